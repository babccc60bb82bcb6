# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""What trains in the recovery fine-tuning: named rules over parameter names, the trainable sets, and LoRA.

Trainable sets (`trainable=`), as named rules over in-memory parameter names (`trainable_rules`, `TRAINABLE_SETS`):

| set        | stage 1 (`partial_rope`)                            | stage 2 (`mla`)                                  |
|------------|-----------------------------------------------------|--------------------------------------------------|
| `paper`    | `q_proj`, `k_rope_proj`, `k_nope_proj`              | `q_proj`, `k_rope_proj`, `kv_a/b_proj`, `o_proj` |
| `official` | `q_proj`, `k_nope_proj`, `v_proj`, norms, aligner   | text params named `*attn*` or `*norm*`, aligner  |

* `paper` stage 1 reads the paper's "only the query and key projections" literally: all of `W_q` and `W_k` (its
  rotary rows `k_rope_proj` and NoPE rows `k_nope_proj`). Partial RoPE only changes the attention scores, which are
  a function of queries and keys alone; values and `o_proj` see no change. The official code freezes
  `k_rope_proj` and also trains `W_v` and the norms (use `official` for that).
* `paper` stage 2 trains the MLA parameters *and* `o_proj`: the low-rank factorisation perturbs the values, and
  `o_proj` is the layer that consumes them; the official code trains it, and the paper's "~10% trainable" for
  Qwen2.5-VL-7B only adds up with `o_proj` (method.md §4.1: without it stage 2 would be ~5-6%).
* `paper` keeps norms and the aligner frozen: only the converted attention changed.
* `official` reproduces `freeze_non_attn_weights` plus ms-swift's `freeze_aligner: false`, without the operator
  precedence bug (norms are simply listed). The aligner is LLaVA's `multi_modal_projector` (plus LLaVA-NeXT's
  `image_newline`) or Qwen2.5-VL's `visual.merger`.

Everything else (vision tower, embeddings, MLPs, `lm_head`) is frozen. With LoRA (`lora=LoraSettings(...)`), the
set's `nn.Linear` layers (or `LoraSettings.target_modules`) get adapters instead of full updates (their biases stay
frozen); the set's other parameters (norms, `image_newline`) are trained directly. Adapters are merged into plain
weights before saving (NaN / Inf check), so the result is an ordinary checkpoint.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..registry import ArchSpec, arch_spec


Stage = Literal[0, 1, 2]
TrainableSet = Literal["paper", "official"]
# Stage 0 is the control: the ORIGINAL (native) model fine-tuned with the same data, steps and schedule.
STAGE_FORMS: dict[int, str | None] = {0: None, 1: "partial_rope", 2: "mla"}


def trainable_rules(spec: ArchSpec) -> dict[str, str]:
    """Named rules over the in-memory parameter names of an architecture (its text-layer path and aligner come from
    the registry). Each rule must match at least one parameter of the model it is applied to."""
    text = "^" + re.escape(spec.text_layers.removesuffix("layers"))  # `model\.language_model\.`
    attention = text + r"layers\.\d+\.self_attn\."
    projections = ("q_proj", "k_rope_proj", "k_proj", "k_nope_proj", "v_proj", "kv_a_proj", "kv_b_proj", "o_proj")
    return {
        **{name: attention + re.escape(name) + r"\." for name in projections},  # k_proj: the native attention
        "text_attn": text + r".*attn",  # official stage 2: "attn" anywhere in a text-decoder name
        "text_norms": text + r".*norm",  # every RMSNorm of the text decoder, the final one included
        "aligner": spec.aligner,
    }


TRAINABLE_SETS: dict[str, dict[int, tuple[str, ...]]] = {
    "paper": {
        0: ("q_proj", "k_proj", "v_proj", "o_proj"),  # the native attention: what stages 1-2 replace
        1: ("q_proj", "k_rope_proj", "k_nope_proj"),
        2: ("q_proj", "k_rope_proj", "kv_a_proj", "kv_b_proj", "o_proj"),
    },
    "official": {
        0: ("text_attn", "text_norms", "aligner"),
        1: ("q_proj", "k_nope_proj", "v_proj", "text_norms", "aligner"),
        2: ("text_attn", "text_norms", "aligner"),
    },
}


