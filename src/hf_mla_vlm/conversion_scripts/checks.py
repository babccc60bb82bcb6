# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""Checks of a converted checkpoint folder, before it is used or published.

`check_checkpoint_folder` lists what would make the folder unusable as a Hub repo (config, `auto_map`, flat remote
code, safetensors weights with every layer's MLA attention, a config that validates). `verify_folder` adds the
integrity checks (the sha256 of every weight file against the one its report recorded) and a tiny forward pass.

Longer than the package's usual ~400 lines: every check names the problem and its fix in its own sentence (config,
`auto_map`, remote-code imports, weight headers and shapes, digests, a forward pass).
"""

from __future__ import annotations

import ast
import json
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from transformers.utils import logging

from ..errors import InputError
from ..registry import MLA_MODEL_TYPES
from ..utils import file_digest, progress_bars, weight_file_names


logger = logging.get_logger(__name__)

CONFIG_NAME = "config.json"
REPORT_NAME = "mla_conversion_report.json"
FINETUNE_REPORT_NAME = "finetune_report.json"
SINGLE_WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
REQUIRED_AUTO_CLASSES = ("AutoConfig", "AutoModel", "AutoModelForImageTextToText")
# Top-level modules the remote code may import: it must run where only torch and transformers are installed.
ALLOWED_REMOTE_IMPORTS = frozenset({"torch", "transformers"}) | frozenset(sys.stdlib_module_names)
_MAX_LISTED_KEYS = 8


# --- the folder ---------------------------------------------------------------------------------------------------
def check_checkpoint_folder(folder: str | os.PathLike) -> list[str]:
    """Problems that would make `folder` a broken Hub repo of a converted model; an empty list means it is fine.

    Checked without loading the model: `config.json` parses, names an MLA `model_type` and has an `auto_map` for
    `AutoConfig`, `AutoModel` and `AutoModelForImageTextToText` whose modules are in the folder; every remote-code
    `.py` file uses only flat relative imports of files present and imports only torch, transformers and the
    standard library at module level; the weights are safetensors (single file, or an index whose shards all exist)
    with readable headers, hold the MLA attention weights of every text layer (with the shapes the config implies)
    and no leftover native `k_proj` / `v_proj`; and the MLA config validates.

    Args:
        folder: the converted checkpoint folder (as written by `hf_mla_vlm.convert`).

    Returns:
        Human-readable problems, one string each.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder} is not a folder."]
    problems: list[str] = []
    if folder.name.endswith(".incomplete"):
        problems.append(f"{folder.name} is the staging folder of an unfinished conversion; push the final folder.")
    config = _read_config(folder, problems)
    if config is not None:
        _check_auto_map(folder, config, problems)
    _check_remote_code(folder, problems)
    keys, shapes = _read_weight_headers(folder, problems)
    mla_config = _validated_config(folder, problems) if config is not None else None
    if config is not None and keys is not None:
        _check_attention_weights(config, mla_config, keys, shapes, problems)
    return problems


def assert_checkpoint_folder(folder: str | os.PathLike) -> None:
    """Raise `InputError` (a `ValueError`) listing every problem `check_checkpoint_folder` finds in `folder`."""
    raise_for_problems(folder, check_checkpoint_folder(folder))


def raise_for_problems(folder: str | os.PathLike, problems: list[str]) -> None:
    """Raise `InputError` listing the `problems` of `folder` (`check_checkpoint_folder`, `verify_folder`), if any."""
    if problems:
        listing = "\n".join(f"  - {problem}" for problem in problems)
        raise InputError(f"{folder} is not a valid converted checkpoint folder:\n{listing}")


