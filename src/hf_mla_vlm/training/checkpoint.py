# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""Saving what `finetune` trained: the gathered state dict under FSDP / ZeRO-3, the plain (adapter-merged) model,
and the crash-safe write of weights, processor and report."""

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer

from ..conversion_scripts.checks import REPORT_NAME as CONVERSION_REPORT_NAME
from ..conversion_scripts.hub import read_report
from ..conversion_scripts.report import finetune_summary, model_card
from ..utils import staged_folder, weight_file_digests
from .trainable import LoraSettings, apply_lora, merge_lora


REPORT_NAME = "finetune_report.json"


def full_state_dict(trainer: Trainer) -> dict | None:
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


def rule_size(model: nn.Module, names: Sequence[str]) -> dict[str, int]:
    params = dict(model.named_parameters())
    return {"tensors": len(names), "parameters": sum(params[name].numel() for name in names)}


def parameter_digest(model: nn.Module, names: Sequence[str]) -> str:
    params = dict(model.named_parameters())
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode())
        digest.update(params[name].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def read_conversion_report(model_path: str | os.PathLike) -> dict | None:
    """The `mla_conversion_report.json` of a converted source folder (`hub.read_report`: it must carry the KV-cache
    numbers the fine-tuned folder's card is written from); None when it has none (a native model, a folder written
    by other tools).

    Raises:
        InputError: the report exists but is unreadable or lacks the numbers (checked before any training).
    """
    if not (Path(model_path) / CONVERSION_REPORT_NAME).is_file():
        return None
    return read_report(model_path)


def carried_conversion_report(conversion_report: dict, finetune_report: dict) -> dict:
    """The source folder's `mla_conversion_report.json` as the fine-tuned folder keeps it: the architecture and KV
    numbers are unchanged, the weight-file digests are the new ones, the fine-tuning joins `"fine_tuning"`, and an
    `"evaluation"` (measured on the weights before this fine-tuning) is dropped."""
    carried = {key: value for key, value in conversion_report.items() if key != "evaluation"}
    carried["files"] = finetune_report["files"]
    carried["fine_tuning"] = [*conversion_report.get("fine_tuning", []), finetune_summary(finetune_report)]
    return carried


def save_atomically(
    model: nn.Module,
    processor,
    report: dict,
    output_dir: Path,
    save_dtype: torch.dtype,
    conversion_report: dict | None = None,
) -> None:
    """Weights (the model's own Hub-ready `save_pretrained`), processor and report in a hidden sibling folder,
    renamed into place at the end (`staged_folder`: an interrupted run never leaves a half-written folder, and a
    replaced one is deleted only once the new one is in place). The report records the sha256 of every weight file.

    With the source's `conversion_report`, the folder also gets it (`carried_conversion_report`) and the model
    card generated from it, so that it verifies and pushes like a converted folder."""
    with staged_folder(output_dir) as staging:
        if any(p.dtype != save_dtype for p in model.parameters() if p.is_floating_point()):
            model.to(save_dtype)
        model.config.dtype = save_dtype
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        report["files"] = weight_file_digests(staging)
        (staging / REPORT_NAME).write_text(json.dumps(report, indent=2, default=str) + "\n")
        if conversion_report is not None:
            carried = carried_conversion_report(conversion_report, report)
            (staging / CONVERSION_REPORT_NAME).write_text(json.dumps(carried, indent=2, default=str) + "\n")
            (staging / "README.md").write_text(model_card(carried))


__all__ = [
    "CONVERSION_REPORT_NAME",
    "REPORT_NAME",
    "carried_conversion_report",
    "full_state_dict",
    "load_model",
    "plain_model_from_state_dict",
    "read_conversion_report",
    "save_atomically",
]
