# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""Small shared helpers."""

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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


__all__ = ["staged_folder"]