def verify_folder(folder: str | os.PathLike, *, forward: bool = True, progress: bool = False) -> list[str]:
    """Problems of `folder` as a converted checkpoint: [`check_checkpoint_folder`], the integrity of its weight files
    and (with `forward`) a tiny forward pass; an empty list means it is fine. What `hf-mla-vlm verify` and
    `push_to_hub` run.

    Integrity: the size and sha256 of every weight file recorded under `"files"` in `mla_conversion_report.json` (or
    `finetune_report.json`) are recomputed, so flipped bytes, which safetensors cannot detect, are reported; weight
    files the report does not list are reported too. (A folder written before reports recorded hashes gets a warning.)
    Forward: the model loads through the package's own classes (never the folder's remote code, which is checked
    statically above) with every weight used, and a forward pass on a few text tokens gives finite logits.

    Args:
        folder: the converted checkpoint folder.
        forward: also load the model and run the forward pass (reads all weights once).
        progress: show progress bars (hashing, loading).

    Returns:
        Human-readable problems, one string each.
    """
    folder = Path(folder)
    problems = check_checkpoint_folder(folder)
    if not folder.is_dir():
        return problems
    problems += _digest_problems(folder, progress)
    if forward and not problems:
        problems += _forward_problems(folder, progress)
    return problems


def _digest_problems(folder: Path, progress: bool) -> list[str]:
    problems, records = [], {}
    for name in (REPORT_NAME, FINETUNE_REPORT_NAME):
        if not (folder / name).is_file():
            continue
        try:
            files = json.loads((folder / name).read_text(encoding="utf-8")).get("files")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as error:
            problems.append(f"{name} is not a readable JSON report ({error}).")
            continue
        if files is not None and not isinstance(files, dict):
            problems.append(
                f"{name} has a malformed 'files' entry (expected an object of file name -> sha256, bytes)."
            )
        elif files is not None:
            records[name] = files
    if not records:
        if not problems:
            logger.warning(
                f"{folder}: no report records the sha256 of the weight files (written by an older hf-mla-vlm); "
                "their integrity is not checked. Convert again to record them."
            )
        return problems
    present = set(weight_file_names(folder))
    for report_name, files in records.items():
        for name in sorted(present - set(files)):
            problems.append(
                f"{name} is a weight file that {report_name} does not record (added after the conversion)."
            )
        for name, entry in sorted(files.items()):
            path = folder / str(name)
            if Path(str(name)).name != name or not path.is_file():
                problems.append(f"{name}, recorded in {report_name}, is missing.")
                continue
            actual = file_digest(path, progress=progress)
            expected = entry if isinstance(entry, dict) else {}
            if actual["bytes"] != expected.get("bytes"):
                problems.append(
                    f"{name} has {actual['bytes']} bytes, {report_name} recorded {expected.get('bytes')}: the file "
                    "was truncated or replaced; download or convert it again."
                )
            elif actual["sha256"] != expected.get("sha256"):
                problems.append(
                    f"{name} does not match the sha256 recorded in {report_name} (bytes changed, e.g. a corrupted "
                    "disk or transfer): download or convert it again."
                )
    return problems


def _forward_problems(folder: Path, progress: bool) -> list[str]:
    import torch
    from transformers import AutoModelForImageTextToText

    try:
        with progress_bars(progress):
            model, info = AutoModelForImageTextToText.from_pretrained(
                folder, trust_remote_code=False, output_loading_info=True
            )
    except Exception as error:  # whatever stops the load is the problem to report
        return [f"the model does not load ({type(error).__name__}: {' '.join(str(error).split())[:500]})."]
    problems = [
        f"loading left {kind.replace('_', ' ')}: {_some(str(key) for key in keys)}."
        for kind, keys in info.items()
        if kind in ("missing_keys", "unexpected_keys", "mismatched_keys") and keys
    ]
    config = model.config
    special = set(getattr(config, "image_token_ids", None) or [])
    for name in (
        "image_token_id",
        "image_token_index",
        "video_token_id",
        "vision_start_token_id",
        "vision_end_token_id",
    ):
        if isinstance(getattr(config, name, None), int):
            special.add(getattr(config, name))
    vocab = config.text_config.vocab_size
    ids = torch.tensor([[i for i in range(1, vocab) if i not in special][:8]])
    try:
        with torch.no_grad():
            logits = model.eval()(input_ids=ids).logits
    except Exception as error:
        return problems + [f"a forward pass on {ids.shape[1]} text tokens fails ({type(error).__name__}: {error})."]
    if tuple(logits.shape) != (1, ids.shape[1], vocab) or not bool(torch.isfinite(logits).all()):
        problems.append(
            f"a forward pass on {ids.shape[1]} text tokens gives logits of shape {tuple(logits.shape)} "
            f"{'with' if not bool(torch.isfinite(logits).all()) else 'without'} non-finite values; expected finite "
            f"logits of shape {(1, ids.shape[1], vocab)}."
        )
    return problems


