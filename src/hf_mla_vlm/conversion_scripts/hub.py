# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""Publish a converted checkpoint folder to the Hugging Face Hub.

`push_to_hub` refuses a folder that fails the checks of `checks.verify_folder`, uploads it in one commit with a
model card that carries the Hub metadata and the measured numbers of `mla_conversion_report.json`, and never writes
into the folder.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers.utils import logging

from ..errors import InputError
from .checks import REPORT_NAME, raise_for_problems, verify_folder
from .report import cache_change, evaluation_rows, model_card


if TYPE_CHECKING:
    import huggingface_hub


logger = logging.get_logger(__name__)

CARD_NAME = "README.md"
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
        f"{cache_change(kv['reduction_vs_original_gqa_cache'], 2)} the real cache",
        f"{cache_change(kv['reduction_vs_mha_equivalent_paper_convention'], 2)} it (paper-style)",
    ]
    evaluation = report.get("evaluation")
    if evaluation not in (None, {}, []):
        fragments += [f"| {metric} | {value} |" for metric, value in evaluation_rows(evaluation)]
    return fragments


def read_report(folder: str | os.PathLike) -> dict:
    """The `mla_conversion_report.json` of `folder`, checked to carry the KV-cache numbers a model card needs.

    Raises:
        InputError: the report is missing, unreadable or lacks the numbers.
    """
    report_path = Path(folder) / REPORT_NAME
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
        report["kv_cache"]["converted_bytes_per_token"]  # noqa: B018  (fails early on a report without numbers)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise InputError(
            f"{report_path} is missing or unreadable ({error!r}); the model card needs its measured KV-cache numbers."
        ) from error
    return report


def _card_state(folder: Path) -> tuple[dict, str | None, list[str]]:
    """The report, the folder's card (None when absent) and what the card lacks."""
    report = read_report(folder)
    card_path = folder / CARD_NAME
    card = card_path.read_text(encoding="utf-8") if card_path.is_file() else None
    return report, card, card_problems(card, report) if card is not None else ["there is no README.md"]


def prepare_model_card(folder: str | os.PathLike) -> bool:
    """Make sure `folder/README.md` has the Hub metadata and the numbers of `mla_conversion_report.json`.

    A card that lacks any of them is regenerated with `report.model_card(report)`; the previous card, if any, is
    kept as the hidden (never uploaded) `.README.md.before-push`. Returns whether the card was (re)written.

    Raises:
        ValueError: the report is missing or unreadable, so the card cannot be checked or written.
    """
    folder = Path(folder)
    report, card, missing = _card_state(folder)
    if not missing:
        return False
    card_path = folder / CARD_NAME
    logger.warning(f"Regenerating {card_path} from {REPORT_NAME}: {'; '.join(missing)}.")
    if card is not None:
        (folder / f".{CARD_NAME}.before-push").write_text(card, encoding="utf-8")
    card_path.write_text(model_card(report), encoding="utf-8")
    return True


def card_for_upload(folder: str | os.PathLike) -> str:
    """The model card an upload of `folder` carries, without writing anything: the folder's `README.md` when it has
    the Hub metadata and the numbers of `mla_conversion_report.json`, else one generated from the report.

    Raises:
        ValueError: the report is missing or unreadable.
    """
    report, card, missing = _card_state(Path(folder))
    if not missing:
        return card
    logger.warning(
        f"The uploaded card is generated from {REPORT_NAME} ({'; '.join(missing)}); the folder's own "
        f"{CARD_NAME} is left as it is."
    )
    return model_card(report)


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
    forward_check: bool = True,
    progress: bool = False,
) -> str:
    """Upload a converted checkpoint folder to the Hub as one commit, without writing into the folder.

    The folder is verified first (`verify_folder`: structure, weight-file hashes, and with `forward_check` a tiny
    forward pass) and refused with `InputError` before any request when it has problems. The commit carries every
    file of the folder except hidden files, `.incomplete` staging leftovers and bytecode, and a model card that has
    the Hub metadata and the report's numbers: the folder's own `README.md` when it is complete, else one generated
    from `mla_conversion_report.json` in memory (`card_for_upload`). The repo is created (`exist_ok=True`), the
    branch `revision` is created when given and missing, and everything is committed with one `create_commit`.

    Args:
        folder: the converted checkpoint folder.
        repo_id: `namespace/name` of the model repo.
        private: create the repo as private (ignored by the Hub when the repo exists).
        revision: branch to commit to (created from `main` if missing); default `main`.
        commit_message: defaults to a summary of the conversion settings.
        token: Hub token; default: the client's token (`HF_TOKEN` or the saved login).
        api: the client to use (default `huggingface_hub.HfApi(token=token)`); tests inject one.
        forward_check: run the forward pass of `verify_folder` (loads the model once on CPU).
        progress: show progress bars while verifying.

    Returns:
        The commit URL (or, for a client that returns no URL, the commit id).
    """
    from huggingface_hub import CommitOperationAdd

    folder = Path(folder)
    raise_for_problems(folder, verify_folder(folder, forward=forward_check, progress=progress))
    card = card_for_upload(folder)
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name))
        for name in upload_file_names(folder)
        if name != CARD_NAME
    ]
    operations.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card.encode("utf-8")))
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    if commit_message is None:
        commit_message = _default_commit_message(folder)

    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model", token=token)
    if revision is not None and revision != "main" and not revision.startswith("refs/"):
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model", token=token)
    info = api.create_commit(
        repo_id=repo_id,
        operations=operations,
        commit_message=commit_message,
        repo_type="model",
        revision=revision,
        token=token,
    )
    commit = getattr(info, "commit_url", None) or getattr(info, "oid", None) or str(info)
    logger.info(f"Pushed {folder} to {repo_id} ({revision or 'main'}): {commit}")
    return str(commit)


def upload_file_names(folder: str | os.PathLike) -> list[str]:
    """Files of `folder` (relative POSIX paths, sorted) that an upload carries: all but `UPLOAD_IGNORE_PATTERNS`
    (hidden files and folders, `.incomplete` leftovers, bytecode) and huggingface_hub's own ignored paths."""
    from huggingface_hub.utils import filter_repo_objects

    folder = Path(folder)
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return list(filter_repo_objects(names, ignore_patterns=list(UPLOAD_IGNORE_PATTERNS)))


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
    "card_for_upload",
    "card_problems",
    "prepare_model_card",
    "push_to_hub",
    "read_report",
    "upload_file_names",
]
