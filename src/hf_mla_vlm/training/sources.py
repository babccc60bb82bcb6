# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""The training data of `finetune`: one source (the zoo's VQA train split, a conversation file, a list) or a mix of
sources with text windows of the Wikipedia calibration split."""

import functools
import math
import os
import sys
from collections.abc import Sequence

import torch
from transformers.utils import logging

from ..conversations import ZOO_VQA, Conversation, load_conversations, zoo_vqa_conversations
from .data import TextWindow, item_length
from .distill import TEXT_SOURCES, mixed_training_items, text_windows


DEFAULT_ZOO_SAMPLES = 1000


class ConversationDataset(torch.utils.data.Dataset):
    """A list of `Conversation`s (and `TextWindow`s); `ChatCollator` turns a batch of them into model inputs."""

    def __init__(self, conversations: Sequence[Conversation | TextWindow]):
        self.conversations = list(conversations)
        self._lengths: tuple[object, list[int]] | None = None  # (processor, `lengths`) once measured

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, index: int) -> Conversation | TextWindow:
        return self.conversations[index]

    def lengths(self, processor, num_workers: int = 0, progress: bool = True) -> list[int]:
        """The token length of every item as `ChatCollator` encodes it (`item_length`), for the length-aware
        samplers of `Trainer` (`train_sampling_strategy="batch_rebalance"` / `"group_by_length"`). Computed once,
        in `num_workers` processes (a conversation goes through the processor: a few ms each), and again only for
        another processor."""
        if self._lengths is None or self._lengths[0] is not processor:
            collate = functools.partial(_item_lengths, processor)  # picklable for the workers
            loader = torch.utils.data.DataLoader(self, batch_size=64, num_workers=num_workers, collate_fn=collate)
            bar = logging.tqdm(total=len(self), desc="Measuring sample lengths", disable=not progress)
            lengths = []
            for batch in loader:
                lengths += batch
                bar.update(len(batch))
            bar.close()
            self._lengths = (processor, lengths)
        return self._lengths[1]


def _item_lengths(processor, items) -> list[int]:
    return [item_length(processor, item) for item in items]


def load_training_conversations(
    data: str | os.PathLike | Sequence[Conversation],
    *,
    num_samples: int | None = None,
    image_size: int = 224,
    seed: int = 0,
    image_folder: str | os.PathLike | None = None,
) -> tuple[list[Conversation], str]:
    """Conversations from `"zoo-vqa"` (procedural VQA train split), a LLaVA-style JSON / `"builtin"` / saved
    `datasets` folder (through `load_conversations`), or a list of `Conversation`. Returns them and a label."""
    if isinstance(data, (str, os.PathLike)):
        if str(data) == ZOO_VQA:
            count = DEFAULT_ZOO_SAMPLES if num_samples is None else num_samples
            conversations, label = zoo_vqa_conversations(count, seed=seed, image_size=image_size), ZOO_VQA
        else:
            count = sys.maxsize if num_samples is None else num_samples
            conversations = load_conversations(data, count, seed=seed, image_folder=image_folder)
            label = str(data)
    else:
        conversations = list(data)
        if num_samples is not None:
            conversations = conversations[:num_samples]
        label = "in-memory conversations"
        if any(not isinstance(c, (Conversation, TextWindow)) for c in conversations):
            raise ValueError(
                "data must hold Conversation (hf_mla_vlm.conversations) or TextWindow "
                "(hf_mla_vlm.training.data) objects."
            )
    if not conversations:
        raise ValueError(f"No training conversations in {label}.")
    return conversations, label


def load_training_items(
    data: str | os.PathLike | Sequence,
    processor,
    *,
    mix: Sequence[float] | None = None,
    num_samples: int | None = None,
    image_size: int = 224,
    seed: int = 0,
    image_folder: str | os.PathLike | None = None,
    text_seq_len: int = 512,
) -> tuple[list, str]:
    """Training items of one source or of a mix: `data` is a source (see `load_training_conversations`), a list of
    items, or comma-separated sources such as `"wikipedia,zoo-vqa"` mixed in the proportions `mix` (default: equal).
    `"wikipedia"` gives `TextWindow`s of `text_seq_len` tokens packed from the Wikipedia calibration split (80% of
    the articles; perplexity is measured on the disjoint test split). Returns the items and a label."""
    specs = [part.strip() for part in str(data).split(",")] if isinstance(data, (str, os.PathLike)) else None
    if specs is None or (len(specs) == 1 and specs[0] not in TEXT_SOURCES):
        if mix is not None and len(mix) != 1:
            raise ValueError(f"mix has {len(mix)} weights for one data source.")
        return load_training_conversations(
            data, num_samples=num_samples, image_size=image_size, seed=seed, image_folder=image_folder
        )
    weights = list(mix) if mix is not None else [1.0] * len(specs)
    if len(weights) != len(specs) or len(set(specs)) != len(specs):
        raise ValueError(f"Give each data source once and one mix weight per source; got {specs} and {weights}.")
    total = DEFAULT_ZOO_SAMPLES if num_samples is None else num_samples
    sources = {}
    for spec, weight in zip(specs, weights):
        count = math.ceil(weight / sum(weights) * total)  # the most the mix takes from this source
        if spec in TEXT_SOURCES:
            from ..assets import wikipedia_split

            sources[spec] = text_windows(processor, wikipedia_split("calibration"), text_seq_len, count)
        else:
            sources[spec], _ = load_training_conversations(
                spec, num_samples=count, image_size=image_size, seed=seed, image_folder=image_folder
            )
    items = mixed_training_items(sources, weights, total, seed=seed)
    return items, ",".join(f"{spec}:{weight:g}" for spec, weight in zip(specs, weights))


__all__ = [
    "DEFAULT_ZOO_SAMPLES",
    "ZOO_VQA",
    "ConversationDataset",
    "load_training_conversations",
    "load_training_items",
]