def _read_config(folder: Path, problems: list[str]) -> dict | None:
    path = folder / CONFIG_NAME
    if not path.is_file():
        problems.append(f"{CONFIG_NAME} is missing.")
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        problems.append(f"{CONFIG_NAME} does not parse as JSON ({error}).")
        return None
    if not isinstance(config, dict):
        problems.append(f"{CONFIG_NAME} must hold a JSON object, got {type(config).__name__}.")
        return None
    model_type = config.get("model_type")
    if model_type not in MLA_MODEL_TYPES:
        problems.append(
            f"{CONFIG_NAME} has model_type {model_type!r}; a converted checkpoint has one of "
            f"{sorted(MLA_MODEL_TYPES)}."
        )
    return config


def _check_auto_map(folder: Path, config: dict, problems: list[str]) -> None:
    auto_map = config.get("auto_map")
    if not isinstance(auto_map, dict):
        problems.append(
            f"{CONFIG_NAME} has no auto_map: the folder cannot load with trust_remote_code=True where hf_mla_vlm is "
            "not installed (Transformers then reports an unknown model type and suggests upgrading). Re-save it with "
            "hf_mla_vlm: run `hf-mla-vlm convert` again, or `import hf_mla_vlm` and "
            "`AutoModelForImageTextToText.from_pretrained(folder).save_pretrained(new_folder)`."
        )
        return
    missing_modules: dict[str, list[str]] = {}
    for auto_class in REQUIRED_AUTO_CLASSES:
        target = auto_map.get(auto_class)
        if target is None:
            problems.append(f"auto_map has no {auto_class} entry.")
            continue
        if isinstance(target, str) and "--" in target:
            problems.append(f"auto_map[{auto_class!r}] = {target!r} points to code in another repo.")
            continue
        if not isinstance(target, str) or target.count(".") != 1:
            problems.append(f"auto_map[{auto_class!r}] = {target!r} is not of the form 'module.ClassName'.")
            continue
        module = target.split(".")[0]
        if not (folder / f"{module}.py").is_file():
            missing_modules.setdefault(module, []).append(auto_class)
    for module, auto_classes in missing_modules.items():
        problems.append(f"auto_map {', '.join(auto_classes)} needs {module}.py, which is not in the folder.")


def _check_remote_code(folder: Path, problems: list[str]) -> None:
    nested = sorted(p.relative_to(folder).as_posix() for p in folder.glob("*/**/*.py") if not _is_hidden(p, folder))
    if nested:
        problems.append(f"Remote code must be flat (top-level .py files only); found {nested}.")
    for path in sorted(p for p in folder.glob("*.py") if not p.name.startswith(".")):
        problems.extend(remote_code_problems(path, folder))


