"""`describe_fault`: the exit code and one-line message of each expected fault; anything else is a bug (None)."""

import errno

import pytest
from safetensors import SafetensorError

from hf_mla_vlm.errors import EnvironmentProblem, InputError, LeftoverError, describe_fault


def _raised_from(error: BaseException, cause: BaseException) -> BaseException:
    try:
        raise error from cause
    except BaseException as raised:  # noqa: B036
        return raised


@pytest.mark.parametrize(
    "error, code, words",
    [
        (KeyboardInterrupt(), 130, "interrupted"),
        (InputError("bad rank file"), 2, "bad rank file"),
        (LeftoverError("left .out.old-1"), 2, ".out.old-1"),
        (EnvironmentProblem("no GPU"), 3, "no GPU"),
        (OSError(errno.ENOSPC, "No space left on device", "/x/model.safetensors"), 3, "disk is full while writing /x"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), 3, "disk is full"),
        (SafetensorError("Error while serializing: No space left on device (os error 28)"), 3, "disk is full"),
        (_raised_from(RuntimeError("save failed"), OSError(errno.ENOSPC, "No space")), 3, "disk is full"),
        (PermissionError(errno.EACCES, "Permission denied", "/root/x"), 3, "permission denied"),
        (FileNotFoundError("no such folder"), 2, "no such folder"),
        (ValueError("rope_dim must be even"), 2, "rope_dim must be even"),
        (ModuleNotFoundError("No module named 'datasets'"), 3, "a required package is missing"),
        (MemoryError(), 3, "out of memory"),
        (ConnectionResetError("reset by peer"), 3, "network error"),
    ],
)
def test_expected_faults(error, code, words):
    fault = describe_fault(error)
    assert fault is not None and fault.exit_code == code and words in fault.message
    assert "\n" not in fault.message


def test_library_faults_by_class():
    class ConnectError(Exception):  # what httpx / httpx2 raise when nothing listens
        __module__ = "httpx2"

    class OfflineModeIsEnabled(ConnectionError):
        __module__ = "huggingface_hub.errors"

    class UnidentifiedImageError(OSError):
        __module__ = "PIL"

    class OutOfMemoryError(RuntimeError):
        __module__ = "torch"

    assert describe_fault(ConnectError("[Errno 111] Connection refused")).message.startswith(
        "cannot connect to the Hugging Face Hub (ConnectError"
    )
    assert "unset HF_HUB_OFFLINE" in describe_fault(OfflineModeIsEnabled("offline")).message
    assert describe_fault(UnidentifiedImageError("cannot identify image file 'a.jpg'")).exit_code == 2
    assert describe_fault(OutOfMemoryError("CUDA out of memory")).exit_code == 3


@pytest.mark.parametrize("error", [RuntimeError("a bug"), KeyError("x"), SystemExit(2), AssertionError()])
def test_anything_else_is_a_bug(error):
    assert describe_fault(error) is None
