# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""Weight mapping from a native GQA/MHA attention to the converted MLA attention (method.md 1.2).

The source of a layer is either the native attention (`q_proj`, `k_proj`, `v_proj`, `o_proj`) or the stage-1
(`partial_rope`) attention of a converted model (`q_proj` already permuted, `k_rope_proj`, `k_nope_proj`, `v_proj`,
`o_proj`). The `mla` stage is always built from the stage-1 layout, so both sources share one code path.

Everything here is a pure function of tensors and the MLA config: no model, no I/O.
"""

from collections.abc import Callable, Mapping

import torch

from ..modeling.partial_rope import key_rows, query_row_order
from .svd import LowRankFactors


LowRankInit = Callable[[torch.Tensor, str], LowRankFactors]
"""`(W [N*P + N*D, d] = [W_k_nope; W_v], branch) -> factors` with `up @ down ~ W` at rank `N * kv_rank`."""


def up_row_order(num_kv_heads: int, nope_dim: int, head_dim: int) -> list[int]:
    """Maps `[W_k_nope (N*P rows); W_v (N*D rows)]` to the per-head `[k_nope_g | v_g]` layout of `kv_b_proj`."""
    order = []
    for g in range(num_kv_heads):
        order += [g * nope_dim + i for i in range(nope_dim)]
        order += [num_kv_heads * nope_dim + g * head_dim + i for i in range(head_dim)]
    return order


# Projections with a q/k/v bias (when the architecture has one), per source layout.
_PROJECTIONS = {
    "native": ("q_proj", "k_proj", "v_proj"),
    "partial_rope": ("q_proj", "k_rope_proj", "k_nope_proj", "v_proj"),
}


def attention_source_stage(attention: Mapping[str, torch.Tensor]) -> str:
    """`partial_rope` for the weights of a stage-1 attention (it has `k_nope_proj`), `native` otherwise."""
    return "partial_rope" if "k_nope_proj.weight" in attention else "native"


def attention_keys(attention: Mapping[str, torch.Tensor], stage: str) -> set[str]:
    """Weight names one attention in the `native` or `partial_rope` layout must have: every projection's weight,
    and the q/k/v biases of all projections or of none (as present in `attention`), and the o bias if present."""
    names = _PROJECTIONS[stage]
    keys = {f"{name}.weight" for name in names} | {"o_proj.weight"}
    keys |= {f"{name}.bias" for name in names} if "q_proj.bias" in attention else set()
    keys |= {"o_proj.bias"} if "o_proj.bias" in attention else set()
    return keys


def kv_source_matrix(
    attention: Mapping[str, torch.Tensor], config, layer_idx: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`W = [W_k_nope; W_v]` of one layer (and its bias), the matrix the low-rank initialisations factorise, from
    native (`k_proj` NoPE rows, `v_proj`) or stage-1 (`k_nope_proj`, `v_proj`) weights."""
    if attention_source_stage(attention) == "partial_rope":
        k_weight, k_bias = attention["k_nope_proj.weight"], attention.get("k_nope_proj.bias")
    else:
        _, nope = key_rows(config.rope_pairs[layer_idx], config.mla_head_dim)
        k_weight = attention["k_proj.weight"][nope]
        k_bias = attention["k_proj.bias"][nope] if "k_proj.bias" in attention else None
    weight = torch.cat([k_weight, attention["v_proj.weight"]], dim=0)
    bias = None if k_bias is None else torch.cat([k_bias, attention["v_proj.bias"]], dim=0)
    return weight, bias


def partial_rope_weights(attention: Mapping[str, torch.Tensor], config, layer_idx: int) -> dict[str, torch.Tensor]:
    """Stage-1 weights of one layer from float native ones: `q_proj` rows permuted per head to `[rope | nope]`,
    `k_proj` split into `k_rope_proj` / `k_nope_proj`, `v_proj` and `o_proj` unchanged."""
    head_dim, pairs = config.mla_head_dim, config.rope_pairs[layer_idx]
    rope_rows, nope_rows = key_rows(pairs, head_dim)
    q_order = query_row_order(pairs, config.text_config.num_attention_heads, head_dim)
    layout = (  # (stage-1 name, native name, rows taken; None = all, in order)
        ("q_proj", "q_proj", q_order),
        ("k_rope_proj", "k_proj", rope_rows),
        ("k_nope_proj", "k_proj", nope_rows),
        ("v_proj", "v_proj", None),
        ("o_proj", "o_proj", None),
    )
    out = {}
    for name, source, order in layout:
        for kind in ("weight", "bias"):
            if f"{source}.{kind}" in attention:
                tensor = attention[f"{source}.{kind}"]
                out[f"{name}.{kind}"] = tensor if order is None else tensor[order]
    return out


def convert_attention_weights(
    attention: Mapping[str, torch.Tensor],
    config,
    layer_idx: int,
    low_rank: LowRankInit | None = None,
) -> dict[str, torch.Tensor]:
    """Converted weights of one layer's attention.

    Args:
        attention: the native attention's weights (`q_proj.weight`, `k_proj.weight`, ...) or a stage-1 attention's
            (`q_proj.weight`, `k_rope_proj.weight`, `k_nope_proj.weight`, ...; already permuted), biases if any.
        config: the target MLA config (`rope_pairs`, `rope_dim`, `kv_rank`, `mla_stage`, `modality_split`).
        layer_idx: decoder layer index.
        low_rank: factorisation of `[W_k_nope; W_v]` per modality branch (required for `mla_stage="mla"`).

    Returns:
        The state dict of [`MLAAttention`] (keys relative to the attention module), in float32.
    """
    text = config.text_config
    num_kv, head_dim = text.num_key_value_heads, config.mla_head_dim
    nope_dim = head_dim - config.rope_dim
    stage = attention_source_stage(attention)
    expected = attention_keys(attention, stage)
    if set(attention) != expected:
        raise ValueError(
            f"Layer {layer_idx}: attention weights {sorted(attention)} do not match the expected {sorted(expected)}."
        )
    attention = {name: tensor.float() for name, tensor in attention.items()}
    stage1 = attention if stage == "partial_rope" else partial_rope_weights(attention, config, layer_idx)
    if config.mla_stage == "partial_rope":
        return stage1

    if low_rank is None:
        raise ValueError("mla_stage='mla' needs a low-rank initialisation (`low_rank`).")
    weight, bias = kv_source_matrix(stage1, config, layer_idx)
    out = {name: tensor for name, tensor in stage1.items() if not name.startswith(("k_nope_proj.", "v_proj."))}
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
    "attention_keys",
    "attention_source_stage",
    "convert_attention_weights",
    "key_rows",
    "kv_source_matrix",
    "partial_rope_weights",
    "query_row_order",
    "up_row_order",
]
