"""Crash-safe writers (`staged_folder`, `replace_folder`, `atomic_file`), devices, progress bars and digests.

The swap tests inject a fault at every step of replacing a folder: a real SIGINT (Python turns it into
`KeyboardInterrupt` inside the call) or an `OSError(ENOSPC)`, raised just before a rename / delete happens or just
after it returned (the window in which a signal lands between a finished system call and the next line), and a
delete that stops half-way. After each, the output folder must be the complete old or the complete new folder, no
complete folder may be gone, and the next run must name every leftover instead of deleting it.
"""

import errno
import hashlib
import os
import shutil
import signal

import pytest
import torch

from hf_mla_vlm import utils
from hf_mla_vlm.errors import EnvironmentProblem, InputError, LeftoverError


OLD = {"config.json": b"old config", "model.safetensors": b"old weights" * 1000, "code/a.py": b"old"}
NEW = {"config.json": b"new config", "model.safetensors": b"new weights" * 1000, "mla_attention.py": b"new"}


def _fill(folder, files) -> None:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


def _files(folder) -> dict[str, bytes] | None:
    if not folder.is_dir():
        return None
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


class Fault(Exception):
    pass


def _raise(kind: str) -> None:
    if kind == "sigint":
        signal.raise_signal(signal.SIGINT)  # the default handler raises KeyboardInterrupt right here
        raise AssertionError("SIGINT did not interrupt")  # pragma: no cover
    raise OSError(errno.ENOSPC, "No space left on device")


EXPECTED = {"sigint": KeyboardInterrupt, "enospc": OSError}


def _inject(monkeypatch, step: int, when: str, kind: str) -> list[str]:
    """Make the `step`-th call of `os.rename` / `shutil.rmtree` fail `when` ("before" / "after" it ran, or
    "midway" for a delete that removed one file). Returns the log of calls."""
    calls: list[str] = []
    real_rename, real_rmtree = os.rename, shutil.rmtree

    def wrap(name, real):
        def call(path, *args, **kwargs):
            calls.append(name)
            if len(calls) != step:
                return real(path, *args, **kwargs)
            if when == "before":
                _raise(kind)
            if when == "midway" and name == "rmtree":
                os.unlink(next(p for p in sorted(os.scandir(path), key=lambda e: e.name) if p.is_file()).path)
                _raise(kind)
            real(path, *args, **kwargs)
            _raise(kind)

        return call

    monkeypatch.setattr(os, "rename", wrap("rename", real_rename))
    monkeypatch.setattr(shutil, "rmtree", wrap("rmtree", real_rmtree))
    return calls


def _write_new(target) -> None:
    with utils.staged_folder(target) as staging:
        _fill(staging, NEW)


