# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""Partial RoPE: which dims of a head keep their rotation, how they are rotated, and the row orders that follow.

A head of dim `D` (symbols in `latent_cache.py`) has `D / 2` rotary frequency pairs in Transformers' `rotate_half`
layout: pair `j` is dims `j` and `j + D / 2` (`j = 0` the highest frequency). A converted layer keeps `R / 2` pairs
per kv head (`config.rope_pairs[layer][kv_head]`); the query heads of a kv group use its pairs. Kept dims are
ordered `[first halves | second halves]` (`kept_rope_dims`), so the kept part of a head is again in `rotate_half`
layout and rotates with `apply_partial_rope`; the other `P = D - R` dims (`nope_dims`, ascending) lose their
rotation. Conversion permutes `q_proj` rows to `[kept (R) | nope (P)]` per head (`query_row_order`) and splits
`k_proj` rows into the rope keys and the no-rope keys (`key_rows`); calibration statistics rotate with the same
functions.

Qwen2.5-VL's M-RoPE reaches the attention already recomposed per pair (`cos`/`sin` of shape `(B, S, D)`), so the
same index gathers each kept pair's angle from its own t/h/w axis.

This file is part of the remote-code bundle: it imports only torch.
"""

import torch


def kept_rope_dims(pairs: list[int], head_dim: int) -> list[int]:
    """Dims of one head that carry the kept pairs, in the order `[first halves | second halves]` (rotate_half)."""
    return list(pairs) + [j + head_dim // 2 for j in pairs]


def nope_dims(pairs: list[int], head_dim: int) -> list[int]:
    """Dims of one head that lose their rotation, ascending."""
    kept = set(kept_rope_dims(pairs, head_dim))
    return [i for i in range(head_dim) if i not in kept]


def rope_index(pairs_per_kv_head: list[list[int]], head_dim: int, device=None) -> torch.Tensor:
    """`(N, R)` indices into the per-position `cos` / `sin` of the dims each kv head keeps."""
    dims = [kept_rope_dims(pairs, head_dim) for pairs in pairs_per_kv_head]
    return torch.tensor(dims, dtype=torch.long, device=device)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x [..., R]` laid out as `[first halves | second halves]` of the kept pairs."""
    return x * cos + rotate_half(x) * sin


def query_row_order(pairs: list[list[int]], num_heads: int, head_dim: int) -> list[int]:
    """Rows of `q_proj` in the converted order: per head `[kept rope dims | nope dims]` of its kv group."""
    groups = num_heads // len(pairs)
    order = []
    for head in range(num_heads):
        kept = pairs[head // groups]
        order += [head * head_dim + i for i in kept_rope_dims(kept, head_dim) + nope_dims(kept, head_dim)]
    return order


def key_rows(pairs: list[list[int]], head_dim: int) -> tuple[list[int], list[int]]:
    """Rows of `k_proj` that become `k_rope_proj` and the no-rope key rows, per kv head in order."""
    rope = [g * head_dim + i for g, kept in enumerate(pairs) for i in kept_rope_dims(kept, head_dim)]
    nope = [g * head_dim + i for g, kept in enumerate(pairs) for i in nope_dims(kept, head_dim)]
    return rope, nope


__all__ = [
    "apply_partial_rope",
    "kept_rope_dims",
    "key_rows",
    "nope_dims",
    "query_row_order",
    "rope_index",
    "rotate_half",
]