def remote_code_problems(path: str | os.PathLike, folder: str | os.PathLike | None = None) -> list[str]:
    """Problems of one remote-code file: syntax, non-flat relative imports, relative imports of files that are not
    in `folder` (default: the file's folder), and module-level imports other than torch, transformers and the
    standard library. `hf_mla_vlm` may not be imported anywhere (the package is absent where the code runs)."""
    path = Path(path)
    folder = Path(folder) if folder is not None else path.parent
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=path.name)
    except (OSError, UnicodeDecodeError, SyntaxError) as error:
        return [f"{path.name} does not parse as Python ({error})."]
    problems = []
    module_level = {id(node) for node in _module_level_statements(tree.body)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            where = f"{path.name}:{node.lineno}"
            if node.level != 1 or not node.module or "." in node.module:
                dots = "." * node.level
                problems.append(
                    f"{where}: `from {dots}{node.module or ''} import ...` is not a flat relative import "
                    "(use `from .module import name` with module.py beside it)."
                )
            elif not (folder / f"{node.module}.py").is_file():
                problems.append(f"{where}: imports .{node.module}, but {node.module}.py is not in the folder.")
            continue
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        for name in names:
            top = name.split(".")[0]
            if top == "hf_mla_vlm":
                problems.append(
                    f"{path.name}:{node.lineno}: imports {name}; remote code must run where hf_mla_vlm is not "
                    "installed."
                )
            elif id(node) in module_level and top not in ALLOWED_REMOTE_IMPORTS:
                problems.append(
                    f"{path.name}:{node.lineno}: imports {name} at module level; remote code may import only torch, "
                    "transformers and the standard library."
                )
    return problems


def _module_level_statements(body: Iterable[ast.stmt]) -> Iterable[ast.stmt]:
    """Statements run at import time: the module body and the bodies of its `if` / `with` blocks. Imports inside a
    `try` are optional by construction and imports inside functions run only when called, so both are skipped."""
    for node in body:
        yield node
        if isinstance(node, ast.If):
            yield from _module_level_statements(node.body)
            yield from _module_level_statements(node.orelse)
        elif isinstance(node, ast.With):
            yield from _module_level_statements(node.body)


def _is_hidden(path: Path, folder: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(folder).parts)


def _read_weight_headers(folder: Path, problems: list[str]) -> tuple[set[str] | None, dict[str, tuple[int, ...]]]:
    """Tensor names (and shapes) of the safetensors weights, read from the headers only."""
    from safetensors import safe_open

    index_path = folder / WEIGHTS_INDEX
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError("weight_map must be a non-empty object")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            problems.append(f"{WEIGHTS_INDEX} is not a valid safetensors index ({error!r}).")
            return None, {}
        shards = sorted(set(weight_map.values()))
    elif (folder / SINGLE_WEIGHTS).is_file():
        weight_map, shards = None, [SINGLE_WEIGHTS]
    else:
        others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        hint = f" (found {others}: only safetensors weights are supported)" if others else ""
        problems.append(f"No weights: neither {SINGLE_WEIGHTS} nor {WEIGHTS_INDEX} is in the folder{hint}.")
        return None, {}

    keys: set[str] = set()
    shapes: dict[str, tuple[int, ...]] = {}
    readable = True
    for shard in shards:
        path = folder / shard
        if not isinstance(shard, str) or Path(shard).name != shard or not path.is_file():
            problems.append(f"Weight shard {shard!r} listed in {WEIGHTS_INDEX} is missing.")
            readable = False
            continue
        try:
            with safe_open(str(path), framework="pt") as weights:
                shard_keys = set(weights.keys())
                for key in shard_keys:
                    shapes[key] = tuple(weights.get_slice(key).get_shape())
        except Exception as error:  # SafetensorError, OSError: truncated, corrupted or unreadable file
            problems.append(f"{shard} is not a readable safetensors file ({error}).")
            readable = False
            continue
        if weight_map is not None:
            indexed = {key for key, name in weight_map.items() if name == shard}
            if indexed - shard_keys:
                problems.append(
                    f"{WEIGHTS_INDEX} lists tensors that {shard} does not hold: {_some(indexed - shard_keys)}."
                )
            if shard_keys - indexed:
                problems.append(
                    f"{shard} holds tensors that {WEIGHTS_INDEX} does not list (they would not load): "
                    f"{_some(shard_keys - indexed)}."
                )
        keys |= shard_keys
    return (keys if readable else None), shapes


def _validated_config(folder: Path, problems: list[str]) -> Any | None:
    """The MLA config built by the package's config class (`AutoConfig` after `import hf_mla_vlm`), or None."""
    # Importing this module imported `hf_mla_vlm`, which registered the MLA configs with AutoConfig.
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder)
    except ValueError as error:
        problems.append(f"{CONFIG_NAME} does not validate as an MLA config: {error}")
        return None
    except Exception as error:  # a malformed field the config class cannot even read
        problems.append(f"{CONFIG_NAME} cannot be loaded as an MLA config ({type(error).__name__}: {error}).")
        return None
    if not hasattr(config, "validate_mla"):
        return None  # not an MLA model_type: already reported
    return config