def test_a_clean_replacement_leaves_only_the_new_folder(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    _fill(target, OLD)
    calls = _inject(monkeypatch, step=0, when="before", kind="enospc")  # records, never fails
    _write_new(target)
    assert _files(target) == NEW and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert calls == ["rename", "rename", "rename", "rmtree"]  # staging -> new, old aside, new in, old deleted


# Calls of a replacement: 1 rename staging -> .new-, 2 rename out -> .old-, 3 rename .new- -> out, 4 rmtree .old-.
SWAP_FAULTS = [(step, when) for step in (1, 2, 3) for when in ("before", "after")]
SWAP_FAULTS += [(4, "before"), (4, "midway"), (4, "after")]


@pytest.mark.parametrize("kind", ["sigint", "enospc"])
@pytest.mark.parametrize("step, when", SWAP_FAULTS)
def test_a_fault_at_each_step_of_the_swap_loses_nothing(tmp_path, monkeypatch, kind, step, when):
    target = tmp_path / "out"
    target.mkdir()
    _fill(target, OLD)
    _inject(monkeypatch, step, when, kind)
    interrupted = True
    try:
        _write_new(target)
        interrupted = False
    except EXPECTED[kind]:
        pass
    monkeypatch.undo()
    # An OSError while deleting the replaced folder does not fail the run: the new folder is in place.
    assert interrupted == (kind == "sigint" or step < 4)
    state = _files(target)
    assert state in (OLD, NEW)
    leftovers = utils.folder_leftovers(target)
    kept = [_files(p) for p in leftovers]
    assert state == NEW or NEW in kept, "the complete new folder was deleted"
    if state == OLD:
        assert not any(p.name.startswith(".out.old-") for p in leftovers)  # the old folder was put back
    elif step < 4 or when != "after":  # the new one is in place; the old one may be half-deleted
        assert [p.name[:9] for p in leftovers] == [".out.old-"]
    else:
        assert leftovers == []
    # The next run names every leftover and deletes nothing.
    if leftovers:
        with pytest.raises(LeftoverError) as raised:
            utils.check_output_folder(target, overwrite=True)
        message = str(raised.value)
        assert all(str(p) in message for p in leftovers) and "Nothing was deleted" in message
        with pytest.raises(LeftoverError):
            _write_new(target)
        assert utils.folder_leftovers(target) == leftovers and _files(target) == state
    else:
        utils.check_output_folder(target, overwrite=True)


@pytest.mark.parametrize("kind", ["sigint", "enospc"])
@pytest.mark.parametrize("step, when", [(1, "before"), (1, "after"), (2, "before"), (2, "after")])
def test_a_fault_while_writing_a_fresh_folder(tmp_path, monkeypatch, kind, step, when):
    target = tmp_path / "out"
    _inject(monkeypatch, step, when, kind)
    with pytest.raises(EXPECTED[kind]):
        _write_new(target)
    monkeypatch.undo()
    state, leftovers = _files(target), utils.folder_leftovers(target)
    assert state in (None, NEW)
    assert state == NEW or [_files(p) for p in leftovers] == [NEW]
    assert (leftovers == []) == (state == NEW)


@pytest.mark.parametrize("kind", ["sigint", "enospc"])
def test_a_fault_while_filling_the_staging_folder_keeps_the_old_one(tmp_path, kind):
    target = tmp_path / "out"
    target.mkdir()
    _fill(target, OLD)
    with pytest.raises(EXPECTED[kind]):
        with utils.staged_folder(target) as staging:
            (staging / "model.safetensors").write_bytes(b"half")
            _raise(kind)
    assert _files(target) == OLD and utils.folder_leftovers(target) == []  # the unfinished staging is gone


def test_leftover_messages_say_what_each_one_is(tmp_path):
    target = tmp_path / "out"
    for name in (".out.incomplete", ".out.new-20261201-1", ".out.old-20261201-1", ".out.checkpoints", ".outx.old-1"):
        (tmp_path / name).mkdir()
    names = [p.name for p in utils.folder_leftovers(target)]
    assert names == [".out.incomplete", ".out.new-20261201-1", ".out.old-20261201-1"]  # not Trainer checkpoints
    text = utils.describe_leftovers(target, utils.folder_leftovers(target))
    assert "unfinished write (safe to delete)" in text
    assert "complete new output that was not moved into place" in text
    assert "which was being replaced (rename it back to out)" in text  # out is missing
    target.mkdir()
    assert "replaced by the one now in place" in utils.describe_leftovers(target, utils.folder_leftovers(target))


def test_check_output_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        utils.check_output_folder(tmp_path / "file")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty; pass overwrite=True"):
        utils.check_output_folder(tmp_path / "full")
    assert utils.check_output_folder(tmp_path / "full", overwrite=True) == tmp_path / "full"
    assert utils.check_output_folder(tmp_path / "absent") == tmp_path / "absent"


def test_atomic_file_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old")
    with pytest.raises(OSError, match="No space left"):
        with utils.atomic_file(path) as temporary:
            temporary.write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.json"]
    utils.write_text_atomically(path, "new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_resolve_device(monkeypatch):
    assert utils.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(InputError, match="'gpu0' .* is not a device torch knows"):
        utils.resolve_device("gpu0")
    with pytest.raises(InputError, match="not a compute device"):
        utils.resolve_device("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(EnvironmentProblem, match="no CUDA GPU is available here .* use --device cpu"):
        utils.resolve_device("cuda")
    assert utils.resolve_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(EnvironmentProblem, match="has 2 CUDA device"):
        utils.resolve_device("cuda:5")


def test_progress_bars_are_silenced_and_restored():
    from transformers.utils import logging

    assert logging.is_progress_bar_enabled()
    with utils.progress_bars(False):
        assert not logging.is_progress_bar_enabled()
    assert logging.is_progress_bar_enabled()
    with utils.progress_bars(True):
        assert logging.is_progress_bar_enabled()


def test_weight_file_digests(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"abc")
    (tmp_path / "model.safetensors.index.json").write_bytes(b"{}")
    (tmp_path / "config.json").write_bytes(b"{}")
    (tmp_path / ".hidden.safetensors").write_bytes(b"x")
    digests = utils.weight_file_digests(tmp_path)
    assert digests == {
        "model.safetensors": {"sha256": hashlib.sha256(b"abc").hexdigest(), "bytes": 3},
        "model.safetensors.index.json": {"sha256": hashlib.sha256(b"{}").hexdigest(), "bytes": 2},
    }
