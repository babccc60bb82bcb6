# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""Check a converted checkpoint folder and publish it to the Hugging Face Hub.

`check_checkpoint_folder` lists what would make the folder unusable as a Hub repo (config, `auto_map`, flat remote
code, safetensors weights with every layer's MLA attention, a config that validates). `push_to_hub` refuses such a
folder, makes sure the model card carries the Hub metadata and the measured numbers of
`mla_conversion_report.json`, and uploads the folder in one commit.
"""

from __future__ import annotations

import ast
import json
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers.utils import logging

from .registry import MLA_MODEL_TYPES
from .report import evaluation_rows, model_card


if TYPE_CHECKING:
    import huggingface_hub


logger = logging.get_logger(__name__)

CONFIG_NAME = "config.json"
REPORT_NAME = "mla_conversion_report.json"
CARD_NAME = "README.md"
SINGLE_WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
REQUIRED_AUTO_CLASSES = ("AutoConfig", "AutoModel", "AutoModelForImageTextToText")
# Top-level modules the remote code may import: it must run where only torch and transformers are installed.
ALLOWED_REMOTE_IMPORTS = frozenset({"torch", "transformers"}) | frozenset(sys.stdlib_module_names)
CARD_TAGS = ("hf-mla-vlm", "mla")
CARD_METADATA = {"library_name": "transformers", "pipeline_tag": "image-text-to-text"}
# Never uploaded: hidden files and folders (`.git`, `.cache`, editor files), the converter's `.<name>.incomplete`
# staging leftovers, and Python bytecode. Patterns are fnmatch-style (`*` also matches `/`).
UPLOAD_IGNORE_PATTERNS = [
    ".*",
    "*/.*",
    "*.incomplete",
    "*.incomplete/*",
    "__pycache__/*",
    "*/__pycache__/*",
    "*.pyc",
]
_MAX_LISTED_KEYS = 8


# --- checks ---------------------------------------------------------------------------------------------------------
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
    """Raise `ValueError` listing every problem `check_checkpoint_folder` finds in `folder`."""
    problems = check_checkpoint_folder(folder)
    if problems:
        listing = "\n".join(f"  - {problem}" for problem in problems)
        raise ValueError(f"{folder} is not a valid converted checkpoint folder:\n{listing}")


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
        problems.append(f"{CONFIG_NAME} has no auto_map: the folder cannot load with trust_remote_code=True.")
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


def expected_attention_keys(config: dict, layer_prefix: str = "model.language_model.layers") -> list[str]:
    """Attention weight names every text layer of a converted checkpoint must hold (from the raw config.json)."""
    text = config.get("text_config") or {}
    num_layers = text.get("num_hidden_layers")
    if not isinstance(num_layers, int):
        return []
    stage = config.get("mla_stage", "mla")
    branches = ("text", "image") if config.get("modality_split", True) else ("text",)
    if stage == "partial_rope":
        names = ["k_nope_proj.weight", "v_proj.weight"]
    else:
        names = [f"{proj}.{branch}.weight" for branch in branches for proj in ("kv_a_proj", "kv_b_proj")]
    names = ["q_proj.weight", "k_rope_proj.weight", *names, "o_proj.weight"]
    return [f"{layer_prefix}.{i}.self_attn.{name}" for i in range(num_layers) for name in names]


def _check_attention_weights(
    config: dict, mla_config: Any | None, keys: set[str], shapes: dict[str, tuple[int, ...]], problems: list[str]
) -> None:
    spec = MLA_MODEL_TYPES.get(config.get("model_type"))
    prefix = spec.text_layers if spec is not None else "model.language_model.layers"
    num_layers = (config.get("text_config") or {}).get("num_hidden_layers")
    if not isinstance(num_layers, int) or num_layers < 1:
        problems.append(f"{CONFIG_NAME} has no valid text_config.num_hidden_layers ({num_layers!r}).")
        return
    missing = [key for key in expected_attention_keys(config, prefix) if key not in keys]
    if missing:
        layers = sorted({int(key[len(prefix) + 1 :].split(".")[0]) for key in missing})
        problems.append(
            f"Missing MLA attention weights ({len(missing)}) in text layers {layers} "
            f"(mla_stage={config.get('mla_stage', 'mla')!r}): {_some(missing)}."
        )
    layer_key = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")
    leftovers, beyond = [], set()
    # `v_proj` is part of the partial_rope stage; in the mla stage keys and values come from the latent.
    native = (
        ("self_attn.k_proj.",)
        if config.get("mla_stage") == "partial_rope"
        else ("self_attn.k_proj.", "self_attn.v_proj.")
    )
    for key in keys:
        match = layer_key.match(key)
        if match is None:
            continue
        if int(match.group(1)) >= num_layers:
            beyond.add(int(match.group(1)))
        if match.group(2).startswith(native):
            leftovers.append(key)
    if leftovers:
        problems.append(f"Leftover native attention weights (not converted): {_some(leftovers)}.")
    if beyond:
        problems.append(f"Weights for text layers {sorted(beyond)} but text_config.num_hidden_layers = {num_layers}.")
    if mla_config is not None:
        _check_attention_shapes(mla_config, prefix, shapes, problems)


def _check_attention_shapes(mla_config, prefix: str, shapes: dict[str, tuple[int, ...]], problems: list[str]) -> None:
    """The attention weights have the shapes the (validated) config implies, so the folder loads."""
    text = mla_config.text_config
    n_q, n_kv, hidden = text.num_attention_heads, text.num_key_value_heads, text.hidden_size
    head_dim, rope_dim = mla_config.mla_head_dim, mla_config.rope_dim
    nope_dim, latent = head_dim - rope_dim, mla_config.mla_latent_dim
    expected = {
        "q_proj.weight": (n_q * head_dim, hidden),
        "k_rope_proj.weight": (n_kv * rope_dim, hidden),
        "o_proj.weight": (hidden, n_q * head_dim),
        "k_nope_proj.weight": (n_kv * nope_dim, hidden),
        "v_proj.weight": (n_kv * head_dim, hidden),
    }
    for branch in ("text", "image"):
        expected[f"kv_a_proj.{branch}.weight"] = (latent, hidden)
        expected[f"kv_b_proj.{branch}.weight"] = (n_kv * (nope_dim + head_dim), latent)
    wrong = []
    for layer in range(text.num_hidden_layers):
        for name, shape in expected.items():
            key = f"{prefix}.{layer}.self_attn.{name}"
            if key in shapes and shapes[key] != shape:
                wrong.append(f"{key} is {list(shapes[key])}, expected {list(shape)}")
    if wrong:
        problems.append(
            f"Attention weights do not match config.json (rope_dim={rope_dim}, kv_rank={mla_config.kv_rank}): "
            f"{_some(wrong)}."
        )


def _some(items: Iterable[str]) -> str:
    items = sorted(items)
    shown = ", ".join(items[:_MAX_LISTED_KEYS])
    return shown + (f", ... ({len(items) - _MAX_LISTED_KEYS} more)" if len(items) > _MAX_LISTED_KEYS else "")


# --- model card -----------------------------------------------------------------------------------------------------
def card_problems(card: str, report: dict) -> list[str]:
    """What the model card `card` lacks: Hub metadata (library, pipeline, tags) and the measured numbers of `report`
    (KV bytes per token before/after in both conventions, and every `evaluation` row when the report has one)."""
    import yaml

    problems = []
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", card, flags=re.DOTALL)
    metadata: Any = None
    if match is not None:
        try:
            metadata = yaml.safe_load(match.group(1))
        except yaml.YAMLError as error:
            problems.append(f"the YAML front matter does not parse ({error})")
    if not isinstance(metadata, dict):
        if not problems:
            problems.append("no YAML front matter with Hub metadata")
        metadata = {}
    for key, value in CARD_METADATA.items():
        if metadata.get(key) != value:
            problems.append(f"metadata {key} is {metadata.get(key)!r}, expected {value!r}")
    tags = metadata.get("tags") if isinstance(metadata.get("tags"), list) else []
    for tag in CARD_TAGS:
        if tag not in tags:
            problems.append(f"tag {tag!r} is missing")
    body = card[match.end() :] if match is not None else card
    for fragment in _measured_fragments(report):
        if fragment not in body:
            problems.append(f"the measured number {fragment!r} is missing")
    return problems


def _measured_fragments(report: dict) -> list[str]:
    kv = report["kv_cache"]
    fragments = [
        f"| {kv['original_bytes_per_token']} |",
        f"| {kv['converted_bytes_per_token']} |",
        f"| {kv['mha_equivalent_bytes_per_token']} |",
        f"{100 * kv['reduction_vs_original_gqa_cache']:.2f}%",
        f"{100 * kv['reduction_vs_mha_equivalent_paper_convention']:.2f}%",
    ]
    evaluation = report.get("evaluation")
    if evaluation not in (None, {}, []):
        fragments += [f"| {metric} | {value} |" for metric, value in evaluation_rows(evaluation)]
    return fragments


def prepare_model_card(folder: str | os.PathLike) -> bool:
    """Make sure `folder/README.md` has the Hub metadata and the numbers of `mla_conversion_report.json`.

    A card that lacks any of them is regenerated with `report.model_card(report)`; the previous card, if any, is
    kept as the hidden (never uploaded) `.README.md.before-push`. Returns whether the card was (re)written.

    Raises:
        ValueError: the report is missing or unreadable, so the card cannot be checked or written.
    """
    folder = Path(folder)
    report_path = folder / REPORT_NAME
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
        report["kv_cache"]["converted_bytes_per_token"]  # noqa: B018  (fails early on a report without numbers)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(
            f"{report_path} is missing or unreadable ({error!r}); the model card needs its measured KV-cache numbers."
        ) from error
    card_path = folder / CARD_NAME
    card = card_path.read_text(encoding="utf-8") if card_path.is_file() else None
    missing = card_problems(card, report) if card is not None else ["there is no README.md"]
    if not missing:
        return False
    logger.warning(f"Regenerating {card_path} from {REPORT_NAME}: {'; '.join(missing)}.")
    if card is not None:
        (folder / f".{CARD_NAME}.before-push").write_text(card, encoding="utf-8")
    card_path.write_text(model_card(report), encoding="utf-8")
    return True


# --- upload ---------------------------------------------------------------------------------------------------------
def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    api: huggingface_hub.HfApi | None = None,
) -> str:
    """Upload a converted checkpoint folder to the Hub as one commit.

    The folder is checked first (`check_checkpoint_folder`) and refused with `ValueError` before any request when
    it has problems. The model card is completed from `mla_conversion_report.json` if needed (`prepare_model_card`).
    Then the repo is created (`exist_ok=True`), the branch `revision` is created when given and missing, and the
    folder is uploaded with `upload_folder` in a single commit, without hidden files, `.incomplete` staging
    leftovers or bytecode. (With `hf_xet` installed, `upload_folder` splits only folders of more than 256 files or
    more than 100 MB of non-LFS content into several commits; a converted checkpoint is far below both.)

    Args:
        folder: the converted checkpoint folder.
        repo_id: `namespace/name` of the model repo.
        private: create the repo as private (ignored by the Hub when the repo exists).
        revision: branch to commit to (created from `main` if missing); default `main`.
        commit_message: defaults to a summary of the conversion settings.
        token: Hub token; default: the client's token (`HF_TOKEN` or the saved login).
        api: the client to use (default `huggingface_hub.HfApi(token=token)`); tests inject one.

    Returns:
        The commit URL (or, for a client that returns no URL, the commit id).
    """
    folder = Path(folder)
    assert_checkpoint_folder(folder)
    prepare_model_card(folder)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    if commit_message is None:
        commit_message = _default_commit_message(folder)

    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model", token=token)
    if revision is not None and revision != "main" and not revision.startswith("refs/"):
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model", token=token)
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        revision=revision,
        commit_message=commit_message,
        ignore_patterns=list(UPLOAD_IGNORE_PATTERNS),
        token=token,
    )
    commit = getattr(info, "commit_url", None) or getattr(info, "oid", None) or str(info)
    logger.info(f"Pushed {folder} to {repo_id} ({revision or 'main'}): {commit}")
    return str(commit)


def _default_commit_message(folder: Path) -> str:
    try:
        report = json.loads((folder / REPORT_NAME).read_text(encoding="utf-8"))
        settings = report["settings"]
        return (
            f"Upload {report['model_type']} converted with hf-mla-vlm "
            f"(rope_dim={settings['rope_dim']}, kv_rank={settings['kv_rank']}, stage={settings['mla_stage']})"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return "Upload MLA checkpoint converted with hf-mla-vlm"


__all__ = [
    "assert_checkpoint_folder",
    "card_problems",
    "check_checkpoint_folder",
    "expected_attention_keys",
    "prepare_model_card",
    "push_to_hub",
    "remote_code_problems",
]
