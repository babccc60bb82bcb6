# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""`convert(...)`: a native LLaVA / LLaVA-NeXT / Qwen2.5-VL checkpoint in, a converted MLA checkpoint folder out."""

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import torch
import transformers
from tqdm.auto import tqdm
from transformers import AutoConfig
from transformers.initialization import no_init_weights
from transformers.utils import logging

from .registry import ArchSpec, arch_spec
from .report import environment, kv_cache_size, model_card
from .rope_selection import load_rank_file, ranks_to_pairs, select_fixed_pairs
from .svd import weight_svd
from .weights import convert_attention_weights


logger = logging.get_logger(__name__)

RopeStrategy = Literal["high", "low", "uniform"]
SvdMethod = Literal["weight"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Files of the source folder that must not be copied: the converter writes its own weights, config and card.
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".py", ".gguf", ".msgpack", ".h5")
_NOT_COPIED_NAMES = {
    "config.json",
    "generation_config.json",
    "README.md",
    ".gitattributes",
    "model.safetensors.index.json",
}
REPORT_NAME = "mla_conversion_report.json"


@dataclass
class ConversionResult:
    """What `convert` wrote: the folder, its report (also in `mla_conversion_report.json`) and the model."""

    output_dir: Path
    report: dict
    model: torch.nn.Module | None = field(default=None, repr=False)


def resolve_source(source: str | os.PathLike) -> tuple[Path, bool]:
    """A local folder, or a Hub id resolved through the local cache (no network here). Returns (path, is_hub_id)."""
    path = Path(source)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a Transformers checkpoint folder.")
        return path, False
    if path.exists():
        raise NotADirectoryError(f"{path} is a file; pass the checkpoint folder.")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(source))), True
    except Exception as error:  # offline, unknown repo, ...
        raise FileNotFoundError(
            f"{source!r} is neither a local checkpoint folder nor a Hub repo available here ({error})."
        ) from error


def select_rope_pairs(
    config, rope_dim: int, rope_strategy: str, rope_ranks: str | os.PathLike | None
) -> tuple[list[list[list[int]]], str]:
    """Kept rotary pairs per layer and kv head, from a fixed strategy or a rank file."""
    text = config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if rope_ranks is not None:
        ranks = load_rank_file(rope_ranks)
        expected = (text.num_hidden_layers, text.num_key_value_heads)
        if tuple(ranks.shape[:2]) != expected:
            raise ValueError(
                f"Rank file {rope_ranks} has shape {tuple(ranks.shape)}; this model needs [layers, kv_heads, ...] = "
                f"{expected}."
            )
        return ranks_to_pairs(ranks, rope_dim, head_dim=head_dim), f"ranks:{Path(rope_ranks).name}"
    if rope_strategy not in ("high", "low", "uniform"):
        raise ValueError(
            f"rope_strategy {rope_strategy!r} is not available for weight-only conversion; use high, low, uniform "
            "or --rope-ranks FILE."
        )
    pairs = select_fixed_pairs(rope_strategy, head_dim, rope_dim, text.num_hidden_layers, text.num_key_value_heads)
    return pairs, rope_strategy


def build_mla_config(source_config, spec: ArchSpec, **mla_settings):
    """The MLA config of `spec` carrying every field of the native `source_config` plus `mla_settings`."""
    values = source_config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version"):
        values.pop(key, None)
    values.update(mla_settings)
    return spec.mla_config_class(**values)


