# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""Two-stage recovery fine-tuning of converted models on `transformers.Trainer` (MHA2MLA-VLM §4).

Stage 1 trains the `partial_rope` form (partial RoPE, full-rank keys and values), stage 2 the `mla` form (per
modality low-rank `kv_a_proj` / `kv_b_proj`). Everything runs through a stock `Trainer`, so `torchrun` and
`accelerate launch` with DDP, FSDP or DeepSpeed work unchanged; this module holds no distributed code of its own
beyond asking the `Trainer`'s accelerator for a full state dict when parameters are sharded.

What trains (the `paper` and `official` sets, LoRA): `training.trainable`; the data and its mixes:
`training.sources`; the crash-safe save: `training.checkpoint`.

Schedule: warmup-stable-decay (linear warm-up, constant, then `1 - sqrt` decay to 0), the official
`lr_scheduler.py` recipe, via Transformers' `warmup_stable_decay` scheduler (identical in 5.17 and 5.23). Warm-up
and decay lengths are `ceil(ratio * total_steps)`, computed from the Trainer's real number of optimizer steps (also
with `num_train_epochs`).

Qwen2.5-VL: the collator never passes `position_ids`; the model computes 3-D M-RoPE positions from `input_ids`,
`mm_token_type_ids` and `image_grid_thw` in every training forward (method.md §7.9 is the official code's bug).

About 400 lines: `finetune` itself is one linear function (load, trainable set, data, Trainer, save, report) with
its argument documentation.
"""

import os
import shutil
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import TrainerCallback, TrainingArguments
from transformers.utils import logging

from ..conversations import Conversation
from ..registry import ARCHITECTURES, MLA_MODEL_TYPES, arch_spec
from ..utils import check_output_folder, environment
from ..zoo.batched_attention import batch_vision_attention
from .checkpoint import (
    full_state_dict,
    load_model,
    parameter_digest,
    plain_model_from_state_dict,
    read_conversion_report,
    rule_size,
    save_atomically,
)
from .data import ChatCollator
from .sources import ZOO_VQA, ConversationDataset, load_training_items
from .trainable import (
    STAGE_FORMS,
    LoraSettings,
    Stage,
    TrainableSet,
    apply_lora,
    apply_trainable_set,
    count_parameters,
    merge_lora,
    rule_patterns,
    trainable_parameter_names,
)
from .trainer import DistillationTrainer, RecoveryTrainer, TimingCallback


logger = logging.get_logger(__name__)

Objective = Literal["sft", "distill"]


@dataclass
class FinetuneResult:
    """What `finetune` produced: the saved folder, its report (also in `finetune_report.json`), the names of the
    trained parameters, and the trained plain model when `return_model=True`."""

    output_dir: Path
    report: dict
    trainable_names: list[str] = field(default_factory=list, repr=False)
    model: nn.Module | None = field(default=None, repr=False)


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
    train_sampling_strategy: str = "random",
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
    callbacks: Sequence[TrainerCallback] = (),
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
        train_sampling_strategy: `TrainingArguments.train_sampling_strategy`. `"batch_rebalance"` with
            `gradient_accumulation_steps` >= 2 splits each step's samples into micro-batches by length (same loss,
            far less padding when text windows and short conversations mix); `"group_by_length"` also works on
            conversations (their lengths are measured once before training).
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
        callbacks: extra `TrainerCallback`s for the Trainer (e.g. early stopping, a profiler), after the run's own.
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
    conversion_report = read_conversion_report(model_path)
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
    rule_sizes = {label: rule_size(model, names) for label, names in by_rule.items()}
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
        train_sampling_strategy=train_sampling_strategy,
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
    # Qwen-VL's M-RoPE positions computed in the dataloader workers and LLaVA-NeXT's image sizes kept on the host:
    # on a GPU the forwards would otherwise synchronise with the device per row and image
    collator = ChatCollator.for_model(
        processor,
        config,
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
        callbacks=[timing, *callbacks],
        decay_ratio=decay_ratio,
    )
    if objective == "distill":
        trainer = DistillationTrainer(
            **common, teacher=teacher_model, temperature=temperature, label_weight=label_weight
        )
    else:
        trainer = RecoveryTrainer(**common)
    with ExitStack() as stack:
        # Qwen's vision attention (the registry's `vision_attention`) in one SDPA call per block instead of one per
        # image and window, for the student and the teacher (`zoo.batched_attention`; the same parameters, so the
        # saved state dict is unchanged). Sharded runs (FSDP, DeepSpeed) keep Transformers' modules, which their
        # wrapping was set up for.
        if not (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
            for module in (model, teacher_model):
                if module is not None:
                    stack.enter_context(batch_vision_attention(module))
        train_output = trainer.train(resume_from_checkpoint=resume_from_checkpoint)

    state_dict = full_state_dict(trainer)  # collective; None unless parameters are sharded
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
            "trainable_rules": rule_patterns(stage, trainable, arch_spec(config.model_type)),
            "lora": asdict(lora) if lora is not None else None,
            "data": data_label,
            "num_conversations": len(conversations),
            "image_size": image_size if data_label == ZOO_VQA else None,
            "learning_rate": learning_rate,
            "per_device_train_batch_size": per_device_train_batch_size,
            "gradient_accumulation_steps": gradient_accumulation_steps,
            "world_size": args.world_size,
            "global_batch_size": per_device_train_batch_size * gradient_accumulation_steps * args.world_size,
            "train_sampling_strategy": args.train_sampling_strategy,
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
        report["trained_parameters_sha256"] = parameter_digest(trained, trainable_names)
    report["total_time_s"] = time.perf_counter() - started
    if args.should_save:
        save_atomically(trained, processor, report, output_dir, save_dtype, conversion_report)
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


__all__ = ["FinetuneResult", "Objective", "check_stage", "finetune"]
