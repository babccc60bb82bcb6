"""Tests of the absorbed MLA decode reference (CPU) and the Triton decode kernel (interpreter on CPU, real on GPU).

How the Triton tests run
------------------------
* ``test_reference_*``: plain torch on CPU, always run. The reference is checked against ordinary attention over
  explicitly decompressed K/V (``mla_decode_decompressed_oracle``), which proves the absorbed formulation.
* ``test_interpreter_*``: the Triton kernel in Triton's CPU interpreter. ``TRITON_INTERPRET=1`` must be set
  before ``triton`` is imported, so these cases are skipped in a normal run and executed instead by
  ``test_triton_kernel_in_interpreter``, which re-runs this file in a subprocess with the variable set. To run them
  directly: ``TRITON_INTERPRET=1 pytest tests/kernels/test_absorbed_decode.py -k test_interpreter_``.
* ``@pytest.mark.gpu`` tests: the compiled kernel on CUDA (skipped without a GPU), e.g. on the device machine:
  ``PYTHONPATH=src python -m pytest tests/kernels/test_absorbed_decode.py -m gpu``.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass

import pytest
import torch

from hf_mla_vlm.kernels import mla_decode_reference
from hf_mla_vlm.modeling.latent_cache import SIDE_ROW_MULTIPLE, side_row_width
from tests.kernels.oracles import absorb_queries, apply_value_up_projection, mla_decode_decompressed_oracle


INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
needs_interpreter = pytest.mark.skipif(
    not (INTERPRET and HAS_TRITON),
    reason="needs TRITON_INTERPRET=1 before triton is imported (run by test_triton_kernel_in_interpreter)",
)
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON and not INTERPRET), reason="needs CUDA and Triton")


@dataclass
class DecodeCase:
    """One random decode problem; the cache tensors keep the model's layout (``(B, 1, T_alloc, ...)``)."""

    q_rope: torch.Tensor  # (B, H, R)
    q_nope: torch.Tensor  # (B, H, D)
    q_latent: torch.Tensor  # (B, H, M, L)
    q_bias: torch.Tensor | None  # (B, H, M)
    keys: torch.Tensor  # (B, 1, T_alloc, L)
    values: torch.Tensor  # (B, 1, T_alloc, N*R + 1 + side_pad)
    key_mask: torch.Tensor | None  # (B, T)
    w_uk: torch.Tensor  # (M, N*D, L)
    w_uv: torch.Tensor  # (M, N*V, L)
    b_k: torch.Tensor | None  # (M, N*D)
    b_v: torch.Tensor | None  # (M, N*V)
    t: int
    n: int
    scale: float

    @property
    def latent(self) -> torch.Tensor:
        return self.keys[:, 0, : self.t]

    @property
    def side(self) -> torch.Tensor:
        return self.values[:, 0, : self.t, : self.n * self.q_rope.shape[-1] + 1]

    def absorbed_args(self) -> tuple:
        return (self.q_rope, self.q_latent, self.q_bias, self.latent, self.side, self.key_mask, self.scale, self.n)


