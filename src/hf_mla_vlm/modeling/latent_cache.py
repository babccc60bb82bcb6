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

This file is part of the remote-code bundle: it imports only torch.
"""

from dataclasses import dataclass

import torch


SIDE_ROW_MULTIPLE = 8  # elements: 16 bytes in float16 / bfloat16


def side_row_width(num_kv_heads: int, rope_dim: int) -> int:
    """Elements per token of the cache's "values" slot: N*R rope keys, the modality flag, zero padding."""
    return -(-(num_kv_heads * rope_dim + 1) // SIDE_ROW_MULTIPLE) * SIDE_ROW_MULTIPLE


def is_image(flags: torch.Tensor) -> torch.Tensor:
    """The cached modality flags (any float dtype) as booleans: True for the image branch."""
    return flags.float() > 0.5


@dataclass(frozen=True)
class LatentCacheLayout:
    """The cache rows of one MLA layer: `num_kv_heads` (N), `rope_dim` (R per head) and `latent_dim` (L)."""

    num_kv_heads: int
    rope_dim: int
    latent_dim: int

    @property
    def rope_width(self) -> int:
        """N*R: the rope-key columns of the side row (the flag is the column after them)."""
        return self.num_kv_heads * self.rope_dim

    @property
    def side_width(self) -> int:
        """W: elements of the side row, padding included."""
        return side_row_width(self.num_kv_heads, self.rope_dim)

    @property
    def elements_per_token(self) -> int:
        """L + W: cached elements per token and layer (what the memory accounting counts)."""
        return self.latent_dim + self.side_width

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
        """The decode kernel's inputs from the cached rows: `latent (B, T, L)` and `side (B, T, N*R + 1)` (strided
        views of the padded rows, no copy)."""
        return keys[:, 0], values[:, 0, :, : self.rope_width + 1]

    def rope_keys(self, side: torch.Tensor) -> torch.Tensor:
        """`(B, N, T, R)` post-RoPE rope keys of a `side` view."""
        bsz, kv_len = side.shape[:2]
        return side[..., : self.rope_width].reshape(bsz, kv_len, self.num_kv_heads, self.rope_dim).transpose(1, 2)

    def image_flags(self, side: torch.Tensor) -> torch.Tensor:
        """`(B, T)` bool: True where the cached token belongs to the image branch."""
        return is_image(side[..., self.rope_width])


__all__ = ["SIDE_ROW_MULTIPLE", "LatentCacheLayout", "is_image", "side_row_width"]
