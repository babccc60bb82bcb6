# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""The error contract of hf-mla-vlm: exception classes, exit codes and one sentence per expected fault.

Every expected fault ends a command with one line that names the cause and the fix, and an exit code:

| code | meaning |
|---|---|
| 0 | success |
| 2 | bad input: an argument, file or folder that cannot be used as given (fix the input) |
| 3 | environment: disk full, no network / offline mode / refused token, no device, out of memory, a missing package |
| 130 | interrupted (Ctrl-C, SIGINT) |

The package's own code raises [`InputError`] and [`EnvironmentProblem`] (subclasses of `ValueError` and
`RuntimeError`, so existing `except ValueError` code keeps working); [`describe_fault`] also recognises the faults
other libraries raise (`OSError(ENOSPC)`, `safetensors` write errors, `httpx` connection errors, Hub HTTP errors,
offline mode, out of memory, `KeyboardInterrupt`). Anything else is a bug: the command line shows its traceback.
"""

import errno
from dataclasses import dataclass


EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_ENVIRONMENT = 3
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = """exit codes:
  0    success
  2    bad input (an argument, file or folder that cannot be used as given)
  3    environment (disk full, no network / offline mode / refused token, no such device, out of memory, a missing
       package)
  130  interrupted (Ctrl-C)
every expected fault prints one line naming the cause and the fix; --debug adds the traceback."""


class HfMlaVlmError(Exception):
    """Base class of the package's expected faults; `exit_code` is what the command line exits with."""

    exit_code = 1


class InputError(HfMlaVlmError, ValueError):
    """Bad input: an argument, file or folder that cannot be used as given (exit code 2)."""

    exit_code = EXIT_BAD_INPUT


class EnvironmentProblem(HfMlaVlmError, RuntimeError):
    """The machine, not the input: disk, network, device, memory, packages (exit code 3)."""

    exit_code = EXIT_ENVIRONMENT


class LeftoverError(InputError, FileExistsError):
    """An earlier run was interrupted and left a hidden staging or replaced folder next to the output (exit code 2).

    Nothing is deleted automatically: the message names each leftover and what to do with it."""


@dataclass(frozen=True)
class Fault:
    """An expected fault: the exit code and the one-line message (cause and fix)."""

    exit_code: int
    message: str


_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")
# Connection-level errors of the HTTP clients huggingface_hub uses (httpx / httpx2 / httpcore) and of requests.
_NETWORK_CLASSES = {
    "ConnectError",
    "ConnectTimeout",
    "ReadTimeout",
    "WriteTimeout",
    "PoolTimeout",
    "TimeoutException",
    "NetworkError",
    "ReadError",
    "WriteError",
    "RemoteProtocolError",
    "ProxyError",
    "TransportError",
    "ConnectionError",
}
_NETWORK_MODULES = ("httpx", "httpx2", "httpcore", "requests", "urllib3")
_NETWORK_FIX = "check the network connection (and HF_ENDPOINT / proxy settings), then run again; nothing was uploaded"


