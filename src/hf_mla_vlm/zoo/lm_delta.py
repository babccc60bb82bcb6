# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""The zoo's language-model delta: low-rank updates of SmolLM2's decoder projections, trained with the vision side.

A frozen 135M language model reading soft image tokens learns colours and shapes but not where things are (position
and relation questions stayed at 15-54%). The zoo therefore also adapts the language model, by a low-rank delta on
every decoder projection: `W' = W + B @ A` (`A`: `rank x in`, `B`: `out x rank`). Training keeps `W` frozen and
learns `A` and `B` (`LowRankDelta`); the package stores only the factors (a few MB), under the projection's
state-dict name with the suffixes `.lora_A` / `.lora_B`, beside the vision weights; `merge_lm_delta` folds them into
the weights when a zoo model is built, so the model is a plain native Transformers model again.

Training also holds the language model to SmolLM2 on plain text (`hf_mla_vlm.zoo.train`): the teacher is the same
model with the delta switched off (`deltas_disabled`), so no second copy of the language model is needed.
"""

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from hf_mla_vlm.registry import arch_spec


LM_DELTA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DELTA_SUFFIXES = (".lora_A", ".lora_B")


class LowRankDelta(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank delta: `base(x) + (x @ A.T) @ B.T`, `B` starting at zero (the
    wrapped model starts equal to the original). `enabled = False` gives the base alone."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}.")
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.enabled:
            return out
        return out + (x.to(self.lora_A.dtype) @ self.lora_A.T @ self.lora_B.T).to(out.dtype)


def is_delta_key(key: str) -> bool:
    """Whether a state-dict key is a factor of the language-model delta (which projections it may name is checked
    against the model when it is merged or loaded)."""
    return key.endswith(DELTA_SUFFIXES)


def _text_layers(model: nn.Module) -> str:
    """The attribute path of the model's text decoder layers (the architecture registry's `text_layers`)."""
    return arch_spec(model.config.model_type).text_layers


def _targets(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Linear]]:
    layers = _text_layers(model)
    for name, module in model.named_modules():
        if not name.startswith(f"{layers}."):
            continue
        for child_name, child in module.named_children():
            if child_name in LM_DELTA_TARGETS and isinstance(child, nn.Linear):
                yield f"{name}.{child_name}", module, child_name, child


def add_lm_deltas(model: nn.Module, rank: int) -> list[LowRankDelta]:
    """Wrap every decoder projection of the language model in a `LowRankDelta` of `rank` (swapped in place).

    Raises:
        `ValueError`: the model has no decoder projection to adapt.
    """
    deltas = []
    for _, parent, child_name, linear in list(_targets(model)):
        delta = LowRankDelta(linear, rank)
        setattr(parent, child_name, delta)
        deltas.append(delta)
    if not deltas:
        raise ValueError(f"No decoder projection ({', '.join(LM_DELTA_TARGETS)}) under {_text_layers(model)!r}.")
    return deltas


def lm_delta_state(model: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The delta factors of a model wrapped by `add_lm_deltas`, as contiguous CPU tensors of `dtype`."""
    return {
        f"{name}.{factor}": getattr(module, factor).detach().to("cpu", dtype).contiguous()
        for name, module in model.named_modules()
        if isinstance(module, LowRankDelta)
        for factor in ("lora_A", "lora_B")
    }


def _pairs(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    names = {key.rsplit(".", 1)[0] for key in state if is_delta_key(key)}
    unpaired = sorted(n for n in names if f"{n}.lora_A" not in state or f"{n}.lora_B" not in state)
    if unpaired:
        raise ValueError(f"Delta factors without their pair: {unpaired[:5]}")
    return {name: (state[f"{name}.lora_A"], state[f"{name}.lora_B"]) for name in sorted(names)}


def _check_pair(name: str, a: torch.Tensor, b: torch.Tensor, weight_shape: torch.Size) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or (b.shape[0], a.shape[1]) != tuple(weight_shape):
        raise ValueError(
            f"Delta of {name} has factors {tuple(a.shape)} / {tuple(b.shape)}, which do not fit a weight of shape "
            f"{tuple(weight_shape)}."
        )


@torch.no_grad()
def merge_lm_delta(model: nn.Module, state: Mapping[str, torch.Tensor]) -> int:
    """Fold the delta factors in `state` into the plain model's projection weights (`W += B @ A`, in float32);
    returns how many projections changed.

    Raises:
        `ValueError`: a factor without its pair, a projection the model lacks, or factors of the wrong shape.
    """
    linears = {name: linear for name, _, _, linear in _targets(model)}
    pairs = _pairs(state)
    missing = sorted(set(pairs) - set(linears))
    if missing:
        raise ValueError(f"Delta for projections this model does not have: {missing[:5]}")
    for name, (a, b) in pairs.items():  # all checked before any weight changes
        _check_pair(name, a, b, linears[name].weight.shape)
    for name, (a, b) in pairs.items():
        weight = linears[name].weight
        weight.copy_((weight.float() + b.float().to(weight.device) @ a.float().to(weight.device)).to(weight.dtype))
    return len(pairs)


@torch.no_grad()
def load_lm_deltas(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Set the factors of a model wrapped by `add_lm_deltas` from `state` (to continue training a stored delta);
    every wrapped projection must be in `state`, with the wrapper's rank.

    Raises:
        `ValueError`: factors missing, left over or of another shape than the wrappers'.
    """
    deltas = {name: m for name, m in model.named_modules() if isinstance(m, LowRankDelta)}
    pairs = _pairs(state)
    if set(pairs) != set(deltas):
        missing, unexpected = sorted(set(deltas) - set(pairs)), sorted(set(pairs) - set(deltas))
        raise ValueError(
            f"The stored delta covers other projections: missing={missing[:5]}, unexpected={unexpected[:5]}"
        )
    for name, (a, b) in pairs.items():
        delta = deltas[name]
        if a.shape != delta.lora_A.shape or b.shape != delta.lora_B.shape:
            raise ValueError(
                f"Delta of {name} has rank {a.shape[0]}; the model's wrapper has rank {delta.lora_A.shape[0]}."
            )
        delta.lora_A.copy_(a)
        delta.lora_B.copy_(b)


@contextmanager
def deltas_disabled(model: nn.Module):
    """Within the block, every `LowRankDelta` of `model` computes its base projection alone (the original LM)."""
    deltas = [m for m in model.modules() if isinstance(m, LowRankDelta)]
    states = [d.enabled for d in deltas]
    try:
        for delta in deltas:
            delta.enabled = False
        yield model
    finally:
        for delta, state in zip(deltas, states):
            delta.enabled = state


__all__ = [
    "LM_DELTA_TARGETS",
    "LowRankDelta",
    "add_lm_deltas",
    "deltas_disabled",
    "is_delta_key",
    "lm_delta_state",
    "load_lm_deltas",
    "merge_lm_delta",
]
