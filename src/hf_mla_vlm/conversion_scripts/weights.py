# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""Weight mapping from a native GQA/MHA attention to the converted MLA attention (method.md 1.2).

The source of a layer is either the native attention (`q_proj`, `k_proj`, `v_proj`, `o_proj`) or the stage-1
(`partial_rope`) attention of a converted model (`q_proj` already permuted, `k_rope_proj`, `k_nope_proj`, `v_proj`,
`o_proj`). The `mla` stage is always built from the stage-1 layout, so both sources share one code path.

Everything here is a pure function of tensors and the MLA config: no model, no I/O.
"""

from collections.abc import Mapping

import torch

from ..modeling.partial_rope import key_rows, query_row_order
from .svd import LowRankFactors


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


def kv_source_matrix(stage1: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`W = [W_k_nope; W_v]` of one layer's stage-1 weights (and its bias): the matrix the low-rank initialisations
    factorise, computed once per layer."""
    weight = torch.cat([stage1["k_nope_proj.weight"], stage1["v_proj.weight"]], dim=0)
    k_bias = stage1.get("k_nope_proj.bias")
    bias = None if k_bias is None else torch.cat([k_bias, stage1["v_proj.bias"]], dim=0)
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


def stage1_attention_weights(attention: Mapping[str, torch.Tensor], config, layer_idx: int) -> dict[str, torch.Tensor]:
    """The stage-1 (`partial_rope`) weights of one layer's attention, in float32.

    Args:
        attention: the native attention's weights (`q_proj.weight`, `k_proj.weight`, ...) or a stage-1 attention's
            (`q_proj.weight`, `k_rope_proj.weight`, `k_nope_proj.weight`, ...; already permuted), biases if any.
        config: the target MLA config (`rope_pairs`, `rope_dim`).
        layer_idx: decoder layer index.
    """
    stage = attention_source_stage(attention)
    expected = attention_keys(attention, stage)
    if set(attention) != expected:
        raise ValueError(
            f"Layer {layer_idx}: attention weights {sorted(attention)} do not match the expected {sorted(expected)}."
        )
    attention = {name: tensor.float() for name, tensor in attention.items()}
    return attention if stage == "partial_rope" else partial_rope_weights(attention, config, layer_idx)


def mla_attention_weights(
    stage1: Mapping[str, torch.Tensor],
    factors: Mapping[str, LowRankFactors],
    bias: torch.Tensor | None,
    config,
    layer_idx: int,
) -> dict[str, torch.Tensor]:
    """The state dict of one [`MLAAttention`] (keys relative to the module, float32) from its stage-1 weights and the
    low-rank factors of `[W_k_nope; W_v]` per branch (`kv_source_matrix` gave the matrix and its `bias`):
    `kv_a_proj = down`, `kv_b_proj = up` (rows per kv head `[k_nope | v]`), `q_proj`, `k_rope_proj`, `o_proj` kept."""
    num_kv, head_dim = config.text_config.num_key_value_heads, config.mla_head_dim
    order = up_row_order(num_kv, head_dim - config.rope_dim, head_dim)
    latent, (rows, cols) = config.mla_latent_dim, (len(order), stage1["q_proj.weight"].shape[1])
    out = {name: tensor for name, tensor in stage1.items() if not name.startswith(("k_nope_proj.", "v_proj."))}
    for branch in ("text", "image") if config.modality_split else ("text",):
        down, up = factors[branch].down, factors[branch].up
        if down.shape != (latent, cols) or up.shape != (rows, latent):
            raise ValueError(
                f"Layer {layer_idx} branch {branch}: low-rank factors have shapes {tuple(up.shape)} @ "
                f"{tuple(down.shape)}, expected ({rows}, {latent}) @ ({latent}, {cols})."
            )
        out[f"kv_a_proj.{branch}.weight"] = down.float()
        out[f"kv_b_proj.{branch}.weight"] = up.float()[order]
        if bias is not None:
            out[f"kv_b_proj.{branch}.bias"] = bias[order]
    return out


__all__ = [
    "attention_keys",
    "attention_source_stage",
    "kv_source_matrix",
    "mla_attention_weights",
    "partial_rope_weights",
    "stage1_attention_weights",
    "up_row_order",
]