@torch.no_grad()
def convert_model(
    source_model: torch.nn.Module,
    mla_config,
    spec: ArchSpec,
    *,
    svd: SvdMethod = "weight",
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> tuple[torch.nn.Module, list[dict]]:
    """Build the MLA model from an in-memory native model. Returns the model and per-layer statistics."""
    if svd != "weight":
        raise ValueError(f"svd={svd!r} needs calibration data; weight-only conversion supports svd='weight'.")
    state = source_model.state_dict()
    prefix = spec.text_layers
    new_state, layer_stats = {}, []
    num_layers = mla_config.text_config.num_hidden_layers
    for name, tensor in state.items():
        if not (name.startswith(prefix + ".") and ".self_attn." in name):
            new_state[name] = tensor
    rank = mla_config.mla_latent_dim
    for layer_idx in tqdm(range(num_layers), desc="Converting attention layers", disable=not progress):
        attn_prefix = f"{prefix}.{layer_idx}.self_attn."
        attention = {k[len(attn_prefix) :]: v for k, v in state.items() if k.startswith(attn_prefix)}
        factors_cache = {}

        def low_rank(weight, branch, cache=factors_cache):
            if "weight" not in cache:  # both branches share the weight-space factorisation
                cache["weight"] = weight_svd(weight, rank)
                cache["relative_error"] = (cache["weight"].discarded ** 0.5) / weight.double().norm().item()
            return cache["weight"]

        converted = convert_attention_weights(attention, mla_config, layer_idx, low_rank)
        new_state.update({attn_prefix + k: v for k, v in converted.items()})
        stats = {"layer": layer_idx}
        if "relative_error" in factors_cache:
            stats["weight_relative_error"] = factors_cache["relative_error"]
        layer_stats.append(stats)

    with no_init_weights():
        model = spec.mla_model_class(mla_config)
    missing, unexpected = model.load_state_dict(new_state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"Converted weights do not match the MLA model: missing={missing}, unexpected={unexpected}")
    model.tie_weights()
    if dtype is not None:
        model.to(dtype)
    return model.eval(), layer_stats


def convert(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    rope_dim: int,
    kv_rank: int,
    rope_strategy: RopeStrategy = "high",
    rope_ranks: str | os.PathLike | None = None,
    svd: SvdMethod = "weight",
    dtype: str = "auto",
    mla_stage: Literal["partial_rope", "mla"] = "mla",
    modality_split: bool = True,
    image_token_ids: list[int] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    return_model: bool = False,
) -> ConversionResult:
    """Convert a native VLM checkpoint to MLA and write a Hub-compatible folder.

    Args:
        source: native LLaVA / LLaVA-NeXT / Qwen2.5-VL checkpoint folder (or Hub id in the local cache).
        output_dir: folder to write. It is assembled in a hidden sibling folder and renamed at the end, so an
            interrupted run never leaves a folder that looks complete.
        rope_dim: rotary dims kept per head (even, at most head_dim).
        kv_rank: latent width per kv head (the cached latent has `num_kv_heads * kv_rank` elements).
        rope_strategy: which rotary pairs to keep (`high`, `low`, `uniform`); ignored when `rope_ranks` is given.
        rope_ranks: rank file (official `.pth` format, or our `.safetensors` / `.json`).
        svd: low-rank initialisation; `weight` = truncated SVD of `[W_k_nope; W_v]` (method.md 3.5).
        dtype: `auto` (the source's dtype), `float32`, `bfloat16` or `float16`.
        mla_stage: `mla`, or `partial_rope` (stage-1 form for recovery fine-tuning).
        modality_split: separate image/text projections (both start from the same weight-SVD factors).
        image_token_ids: token ids of the image branch (default: the architecture's image tokens).
        overwrite: replace an existing non-empty `output_dir`.
        progress: show progress bars.
        return_model: keep the converted model in the result.
    """
    started = time.perf_counter()
    timings = {}
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{output_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it."
        )
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}.")
    source_path, is_hub_id = resolve_source(source)
    source_config = AutoConfig.from_pretrained(source_path)
    spec = arch_spec(source_config.model_type)
    if source_config.model_type != spec.source_model_type:
        raise ValueError(f"{source} is already an MLA checkpoint ({source_config.model_type}); pass the native one.")

    rope_pairs, rope_source = select_rope_pairs(source_config, rope_dim, rope_strategy, rope_ranks)
    mla_settings = dict(
        rope_dim=rope_dim, kv_rank=kv_rank, rope_pairs=rope_pairs, modality_split=modality_split, mla_stage=mla_stage
    )
    if image_token_ids is not None:
        mla_settings["image_token_ids"] = list(image_token_ids)
    mla_config = build_mla_config(source_config, spec, **mla_settings)  # validates before the weights are read

    t = time.perf_counter()
    source_class = getattr(transformers, spec.source_class)
    source_model = source_class.from_pretrained(source_path, dtype=torch.float32)
    source_dtype = getattr(source_config, "dtype", None) or getattr(source_config.text_config, "dtype", None)
    target_dtype = DTYPES[dtype] if dtype != "auto" else _as_dtype(source_dtype)
    timings["load_source_s"] = time.perf_counter() - t

    t = time.perf_counter()
    mla_config.dtype = target_dtype
    model, layer_stats = convert_model(source_model, mla_config, spec, svd=svd, dtype=target_dtype, progress=progress)
    del source_model
    timings["convert_s"] = time.perf_counter() - t

    settings = {
        "architecture": spec.source_model_type,
        "mla_stage": mla_stage,
        "rope_dim": rope_dim,
        "kv_rank": kv_rank,
        "latent_dim": mla_config.mla_latent_dim,
        "rope_strategy": rope_source,
        "svd": svd,
        "modality_split": modality_split,
        "image_token_ids": mla_config.image_token_ids,
        "dtype": str(target_dtype).removeprefix("torch."),
    }
    report = {
        "source": str(source),
        "source_is_hub_id": is_hub_id,
        "model_type": mla_config.model_type,
        "settings": settings,
        "kv_cache": kv_cache_size(mla_config, target_dtype).to_dict(),
        "layers": layer_stats,
        "timings_s": timings,
        "environment": environment(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }

    t = time.perf_counter()
    write_checkpoint_atomically(model, report, source_path, output_dir)
    timings["save_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - started
    (output_dir / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    logger.info(f"Converted {source} -> {output_dir} in {timings['total_s']:.1f}s")
    return ConversionResult(output_dir=output_dir, report=report, model=model if return_model else None)


def _as_dtype(value) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in DTYPES:
        return DTYPES[value.removeprefix("torch.")]
    return torch.float32


def copy_processor_files(source_path: Path, output_dir: Path) -> list[str]:
    """Copy tokenizer / processor / chat-template files of the source folder (not weights, config or code)."""
    copied = []
    for item in sorted(source_path.iterdir()):
        if not item.is_file() or item.name in _NOT_COPIED_NAMES or item.name.endswith(_NOT_COPIED_SUFFIXES):
            continue
        if item.name.startswith("model-") or item.name.startswith("pytorch_model"):
            continue
        shutil.copy2(item, output_dir / item.name)
        copied.append(item.name)
    return copied


def write_checkpoint_atomically(model, report: dict, source_path: Path, output_dir: Path) -> None:
    """Write weights, config, remote code, processor files, card and report in a hidden sibling folder, then
    move it into place. A crash leaves only `.<name>.incomplete`, never a folder that looks complete."""
    output_dir = output_dir.resolve()
    staging = output_dir.parent / f".{output_dir.name}.incomplete"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        model.save_pretrained(staging)
        report["copied_from_source"] = copy_processor_files(source_path, staging)
        (staging / "README.md").write_text(model_card(report))
        (staging / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


__all__ = ["ConversionResult", "build_mla_config", "convert", "convert_model", "resolve_source", "select_rope_pairs"]