def make_case(
    b: int = 2,
    h: int = 4,
    n: int = 2,
    r: int = 4,
    lat: int = 16,
    t: int = 37,
    m: int = 2,
    *,
    d: int = 8,
    v: int = 8,
    bias: bool = True,
    mask: str = "random",
    image_frac: float = 0.5,
    layout: str = "random",
    poison: bool = True,
    t_extra: int = 3,
    side_pad: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> DecodeCase:
    """Random case. ``mask``: ``none`` | ``random`` | ``left_pad`` (different valid lengths, left padded) |
    ``tail`` (static cache: valid prefix of different lengths) | ``empty_row`` (random, last row fully masked).
    ``layout``: ``random`` (each token is an image token with probability ``image_frac``) | ``runs`` (modality in
    contiguous runs of 1 to 40 tokens, as images sit in a real cache: kernel tiles are image-only, text-only or
    mixed).
    ``poison`` writes NaN into masked rows and into the unused tail of the allocation. ``side_pad`` extra columns
    (NaN) pad the side rows like the model's cache (``side_row_width``)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, s: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * s

    t_alloc = t + t_extra
    keys = rnd(b, 1, t_alloc, lat)
    values = torch.cat([rnd(b, 1, t_alloc, n * r + 1), torch.full((b, 1, t_alloc, side_pad), float("nan"))], -1)
    if layout == "random":
        values[..., n * r] = (torch.rand(b, 1, t_alloc, generator=g) < image_frac).float()
    elif layout == "runs":
        for row in range(b):
            pos, image = 0, bool(torch.rand(1, generator=g) < image_frac)
            while pos < t_alloc:
                run = int(torch.randint(1, 41, (1,), generator=g))
                values[row, 0, pos : pos + run, n * r] = float(image)
                pos, image = pos + run, not image
    else:
        raise ValueError(f"unknown layout {layout!r}")
    key_mask = None
    if mask != "none":
        if mask in ("random", "empty_row"):
            key_mask = torch.rand(b, t, generator=g) > 0.3
            key_mask[:, 0] = True
            if mask == "empty_row":
                key_mask[-1] = False
        else:
            lengths = torch.randint(1, t + 1, (b,), generator=g)
            lengths[0] = t
            pos = torch.arange(t)
            if mask == "left_pad":
                key_mask = pos[None, :] >= (t - lengths)[:, None]
            elif mask == "tail":
                key_mask = pos[None, :] < lengths[:, None]
            else:
                raise ValueError(f"unknown mask kind {mask!r}")
    if poison:
        nan = float("nan")
        keys[:, :, t:] = nan
        values[:, :, t:] = nan
        if key_mask is not None:
            keys[:, 0, :t][~key_mask] = nan
            values[:, 0, :t][~key_mask] = nan
    w_uk = rnd(m, n * d, lat, s=lat**-0.5)
    w_uv = rnd(m, n * v, lat, s=lat**-0.5)
    b_k = rnd(m, n * d) if bias else None
    b_v = rnd(m, n * v) if bias else None
    q_rope = rnd(b, h, r)
    q_nope = rnd(b, h, d)
    q_latent, q_bias = absorb_queries(q_nope, w_uk, b_k, n)
    scale = 1.0 / math.sqrt(r + d)

    def dev(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.to(device)

    def cast(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.to(device=device, dtype=dtype)

    return DecodeCase(
        q_rope=cast(q_rope),
        q_nope=cast(q_nope),
        q_latent=cast(q_latent),
        q_bias=dev(q_bias),
        keys=cast(keys),
        values=cast(values),
        key_mask=dev(key_mask),
        w_uk=dev(w_uk),
        w_uv=dev(w_uv),
        b_k=dev(b_k),
        b_v=dev(b_v),
        t=t,
        n=n,
        scale=scale,
    )


def _assert_finite(*tensors: torch.Tensor) -> None:
    for x in tensors:
        assert not torch.isnan(x).any(), "NaN in output"


# ---------------------------------------------------------------------------------------------------------------
# reference vs decompressed oracle (CPU)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "t,m,bias,mask",
    [
        (1, 1, False, "none"),
        (1, 2, True, "none"),
        (37, 1, False, "random"),
        (37, 2, True, "random"),
        (37, 2, True, "left_pad"),
        (37, 2, False, "tail"),
        (64, 2, True, "empty_row"),
        (5, 1, True, "left_pad"),
    ],
)
def test_reference_matches_decompressed_oracle(t: int, m: int, bias: bool, mask: str) -> None:
    case = make_case(b=3, h=6, n=3, r=4, lat=12, t=t, m=m, bias=bias, mask=mask, d=5, v=7, seed=t + 10 * m)
    ctx, p_sum, lse = mla_decode_reference(*case.absorbed_args())
    out, lse_ref = mla_decode_decompressed_oracle(
        case.q_rope, case.q_nope, case.latent, case.side, case.key_mask, case.scale, case.n,
        case.w_uk, case.w_uv, case.b_k, case.b_v,
    )  # fmt: skip
    _assert_finite(ctx, p_sum, lse)
    o = apply_value_up_projection(ctx, p_sum, case.w_uv, case.b_v, case.n)
    torch.testing.assert_close(o.double(), out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse.double(), lse_ref, rtol=1e-5, atol=1e-5)
    valid = torch.ones(3, t, dtype=torch.bool) if case.key_mask is None else case.key_mask
    has_key = valid.any(dim=1)
    torch.testing.assert_close(p_sum.sum(-1)[has_key], torch.ones_like(p_sum.sum(-1)[has_key]))
    assert (lse[~has_key] == float("-inf")).all()
    assert (ctx[~has_key] == 0).all() and (p_sum[~has_key] == 0).all()


def test_reference_empty_modality_segment() -> None:
    """Text-only cache with M = 2: the image branch gets exactly zero mass and the result equals the M = 1 run."""
    case = make_case(t=29, m=2, image_frac=0.0, mask="left_pad", seed=3)
    ctx, p_sum, lse = mla_decode_reference(*case.absorbed_args())
    assert (ctx[:, :, 1] == 0).all() and (p_sum[:, :, 1] == 0).all()
    one = mla_decode_reference(
        case.q_rope, case.q_latent[:, :, :1], case.q_bias[:, :, :1], case.latent, case.side, case.key_mask,
        case.scale, case.n,
    )  # fmt: skip
    torch.testing.assert_close(ctx[:, :, :1], one[0])
    torch.testing.assert_close(lse, one[2])
    out, _ = mla_decode_decompressed_oracle(
        case.q_rope, case.q_nope, case.latent, case.side, case.key_mask, case.scale, case.n,
        case.w_uk, case.w_uv, case.b_k, case.b_v,
    )  # fmt: skip
    o = apply_value_up_projection(ctx, p_sum, case.w_uv, case.b_v, case.n)
    torch.testing.assert_close(o.double(), out, rtol=1e-4, atol=1e-5)


def test_reference_ignores_poisoned_rows_and_matches_per_sequence_runs() -> None:
    """Different valid lengths per sequence (NaN in the padding) == each sequence on its own unpadded cache."""
    case = make_case(b=3, t=41, mask="left_pad", poison=True, seed=7)
    ctx, p_sum, lse = mla_decode_reference(*case.absorbed_args())
    _assert_finite(ctx, p_sum, lse)
    for i in range(3):
        keep = case.key_mask[i]
        single = mla_decode_reference(
            case.q_rope[i : i + 1], case.q_latent[i : i + 1], case.q_bias[i : i + 1],
            case.latent[i : i + 1, keep], case.side[i : i + 1, keep], None, case.scale, case.n,
        )  # fmt: skip
        torch.testing.assert_close(ctx[i : i + 1], single[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p_sum[i : i + 1], single[1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lse[i : i + 1], single[2], rtol=1e-5, atol=1e-6)


def test_reference_uses_token_modality_not_position() -> None:
    """Swapping a token's flag moves its probability mass to the other branch's accumulator."""
    case = make_case(b=1, t=9, mask="none", poison=False, seed=11)
    case.values[0, 0, :, -1] = 0.0
    case.values[0, 0, 4, -1] = 1.0
    ctx, p_sum, _ = mla_decode_reference(*case.absorbed_args())
    assert torch.all(p_sum[0, :, 1] > 0)
    # only token 4 is an image token: every head's image-branch context is exactly p * c_4
    torch.testing.assert_close(ctx[0, :, 1], p_sum[0, :, 1, None] * case.latent[0, 4][None, :])


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.update(q_rope=torch.cat([a["q_rope"], a["q_rope"][..., :1]], -1)), "side must have shape"),
        (lambda a: a.update(side=a["side"][..., :-1]), "side must have shape"),
        (lambda a: a.update(q_latent=a["q_latent"][:, :, :1].expand(-1, -1, 3, -1)), "M = 1 or 2"),
        (lambda a: a.update(latent=a["latent"][..., :-1]), "latent must have shape"),
        (lambda a: a.update(key_mask=a["key_mask"].float()), "bool"),
        (lambda a: a.update(key_mask=a["key_mask"][:, :-1]), "key_mask must have shape"),
        (lambda a: a.update(q_bias=a["q_bias"][:, :, :1]), "q_bias must have shape"),
        (lambda a: a.update(num_kv_heads=3), "multiple of num_kv_heads"),
        (lambda a: a.update(side=a["side"].double()), "share the cache dtype"),
        (lambda a: a.update(latent=a["latent"][:, :0], side=a["side"][:, :0], key_mask=None), "T >= 1"),
    ],
)
def test_reference_rejects_bad_inputs(mutate, match: str) -> None:
    case = make_case(t=8)
    args = dict(
        q_rope=case.q_rope, q_latent=case.q_latent, q_bias=case.q_bias, latent=case.latent, side=case.side,
        key_mask=case.key_mask, scale=case.scale, num_kv_heads=case.n,
    )  # fmt: skip
    mutate(args)
    with pytest.raises(ValueError, match=match):
        mla_decode_reference(**args)


# ---------------------------------------------------------------------------------------------------------------
# Triton kernel in the CPU interpreter
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(INTERPRET, reason="already inside the interpreter run")
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernel_in_interpreter() -> None:
    """Run the ``test_interpreter_*`` tests of this file in a subprocess with ``TRITON_INTERPRET=1``."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-x", "-k", "test_interpreter_", "-p", "no:cacheprovider"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"interpreter run failed:\n{out[-6000:]}"
    assert " passed" in out and " failed" not in out, out[-3000:]


_INTERP_CASES = [
    # (t, m, r, lat, bias, mask, dtype, num_splits)
    (1, 1, 4, 16, False, "none", torch.float32, None),
    (1, 2, 4, 16, True, "random", torch.float32, 3),
    (5, 2, 4, 16, True, "left_pad", torch.float32, None),
    (5, 1, 4, 16, True, "tail", torch.float16, 2),
    (37, 2, 4, 16, True, "random", torch.float32, None),
    (37, 2, 4, 16, True, "random", torch.float32, 1),
    (37, 2, 4, 16, True, "empty_row", torch.float32, 3),
    (37, 1, 4, 16, False, "left_pad", torch.float32, 2),
    (37, 2, 4, 16, False, "tail", torch.bfloat16, 3),
    (37, 2, 3, 48, True, "random", torch.float32, 2),
    (37, 1, 5, 20, True, "none", torch.float16, None),
]


@needs_interpreter
@pytest.mark.parametrize("t,m,r,lat,bias,mask,dtype,num_splits", _INTERP_CASES)
def test_interpreter_case(t, m, r, lat, bias, mask, dtype, num_splits) -> None:
    from hf_mla_vlm.kernels.absorbed_decode import mla_decode_triton

    case = make_case(b=2, h=4, n=2, r=r, lat=lat, t=t, m=m, bias=bias, mask=mask, dtype=dtype, seed=t + r)
    ref = mla_decode_reference(*case.absorbed_args())
    out = mla_decode_triton(*case.absorbed_args(), num_splits=num_splits)
    _assert_finite(*out)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    for got, want, name in zip(out, ref, ("ctx", "p_sum", "lse")):
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        torch.testing.assert_close(got, want, **tol, msg=lambda s, n=name: f"{n}: {s}")


@needs_interpreter
def test_interpreter_empty_modality_and_block_boundaries() -> None:
    """Text-only cache with M = 2 (empty image segment); T spans several BLOCK_T tiles and splits."""
    from hf_mla_vlm.kernels.absorbed_decode import mla_decode_triton

    case = make_case(b=2, t=70, m=2, image_frac=0.0, mask="left_pad", seed=5)
    ref = mla_decode_reference(*case.absorbed_args())
    for splits, block_t in ((None, 16), (1, 32), (2, 16), (5, 16)):
        out = mla_decode_triton(*case.absorbed_args(), num_splits=splits, block_t=block_t)
        assert (out[0][:, :, 1] == 0).all() and (out[1][:, :, 1] == 0).all()
        for got, want in zip(out, ref):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_interpreter
def test_interpreter_modality_runs() -> None:
    """Modality in runs, so tiles are image-only, text-only and mixed."""
    from hf_mla_vlm.kernels.absorbed_decode import mla_decode_triton

    case = make_case(b=3, t=150, m=2, layout="runs", mask="left_pad", seed=17)
    ref = mla_decode_reference(*case.absorbed_args())
    for splits in (1, 4, 9):
        out = mla_decode_triton(*case.absorbed_args(), num_splits=splits, block_t=16)
        _assert_finite(*out)
        for got, want in zip(out, ref):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("m,lat", [(2, 80), (1, 16), (2, 200)])
def test_interpreter_many_splits(m: int, lat: int) -> None:
    """More splits than the combine reads at once (several chunks, the last one partial) and latent widths over
    several combine column blocks (the last one partial); left padding empties whole splits of one sequence."""
    from hf_mla_vlm.kernels.absorbed_decode import COMBINE_CHUNK_S, _cdiv, mla_decode_triton

    t = 16 * (2 * COMBINE_CHUNK_S + 3)
    case = make_case(b=2, h=4, n=2, r=4, lat=lat, t=t, m=m, layout="runs", mask="left_pad", seed=lat + m)
    ref = mla_decode_reference(*case.absorbed_args())
    effective = lambda splits: _cdiv(t, _cdiv(_cdiv(t, splits), 16) * 16)  # noqa: E731  (the launcher's rounding)
    assert effective(2 * COMBINE_CHUNK_S + 3) == 2 * COMBINE_CHUNK_S + 3  # three chunks, the last of 3 splits
    assert COMBINE_CHUNK_S < effective(COMBINE_CHUNK_S + 4) < 2 * COMBINE_CHUNK_S
    for splits in (2 * COMBINE_CHUNK_S + 3, COMBINE_CHUNK_S + 4, 5):
        out = mla_decode_triton(*case.absorbed_args(), num_splits=splits, block_t=16)
        _assert_finite(*out)
        for got, want in zip(out, ref):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("lat", [80, 200])
def test_interpreter_combine_whole_rows(lat: int, monkeypatch) -> None:
    """With enough (B, H) rows for the SMs, a combine program merges whole latent rows, a few splits per iteration
    (the last chunk partial); as the column-block combine, it equals the reference."""
    from hf_mla_vlm.kernels import absorbed_decode

    monkeypatch.setattr(absorbed_decode, "_sm_count", lambda device: 2)  # B * H = 8 rows fill two waves of 2 SMs
    case = make_case(b=2, h=4, n=2, r=4, lat=lat, t=16 * 21, m=2, layout="runs", mask="left_pad", seed=lat)
    chunk_s, block_l = absorbed_decode.choose_combine_tile(8, lat, 21, 2)
    assert block_l >= lat and 21 % chunk_s and chunk_s < 21  # one column block; several chunks, the last partial
    ref = mla_decode_reference(*case.absorbed_args())
    out = absorbed_decode.mla_decode_triton(*case.absorbed_args(), num_splits=21, block_t=16)
    _assert_finite(*out)
    for got, want in zip(out, ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interpreter_padded_side_rows(dtype: torch.dtype) -> None:
    """Side rows padded to 16-byte units (the model's cache layout) take the aligned-load path; the NaN padding
    columns are never read."""
    from hf_mla_vlm.kernels.absorbed_decode import _row_alignment, mla_decode_triton

    per_16b = 16 // torch.empty((), dtype=dtype).element_size()
    width = side_row_width(2, 4)
    assert width % SIDE_ROW_MULTIPLE == 0 and width >= 2 * 4 + 1
    pad = -(-(2 * 4 + 1) // per_16b) * per_16b - (2 * 4 + 1)
    case = make_case(b=3, n=2, r=4, t=70, m=2, layout="runs", mask="left_pad", side_pad=pad, dtype=dtype, seed=31)
    assert _row_alignment(case.side) == per_16b
    assert _row_alignment(make_case(t=8, dtype=dtype).side) == 1  # N*R + 1 = 9 elements: unaligned rows
    ref = mla_decode_reference(*case.absorbed_args())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    for splits in (1, 4):
        out = mla_decode_triton(*case.absorbed_args(), num_splits=splits, block_t=16)
        _assert_finite(*out)
        for got, want in zip(out, ref):
            torch.testing.assert_close(got, want, **tol)


@needs_interpreter
@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("h,n,block_h", [(40, 4, 16), (24, 3, 8), (20, 1, 16), (48, 2, None)])
def test_interpreter_head_blocks(h: int, n: int, block_h: int | None, m: int) -> None:
    """Heads split across programs (the last block partly empty when BLOCK_H does not divide H), with and without
    split-K: every head's row equals the reference."""
    from hf_mla_vlm.kernels.absorbed_decode import mla_decode_triton

    if block_h is not None and m * block_h < 16:
        pytest.skip("fewer than 16 rows per program")
    case = make_case(b=2, h=h, n=n, r=4, lat=16, t=45, m=m, mask="left_pad", seed=h + m)
    ref = mla_decode_reference(*case.absorbed_args())
    for splits in (1, 3):
        out = mla_decode_triton(*case.absorbed_args(), num_splits=splits, block_h=block_h)
        _assert_finite(*out)
        for got, want in zip(out, ref):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


_BY_BRANCH_CASES = [
    # (t, layout, image_frac, mask, cache dtype, h, n)
    (150, "runs", 0.5, "left_pad", torch.float32, 6, 2),
    (150, "random", 0.5, "random", torch.float32, 40, 4),  # mixed tiles; three head blocks of 16
    (150, "runs", 0.5, "empty_row", torch.float16, 4, 2),
    (90, "random", 0.0, "tail", torch.bfloat16, 4, 2),  # text only: every image range empty
    (90, "random", 1.0, "none", torch.float32, 4, 1),  # image only (the decode token too)
    (600, "runs", 0.5, "left_pad", torch.float32, 4, 2),  # chunks of more flags than one prologue step
]


@needs_interpreter
@pytest.mark.parametrize("t,layout,image_frac,mask,dtype,h,n", _BY_BRANCH_CASES)
def test_interpreter_by_branch(t, layout, image_frac, mask, dtype, h, n) -> None:
    """Stage 1 by branch (each branch's queries over its own range of every chunk): the reference's outputs with
    one or several splits, partial head blocks, masks that empty whole ranges or rows, and one-branch caches."""
    from hf_mla_vlm.kernels.absorbed_decode import FLAG_BLOCK, mla_decode_triton

    case = make_case(b=3, h=h, n=n, r=4, lat=24, t=t, m=2, layout=layout, image_frac=image_frac, mask=mask,
                     dtype=dtype, seed=t + h)  # fmt: skip
    ref = mla_decode_reference(*case.absorbed_args())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    assert t < FLAG_BLOCK or t > 2 * FLAG_BLOCK
    for splits, block_t, block_h in ((1, 16, None), (4, 16, 16), (9, 32, None)):
        out = mla_decode_triton(*case.absorbed_args(), num_splits=splits, block_t=block_t, block_h=block_h,
                                by_branch=True)  # fmt: skip
        _assert_finite(*out)
        for got, want, name in zip(out, ref, ("ctx", "p_sum", "lse")):
            torch.testing.assert_close(got, want, **tol, msg=lambda s, n=name, k=splits: f"{n} ({k} splits): {s}")
        if image_frac in (0.0, 1.0):  # the absent branch has no keys: exactly zero
            absent = 1 if image_frac == 0.0 else 0
            assert (out[0][:, :, absent] == 0).all() and (out[1][:, :, absent] == 0).all()
    with pytest.raises(ValueError, match="block_h >= 16"):
        mla_decode_triton(*case.absorbed_args(), block_h=8, by_branch=True)  # one row per head: 8 rows


@needs_interpreter
def test_interpreter_strided_queries() -> None:
    """q_latent / q_bias may be views with any (B, H) strides (the model slices both out of one matmul result)."""
    from hf_mla_vlm.kernels.absorbed_decode import mla_decode_triton

    case = make_case(b=2, h=4, n=2, lat=16, t=40, m=2, mask="left_pad", seed=23)
    b, h, m, lat = case.q_latent.shape
    packed = torch.cat([case.q_latent.reshape(b, h, m * lat), case.q_bias], dim=-1)  # (B, H, M*L + M)
    packed = torch.cat([packed, torch.full_like(packed[..., :3], float("nan"))], dim=-1)  # unused NaN columns
    q_latent = packed[..., : m * lat].view(b, h, m, lat)
    q_bias = packed[..., m * lat : m * lat + m]
    assert not q_latent.is_contiguous() and not q_bias.is_contiguous()
    args = list(case.absorbed_args())
    args[1], args[2] = q_latent, q_bias
    ref = mla_decode_reference(*case.absorbed_args())
    for splits in (1, 3):
        out = mla_decode_triton(*args, num_splits=splits)
        for got, want in zip(out, ref):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_interpreter
def test_interpreter_rejects_bad_inputs() -> None:
    from hf_mla_vlm.kernels.absorbed_decode import mla_decode_triton

    case = make_case(t=8)
    with pytest.raises(ValueError, match="num_splits"):
        mla_decode_triton(*case.absorbed_args(), num_splits=0)
    with pytest.raises(ValueError, match="contiguous in their last dim"):
        args = list(case.absorbed_args())
        args[3] = case.keys[:, 0, :8].transpose(1, 2).contiguous().transpose(1, 2)
        mla_decode_triton(*args)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        args = list(case.absorbed_args())
        args[3], args[4] = args[3].double(), args[4].double()
        args[0], args[1] = args[0].double(), args[1].double()
        mla_decode_triton(*args)


@pytest.mark.skipif(INTERPRET or not HAS_TRITON, reason="checks the error raised outside the interpreter")
def test_triton_launcher_rejects_cpu_tensors_without_interpreter() -> None:
    from hf_mla_vlm.kernels.absorbed_decode import mla_decode_triton

    case = make_case(t=8)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        mla_decode_triton(*case.absorbed_args())


# ---------------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------------

# per-dtype tolerances: (ctx relative to max|ctx_ref|, p_sum absolute, lse absolute)
_GPU_TOL = {
    torch.float32: (1e-4, 1e-5, 1e-4),
    torch.float16: (4e-3, 2e-3, 2e-3),
    torch.bfloat16: (2e-2, 1e-2, 1e-2),
}


def _check_gpu(out, ref, dtype: torch.dtype) -> None:
    ctx, p_sum, lse = out
    ctx_r, p_sum_r, lse_r = ref
    _assert_finite(ctx, p_sum, lse)
    t_ctx, t_ps, t_lse = _GPU_TOL[dtype]
    rel = (ctx - ctx_r).abs().max() / ctx_r.abs().max().clamp_min(1e-6)
    assert rel <= t_ctx, f"ctx rel err {rel:.3g} > {t_ctx}"
    assert (p_sum - p_sum_r).abs().max() <= t_ps
    both_inf = (lse == float("-inf")) & (lse_r == float("-inf"))
    assert torch.equal(lse == float("-inf"), lse_r == float("-inf")), "empty rows differ"
    diff = (lse - lse_r)[~both_inf].abs()
    assert diff.numel() == 0 or diff.max() <= t_lse, f"lse abs err {diff.max():.3g} > {t_lse}"


_GPU_SHAPES = {
    # name: (h, n, r, lat)
    "qwen_l256": (28, 4, 32, 256),
    "qwen_l512": (28, 4, 32, 512),
    "llama_l256": (32, 8, 32, 256),
    "llama_l512": (32, 8, 32, 512),
    "odd": (12, 3, 24, 48),
}


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", list(_GPU_SHAPES))
@pytest.mark.parametrize(
    "t,m,mask,bias",
    [(1, 2, "none", True), (37, 1, "random", False), (1000, 2, "left_pad", True), (4099, 2, "tail", True)],
)
def test_gpu_kernel_matches_reference(shape: str, dtype: torch.dtype, t: int, m: int, mask: str, bias: bool) -> None:
    from hf_mla_vlm.kernels import mla_decode_triton

    h, n, r, lat = _GPU_SHAPES[shape]
    case = make_case(
        b=3, h=h, n=n, r=r, lat=lat, t=t, m=m, d=128 - r, v=128, bias=bias, mask=mask, dtype=dtype, device="cuda",
        seed=t,
    )  # fmt: skip
    ref = mla_decode_reference(*case.absorbed_args())
    out = mla_decode_triton(*case.absorbed_args())
    _check_gpu(out, ref, dtype)


@gpu
@needs_cuda
@pytest.mark.parametrize("by_branch", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("num_splits", [None, 1, 9])
@pytest.mark.parametrize("shape", ["qwen_l256", "qwen_l512", "llama_l256", "odd"])
def test_gpu_modality_runs(shape: str, num_splits: int | None, padded: bool, by_branch: bool) -> None:
    """Image/text runs (pure and mixed tiles, chunks without one branch), NaN in the padding, different lengths;
    side rows as the model pads them (aligned loads) or unpadded."""
    from hf_mla_vlm.kernels import mla_decode_triton
    from hf_mla_vlm.kernels.absorbed_decode import _row_alignment

    h, n, r, lat = _GPU_SHAPES[shape]
    case = make_case(
        b=3, h=h, n=n, r=r, lat=lat, t=4099, m=2, d=128 - r, v=128, layout="runs", mask="left_pad",
        side_pad=side_row_width(n, r) - n * r - 1 if padded else 0, dtype=torch.bfloat16, device="cuda", seed=lat,
    )  # fmt: skip
    assert (_row_alignment(case.side) > 1) == padded
    ref = mla_decode_reference(*case.absorbed_args())
    out = mla_decode_triton(*case.absorbed_args(), num_splits=num_splits, by_branch=by_branch)
    _check_gpu(out, ref, torch.bfloat16)


@gpu
@needs_cuda
@pytest.mark.parametrize("num_splits", [1, 2, 7, 64, 10_000])
@pytest.mark.parametrize("mask", ["empty_row", "left_pad"])
def test_gpu_num_splits_and_empty_segments(num_splits: int, mask: str) -> None:
    from hf_mla_vlm.kernels import mla_decode_triton

    case = make_case(
        b=4, h=28, n=4, r=32, lat=256, t=2053, m=2, d=96, v=128, mask=mask, image_frac=0.0, dtype=torch.bfloat16,
        device="cuda", seed=num_splits,
    )  # fmt: skip
    ref = mla_decode_reference(*case.absorbed_args())
    out = mla_decode_triton(*case.absorbed_args(), num_splits=num_splits)
    _check_gpu(out, ref, torch.bfloat16)
    assert (out[0][:, :, 1] == 0).all() and (out[1][:, :, 1] == 0).all()


@gpu
@needs_cuda
@pytest.mark.parametrize("by_branch", [False, True])
def test_gpu_cuda_graph_replay_with_new_lengths(by_branch: bool) -> None:
    """The launcher does no host sync: capture it once, then change the cache contents, the key mask (valid lengths)
    and the queries in place and replay; every replay must match the reference (the by-branch kernel's token ranges
    are read on the device, from the replayed cache)."""
    from hf_mla_vlm.kernels import mla_decode_triton

    dtype = torch.bfloat16
    case = make_case(
        b=4, h=28, n=4, r=32, lat=256, t=3000, m=2, d=96, v=128, mask="tail", dtype=dtype, device="cuda", seed=1,
        poison=False,
    )  # fmt: skip
    args = case.absorbed_args()
    mla_decode_triton(*args, by_branch=by_branch)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = mla_decode_triton(*args, by_branch=by_branch)
    for step in range(3):
        fresh = make_case(
            b=4, h=28, n=4, r=32, lat=256, t=3000, m=2, d=96, v=128, mask="tail", dtype=dtype, device="cuda",
            seed=100 + step,
        )  # fmt: skip
        case.q_rope.copy_(fresh.q_rope)
        case.q_latent.copy_(fresh.q_latent)
        case.q_bias.copy_(fresh.q_bias)
        case.keys.copy_(fresh.keys)
        case.values.copy_(fresh.values)
        case.key_mask.copy_(fresh.key_mask)
        if step == 2:
            case.key_mask[1] = False  # a sequence with nothing valid
        graph.replay()
        torch.cuda.synchronize()
        _check_gpu(static_out, mla_decode_reference(*args), dtype)


@gpu
@needs_cuda
def test_gpu_runtime_length_does_not_recompile() -> None:
    from hf_mla_vlm.kernels import mla_decode_triton
    from hf_mla_vlm.kernels.absorbed_decode import _mla_decode_stage1

    def n_compiled() -> int | None:
        caches = getattr(_mla_decode_stage1, "device_caches", None)
        if caches is None:
            return None
        return sum(len(entry[0]) for entry in caches.values())

    case = make_case(h=28, n=4, r=32, lat=256, t=4000, m=2, d=96, v=128, dtype=torch.bfloat16, device="cuda")
    args = list(case.absorbed_args())
    mla_decode_triton(*args, num_splits=4)
    before = n_compiled()
    if before is None:
        pytest.skip("this Triton version does not expose its kernel cache")
    for t in (1001, 2048, 3999, 777):
        args[3], args[4], args[5] = case.keys[:, 0, :t], case.values[:, 0, :t], case.key_mask[:, :t]
        out = mla_decode_triton(*args, num_splits=4)
        _check_gpu(out, mla_decode_reference(*args), torch.bfloat16)
    # a DynamicCache holds fresh contiguous tensors whose batch strides (T * (N*R + 1), T) change with T
    for t in (1001, 1008, 1009, 1024):
        args[3], args[4] = case.keys[:, 0, :t].contiguous(), case.values[:, 0, :t].contiguous()
        args[5] = case.key_mask[:, :t].contiguous()
        out = mla_decode_triton(*args, num_splits=4)
        _check_gpu(out, mla_decode_reference(*args), torch.bfloat16)
    assert n_compiled() == before


@gpu
@needs_cuda
@pytest.mark.parametrize(
    "block_t,num_warps,num_stages", [(64, 8, 3), (64, 8, 2), (32, 8, 3), (32, 8, 2), (32, 4, 2), (16, 8, 1)]
)
@pytest.mark.parametrize("lat", [256, 512])
def test_gpu_tile_configs(block_t: int, num_warps: int, num_stages: int, lat: int) -> None:
    """Every tile configuration the benchmark's tuner may pick computes the same function."""
    from triton.runtime.errors import OutOfResources

    from hf_mla_vlm.kernels import mla_decode_triton

    case = make_case(
        b=3, h=28, n=4, r=32, lat=lat, t=1531, m=2, d=96, v=128, mask="left_pad", dtype=torch.bfloat16,
        device="cuda", seed=lat + block_t,
    )  # fmt: skip
    ref = mla_decode_reference(*case.absorbed_args())
    for splits in (1, 3):
        try:
            out = mla_decode_triton(
                *case.absorbed_args(), num_splits=splits, block_t=block_t, num_warps=num_warps, num_stages=num_stages
            )
        except OutOfResources:
            pytest.skip("this explicit configuration does not fit in shared memory")
        _check_gpu(out, ref, torch.bfloat16)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("h", [16, 32, 64, 128])
@pytest.mark.parametrize("t,mask", [(1, "none"), (777, "left_pad"), (8193, "tail")])
def test_gpu_many_heads_deepseek_shape(h: int, t: int, mask: str, dtype: torch.dtype) -> None:
    """DeepSeek-style MQA over the latent (one kv head, latent 512, rope 64) at 16-128 query heads: the larger
    head counts run in several head blocks instead of falling back to the reference."""
    from hf_mla_vlm.kernels import mla_decode_triton
    from hf_mla_vlm.kernels.absorbed_decode import _NO_FIT

    case = make_case(b=2, h=h, n=1, r=64, lat=512, t=t, m=1, d=128, v=128, bias=False, mask=mask, dtype=dtype,
                     device="cuda", seed=h + t)  # fmt: skip
    ref = mla_decode_reference(*case.absorbed_args())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the "does not fit ... using the torch reference" warning fails the test
        out = mla_decode_triton(*case.absorbed_args())
    assert not [key for key in _NO_FIT if key[:3] == (dtype, 512, 1)]  # served by the kernel, not the reference
    _check_gpu(out, ref, dtype)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("lat,r", [(128, 16), (1024, 64), (96, 24)])
@pytest.mark.parametrize("m,by_branch", [(1, False), (2, False), (2, True)])
def test_gpu_latent_widths(lat: int, r: int, m: int, by_branch: bool, dtype: torch.dtype) -> None:
    """The latent widths of the contract (128-1024, and one that is not a power of two) with both stage-1 kernels,
    served by the kernel (no "does not fit" fallback to the reference)."""
    from hf_mla_vlm.kernels import mla_decode_triton
    from hf_mla_vlm.kernels.absorbed_decode import _NO_FIT

    case = make_case(b=2, h=16, n=2, r=r, lat=lat, t=3001, m=m, d=128 - r, v=128, layout="runs", mask="left_pad",
                     side_pad=side_row_width(2, r) - 2 * r - 1, dtype=dtype, device="cuda", seed=lat + m)  # fmt: skip
    ref = mla_decode_reference(*case.absorbed_args())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = mla_decode_triton(*case.absorbed_args(), by_branch=by_branch)
    assert not [key for key in _NO_FIT if key[:3] == (dtype, lat, m)]
    _check_gpu(out, ref, dtype)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_choose_block_h_bounds_the_accumulator() -> None:
    from hf_mla_vlm.kernels.absorbed_decode import MAX_ACCUMULATOR_ELEMENTS, choose_block_h

    assert choose_block_h(28, 2, 256) == 32  # Qwen2.5-VL-7B, latent 256: all heads in one program
    assert choose_block_h(16, 1, 512) == 16
    assert choose_block_h(128, 1, 512) == 64  # DeepSeek's 128 heads: two head blocks
    assert choose_block_h(28, 2, 512) == 32  # the converted models keep all heads in one program
    for h, m, block_l in ((4, 1, 16), (4, 2, 16), (128, 2, 1024), (64, 1, 512), (28, 2, 512)):
        block_h = choose_block_h(h, m, block_l)
        assert m * block_h >= 16 and block_h & (block_h - 1) == 0
        assert m * block_h * block_l <= MAX_ACCUMULATOR_ELEMENTS or m * block_h == 16


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_choose_num_splits_fills_waves() -> None:
    from hf_mla_vlm.kernels.absorbed_decode import choose_num_splits

    assert choose_num_splits(64, 37, 132, 64) == 1
    for b, t in ((16, 8192), (64, 8192), (16, 32768), (64, 32768)):
        s = choose_num_splits(b, t, 132, 64)
        programs = b * s
        assert programs / (132 * -(-programs // 132)) > 0.9, (b, t, s)
    assert choose_num_splits(1, 32768, 132, 64) > 32  # one sequence still spreads over many SMs
    assert choose_num_splits(16, 8192, 132, 32, programs_per_sm=2) == 2 * choose_num_splits(16, 8192, 132, 32)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_choose_combine_tile_keeps_whole_rows_when_the_rows_fill_the_sms() -> None:
    from hf_mla_vlm.kernels.absorbed_decode import COMBINE_BLOCK_L, COMBINE_TILE_ELEMENTS, choose_combine_tile

    assert choose_combine_tile(1 * 28, 512, 127, 132) == (32, COMBINE_BLOCK_L)  # batch 1: 64-column blocks
    assert choose_combine_tile(16 * 28, 512, 8, 132) == (4, 512)  # batch 16: whole rows
    assert choose_combine_tile(64 * 28, 256, 4, 132) == (4, 256)  # never more splits than there are
    for rows, lat, splits in ((1, 1024, 200), (4096, 1024, 3), (28, 128, 2), (4096, 80, 40)):
        chunk_s, block_l = choose_combine_tile(rows, lat, splits, 132)
        assert chunk_s >= 2 and chunk_s & (chunk_s - 1) == 0 and block_l & (block_l - 1) == 0
        assert 2 * chunk_s * block_l <= COMBINE_TILE_ELEMENTS


# ---------------------------------------------------------------------------------------------------------------
# quantized latent (int8 / fp8 / int4 rows of latent_cache.LatentQuantization)
# ---------------------------------------------------------------------------------------------------------------


def quantize_case(case: DecodeCase, dtype: str, group_size: int | None = None, poison: bool = True):
    """``case`` with its latent stored as quantized rows: returns ``(args, rows, spec)``, ``args`` the absorbed
    arguments with ``latent`` = the ``(B, T, K)`` uint8 view and ``latent_format`` appended. With ``poison`` the
    masked rows and the unused tail hold 0xFF bytes (NaN fp16 scales, NaN fp8 values)."""
    from hf_mla_vlm.modeling.latent_cache import LatentQuantization

    lat = case.keys.shape[-1]
    fmt = LatentQuantization.create(dtype, lat, group_size)
    keys = torch.nan_to_num(case.keys.float(), nan=0.0)  # NaN-poisoned float rows are re-poisoned as bytes below
    rows = fmt.quantize(keys).to(case.keys.device)  # (B, 1, T_alloc, K)
    if poison:
        rows[:, :, case.t :] = 0xFF
        if case.key_mask is not None:
            rows[:, 0, : case.t][~case.key_mask] = 0xFF
    args = list(case.absorbed_args())
    args[3] = rows[:, 0, : case.t]
    return args, rows, fmt.spec


_QUANT_REF_CASES = [(dt, m, mask) for dt in ("int8", "fp8", "int4") for m, mask in ((1, "none"), (2, "left_pad"))]


@pytest.mark.parametrize("dtype,m,mask", _QUANT_REF_CASES)
def test_reference_quantized_latent_equals_dequantized_cache(dtype: str, m: int, mask: str) -> None:
    """The reference with a latent_format equals the reference on the dequantized latent (float rows), and the
    poisoned (0xFF: NaN scales) masked rows and unused tail never reach the outputs."""
    from hf_mla_vlm.modeling.latent_cache import LatentQuantization

    case = make_case(b=3, h=4, n=2, r=4, lat=32, t=37, m=m, mask=mask, seed=41)
    args, rows, spec = quantize_case(case, dtype, group_size=16)
    out = mla_decode_reference(*args, latent_format=spec)
    _assert_finite(*out)
    dequantized = LatentQuantization.from_spec(spec, 32).dequantize(rows[:, 0, : case.t])
    plain = list(args)
    plain[3] = dequantized
    ref = mla_decode_reference(*plain)
    for got, want in zip(out, ref):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    unquantized = mla_decode_reference(*case.absorbed_args())
    assert (out[0] - unquantized[0]).abs().max() > 0  # the quantization is really applied


def test_reference_rejects_bad_quantized_rows() -> None:
    case = make_case(t=8, lat=16)
    args, _, spec = quantize_case(case, "int8")
    with pytest.raises(ValueError, match="uint8 rows"):
        mla_decode_reference(*args[:3], args[3][..., :-16], *args[4:], latent_format=spec)
    with pytest.raises(ValueError, match="uint8 rows"):
        mla_decode_reference(*case.absorbed_args(), latent_format=spec)  # float latent with a format
    with pytest.raises(ValueError, match="must be one of"):
        mla_decode_reference(*args, latent_format="int3:16")


_INTERP_QUANT_CASES = [
    # (dtype, group, t, m, mask, cache dtype, num_splits)
    ("int8", 16, 1, 1, "none", torch.float32, None),
    ("int8", 32, 37, 2, "left_pad", torch.float32, 3),
    ("int8", 8, 37, 2, "empty_row", torch.float16, 2),
    ("fp8", 32, 5, 2, "tail", torch.float32, None),
    ("fp8", 16, 37, 1, "random", torch.bfloat16, 3),
    ("int4", 16, 37, 2, "left_pad", torch.float32, 2),
    ("int4", 32, 37, 2, "random", torch.float16, 1),
    ("int4", 8, 70, 1, "tail", torch.float32, 5),
]


@needs_interpreter
@pytest.mark.parametrize("dtype,group,t,m,mask,cache_dtype,num_splits", _INTERP_QUANT_CASES)
def test_interpreter_quantized_latent(dtype, group, t, m, mask, cache_dtype, num_splits) -> None:
    """The kernel dequantizes the stored rows itself: it equals the reference with the same latent_format, with
    odd lengths, empty rows, padding and 0xFF-poisoned (NaN-scale) unused rows."""
    from hf_mla_vlm.kernels.absorbed_decode import mla_decode_triton

    case = make_case(b=2, h=4, n=2, r=4, lat=32, t=t, m=m, mask=mask, dtype=cache_dtype, seed=t + group)
    args, _, spec = quantize_case(case, dtype, group)
    ref = mla_decode_reference(*args, latent_format=spec)
    out = mla_decode_triton(*args, num_splits=num_splits, latent_format=spec)
    _assert_finite(*out)
    tol = dict(rtol=1e-5, atol=1e-5) if cache_dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    for got, want, name in zip(out, ref, ("ctx", "p_sum", "lse")):
        torch.testing.assert_close(got, want, **tol, msg=lambda s, n=name: f"{n}: {s}")


@needs_interpreter
@pytest.mark.parametrize("dtype", ["int8", "fp8", "int4"])
@pytest.mark.parametrize("group", [16, 24])
def test_interpreter_quantized_padded_rows_and_empty_segment(dtype: str, group: int) -> None:
    """The model's layout (side rows padded to 16 bytes, odd latent width 48 in groups of 16, or of 24: a group size
    that is not a power of two takes the per-element path) and a text-only cache with two branches (an empty image
    segment), over several tiles and splits."""
    from hf_mla_vlm.kernels.absorbed_decode import mla_decode_triton

    pad = side_row_width(2, 4) - 2 * 4 - 1
    case = make_case(b=3, n=2, r=4, lat=48, t=70, m=2, image_frac=0.0, mask="left_pad", side_pad=pad, seed=9)
    args, _, spec = quantize_case(case, dtype, group)
    ref = mla_decode_reference(*args, latent_format=spec)
    for splits in (1, 4):
        out = mla_decode_triton(*args, num_splits=splits, block_t=16, latent_format=spec)
        assert (out[0][:, :, 1] == 0).all() and (out[1][:, :, 1] == 0).all()
        for got, want in zip(out, ref):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("dtype", ["int8", "fp8", "int4"])
def test_interpreter_by_branch_quantized(dtype: str) -> None:
    """Stage 1 by branch reads and dequantizes the stored rows as the fused kernel does (padded side rows, modality
    runs, 0xFF-poisoned masked rows)."""
    from hf_mla_vlm.kernels.absorbed_decode import mla_decode_triton

    pad = side_row_width(2, 4) - 2 * 4 - 1
    case = make_case(b=2, n=2, r=4, lat=48, t=90, m=2, layout="runs", mask="left_pad", side_pad=pad, seed=13)
    args, _, spec = quantize_case(case, dtype, 16)
    ref = mla_decode_reference(*args, latent_format=spec)
    for splits in (1, 3):
        out = mla_decode_triton(*args, num_splits=splits, block_t=16, latent_format=spec, by_branch=True)
        _assert_finite(*out)
        for got, want in zip(out, ref):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", ["int8", "fp8", "int4"])
@pytest.mark.parametrize("shape", ["qwen_l256", "qwen_l512", "llama_l256", "odd"])
@pytest.mark.parametrize("t,m,mask,num_splits", [(1, 2, "none", None), (1000, 2, "left_pad", None),
                                                 (4099, 2, "tail", 9), (2053, 1, "empty_row", None)])  # fmt: skip
def test_gpu_quantized_kernel_matches_reference(shape: str, dtype: str, t: int, m: int, mask: str, num_splits) -> None:
    from hf_mla_vlm.kernels import mla_decode_triton

    h, n, r, lat = _GPU_SHAPES[shape]
    case = make_case(
        b=3, h=h, n=n, r=r, lat=lat, t=t, m=m, d=128 - r, v=128, layout="runs", mask=mask,
        side_pad=side_row_width(n, r) - n * r - 1, dtype=torch.bfloat16, device="cuda", seed=t + lat,
    )  # fmt: skip
    args, _, spec = quantize_case(case, dtype)
    ref = mla_decode_reference(*args, latent_format=spec)
    out = mla_decode_triton(*args, num_splits=num_splits, latent_format=spec)
    _check_gpu(out, ref, torch.bfloat16)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", ["int8", "fp8", "int4"])
def test_gpu_quantized_cuda_graph_replay(dtype: str) -> None:
    """Capture the quantized launch once, rewrite the stored rows, the valid lengths and the queries in place,
    replay: every replay matches the reference (the launcher reads the rows in place, no host sync)."""
    from hf_mla_vlm.kernels import mla_decode_triton

    def fresh(seed: int):
        case = make_case(
            b=4, h=28, n=4, r=32, lat=256, t=3000, m=2, d=96, v=128, mask="tail", dtype=torch.bfloat16,
            device="cuda", seed=seed, poison=False,
        )  # fmt: skip
        return case, *quantize_case(case, dtype, poison=False)

    case, args, rows, spec = fresh(1)
    mla_decode_triton(*args, latent_format=spec)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = mla_decode_triton(*args, latent_format=spec)
    for step in range(3):
        new_case, _, new_rows, _ = fresh(100 + step)
        for name in ("q_rope", "q_latent", "q_bias", "values", "key_mask"):
            getattr(case, name).copy_(getattr(new_case, name))
        rows.copy_(new_rows)
        if step == 2:
            case.key_mask[1] = False
        graph.replay()
        torch.cuda.synchronize()
        _check_gpu(static_out, mla_decode_reference(*args, latent_format=spec), torch.bfloat16)
