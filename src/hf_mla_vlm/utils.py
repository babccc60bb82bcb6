# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""Small shared helpers: devices, progress bars, file digests and crash-safe writers.

Every output folder of the package (`convert`, `finetune`, `zoo build`, the asset cache) is written through
[`staged_folder`] and [`replace_folder`], every single output file through [`atomic_file`]. The folder life cycle:

1. `.<name>.incomplete`: the staging folder being filled (deleted if the writing fails or is interrupted);
2. `.<name>.new-<stamp>`: the complete new folder, renamed from the staging folder when writing finished;
3. an existing `<name>` is renamed to `.<name>.old-<stamp>`, the new folder is renamed to `<name>`, and only then
   is the old one deleted.

`<name>` is therefore always either the complete old or the complete new folder (it is briefly absent between the
two renames of step 3, with the old folder at its `.old-` name); a fault during step 3 puts the old folder back.
A run killed outright (SIGKILL, power loss) can leave `.incomplete`, `.new-` or `.old-` folders: the next run on the
same output refuses to start and names each of them with what to do ([`folder_leftovers`]); nothing is deleted
silently.
"""

import hashlib
import os
import platform
import shutil
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from .errors import EnvironmentProblem, InputError, LeftoverError


logger = logging.get_logger(__name__)

_HASH_CHUNK = 8 * 2**20


def to_device(value, device, non_blocking: bool = False):
    """`value` with every tensor moved to `device`, through mappings, lists and tuples (other values as they are)."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=non_blocking)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device, non_blocking) for v in value)
    if isinstance(value, Mapping):  # dicts and processor outputs (`BatchFeature`): a plain dict comes back
        return {k: to_device(v, device, non_blocking) for k, v in value.items()}
    return value


def as_tokenizer(tokenizer_or_processor):
    """A processor's tokenizer, or the tokenizer itself."""
    return getattr(tokenizer_or_processor, "tokenizer", None) or tokenizer_or_processor


