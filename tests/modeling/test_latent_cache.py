"""The latent cache layout and its quantized latent formats (latent_cache.py): round-trip error bounds, row bytes."""

import pytest
import torch

from hf_mla_vlm.modeling.latent_cache import (
    LATENT_DTYPES,
    LatentCacheLayout,
    LatentQuantization,
    parse_latent_format,
    side_row_width,
)


def _latent(shape, seed: int = 0) -> torch.Tensor:
    """Latents with a spread of magnitudes per token and per channel and an outlier channel."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * torch.exp(torch.randn(*shape[:-1], 1, generator=g))
    x[..., 3] *= 40.0  # outlier channel
    return x


def _groups(x: torch.Tensor, fmt: LatentQuantization) -> torch.Tensor:
    return x.reshape(*x.shape[:-1], fmt.num_groups, fmt.group_size)


@pytest.mark.parametrize("dtype", LATENT_DTYPES)
@pytest.mark.parametrize("latent_dim,group_size", [(256, None), (64, 16), (48, 16), (256, 256)])
def test_round_trip_error_is_within_the_format_bound(dtype: str, latent_dim: int, group_size: int | None) -> None:
    """Per group: int8 error <= ~half a step (absmax / 127 / 2), fp8 e4m3 error <= 2^-4 relative (3 mantissa bits)
    plus the subnormal step, int4 error <= ~half a step ((max - min) / 15 / 2). Zero groups come back exactly."""
    fmt = LatentQuantization.create(dtype, latent_dim, group_size)
    x = _latent((3, 5, latent_dim))
    x[0, 0, : fmt.group_size] = 0.0  # a group of zeros (scale 0)
    rows = fmt.quantize(x)
    assert rows.dtype == torch.uint8 and rows.shape == (3, 5, fmt.row_bytes)
    y = fmt.dequantize(rows)
    err, xg = _groups((y - x).abs(), fmt), _groups(x, fmt)
    absmax = xg.abs().amax(-1, keepdim=True)
    if dtype == "int8":
        bound = 0.5 * absmax / 127 * 1.01 + 1e-6
    elif dtype == "fp8":
        bound = 2**-4 * xg.abs() * 1.01 + 2**-9 * absmax / 448 + 1e-6
    else:
        span = xg.amax(-1, keepdim=True) - xg.amin(-1, keepdim=True)
        bound = 0.5 * span / 15 * 1.01 + 1e-3 * absmax + 1e-6  # + the fp16 rounding of the zero point
    assert (err <= bound).all(), f"max excess {(err - bound).max():.3g}"
    assert (y[0, 0, : fmt.group_size] == 0).all()
    assert err.max() > 0  # the quantization is really applied


def test_error_ordering_and_scale_dtype() -> None:
    """On Gaussian latents (no outlier channel: with one, fp8's relative precision beats int8's absmax steps)."""
    x = torch.randn(4, 7, 256, generator=torch.Generator().manual_seed(1))
    errors = {}
    for dtype in LATENT_DTYPES:
        fmt = LatentQuantization.create(dtype, 256)
        errors[dtype] = ((fmt.dequantize(fmt.quantize(x)) - x).norm() / x.norm()).item()
    assert errors["int8"] < errors["fp8"] < errors["int4"]
    fmt = LatentQuantization.create("int8", 256)
    rows = fmt.quantize(x)
    assert fmt.scales(rows).dtype == torch.float16 and fmt.scales(rows).shape == (4, 7, 4)


def test_quantize_is_per_token_and_dtype_independent() -> None:
    """Rows are independent (a token's row does not depend on the others: prefill and decode store the same bytes)
    and the stored bytes do not depend on the compute dtype the latent arrives in beyond its own rounding."""
    fmt = LatentQuantization.create("int4", 64)
    x = _latent((2, 9, 64), seed=2)
    whole = fmt.quantize(x)
    assert torch.equal(torch.cat([fmt.quantize(x[:, :4]), fmt.quantize(x[:, 4:])], dim=1), whole)
    assert torch.equal(fmt.quantize(x.double()), whole)
    y16 = fmt.dequantize(fmt.quantize(x.half()), torch.float16)
    assert y16.dtype == torch.float16


@pytest.mark.parametrize(
    "dtype,latent_dim,group_size,row_bytes",
    [
        ("int8", 256, 64, 256 + 4 * 2 + 8),  # 264 -> padded to 272
        ("fp8", 512, 128, 512 + 4 * 2 + 8),  # FlashMLA's grouping, fp16 scales: 520 -> 528
        ("int4", 256, 64, 128 + 4 * 2 * 2 + 0),  # 144: values 128, scales 8, zero points 8
        ("int8", 48, 16, 48 + 3 * 2 + 10),  # 54 -> 64
        ("int4", 6, 2, 3 + 1 + 3 * 2 * 2),  # values 3, pad 1, 3 scales + 3 zero points: 16
    ],
)
def test_row_bytes(dtype: str, latent_dim: int, group_size: int, row_bytes: int) -> None:
    fmt = LatentQuantization.create(dtype, latent_dim, group_size)
    assert fmt.row_bytes == row_bytes and fmt.row_bytes % 16 == 0
    assert fmt.quantize(torch.randn(2, latent_dim)).shape == (2, row_bytes)


def test_layout_bytes_per_token() -> None:
    """Qwen2.5-VL-7B at rope_dim 32, kv_rank 64 (N = 4, R = 32, L = 256) in bf16: side row 136 elements."""
    layout = LatentCacheLayout(4, 32, 256)
    assert side_row_width(4, 32) == 136
    assert layout.bytes_per_token(torch.bfloat16) == (256 + 136) * 2
    int8 = layout.quantized(LatentQuantization.create("int8", 256))
    assert int8.bytes_per_token(torch.bfloat16) == 272 + 136 * 2
    assert int8.quantized(None) == layout and layout.quantized(None) is layout
    with pytest.raises(ValueError, match="latent of 128"):
        layout.quantized(LatentQuantization.create("int8", 128))


def test_spec_round_trip_and_defaults() -> None:
    for dtype in LATENT_DTYPES:
        fmt = LatentQuantization.create(dtype, 256)
        assert LatentQuantization.from_spec(fmt.spec, 256) == fmt == parse_latent_format(fmt.spec, 256)
    assert LatentQuantization.create("int8", 256).group_size == 64
    assert LatentQuantization.create("fp8", 256).group_size == 128
    assert LatentQuantization.create("int8", 48).group_size == 16  # largest power of two dividing L, up to 64
    assert LatentQuantization.from_spec("fp8", 512).group_size == 128


@pytest.mark.parametrize(
    "args,match",
    [
        (("int3", 64), "must be one of"),
        (("int8", 64, 48), "divisor"),
        (("int4", 7), "even"),
        (("int8", 0), "positive"),
    ],
)
def test_bad_formats_are_refused(args, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LatentQuantization.create(*args)


def test_dequantize_checks_the_rows() -> None:
    fmt = LatentQuantization.create("int8", 64)
    with pytest.raises(ValueError, match="uint8"):
        fmt.dequantize(torch.zeros(2, fmt.row_bytes))
    with pytest.raises(ValueError, match="bytes"):
        fmt.dequantize(torch.zeros(2, fmt.row_bytes + 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="64 columns"):
        fmt.quantize(torch.zeros(2, 32))