def _chain(error: BaseException):
    """`error` and the exceptions it was raised from or while handling."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _class_names(error: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(error).__mro__}


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def _disk_full(error: BaseException) -> Fault | None:
    for item in _chain(error):
        full = isinstance(item, OSError) and item.errno in _DISK_FULL
        if full or any(text in str(item) for text in _DISK_FULL_TEXT):
            where = f" while writing {item.filename}" if isinstance(item, OSError) and item.filename else ""
            return Fault(
                EXIT_ENVIRONMENT,
                f"the disk is full{where} ({_one_line(item)}): free space or write the output to another disk "
                "(--out), then run again; no partial output was left in place.",
            )
    return None


def _network(error: BaseException) -> Fault | None:
    for item in _chain(error):
        names = _class_names(item)
        if "OfflineModeIsEnabled" in names:
            return Fault(
                EXIT_ENVIRONMENT,
                f"the Hugging Face Hub cannot be reached in offline mode ({_one_line(item)}): unset HF_HUB_OFFLINE "
                "(and TRANSFORMERS_OFFLINE) to push, or use a local folder.",
            )
        if "HfHubHTTPError" in names:
            response = getattr(item, "response", None)
            status = getattr(response, "status_code", None)
            if status == 401:
                fix = "log in with `hf auth login` or set HF_TOKEN to a valid token, then run again"
                return Fault(EXIT_ENVIRONMENT, f"the Hub refused the token (HTTP 401, {_one_line(item)}): {fix}.")
            if status == 403:
                fix = "use a token with write access to this namespace (or push to your own namespace)"
                return Fault(EXIT_ENVIRONMENT, f"the Hub refused the request (HTTP 403, {_one_line(item)}): {fix}.")
            return Fault(EXIT_ENVIRONMENT, f"the Hub answered with an error ({_one_line(item)}): {_NETWORK_FIX}.")
        module = type(item).__module__.split(".")[0]
        if module in _NETWORK_MODULES and names & _NETWORK_CLASSES:
            return Fault(
                EXIT_ENVIRONMENT,
                f"cannot connect to the Hugging Face Hub ({type(item).__name__}: {_one_line(item)}): {_NETWORK_FIX}.",
            )
        if isinstance(item, (ConnectionError, TimeoutError)):
            return Fault(EXIT_ENVIRONMENT, f"network error ({_one_line(item)}): {_NETWORK_FIX}.")
    return None


def describe_fault(error: BaseException) -> Fault | None:
    """The exit code and one-line message of an expected fault, or `None` for anything else (a bug).

    Args:
        error: the exception that ended a command.

    Returns:
        A [`Fault`], or `None` when `error` is not an expected fault (`SystemExit` included).
    """
    if isinstance(error, KeyboardInterrupt):
        return Fault(
            EXIT_INTERRUPTED,
            "interrupted: no partial output was left in place (a folder being replaced is kept, or restored; any "
            "leftover is named above). Run the command again to redo the work.",
        )
    if isinstance(error, HfMlaVlmError):
        return Fault(error.exit_code, str(error))
    if not isinstance(error, Exception):
        return None
    fault = _disk_full(error) or _network(error)
    if fault is not None:
        return fault
    names = _class_names(error)
    if "OutOfMemoryError" in names or isinstance(error, MemoryError):
        return Fault(
            EXIT_ENVIRONMENT,
            f"out of memory ({_one_line(error)[:300]}): use fewer calibration samples (--num-samples), a smaller "
            "batch, --device cpu, or a machine with more memory.",
        )
    if "MissingAssetError" in names or isinstance(error, ImportError):
        return Fault(EXIT_ENVIRONMENT, f"a required package is missing: {_one_line(error)}")
    if "UnidentifiedImageError" in names:
        return Fault(EXIT_BAD_INPUT, f"{_one_line(error)}: replace the file with a PNG / JPEG image or remove it.")
    if isinstance(error, (FileExistsError, FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return Fault(EXIT_BAD_INPUT, str(error))
    if isinstance(error, PermissionError):
        return Fault(
            EXIT_ENVIRONMENT,
            f"permission denied ({_one_line(error)}): choose a folder you can write to, or fix its permissions.",
        )
    if isinstance(error, OSError):
        return Fault(
            EXIT_ENVIRONMENT,
            f"the operating system refused an operation ({_one_line(error)}): check the paths, permissions and "
            "free space, then run again.",
        )
    if isinstance(error, ValueError):
        return Fault(EXIT_BAD_INPUT, str(error))
    return None


__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_CODES_HELP",
    "EXIT_ENVIRONMENT",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EnvironmentProblem",
    "Fault",
    "HfMlaVlmError",
    "InputError",
    "LeftoverError",
    "describe_fault",
]