# --- devices and progress bars --------------------------------------------------------------------------------------
def resolve_device(device: str | torch.device | None) -> torch.device:
    """The torch device `device` names, checked to exist here (default: CUDA if available, else CPU).

    Raises:
        `InputError`: `device` is not a device string torch knows, or not a compute device.
        `EnvironmentProblem`: the device type is valid but not available on this machine (e.g. `cuda` without a GPU,
            or `cuda:3` on a machine with two GPUs).
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as error:
        raise InputError(
            f"device {device!r} (--device) is not a device torch knows ({' '.join(str(error).split())}); use cpu, "
            "cuda or cuda:N."
        ) from error
    if parsed.type == "cpu":
        return parsed
    if parsed.type == "cuda":
        built = f"torch {torch.__version__}, " + (f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA")
        if not torch.cuda.is_available():
            raise EnvironmentProblem(
                f"device {device!r} (--device) was requested, but no CUDA GPU is available here ({built}): use "
                "--device cpu, or run on a machine with a GPU and a CUDA build of torch."
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise EnvironmentProblem(
                f"device {device!r} (--device) was requested, but this machine has {torch.cuda.device_count()} "
                f"CUDA device(s): use cuda:0 .. cuda:{torch.cuda.device_count() - 1}."
            )
        return parsed
    backend = getattr(torch.backends, parsed.type, None) if parsed.type == "mps" else getattr(torch, parsed.type, None)
    is_available = getattr(backend, "is_available", None)
    if not callable(is_available):
        raise InputError(f"device {device!r} (--device) is not a compute device; use cpu, cuda or cuda:N.")
    if not is_available():
        raise EnvironmentProblem(
            f"device {device!r} (--device) was requested, but no {parsed.type} device is available here: use "
            "--device cpu."
        )
    return parsed


@contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """With `enabled=False`, silence Transformers' and huggingface_hub's progress bars (model loading, saving,
    downloads) for the block, and restore them afterwards."""
    if enabled:
        yield
        return
    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    except ImportError:  # huggingface_hub is optional
        hub_was_enabled, enable_progress_bars = False, None
    else:
        hub_was_enabled = not are_progress_bars_disabled()
        disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()
        if hub_was_enabled:
            enable_progress_bars()


# --- digests ---------------------------------------------------------------------------------------------------------
def file_digest(path: str | os.PathLike, progress: bool = False) -> dict[str, int | str]:
    """`{"sha256": hex digest, "bytes": size}` of a file, read in 8 MiB chunks."""
    path = Path(path)
    digest, size = hashlib.sha256(), path.stat().st_size
    with (
        open(path, "rb") as handle,
        tqdm(
            total=size, unit="B", unit_scale=True, desc=f"sha256 {path.name}", disable=not progress, leave=False
        ) as bar,
    ):
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return {"sha256": digest.hexdigest(), "bytes": size}


def weight_file_names(folder: str | os.PathLike) -> list[str]:
    """The safetensors files and safetensors indexes at the top of `folder` (hidden files excluded), sorted."""
    return sorted(
        p.name
        for p in Path(folder).iterdir()
        if p.is_file() and p.name.endswith((".safetensors", ".safetensors.index.json")) and not p.name.startswith(".")
    )


def weight_file_digests(folder: str | os.PathLike, progress: bool = False) -> dict[str, dict[str, int | str]]:
    """[`file_digest`] of every [`weight_file_names`] file of `folder` (what a report records under `"files"` and
    `hf-mla-vlm verify` checks)."""
    return {name: file_digest(Path(folder) / name, progress=progress) for name in weight_file_names(folder)}


# --- crash-safe writers ----------------------------------------------------------------------------------------------
def _stamp() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def _leftover_kind(target: Path, path: Path) -> str | None:
    suffix = path.name[len(target.name) + 2 :]
    if suffix == "incomplete":
        return "incomplete"
    if suffix.startswith(("new-", "old-")):
        return suffix[:3]
    return None


def folder_leftovers(output_dir: str | os.PathLike) -> list[Path]:
    """Hidden siblings of `output_dir` that an interrupted write left: `.<name>.incomplete` (unfinished staging),
    `.<name>.new-<stamp>` (a complete new folder not moved into place) and `.<name>.old-<stamp>` (a replaced folder
    not yet deleted, or not put back)."""
    target = Path(output_dir).absolute()
    if not target.parent.is_dir():
        return []
    prefix = f".{target.name}."
    return sorted(
        p for p in target.parent.iterdir() if p.name.startswith(prefix) and _leftover_kind(target, p) is not None
    )


def describe_leftovers(output_dir: str | os.PathLike, leftovers: list[Path]) -> str:
    """One sentence per leftover of `output_dir`: what it holds and what to do with it."""
    target = Path(output_dir).absolute()
    sentences = []
    for path in leftovers:
        kind = _leftover_kind(target, path)
        if kind == "incomplete" or path.name.endswith(".incomplete"):
            what = "an unfinished write (safe to delete)"
        elif kind == "new":
            what = (
                f"a complete new output that was not moved into place (to use it, move {target.name} aside and "
                f"rename it to {target.name}; else delete it)"
            )
        elif target.exists():
            what = f"the previous {target.name}, replaced by the one now in place (delete it once you checked it)"
        else:
            what = f"the previous {target.name}, which was being replaced (rename it back to {target.name})"
        sentences.append(f"{path} is {what}")
    return "; ".join(sentences)


def _refuse_leftovers(output_dir: Path) -> None:
    leftovers = folder_leftovers(output_dir)
    if leftovers:
        raise LeftoverError(
            f"an earlier run writing {output_dir} was interrupted and left: "
            f"{describe_leftovers(output_dir, leftovers)}. Nothing was deleted; resolve them, then run again."
        )


def check_output_folder(output_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Check, before any heavy work, that `output_dir` can be written: it is not a file, it is absent or empty (or
    `overwrite` is set), and no earlier interrupted run left staging or replaced folders beside it.

    Raises:
        `InputError`: `output_dir` is a file.
        `FileExistsError`: `output_dir` is a non-empty folder and `overwrite` is false.
        `LeftoverError`: leftovers of an interrupted run (named, with what to do; nothing is deleted).
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"{output_dir} is a file; the output (--out) must be a folder path.")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{output_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it."
        )
    _refuse_leftovers(output_dir)
    return output_dir


def _warn_leftovers(output_dir: Path, leftovers: list[Path]) -> None:
    if leftovers:
        logger.warning(f"Writing {output_dir} stopped: {describe_leftovers(output_dir, leftovers)}.")


def replace_folder(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the complete folder `new` to `target`, replacing an existing `target` crash-safely.

    An existing `target` is renamed to `.<name>.old-<stamp>`, `new` is renamed to `target`, and the old folder is
    deleted last. If the renames fail or are interrupted, the old folder is put back (when it had been moved aside)
    and `new` stays where it is; if deleting the old folder fails or is interrupted, the rest of it stays at its
    `.old-` name. A complete folder is never deleted except the replaced one, after the new one is in place; what
    is left is named in a warning, and the next [`check_output_folder`] reports it.
    """
    new, target = Path(new), Path(target)
    old = target.parent / f".{target.name}.old-{_stamp()}"
    try:
        if os.path.lexists(target):
            os.rename(target, old)
        os.rename(new, target)
    except BaseException:
        try:
            if not os.path.lexists(target) and os.path.lexists(old):
                os.rename(old, target)  # put the old folder back
        except BaseException as error:  # noqa: B036 (a second interrupt must not hide the first fault)
            logger.warning(f"Could not put {old} back as {target} ({error!r}).")
        _warn_leftovers(target, [p for p in (new, old) if os.path.lexists(p)])
        raise
    if not os.path.lexists(old):
        return
    try:
        shutil.rmtree(old)
    except OSError as error:  # the new folder is in place: the run succeeded, the old one is a named leftover
        logger.warning(f"{target} was written, but the replaced folder {old} could not be deleted ({error}).")
    except BaseException:
        _warn_leftovers(target, [old])
        raise