def attention_weight_schema(mla_config) -> dict[str, tuple[tuple[int, ...], bool]]:
    """The weights of one converted attention layer: name (under `self_attn.`) -> (shape, required).

    Derived from `MLAAttention` itself, built on the meta device from the validated config, so the check cannot drift
    from the model: weights are required, biases optional (a layer takes the biases of the native attention it
    replaced, which the config does not record) but must have the shape the module gives them.
    """
    import torch

    from ..modeling.mla_attention import MLAAttention

    with torch.device("meta"):
        attention = MLAAttention(mla_config, 0, qkv_bias=True, o_bias=True)
    return {
        name: (tuple(parameter.shape), not name.endswith(".bias")) for name, parameter in attention.named_parameters()
    }


def _check_attention_weights(
    config: dict, mla_config: Any | None, keys: set[str], shapes: dict[str, tuple[int, ...]], problems: list[str]
) -> None:
    spec = MLA_MODEL_TYPES.get(config.get("model_type"))
    prefix = spec.text_layers if spec is not None else "model.language_model.layers"
    num_layers = (config.get("text_config") or {}).get("num_hidden_layers")
    if not isinstance(num_layers, int) or num_layers < 1:
        problems.append(f"{CONFIG_NAME} has no valid text_config.num_hidden_layers ({num_layers!r}).")
        return
    layer_key = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")
    beyond = sorted({int(m.group(1)) for m in map(layer_key.match, keys) if m and int(m.group(1)) >= num_layers})
    if beyond:
        problems.append(f"Weights for text layers {beyond} but text_config.num_hidden_layers = {num_layers}.")
    if mla_config is None:
        return  # the config problem is reported; without a valid config there is no schema to check against
    schema = attention_weight_schema(mla_config)
    missing, wrong, leftovers = [], [], []
    for layer in range(num_layers):
        attention = f"{prefix}.{layer}.self_attn."
        for name, (shape, required) in schema.items():
            key = attention + name
            if key not in keys:
                if required:
                    missing.append(key)
            elif shapes.get(key, shape) != shape:
                wrong.append(f"{key} is {list(shapes[key])}, expected {list(shape)}")
        leftovers += [key for key in keys if key.startswith(attention) and key[len(attention) :] not in schema]
    if missing:
        layers = sorted({int(key[len(prefix) + 1 :].split(".")[0]) for key in missing})
        problems.append(
            f"Missing MLA attention weights ({len(missing)}) in text layers {layers} "
            f"(mla_stage={mla_config.mla_stage!r}): {_some(missing)}."
        )
    if leftovers:
        problems.append(
            f"Leftover attention weights the MLA layer does not have (native, not converted): {_some(leftovers)}."
        )
    if wrong:
        problems.append(
            f"Attention weights do not match config.json (rope_dim={mla_config.rope_dim}, "
            f"kv_rank={mla_config.kv_rank}): {_some(wrong)}."
        )


def _some(items: Iterable[str]) -> str:
    items = sorted(items)
    shown = ", ".join(items[:_MAX_LISTED_KEYS])
    return shown + (f", ... ({len(items) - _MAX_LISTED_KEYS} more)" if len(items) > _MAX_LISTED_KEYS else "")


__all__ = [
    "ALLOWED_REMOTE_IMPORTS",
    "assert_checkpoint_folder",
    "attention_weight_schema",
    "check_checkpoint_folder",
    "raise_for_problems",
    "remote_code_problems",
    "verify_folder",
]
