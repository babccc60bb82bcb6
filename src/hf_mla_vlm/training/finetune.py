# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""Two-stage recovery fine-tuning of converted models on `transformers.Trainer` (MHA2MLA-VLM §4).

Stage 1 trains the `partial_rope` form (partial RoPE, full-rank keys and values), stage 2 the `mla` form (per
modality low-rank `kv_a_proj` / `kv_b_proj`). Everything runs through a stock `Trainer`, so `torchrun` and
`accelerate launch` with DDP, FSDP or DeepSpeed work unchanged; this module holds no distributed code of its own
beyond asking the `Trainer`'s accelerator for a full state dict when parameters are sharded.

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

Schedule: warmup-stable-decay (linear warm-up, constant, then `1 - sqrt` decay to 0), the official
`lr_scheduler.py` recipe, via Transformers' `warmup_stable_decay` scheduler (identical in 5.17 and 5.23). Warm-up
and decay lengths are `ceil(ratio * total_steps)`, computed from the Trainer's real number of optimizer steps (also
with `num_train_epochs`).

Qwen2.5-VL: the collator never passes `position_ids`; the model computes 3-D M-RoPE positions from `input_ids`,
`mm_token_type_ids` and `image_grid_thw` in every training forward (method.md §7.9 is the official code's bug).
"""

import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.utils import logging

from ..conversations import Conversation, load_conversations
from ..registry import ARCHITECTURES, MLA_MODEL_TYPES, ArchSpec, arch_spec
from ..utils import check_output_folder, environment, staged_folder, weight_file_digests
from .data import ChatCollator, TextWindow
from .distill import TEXT_SOURCES, mixed_training_items, text_windows
from .trainer import DistillationTrainer, RecoveryTrainer, TimingCallback, wsd_steps


logger = logging.get_logger(__name__)

Stage = Literal[0, 1, 2]
TrainableSet = Literal["paper", "official"]
Objective = Literal["sft", "distill"]
# Stage 0 is the control: the ORIGINAL (native) model fine-tuned with the same data, steps and schedule.
STAGE_FORMS: dict[int, str | None] = {0: None, 1: "partial_rope", 2: "mla"}
REPORT_NAME = "finetune_report.json"
ZOO_VQA = "zoo-vqa"
DEFAULT_ZOO_SAMPLES = 1000


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


@dataclass
class FinetuneResult:
    """What `finetune` produced: the saved folder, its report (also in `finetune_report.json`), the names of the
    trained parameters, and the trained plain model when `return_model=True`."""

    output_dir: Path
    report: dict
    trainable_names: list[str] = field(default_factory=list, repr=False)
    model: nn.Module | None = field(default=None, repr=False)


# ------------------------------------------------------------------------------------------------ trainable sets


def _rule_patterns(stage: int, trainable: str | Sequence[str], spec: ArchSpec) -> dict[str, str]:
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
    for label, pattern in _rule_patterns(stage, trainable, arch_spec(model.config.model_type)).items():
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


# ---------------------------------------------------------------------------------------------------------- data


class ConversationDataset(torch.utils.data.Dataset):
    """A list of `Conversation`s (and `TextWindow`s); `ChatCollator` turns a batch of them into model inputs."""

    def __init__(self, conversations: Sequence[Conversation | TextWindow]):
        self.conversations = list(conversations)

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, index: int) -> Conversation | TextWindow:
        return self.conversations[index]


def load_training_conversations(
    data: str | os.PathLike | Sequence[Conversation],
    *,
    num_samples: int | None = None,
    image_size: int = 224,
    seed: int = 0,
    image_folder: str | os.PathLike | None = None,
) -> tuple[list[Conversation], str]:
    """Conversations from `"zoo-vqa"` (procedural VQA train split), a LLaVA-style JSON / `"builtin"` / saved
    `datasets` folder (through `load_conversations`), or a list of `Conversation`. Returns them and a label."""
    if isinstance(data, (str, os.PathLike)):
        if str(data) == ZOO_VQA:
            from ..zoo.vqa_data import generate_split

            count = DEFAULT_ZOO_SAMPLES if num_samples is None else num_samples
            samples = generate_split("train", count, seed=seed, image_size=image_size)
            conversations, label = [s.to_conversation() for s in samples], ZOO_VQA
        else:
            count = sys.maxsize if num_samples is None else num_samples
            conversations = load_conversations(data, count, seed=seed, image_folder=image_folder)
            label = str(data)
    else:
        conversations = list(data)
        if num_samples is not None:
            conversations = conversations[:num_samples]
        label = "in-memory conversations"
        if any(not isinstance(c, (Conversation, TextWindow)) for c in conversations):
            raise ValueError(
                "data must hold Conversation (hf_mla_vlm.conversations) or TextWindow "
                "(hf_mla_vlm.training.data) objects."
            )
    if not conversations:
        raise ValueError(f"No training conversations in {label}.")
    return conversations, label


def load_training_items(
    data: str | os.PathLike | Sequence,
    processor,
    *,
    mix: Sequence[float] | None = None,
    num_samples: int | None = None,
    image_size: int = 224,
    seed: int = 0,
    image_folder: str | os.PathLike | None = None,
    text_seq_len: int = 512,
) -> tuple[list, str]:
    """Training items of one source or of a mix: `data` is a source (see `load_training_conversations`), a list of
    items, or comma-separated sources such as `"wikipedia,zoo-vqa"` mixed in the proportions `mix` (default: equal).
    `"wikipedia"` gives `TextWindow`s of `text_seq_len` tokens packed from the Wikipedia calibration split (80% of
    the articles; perplexity is measured on the disjoint test split). Returns the items and a label."""
    specs = [part.strip() for part in str(data).split(",")] if isinstance(data, (str, os.PathLike)) else None
    if specs is None or (len(specs) == 1 and specs[0] not in TEXT_SOURCES):
        if mix is not None and len(mix) != 1:
            raise ValueError(f"mix has {len(mix)} weights for one data source.")
        return load_training_conversations(
            data, num_samples=num_samples, image_size=image_size, seed=seed, image_folder=image_folder
        )
    weights = list(mix) if mix is not None else [1.0] * len(specs)
    if len(weights) != len(specs) or len(set(specs)) != len(specs):
        raise ValueError(f"Give each data source once and one mix weight per source; got {specs} and {weights}.")
    total = DEFAULT_ZOO_SAMPLES if num_samples is None else num_samples
    sources = {}
    for spec, weight in zip(specs, weights):
        count = math.ceil(weight / sum(weights) * total)  # the most the mix takes from this source
        if spec in TEXT_SOURCES:
            from ..assets import wikipedia_split

            sources[spec] = text_windows(processor, wikipedia_split("calibration"), text_seq_len, count)
        else:
            sources[spec], _ = load_training_conversations(
                spec, num_samples=count, image_size=image_size, seed=seed, image_folder=image_folder
            )
    items = mixed_training_items(sources, weights, total, seed=seed)
    return items, ",".join(f"{spec}:{weight:g}" for spec, weight in zip(specs, weights))


# -------------------------------------------------------------------------------------------------------- saving


def _full_state_dict(trainer: Trainer) -> dict | None:
    """The gathered state dict when parameters are sharded (FSDP, ZeRO-3), else None. Collective: every rank calls
    it. (With ZeRO-3 this needs `stage3_gather_16bit_weights_on_model_save: true`.)"""
    if trainer.is_fsdp_enabled:
        return trainer.accelerator.get_state_dict(trainer.model)
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if trainer.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3:
        return trainer.accelerator.get_state_dict(trainer.deepspeed)
    return None


def load_model(model_path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The converted model of `model_path` through `AutoModelForImageTextToText` (the package's registered classes,
    never the folder's remote code)."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(model_path, dtype=dtype)


def plain_model_from_state_dict(
    model_path: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    trainable_names: Sequence[str],
    lora: LoraSettings | None,
) -> nn.Module:
    """Rebuild the trained plain model on CPU from a gathered (FSDP / ZeRO-3) state dict of the trained model (a
    peft model's when `lora` is set), merging the adapters."""
    model = load_model(model_path)
    if lora is not None:
        model = apply_lora(model, trainable_names, lora)
    model.load_state_dict(state_dict, strict=True)
    return merge_lora(model) if lora is not None else model


def _rule_size(model: nn.Module, names: Sequence[str]) -> dict[str, int]:
    params = dict(model.named_parameters())
    return {"tensors": len(names), "parameters": sum(params[name].numel() for name in names)}


def _parameter_digest(model: nn.Module, names: Sequence[str]) -> str:
    params = dict(model.named_parameters())
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode())
        digest.update(params[name].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _save_atomically(model: nn.Module, processor, report: dict, output_dir: Path, save_dtype: torch.dtype) -> None:
    """Weights (the model's own Hub-ready `save_pretrained`), processor and report in a hidden sibling folder,
    renamed into place at the end (`staged_folder`: an interrupted run never leaves a half-written folder, and a
    replaced one is deleted only once the new one is in place). The report records the sha256 of every weight file."""
    with staged_folder(output_dir) as staging:
        if any(p.dtype != save_dtype for p in model.parameters() if p.is_floating_point()):
            model.to(save_dtype)
        model.config.dtype = save_dtype
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        report["files"] = weight_file_digests(staging)
        (staging / REPORT_NAME).write_text(json.dumps(report, indent=2, default=str) + "\n")


# ------------------------------------------------------------------------------------------------------ finetune


def check_stage(model_path: str | os.PathLike, stage: Stage):
    """The checkpoint's config after checking it holds the form `stage` trains (stage 1: `partial_rope`, stage 2:
    `mla`); `ValueError` with the conversion to run otherwise."""
    from transformers import AutoConfig

    if stage not in STAGE_FORMS:
        raise ValueError(f"stage must be 0 (control), 1 or 2, got {stage!r}.")
    config = AutoConfig.from_pretrained(model_path)
    model_type = config.model_type
    if stage == 0:
        if model_type not in ARCHITECTURES:
            raise ValueError(
                f"Stage 0 (the control) fine-tunes the ORIGINAL model; {model_path} has model_type {model_type!r}, "
                f"not one of the native {sorted(ARCHITECTURES)}."
            )
        return config
    if model_type in ARCHITECTURES:
        raise ValueError(
            f"{model_path} is a native {model_type} checkpoint. Recovery fine-tuning starts from a converted one: run "
            f"`hf-mla-vlm convert {model_path} --out OUT --stage partial_rope --rope-dim R --kv-rank K` first, "
            "then fine-tune OUT with --stage 1."
        )
    if model_type not in MLA_MODEL_TYPES:
        raise ValueError(f"{model_path} has model_type {model_type!r}, not a converted MLA checkpoint.")
    form = getattr(config, "mla_stage", None)
    if form != STAGE_FORMS[stage]:
        hint = (
            "stage 1 trains the partial-RoPE form: convert the native model with --stage partial_rope"
            if stage == 1
            else "stage 2 trains the MLA (latent) form: convert the fine-tuned stage-1 checkpoint with "
            "`hf-mla-vlm convert STAGE1 --out OUT --stage mla --kv-rank K` and fine-tune OUT"
        )
        raise ValueError(
            f"Stage {stage} needs a checkpoint with mla_stage={STAGE_FORMS[stage]!r}, but {model_path} has "
            f"mla_stage={form!r}; {hint}."
        )
    return config


def finetune(
    model_path: str | os.PathLike,
    data: str | os.PathLike | Sequence[Conversation],
    output_dir: str | os.PathLike,
    *,
    stage: Stage,
    trainable: TrainableSet | Sequence[str] = "paper",
    objective: Objective = "sft",
    teacher: str | os.PathLike | nn.Module | None = None,
    temperature: float = 1.0,
    label_weight: float = 0.0,
    mix: Sequence[float] | None = None,
    text_seq_len: int = 512,
    lora: LoraSettings | None = None,
    learning_rate: float = 1e-5,
    per_device_train_batch_size: int = 1,
    gradient_accumulation_steps: int = 16,
    max_steps: int = -1,
    num_train_epochs: float = 1.0,
    warmup_ratio: float = 0.1,
    decay_ratio: float = 0.1,
    weight_decay: float = 0.0,
    seed: int = 0,
    num_samples: int | None = None,
    image_size: int | None = None,
    image_folder: str | os.PathLike | None = None,
    max_length: int | None = None,
    bf16: bool = False,
    logging_steps: int = 10,
    save_steps: int | None = None,
    resume_from_checkpoint: str | bool | None = None,
    report_to: str | list[str] = "none",
    training_args: dict | None = None,
    overwrite: bool = False,
    return_model: bool = False,
) -> FinetuneResult:
    """Recovery fine-tuning of a converted checkpoint (stage 1 or 2 of MHA2MLA-VLM) with `transformers.Trainer`.

    Launch with `python`, `torchrun` or `accelerate launch` (DDP, FSDP, DeepSpeed through `training_args`).

    Args:
        model_path: converted checkpoint folder: `mla_stage="partial_rope"` for stage 1, `"mla"` for stage 2; the
            native (original) checkpoint for stage 0, the control.
        data: `"zoo-vqa"` (procedural VQA train split), a LLaVA-style conversation JSON (or `"builtin"`, or a saved
            `datasets` folder), `"wikipedia"` (packed plain text), comma-separated sources to mix (e.g.
            `"wikipedia,zoo-vqa"`, see `mix`), or a list of `Conversation` / `TextWindow`.
        output_dir: folder of the fine-tuned checkpoint (Hub-ready, with remote code), written crash-safely by the
            main process (`hf_mla_vlm.utils.staged_folder`). Trainer checkpoints (`save_steps`) go to the hidden
            sibling `.<name>.checkpoints`.
        stage: 1 or 2, or 0: the control (the original model trained with the same data, steps and schedule; the
            `paper` set is then its text attention, `q/k/v/o_proj`, what stages 1-2 replace and train).
        trainable: `"paper"`, `"official"` (see the module docstring) or regexes (`re.search`) over parameter names.
        objective: `"sft"` (labels: assistant turns of conversations, every token of text) or `"distill"`
            (self-distillation from `teacher`: `T^2 * KL(teacher || student)` at every position except the image
            placeholders, see `hf_mla_vlm.training.distill`).
        teacher: the original model (folder or loaded model), required with `objective="distill"`.
        temperature, label_weight: distillation temperature `T`, and the weight of the label loss added to the KL.
        mix: weights of the comma-separated sources of `data` (default: equal).
        text_seq_len: tokens per packed window of plain-text sources.
        lora: train LoRA adapters instead of full weights; merged back before saving.
        learning_rate: peak learning rate (official: stage 1 5e-5 / 5e-6 / 1e-5 for LLaVA / NeXT / Qwen; stage 2
            1e-5 ... 8e-7 depending on the latent width, method.md §4.2).
        per_device_train_batch_size, gradient_accumulation_steps: the global batch is their product times the
            number of processes (official: 16, Qwen stage 1: 32).
        max_steps: optimizer steps; `-1` trains for `num_train_epochs`.
        num_train_epochs: epochs when `max_steps` is `-1` (official: 1).
        warmup_ratio, decay_ratio: shares of the steps for linear warm-up and `1 - sqrt` decay (official: 0.1 each).
        weight_decay: AdamW weight decay (official: 0).
        seed: model / data seed (also the `zoo-vqa` and JSON sampling seed).
        num_samples: conversations to use (default: all of a JSON, 1000 for `zoo-vqa`).
        image_size: `zoo-vqa` image side in pixels (default: the model's resolution, `vqa_image_size(processor)`).
        image_folder: root of relative image paths in a JSON.
        max_length: drop conversations longer than this many tokens.
        bf16: bf16 mixed precision (fp32 master weights).
        logging_steps: log the loss every this many steps.
        save_steps: also write resumable Trainer checkpoints every this many steps.
        resume_from_checkpoint: passed to `Trainer.train`.
        report_to: Trainer integrations (`"none"`, `"tensorboard"`, `"wandb"`, ...).
        training_args: extra `TrainingArguments` fields, applied last (e.g. `{"deepspeed": "ds.json"}`).
        overwrite: replace a non-empty `output_dir`.
        return_model: keep the trained plain model in the result (cast to the checkpoint's dtype, as saved).

    Returns:
        [`FinetuneResult`]; the report is also written to `output_dir/finetune_report.json`.
    """
    started = time.perf_counter()
    output_dir = check_output_folder(Path(output_dir).resolve(), overwrite)
    if not 0.0 <= warmup_ratio < 1.0 or not 0.0 <= decay_ratio <= 1.0 or warmup_ratio + decay_ratio > 1.0:
        raise ValueError(
            f"warmup_ratio must be in [0, 1), decay_ratio in [0, 1] and their sum at most 1; got {warmup_ratio} "
            f"and {decay_ratio}."
        )
    if max_steps == 0 or (max_steps < 0 and num_train_epochs <= 0):
        raise ValueError("Nothing to train: set max_steps > 0 or num_train_epochs > 0.")
    config = check_stage(model_path, stage)
    if objective not in ("sft", "distill"):
        raise ValueError(f"objective must be 'sft' or 'distill', got {objective!r}.")
    if objective == "distill" and (teacher is None or stage == 0):
        raise ValueError(
            "objective='distill' needs the original model as teacher (--teacher SRC) and a converted student "
            "(stage 1 or 2); the control (stage 0) trains the original itself with objective='sft'."
        )

    from transformers import AutoProcessor, set_seed

    set_seed(seed)
    processor = AutoProcessor.from_pretrained(model_path)
    if image_size is None:  # render zoo-vqa scenes at the model's own resolution (no resampling blur)
        from ..evaluation.vqa import vqa_image_size

        image_size = vqa_image_size(processor)
    conversations, data_label = load_training_items(
        data, processor, mix=mix, num_samples=num_samples, image_size=image_size, seed=seed,
        image_folder=image_folder, text_seq_len=text_seq_len,
    )  # fmt: skip
    teacher_model = _load_teacher(teacher, config) if objective == "distill" else None
    save_dtype = getattr(torch, str(config.dtype).removeprefix("torch."), None) if config.dtype else None
    save_dtype = save_dtype if isinstance(save_dtype, torch.dtype) else torch.float32  # the checkpoint's own dtype

    model = load_model(model_path)
    by_rule = trainable_parameter_names(model, stage, trainable)
    trainable_names = list(dict.fromkeys(name for names in by_rule.values() for name in names))
    apply_trainable_set(model, trainable_names)
    set_size, total = count_parameters(model)
    rule_sizes = {label: _rule_size(model, names) for label, names in by_rule.items()}
    if lora is not None:
        model = apply_lora(model, trainable_names, lora)
    n_trainable, _ = count_parameters(model)
    logger.info(
        f"Stage {stage} ({trainable if isinstance(trainable, str) else 'custom'}{' + LoRA' if lora else ''}): "
        f"{n_trainable:,} of {total:,} parameters trainable ({100 * n_trainable / total:.2f}%)."
    )

    checkpoints_dir = output_dir.parent / f".{output_dir.name}.checkpoints"
    arguments = dict(
        output_dir=str(checkpoints_dir),
        learning_rate=learning_rate,
        per_device_train_batch_size=per_device_train_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        max_steps=max_steps,
        num_train_epochs=num_train_epochs,
        lr_scheduler_type="warmup_stable_decay",
        lr_scheduler_kwargs={"decay_type": "1-sqrt"},
        warmup_steps=warmup_ratio,  # a float below 1 is a ratio (Transformers v5 has no warmup_ratio)
        weight_decay=weight_decay,
        seed=seed,
        data_seed=seed,
        bf16=bf16,
        logging_steps=logging_steps,
        logging_first_step=True,  # the untrained loss (the first step runs at learning rate 0 when warming up)
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        report_to=report_to,
        remove_unused_columns=False,  # the collator needs the raw Conversation objects
        include_num_input_tokens_seen="non_padding",
        # Without an accelerator, `torchrun` only gives a DDP (gloo) run with use_cpu=True: otherwise Accelerate
        # initialises the process group but runs every rank as an independent single process.
        use_cpu=not _has_accelerator(),
    )
    arguments.update(training_args or {})
    if arguments["remove_unused_columns"]:
        raise ValueError("remove_unused_columns must stay False: the collator reads whole Conversation objects.")
    args = TrainingArguments(**arguments)
    timing = TimingCallback()
    collator = ChatCollator(
        processor,
        max_length=max_length,
        labels="all" if objective == "distill" else "assistant",
        exclude_token_ids=getattr(config, "image_token_ids", None) or (),
    )
    common = dict(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=ConversationDataset(conversations),
        processing_class=processor,
        callbacks=[timing],
        decay_ratio=decay_ratio,
    )
    if objective == "distill":
        trainer = DistillationTrainer(
            **common, teacher=teacher_model, temperature=temperature, label_weight=label_weight
        )
    else:
        trainer = RecoveryTrainer(**common)
    train_output = trainer.train(resume_from_checkpoint=resume_from_checkpoint)

    state_dict = _full_state_dict(trainer)  # collective; None unless parameters are sharded
    trained = None
    if state_dict is None:
        trained = trainer.accelerator.unwrap_model(trainer.model)
        trained = merge_lora(trained) if lora is not None else trained
    elif args.should_save:
        trained = plain_model_from_state_dict(model_path, state_dict, trainable_names, lora)

    report = {
        "source": str(model_path),
        "model_type": config.model_type,
        "settings": {
            "stage": stage,
            "mla_stage": STAGE_FORMS[stage],
            "objective": objective,
            "teacher": None if teacher is None else str(getattr(teacher, "name_or_path", teacher)),
            "temperature": temperature if objective == "distill" else None,
            "label_weight": label_weight if objective == "distill" else None,
            "trainable": trainable if isinstance(trainable, str) else list(trainable),
            "trainable_rules": _rule_patterns(stage, trainable, arch_spec(config.model_type)),
            "lora": asdict(lora) if lora is not None else None,
            "data": data_label,
            "num_conversations": len(conversations),
            "image_size": image_size if data_label == ZOO_VQA else None,
            "learning_rate": learning_rate,
            "per_device_train_batch_size": per_device_train_batch_size,
            "gradient_accumulation_steps": gradient_accumulation_steps,
            "world_size": args.world_size,
            "global_batch_size": per_device_train_batch_size * gradient_accumulation_steps * args.world_size,
            "max_steps": max_steps,
            "num_train_epochs": num_train_epochs,
            "warmup_ratio": warmup_ratio,
            "decay_ratio": decay_ratio,
            "weight_decay": weight_decay,
            "seed": seed,
            "bf16": bf16,
            "schedule": trainer.schedule,
            "training_args_overrides": training_args or {},
        },
        "parameters": {
            "trainable": n_trainable,
            "total": total,
            "trainable_fraction": n_trainable / total,
            "set_parameters": set_size,  # equal to `trainable` without LoRA
            "set_tensors": len(trainable_names),
            "by_rule": rule_sizes,
        },
        "training": {
            "steps": trainer.state.global_step,
            "losses": [
                {key: entry[key] for key in ("step", "loss", "learning_rate", "grad_norm") if key in entry}
                for entry in trainer.state.log_history
                if "loss" in entry
            ],
            "train_loss": train_output.training_loss,
            "tokens_seen": int(trainer.state.num_input_tokens_seen),
            "train_time_s": getattr(timing, "seconds", None),
        },
        "environment": _environment(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if trained is not None:
        report["trained_parameters_sha256"] = _parameter_digest(trained, trainable_names)
    report["total_time_s"] = time.perf_counter() - started
    if args.should_save:
        _save_atomically(trained, processor, report, output_dir, save_dtype)
        if not save_steps and checkpoints_dir.exists():
            shutil.rmtree(checkpoints_dir, ignore_errors=True)
        logger.info(f"Stage {stage} fine-tuning -> {output_dir} ({report['total_time_s']:.1f}s)")
    trainer.accelerator.wait_for_everyone()  # other ranks return once the folder is in place
    return FinetuneResult(
        output_dir=output_dir,
        report=report,
        trainable_names=trainable_names,
        model=trained if return_model else None,
    )


def _load_teacher(teacher: str | os.PathLike | nn.Module, student_config) -> nn.Module:
    """The original model as a frozen teacher; its vocabulary must be the student's."""
    model = load_model(teacher) if isinstance(teacher, (str, os.PathLike)) else teacher
    if model.config.model_type not in ARCHITECTURES:
        raise ValueError(
            f"The teacher must be the original (native) model, got model_type {model.config.model_type!r}."
        )
    vocab, expected = model.config.get_text_config().vocab_size, student_config.get_text_config().vocab_size
    if vocab != expected:
        raise ValueError(f"The teacher's vocabulary ({vocab}) is not the student's ({expected}).")
    return model.eval().requires_grad_(False)


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, ROCm, MPS, XPU, ...
    return torch.cuda.is_available() or (accelerator is not None and accelerator.is_available())


def _environment() -> dict[str, str]:
    versions = environment()
    for package in ("peft", "accelerate"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            pass
    return versions


__all__ = [
    "TRAINABLE_SETS",
    "ConversationDataset",
    "FinetuneResult",
    "LoraSettings",
    "apply_lora",
    "apply_trainable_set",
    "check_stage",
    "count_parameters",
    "finetune",
    "load_training_conversations",
    "load_training_items",
    "merge_lora",
    "plain_model_from_state_dict",
    "trainable_parameter_names",
    "trainable_rules",
    "wsd_steps",
]
