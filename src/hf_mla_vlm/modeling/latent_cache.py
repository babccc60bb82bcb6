# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
r"""The layout of the latent KV cache: the one place that writes and reads it.

Symbols (stated once, vLLM's letters; used by the attention, the kernels, the conversion and the report):

| symbol | meaning                                                     |
|--------|-------------------------------------------------------------|
| `H`    | query heads; `N` key/value heads, `G = H / N` per kv group  |
| `D`    | head dim of the original model (`1/sqrt(D)` stays the scale)|
| `R`    | kept rotary (rope) dims per head                            |
| `P`    | no-rope dims per head, `D - R`                              |
| `V`    | value dims per head (`D`)                                   |
| `L`    | latent width per token, `N * kv_rank`, shared by all heads  |
| `M`    | modality branches: 1, or 2 (0 = text, 1 = image)            |

Per token and decoder layer an MLA model caches two rows, in the two slots of a Transformers cache layer; both are
single-"head" tensors, so `DynamicCache`, `StaticCache`, beam reordering and cropping work unchanged:

    keys    (B, 1, T, L)      the latent  c = W_dkv^m x
    values  (B, 1, T, W)      the side row: [rope keys (N*R, kv-head major) | modality flag | zero padding]

The rope keys are post-RoPE. The flag is `1.0` for a token of the image branch and `0.0` for text (`is_image`: > 0.5).
`W = side_row_width(N, R)` pads the row to whole 16-byte units (multiples of `SIDE_ROW_MULTIPLE` elements in half
precision) so that every row starts on a 16-byte boundary and the GPU kernel loads it with vectorised asynchronous
copies. The decode kernel and its torch reference read the views `latent (B, T, L)` and `side (B, T, N*R + 1)`.

Quantized latent (`LatentQuantization`, `MLAQuantizedCache` in `quantized_cache.py`): the keys slot then holds one
row of bytes per token instead of `L` compute-dtype elements; the side row is unchanged (rope keys stay in the compute
dtype, the modality flag is never quantized). Groups of `group_size` consecutive latent elements share their scales
(`K` bytes per row):

    keys    (B, 1, T, K)  uint8  [values | pad to 2 bytes | fp16 scales (L / group_size) | fp16 zero points
                                  (int4 only) | pad to 16 bytes]

| format | values                                        | dequantized element |
|--------|-----------------------------------------------|---------------------|
| `int8` | `L` int8, symmetric, `scale = absmax / 127`    | `q * scale`         |
| `fp8`  | `L` float8 e4m3, `scale = absmax / 448`        | `float(q) * scale`  |
| `int4` | `L / 2` bytes, asymmetric 0..15, `scale = (max - min) / 15`, zero point `min` | `q * scale + zero` |

int4 packs "split halves": byte `k` holds element `k` in its low nibble and element `k + L/2` in its high nibble.
`group_size = L` is one scale per token (FlashMLA's FP8 cache keeps 4 fp32 scales of 128 for its 512 latent values).
Rows are padded to 16 bytes like the side rows. The torch `quantize` / `dequantize` here are the reference the decode
kernel's in-loop dequantization is tested against.

This file is part of the remote-code bundle: it imports only torch.
"""

import functools
import math
from dataclasses import dataclass, replace

import torch


SIDE_ROW_MULTIPLE = 8  # elements: 16 bytes in float16 / bfloat16
ROW_ALIGN_BYTES = 16  # quantized latent rows are padded to whole 16-byte units too

# Quantized latent formats, with the group size taken when none is given (reduced to the largest power of two that
# divides L when L is not a multiple of it).
LATENT_DTYPES = ("int8", "fp8", "int4")
DEFAULT_GROUP_SIZE = {"int8": 64, "fp8": 128, "int4": 64}
_QMAX = {"int8": 127.0, "fp8": 448.0, "int4": 15.0}


