# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""The Transformers versions we run on, and the one API difference between them that our own calls meet.

Version policy: `setup.cfg` accepts `transformers>=5.17,<6`. CI runs the whole test suite, Transformers' own model
tests included (`tests/conformance`), on the oldest accepted release (5.17, the GPU machine's) and on the newest
release at the time (`TESTED_TRANSFORMERS`). Importing the package on any other minor version warns once, naming the
versions that were tested.

Transformers 5.24 renamed the cache argument of every model and module `forward` from `past_key_values=` to
`cache=` (the old name still works with a deprecation warning on the outer models; modules that only know the old
name silently receive no cache). `MLAAttention.forward` accepts both; our own calls pass `CACHE_ARG` and read
`output_cache(outputs)`.
"""

import inspect
import warnings

import transformers
from transformers.models.llama.modeling_llama import LlamaModel


TESTED_TRANSFORMERS = ("5.17", "5.25")

# `cache` from 5.24 on, `past_key_values` before.
CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def output_cache(outputs):
    """The cache a model returned (`outputs.cache` from Transformers 5.24 on, `outputs.past_key_values` before)."""
    return outputs.get(CACHE_ARG)


def minor_version(version: str) -> str:
    """`"5.24"` for `"5.24.0"`, `"5.25.0.dev0"` -> `"5.25"`."""
    return ".".join(version.split(".")[:2])


def warn_if_untested(version: str = transformers.__version__) -> bool:
    """Warn (once per process, through `warnings`) when `version` is not one CI has run; True if it warned."""
    if minor_version(version) in TESTED_TRANSFORMERS:
        return False
    warnings.warn(
        f"hf-mla-vlm was tested with Transformers {' and '.join(TESTED_TRANSFORMERS)}; this is {version}. Converted "
        "models may behave differently (Transformers 5.24 changed how the cache reaches the attention). Run "
        "`python -m pytest -q tests` to check this version, or install transformers=="
        f"{TESTED_TRANSFORMERS[-1]}.*.",
        UserWarning,
        stacklevel=3,
    )
    return True


__all__ = ["CACHE_ARG", "TESTED_TRANSFORMERS", "minor_version", "output_cache", "warn_if_untested"]
