# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""Small shared helpers."""

import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch


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


@contextmanager
def staged_folder(output_dir: str | Path) -> Iterator[Path]:
    """Write a folder atomically: yields a hidden sibling `.<name>.incomplete` to fill; when the block succeeds it
    replaces `output_dir` (an existing folder is removed), when it fails it is deleted. An interrupted run therefore
    never leaves a folder that looks complete."""
    output_dir = Path(output_dir).resolve()
    staging = output_dir.parent / f".{output_dir.name}.incomplete"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


__all__ = ["as_tokenizer", "staged_folder", "to_device"]