def side_row_width(num_kv_heads: int, rope_dim: int) -> int:
    """Elements per token of the cache's "values" slot: N*R rope keys, the modality flag, zero padding."""
    return -(-(num_kv_heads * rope_dim + 1) // SIDE_ROW_MULTIPLE) * SIDE_ROW_MULTIPLE


def is_image(flags: torch.Tensor) -> torch.Tensor:
    """The cached modality flags (any float dtype) as booleans: True for the image branch."""
    return flags.float() > 0.5


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


@dataclass(frozen=True)
class LatentQuantization:
    """A quantized latent format: `dtype` ("int8", "fp8" or "int4"), latent width `latent_dim` (L) and `group_size`
    (dividing L: consecutive latent elements sharing one fp16 scale, and for int4 one fp16 zero point).

    Build it with `LatentQuantization.create(dtype, latent_dim, group_size=None)` (checks and defaults) or from the
    short `spec` string the decode kernels take (`from_spec("int8:64", latent_dim)`).
    """

    dtype: str
    latent_dim: int
    group_size: int

    @classmethod
    def create(cls, dtype: str, latent_dim: int, group_size: int | None = None) -> "LatentQuantization":
        if dtype not in LATENT_DTYPES:
            raise ValueError(f"latent cache dtype must be one of {LATENT_DTYPES}, got {dtype!r}.")
        if not isinstance(latent_dim, int) or latent_dim <= 0:
            raise ValueError(f"latent_dim must be a positive int, got {latent_dim!r}.")
        if dtype == "int4" and latent_dim % 2:
            raise ValueError(f"int4 packs two latent elements per byte: latent_dim must be even, got {latent_dim}.")
        if group_size is None:
            group_size = math.gcd(latent_dim, DEFAULT_GROUP_SIZE[dtype])
        if not isinstance(group_size, int) or group_size <= 0 or latent_dim % group_size:
            raise ValueError(
                f"group_size must be a positive divisor of the latent width {latent_dim}, got {group_size!r}."
            )
        return cls(dtype, latent_dim, group_size)

    @classmethod
    def from_spec(cls, spec: str, latent_dim: int) -> "LatentQuantization":
        """Inverse of `spec`: `"int8:64"` -> int8 with groups of 64."""
        dtype, _, group = spec.partition(":")
        return cls.create(dtype, latent_dim, int(group) if group else None)

    @property
    def spec(self) -> str:
        """`"<dtype>:<group_size>"`: the format as the decode kernels (and the custom op's schema) take it."""
        return f"{self.dtype}:{self.group_size}"

    @property
    def num_groups(self) -> int:
        return self.latent_dim // self.group_size

    @property
    def value_bytes(self) -> int:
        """Bytes of the quantized values at the start of a row."""
        return self.latent_dim // 2 if self.dtype == "int4" else self.latent_dim

    @property
    def scale_offset(self) -> int:
        """Byte offset of the fp16 scales (then, for int4, the fp16 zero points) in a row."""
        return _round_up(self.value_bytes, 2)

    @property
    def params_per_group(self) -> int:
        return 2 if self.dtype == "int4" else 1

    @property
    def row_bytes(self) -> int:
        """K: bytes of one cached latent row, scales and padding included."""
        return _round_up(self.scale_offset + 2 * self.params_per_group * self.num_groups, ROW_ALIGN_BYTES)

    # --- torch reference --------------------------------------------------------------------------------------
    def quantize(self, latent: torch.Tensor) -> torch.Tensor:
        """`latent (..., L)` (any float dtype) -> rows `(..., K)` uint8. Math in float32; the stored (fp16-rounded)
        scales are the ones the values are quantized with, so `dequantize` inverts exactly up to the rounding of
        the values. Non-finite inputs are not supported (a NaN latent makes its group's scale NaN)."""
        if latent.shape[-1] != self.latent_dim:
            raise ValueError(f"latent must have {self.latent_dim} columns, got {tuple(latent.shape)}.")
        lead = latent.shape[:-1]
        x = latent.float().reshape(*lead, self.num_groups, self.group_size)
        if self.dtype == "int4":
            low, high = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
            scale = ((high - low) / _QMAX["int4"]).clamp(max=torch.finfo(torch.float16).max).half()
            zero = low.half()
            s = scale.float()
            q = torch.where(s > 0, torch.round((x - zero.float()) / torch.where(s > 0, s, 1.0)), 0.0)
            q = q.clamp(0, 15).to(torch.uint8).reshape(*lead, self.latent_dim)
            half = self.latent_dim // 2
            values = q[..., :half] | (q[..., half:] << 4)
            params = torch.cat([scale, zero], dim=-2)  # (..., 2 * NG, 1): scales, then zero points
        else:
            qmax = _QMAX[self.dtype]
            scale = (x.abs().amax(-1, keepdim=True) / qmax).clamp(max=torch.finfo(torch.float16).max).half()
            s = scale.float()
            y = torch.where(s > 0, x / torch.where(s > 0, s, 1.0), 0.0).clamp(-qmax, qmax)
            if self.dtype == "int8":
                values = torch.round(y).to(torch.int8).view(torch.uint8)
            else:
                values = y.to(torch.float8_e4m3fn).view(torch.uint8)
            values = values.reshape(*lead, self.latent_dim)
            params = scale
        rows = latent.new_zeros(*lead, self.row_bytes, dtype=torch.uint8)
        rows[..., : self.value_bytes] = values
        n_params = self.params_per_group * self.num_groups
        rows[..., self.scale_offset : self.scale_offset + 2 * n_params] = _fp16_bytes(params.reshape(*lead, n_params))
        return rows

    def scales(self, rows: torch.Tensor) -> torch.Tensor:
        """`(..., NG)` fp16 scales of quantized rows (a view, no copy)."""
        return rows[..., self.scale_offset : self.scale_offset + 2 * self.num_groups].view(torch.float16)

    def zero_points(self, rows: torch.Tensor) -> torch.Tensor:
        """`(..., NG)` fp16 zero points of int4 rows (a view)."""
        start = self.scale_offset + 2 * self.num_groups
        return rows[..., start : start + 2 * self.num_groups].view(torch.float16)

    def dequantize(self, rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows `(..., K)` uint8 -> latent `(..., L)` in `dtype` (computed in float32)."""
        if rows.dtype != torch.uint8 or rows.shape[-1] != self.row_bytes:
            raise ValueError(
                f"quantized latent rows must be uint8 with {self.row_bytes} bytes ({self.spec}, L={self.latent_dim}),"
                f" got {rows.dtype} {tuple(rows.shape)}."
            )
        lead = rows.shape[:-1]
        values = rows[..., : self.value_bytes]
        if self.dtype == "int4":
            q = torch.cat([values & 0xF, values >> 4], dim=-1).float()
        elif self.dtype == "int8":
            q = values.view(torch.int8).float()
        else:
            q = values.view(torch.float8_e4m3fn).float()
        q = q.reshape(*lead, self.num_groups, self.group_size)
        x = q * self.scales(rows).float().unsqueeze(-1)
        if self.dtype == "int4":
            x = x + self.zero_points(rows).float().unsqueeze(-1)
        return x.reshape(*lead, self.latent_dim).to(dtype)


def _fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    """fp16 `(..., n)` -> its little-endian bytes `(..., 2n)` uint8 (the layout `view(torch.float16)` reads back).
    Bit arithmetic, not `view(torch.uint8)`: under `torch.compile` a size-1 last dim may carry stride 0, which a
    view to a narrower dtype rejects."""
    bits = values.view(torch.int16)
    return torch.stack([bits & 0xFF, (bits >> 8) & 0xFF], dim=-1).flatten(-2).to(torch.uint8)


# `LatentQuantization.from_spec`, memoised: the decode kernels parse their `latent_format` on every call.
parse_latent_format = functools.lru_cache(maxsize=64)(LatentQuantization.from_spec)


@dataclass(frozen=True)
class LatentCacheLayout:
    """The cache rows of one MLA layer: `num_kv_heads` (N), `rope_dim` (R per head) and `latent_dim` (L)."""

    num_kv_heads: int
    rope_dim: int
    latent_dim: int
    quantization: LatentQuantization | None = None  # None: the latent in the compute dtype

    def quantized(self, quantization: LatentQuantization | None) -> "LatentCacheLayout":
        """This layout with its latent stored in `quantization`'s format (or unquantized for None)."""
        if quantization is not None and quantization.latent_dim != self.latent_dim:
            raise ValueError(
                f"the quantization is for a latent of {quantization.latent_dim}, this layer's is {self.latent_dim}."
            )
        return self if quantization == self.quantization else replace(self, quantization=quantization)

    @property
    def rope_width(self) -> int:
        """N*R: the rope-key columns of the side row (the flag is the column after them)."""
        return self.num_kv_heads * self.rope_dim

    @property
    def side_width(self) -> int:
        """W: elements of the side row, padding included."""
        return side_row_width(self.num_kv_heads, self.rope_dim)

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        """Cached bytes per token and layer with the side row in the compute `dtype`: `(L + W) * size` unquantized,
        `K + W * size` with a quantized latent (scales and padding included)."""
        size = torch.empty((), dtype=dtype).element_size()
        latent = self.latent_dim * size if self.quantization is None else self.quantization.row_bytes
        return latent + self.side_width * size

    def pack(
        self, latent: torch.Tensor, rope_keys: torch.Tensor, image: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cache rows of new tokens: `latent (B, S, L)`, `rope_keys (B, N, S, R)` post-RoPE, `image (B, S)` bool
        -> `keys (B, 1, S, L)`, `values (B, 1, S, W)` in the latent's dtype."""
        bsz, seq = latent.shape[:2]
        side = latent.new_zeros(bsz, seq, self.side_width)
        side[..., : self.rope_width] = rope_keys.transpose(1, 2).reshape(bsz, seq, self.rope_width)
        side[..., self.rope_width] = image  # copy_ casts the bool flag
        return latent.unsqueeze(1), side.unsqueeze(1)

    def views(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The decode kernel's inputs from the cached rows: `latent (B, T, L)` (quantized: `(B, T, K)` uint8 rows)
        and `side (B, T, N*R + 1)` (strided views of the padded rows, no copy)."""
        return keys[:, 0], values[:, 0, :, : self.rope_width + 1]

    def latent_values(self, latent: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`(B, T, L)` latent in `dtype` from a `views` latent: dequantized when the layout is quantized."""
        if self.quantization is None:
            return latent
        return self.quantization.dequantize(latent, dtype)

    def rope_keys(self, side: torch.Tensor) -> torch.Tensor:
        """`(B, N, T, R)` post-RoPE rope keys of a `side` view."""
        bsz, kv_len = side.shape[:2]
        return side[..., : self.rope_width].reshape(bsz, kv_len, self.num_kv_heads, self.rope_dim).transpose(1, 2)

    def image_flags(self, side: torch.Tensor) -> torch.Tensor:
        """`(B, T)` bool: True where the cached token belongs to the image branch."""
        return is_image(side[..., self.rope_width])


__all__ = [
    "DEFAULT_GROUP_SIZE",
    "LATENT_DTYPES",
    "SIDE_ROW_MULTIPLE",
    "LatentCacheLayout",
    "LatentQuantization",
    "is_image",
    "parse_latent_format",
    "side_row_width",
]
