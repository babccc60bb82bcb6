# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""Weight mapping from a native GQA/MHA attention to the converted MLA attention (method.md 1.2).

Everything here is a pure function of tensors and the MLA config: no model, no I/O.
"""

from collections.abc import Callable, Mapping

import torch

from ..modeling.mla_attention import attention_bias_layout, kept_rope_dims, nope_dims
from .svd import LowRankFactors


LowRankInit = Callable[[torch.Tensor, str], LowRankFactors]
"""`(W [N*P + N*D, d] = [W_k_nope; W_v], branch) -> factors` with `up @ down ~ W` at rank `N * kv_rank`."""


def query_row_order(pairs: list[list[int]], num_heads: int, head_dim: int) -> list[int]:
    """Rows of `q_proj` in the converted order: per head `[kept rope dims | nope dims]` of its kv group."""
    groups = num_heads // len(pairs)
    order = []
    for head in range(num_heads):
        kept = pairs[head // groups]
        order += [head * head_dim + i for i in kept_rope_dims(kept, head_dim) + nope_dims(kept, head_dim)]
    return order


def key_rows(pairs: list[list[int]], head_dim: int) -> tuple[list[int], list[int]]:
    """Rows of `k_proj` that become `k_rope_proj` and the NoPE key rows, per kv head in order."""
    rope = [g * head_dim + i for g, kept in enumerate(pairs) for i in kept_rope_dims(kept, head_dim)]
    nope = [g * head_dim + i for g, kept in enumerate(pairs) for i in nope_dims(kept, head_dim)]
    return rope, nope


def up_row_order(num_kv_heads: int, nope_dim: int, head_dim: int) -> list[int]:
    """Maps `[W_k_nope (N*P rows); W_v (N*D rows)]` to the per-head `[k_nope_g | v_g]` layout of `kv_b_proj`."""
    order = []
    for g in range(num_kv_heads):
        order += [g * nope_dim + i for i in range(nope_dim)]
        order += [num_kv_heads * nope_dim + g * head_dim + i for i in range(head_dim)]
    return order


def kv_source_matrix(
    attention: Mapping[str, torch.Tensor], config, layer_idx: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`W = [W_k_nope; W_v]` of one layer (and its bias), the matrix the low-rank initialisations factorise."""
    _, nope = key_rows(config.rope_pairs[layer_idx], config.mla_head_dim)
    weight = torch.cat([attention["k_proj.weight"][nope], attention["v_proj.weight"]], dim=0)
    bias = None
    if "k_proj.bias" in attention:
        bias = torch.cat([attention["k_proj.bias"][nope], attention["v_proj.bias"]], dim=0)
    return weight, bias


def convert_attention_weights(
    attention: Mapping[str, torch.Tensor],
    config,
    layer_idx: int,
    low_rank: LowRankInit | None = None,
) -> dict[str, torch.Tensor]:
    """Converted weights of one layer's attention.

    Args:
        attention: the native attention's weights, keys `q_proj.weight`, `k_proj.weight`, ... (biases if any).
        config: the target MLA config (`rope_pairs`, `rope_dim`, `kv_rank`, `mla_stage`, `modality_split`).
        layer_idx: decoder layer index.
        low_rank: factorisation of `[W_k_nope; W_v]` per modality branch (required for `mla_stage="mla"`).

    Returns:
        The state dict of [`MLAAttention`] (keys relative to the attention module), in float32.
    """
    text = config.text_config
    num_heads, num_kv = text.num_attention_heads, text.num_key_value_heads
    head_dim, rope_dim = config.mla_head_dim, config.rope_dim
    nope_dim = head_dim - rope_dim
    pairs = config.rope_pairs[layer_idx]
    qkv_bias, o_bias = attention_bias_layout(text)
    expected = {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"}
    expected |= {"q_proj.bias", "k_proj.bias", "v_proj.bias"} if qkv_bias else set()
    expected |= {"o_proj.bias"} if o_bias else set()
    if set(attention) != expected:
        raise ValueError(
            f"Layer {layer_idx}: attention weights {sorted(attention)} do not match the expected {sorted(expected)}."
        )
    attention = {name: tensor.float() for name, tensor in attention.items()}
    rope_rows, nope_rows = key_rows(pairs, head_dim)
    q_order = query_row_order(pairs, num_heads, head_dim)

    out = {
        "q_proj.weight": attention["q_proj.weight"][q_order],
        "k_rope_proj.weight": attention["k_proj.weight"][rope_rows],
    }
    if qkv_bias:
        out["q_proj.bias"] = attention["q_proj.bias"][q_order]
        out["k_rope_proj.bias"] = attention["k_proj.bias"][rope_rows]
    out["o_proj.weight"] = attention["o_proj.weight"]
    if o_bias:
        out["o_proj.bias"] = attention["o_proj.bias"]

    if config.mla_stage == "partial_rope":
        out["k_nope_proj.weight"] = attention["k_proj.weight"][nope_rows]
        out["v_proj.weight"] = attention["v_proj.weight"]
        if qkv_bias:
            out["k_nope_proj.bias"] = attention["k_proj.bias"][nope_rows]
            out["v_proj.bias"] = attention["v_proj.bias"]
        return out

    if low_rank is None:
        raise ValueError("mla_stage='mla' needs a low-rank initialisation (`low_rank`).")
    weight, bias = kv_source_matrix(attention, config, layer_idx)
    order = up_row_order(num_kv, nope_dim, head_dim)
    latent = config.mla_latent_dim
    for branch in ("text", "image") if config.modality_split else ("text",):
        factors = low_rank(weight, branch)
        if factors.down.shape != (latent, weight.shape[1]) or factors.up.shape != (weight.shape[0], latent):
            raise ValueError(
                f"Layer {layer_idx} branch {branch}: low-rank factors have shapes {tuple(factors.up.shape)} @ "
                f"{tuple(factors.down.shape)}, expected ({weight.shape[0]}, {latent}) @ ({latent}, {weight.shape[1]})."
            )
        out[f"kv_a_proj.{branch}.weight"] = factors.down.float()
        out[f"kv_b_proj.{branch}.weight"] = factors.up.float()[order]
        if bias is not None:
            out[f"kv_b_proj.{branch}.bias"] = bias[order]
    return out


__all__ = [
    "LowRankInit",
    "convert_attention_weights",
    "key_rows",
    "kv_source_matrix",
    "query_row_order",
    "up_row_order",
]
