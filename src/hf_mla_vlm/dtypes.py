# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""The one table of dtype names the package accepts (`--dtype` of every CLI verb, the `dtype=` of the Python API).

Imports torch only inside the functions: the CLI reads `DTYPE_NAMES` for its `--help`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING


if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("float32", "bfloat16", "float16")
AUTO = "auto"


def check_dtype_name(name: str, *, allow_auto: bool = True) -> None:
    """Raise `ValueError` unless `name` is one of `DTYPE_NAMES` (or `"auto"` where allowed)."""
    allowed = (AUTO, *DTYPE_NAMES) if allow_auto else DTYPE_NAMES
    if name not in allowed:
        raise ValueError(f"dtype must be one of {', '.join(allowed)}; got {name!r}.")


def torch_dtype(name: str, *, allow_auto: bool = True) -> torch.dtype | str:
    """The `torch.dtype` named `name` (`"auto"` is passed through for `from_pretrained`)."""
    import torch

    check_dtype_name(name, allow_auto=allow_auto)
    return AUTO if name == AUTO else getattr(torch, name)


def as_torch_dtype(value) -> torch.dtype:
    """A config's `dtype` field (`torch.bfloat16`, `"bfloat16"`, `"torch.bfloat16"`) as a `torch.dtype`; float32
    for anything else (a config without one)."""
    import torch

    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in DTYPE_NAMES:
        return getattr(torch, value.removeprefix("torch."))
    return torch.float32