@dataclass
class LoraSettings:
    """LoRA adapters for the recovery fine-tuning (through `peft`), merged into plain weights after training.

    Args:
        r (`int`, *optional*, defaults to 16): adapter rank.
        alpha (`int`, *optional*, defaults to 32): LoRA scaling numerator (`alpha / r` scales the update).
        dropout (`float`, *optional*, defaults to 0.0): dropout on the adapter input.
        target_modules (`Sequence[str]`, *optional*): regexes (`re.search`) over module names selecting the
            `nn.Linear` layers to adapt. Defaults to the `nn.Linear` layers of the trainable set.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: Sequence[str] | None = None

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}.")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]


def rule_patterns(stage: int, trainable: str | Sequence[str], spec: ArchSpec) -> dict[str, str]:
    """`{label: regex}` of a named set for `stage` and the architecture of `spec`, or of user regexes (labelled by
    themselves)."""
    if isinstance(trainable, str):
        if trainable not in TRAINABLE_SETS:
            raise ValueError(
                f"trainable must be one of {sorted(TRAINABLE_SETS)} or a sequence of parameter-name regexes, "
                f"got {trainable!r}."
            )
        rules = trainable_rules(spec)
        return {rule: rules[rule] for rule in TRAINABLE_SETS[trainable][stage]}
    patterns = list(trainable)
    if not patterns:
        raise ValueError("trainable regexes must not be empty.")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"Invalid trainable regex {pattern!r}: {error}") from error
    return {pattern: pattern for pattern in patterns}


def trainable_parameter_names(
    model: nn.Module, stage: Stage, trainable: TrainableSet | Sequence[str] = "paper"
) -> dict[str, list[str]]:
    """Parameter names selected by each rule of a trainable set (in `named_parameters` order).

    Raises:
        `ValueError`: unknown set, or a rule / regex that matches no parameter of `model`.
    """
    if stage not in STAGE_FORMS:
        raise ValueError(f"stage must be 0 (control), 1 or 2, got {stage!r}.")
    names = [name for name, _ in model.named_parameters()]
    selected = {}
    for label, pattern in rule_patterns(stage, trainable, arch_spec(model.config.model_type)).items():
        regex = re.compile(pattern)
        selected[label] = [name for name in names if regex.search(name)]
        if not selected[label]:
            raise ValueError(
                f"Trainable rule {label!r} ({pattern}) matches no parameter of {type(model).__name__}; parameter "
                f"names look like {names[:3]}."
            )
    return selected


def apply_trainable_set(model: nn.Module, names: Sequence[str]) -> None:
    """`requires_grad` True for exactly `names`, False for every other parameter."""
    wanted = set(names)
    for name, param in model.named_parameters():
        param.requires_grad_(name in wanted)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, shared (tied) tensors counted once."""
    seen, trainable, total = set(), 0, 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total


# ---------------------------------------------------------------------------------------------------------- LoRA


def lora_target_modules(model: nn.Module, trainable_names: Sequence[str], lora: LoraSettings) -> list[str]:
    """Names of the `nn.Linear` modules to adapt: `lora.target_modules` regexes, or the set's linear layers."""
    linears = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    if lora.target_modules is not None:
        targets = []
        for pattern in lora.target_modules:
            matched = [name for name in linears if re.search(pattern, name)]
            if not matched:
                raise ValueError(f"LoRA target regex {pattern!r} matches no nn.Linear module.")
            targets += [name for name in matched if name not in targets]
        return targets
    wanted = set(trainable_names)
    targets = [name for name in linears if f"{name}.weight" in wanted]
    if not targets:
        raise ValueError("The trainable set holds no nn.Linear weight to put LoRA adapters on.")
    return targets


def apply_lora(model: nn.Module, trainable_names: Sequence[str], lora: LoraSettings) -> nn.Module:
    """Wrap `model` in a peft LoRA model. The adapted layers' own weights and biases stay frozen; the trainable set's
    parameters outside them (norms, `image_newline`, ...) are trained directly."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise ImportError("LoRA fine-tuning needs `pip install peft` (or `pip install hf-mla-vlm[train]`).") from error

    targets = lora_target_modules(model, trainable_names, lora)
    adapted = {f"{name}.{kind}" for name in targets for kind in ("weight", "bias")}
    direct = [name for name in trainable_names if name not in adapted]
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets)
    peft_model = get_peft_model(model, config)
    base = peft_model.get_base_model()
    params = dict(base.named_parameters())
    for name in direct:
        params[name].requires_grad_(True)
    return peft_model


def merge_lora(peft_model: nn.Module) -> nn.Module:
    """Fold the adapters into plain weights (`merge_and_unload`) and return the plain model.

    Raises:
        `ValueError`: a merged weight is NaN or infinite (the adapter diverged); nothing is saved then.
    """
    try:
        model = peft_model.merge_and_unload(safe_merge=True)
    except ValueError as error:  # peft's safe_merge: "NaNs detected in the merged weights..."
        raise ValueError(f"Merging the LoRA adapters gave non-finite weights; not saving them. ({error})") from error
    bad = [name for name, param in model.named_parameters() if not torch.isfinite(param).all()]
    if bad:
        raise ValueError(f"Non-finite weights after merging the LoRA adapters: {bad[:5]}; not saving them.")
    return model


__all__ = [
    "STAGE_FORMS",
    "TRAINABLE_SETS",
    "LoraSettings",
    "Stage",
    "TrainableSet",
    "apply_lora",
    "apply_trainable_set",
    "count_parameters",
    "lora_target_modules",
    "merge_lora",
    "rule_patterns",
    "trainable_parameter_names",
    "trainable_rules",
]