@contextmanager
def staged_folder(output_dir: str | os.PathLike) -> Iterator[Path]:
    """Write a folder crash-safely (see the module docstring): yields the hidden staging folder
    `.<name>.incomplete` to fill. When the block fails or is interrupted the staging folder is deleted and an
    existing `output_dir` is untouched; when it succeeds the staging folder becomes `.<name>.new-<stamp>` and
    replaces `output_dir` through [`replace_folder`].

    Raises:
        `LeftoverError`: an earlier interrupted run left folders beside `output_dir` (checked first).
    """
    output_dir = Path(output_dir).absolute()
    _refuse_leftovers(output_dir)
    staging = output_dir.parent / f".{output_dir.name}.incomplete"
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    new = output_dir.parent / f".{output_dir.name}.new-{_stamp()}"
    try:
        os.rename(staging, new)
    except BaseException:
        _warn_leftovers(output_dir, [p for p in (staging, new) if os.path.lexists(p)])
        raise
    replace_folder(new, output_dir)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Write one file crash-safely: yields a hidden temporary path beside `path` to write; when the block succeeds
    it replaces `path` (`os.replace`), when it fails the temporary file is deleted and `path` is untouched."""
    path = Path(path)
    temporary = path.parent / f".{path.name}.{os.getpid()}.incomplete"
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """`Path(path).write_text(text)` through [`atomic_file`]: never a half-written file."""
    with atomic_file(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def environment() -> dict[str, str]:
    """Versions of hf-mla-vlm, torch, Transformers and Python, as reports record them."""
    import transformers

    from . import __version__

    return {
        "hf_mla_vlm": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def machine_threads() -> int:
    """CPU threads this process may use: its CPU affinity, capped by a cgroup CPU quota (containers)."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


@contextmanager
def conversion_threads():
    """Torch's intra-op threads set to `machine_threads()` for the block (restored after), unless the user chose
    them with `OMP_NUM_THREADS` / `MKL_NUM_THREADS`: the float64 eigendecompositions and SVDs of a conversion slow
    down many times when more threads than cores compete. Yields the thread count in use."""
    before = torch.get_num_threads()
    chosen = any(os.environ.get(name) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"))
    threads = before if chosen else machine_threads()
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)


__all__ = [
    "as_tokenizer",
    "atomic_file",
    "check_output_folder",
    "conversion_threads",
    "describe_leftovers",
    "environment",
    "file_digest",
    "folder_leftovers",
    "machine_threads",
    "progress_bars",
    "replace_folder",
    "resolve_device",
    "staged_folder",
    "to_device",
    "weight_file_digests",
    "weight_file_names",
    "write_text_atomically",
]
