# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""Chat conversations (text + images) and plain text -> padded training batches with labels.

Every conversation goes through the model's own processor (chat template, image placeholders expanded to one token
per image feature, pixel values, `image_sizes` / `image_grid_thw`). Labels are `-100` everywhere except on the
tokens of each assistant turn's content and the end-of-turn token that closes it, so a model learns to answer and
to stop, and never to predict the user, the system prompt or the image tokens.

Each conversation is processed once; an assistant turn is located after its header tokens (what the chat template
adds with `add_generation_prompt=True`) and checked token by token against the turn tokenised on its own (an error
otherwise, rather than silently misplaced labels).

Batches are right-padded: Llama-style models compute position ids from `cache_position` in a plain forward, so
left padding would shift every position of a shorter row. Qwen-VL's 3-D M-RoPE positions come from `input_ids`,
`image_grid_thw` and `attention_mask`, i.e. from the image grid. The model computes them in its forward unless
given `position_ids`; `ChatCollator(position_ids=RopeIndex(config))` computes the same values with the model's own
method on the CPU, in the dataloader workers (on a GPU the forward's computation synchronises with the device for
every row and image).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import AutoModel

from hf_mla_vlm.conversations import Conversation
from hf_mla_vlm.registry import arch_spec
from hf_mla_vlm.utils import as_tokenizer


IGNORE_INDEX = -100


def _count_images(messages: Sequence[dict]) -> int:
    count = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            count += sum(1 for item in content if isinstance(item, dict) and item.get("type") == "image")
    return count


def _process(processor, text: str, images: Sequence) -> dict:
    kwargs = {"images": list(images)} if images else {}
    return dict(processor(text=[text], return_tensors="pt", **kwargs))


def _find(ids: list[int], pattern: list[int], start: int) -> int:
    for i in range(start, len(ids) - len(pattern) + 1):
        if ids[i : i + len(pattern)] == pattern:
            return i
    return -1


def assistant_spans(processor, conversation: Conversation) -> tuple[dict, list[tuple[int, int]]]:
    """The processed conversation (batch of 1) and the `[start, end)` token spans to train on.

    Each span covers one assistant turn's content and its end-of-turn token (trailing whitespace tokens after it
    are left out: generation stops at the end-of-turn token and never produces them). The conversation goes
    through the processor once; each assistant turn is then located after its header (the text the chat template
    adds with `add_generation_prompt=True`), and its tokens are checked against the turn tokenised on its own.

    Raises:
        `ValueError`: the conversation has no assistant turn, references another number of images than it has, or
            the assistant turns cannot be located exactly in the processed tokens.
    """
    messages = conversation.messages
    if _count_images(messages) != len(conversation.images):
        raise ValueError(
            f"The messages reference {_count_images(messages)} image(s) but {len(conversation.images)} were given."
        )
    full_text = processor.apply_chat_template(messages, tokenize=False)
    encoded = _process(processor, full_text, conversation.images)
    ids = encoded["input_ids"][0].tolist()
    tokenizer = as_tokenizer(processor)
    spans, cursor = [], 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = processor.apply_chat_template(messages[:index], tokenize=False) if index else ""
        head = processor.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        turn = processor.apply_chat_template(messages[: index + 1], tokenize=False)
        if not (full_text.startswith(head) and full_text.startswith(turn) and head.startswith(before)):
            raise ValueError("The chat template does not render conversation prefixes as prefixes of the whole.")
        header = tokenizer(head[len(before) :], add_special_tokens=False)["input_ids"]
        body = tokenizer(turn[len(head) :], add_special_tokens=False)["input_ids"]
        at = _find(ids, header, cursor) if header else cursor
        start = at + len(header)
        if at < 0 or ids[start : start + len(body)] != body:
            raise ValueError(f"Cannot locate assistant turn {index} in the processed tokens; cannot place labels.")
        end = start + len(body)
        cursor = end
        while end > start and tokenizer.decode(ids[end - 1 : end]).strip() == "":
            end -= 1
        if end > start:
            spans.append((start, end))
    if not spans:
        raise ValueError("The conversation has no assistant turn with content to train on.")
    return encoded, spans


def _pad_to(tensor: torch.Tensor, shape: Sequence[int], value) -> torch.Tensor:
    if tuple(tensor.shape) == tuple(shape):
        return tensor
    out = tensor.new_full(tuple(shape), value)
    out[tuple(slice(0, n) for n in tensor.shape)] = tensor
    return out


@dataclass(frozen=True)
class TextWindow:
    """`seq_len` consecutive token ids of plain text (documents packed end to end, EOS between them)."""

    input_ids: tuple[int, ...]


def item_length(processor, item) -> int:
    """The tokens of `item`'s row in a `ChatCollator` batch, before padding: a `TextWindow`'s ids, or a
    `Conversation` through the processor (image placeholders expanded), as the collator encodes it."""
    if isinstance(item, TextWindow):
        return len(item.input_ids)
    if isinstance(item, Conversation):
        text = processor.apply_chat_template(item.messages, tokenize=False)
        return _process(processor, text, item.images)["input_ids"].shape[1]
    raise TypeError(f"Training items must be Conversation or TextWindow, got {type(item).__name__}.")


@dataclass
class ChatCollator:
    """Collate `Conversation`s (and `TextWindow`s of plain text) into one right-padded batch with labels.

    Args:
        processor: the model's processor (LLaVA, LLaVA-NeXT or Qwen2.5-VL style, or any processor with a chat
            template).
        max_length (`int`, *optional*): drop rows longer than this many tokens (an error if a whole batch is
            dropped). Truncating would cut image tokens apart from their features.
        labels (`str`, *optional*, defaults to `"assistant"`): `"assistant"`: conversations are labelled on their
            assistant turns, text windows on every token; `"all"` (distillation): every position whose prediction
            is distilled is labelled, i.e. every token after a position that is not an image placeholder.
        exclude_token_ids (`Sequence[int]`, *optional*): with `labels="all"`, the tokens whose position predicts
            nothing (the image placeholders).
        position_ids (`Callable`, *optional*): a function of the collated batch returning its `position_ids` (or
            None for none), e.g. `RopeIndex(config)` for Qwen-VL models (`rope_index(config)` picks it).
        host_inputs (`Sequence[str]`, *optional*): keys returned as (nested) lists instead of tensors, so that
            device placement leaves them on the host (the registry's `host_inputs`).

    `ChatCollator.for_model(processor, config, ...)` sets `position_ids` and `host_inputs` for the model's
    architecture (what training uses).

    Returns (on call):
        `dict`: `input_ids`, `attention_mask`, `labels`, the processor's other per-token tensors (zeros for text
        rows, e.g. Qwen2.5-VL's `mm_token_type_ids`) and its image tensors (`pixel_values` and `image_sizes` or
        `image_grid_thw`), concatenated over the rows that have images.
    """

    processor: object
    max_length: int | None = None
    labels: str = "assistant"
    exclude_token_ids: Sequence[int] = ()
    position_ids: Callable[[dict], torch.Tensor | None] | None = None
    host_inputs: Sequence[str] = ()

    def __post_init__(self):
        if self.labels not in ("assistant", "all"):
            raise ValueError(f"labels must be 'assistant' or 'all', got {self.labels!r}.")

    @classmethod
    def for_model(cls, processor, config, **kwargs) -> "ChatCollator":
        """The collator for training the model of `config` (native or MLA): Qwen-VL's M-RoPE positions computed on
        the CPU (`rope_index`) and the registry's `host_inputs` kept on the host; `kwargs` as for the class."""
        spec = arch_spec(config.model_type)
        return cls(processor, position_ids=rope_index(config), host_inputs=spec.host_inputs, **kwargs)

    def _row(self, item) -> tuple[dict, list[tuple[int, int]]]:
        if isinstance(item, TextWindow):
            ids = torch.tensor([item.input_ids], dtype=torch.long)
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, [(0, ids.shape[1])]
        if isinstance(item, Conversation):
            encoded, spans = assistant_spans(self.processor, item)
            return encoded, spans if self.labels == "assistant" else [(1, encoded["input_ids"].shape[1])]
        raise TypeError(f"Training items must be Conversation or TextWindow, got {type(item).__name__}.")

    def __call__(self, items: Sequence) -> dict[str, torch.Tensor]:
        rows = [self._row(item) for item in items]
        if self.max_length is not None:
            rows = [(encoded, spans) for encoded, spans in rows if encoded["input_ids"].shape[1] <= self.max_length]
        if not rows:
            raise ValueError(f"Every row of the batch is longer than max_length={self.max_length}.")
        pad_id = as_tokenizer(self.processor).pad_token_id
        if pad_id is None:
            raise ValueError("The tokenizer has no pad token.")
        length = max(encoded["input_ids"].shape[1] for encoded, _ in rows)
        per_token = {
            key
            for encoded, _ in rows
            for key, value in encoded.items()
            if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape == encoded["input_ids"].shape
        }
        batch: dict[str, list[torch.Tensor]] = {key: [] for key in sorted(per_token | {"labels"})}
        images: dict[str, list[torch.Tensor]] = {}
        excluded = torch.tensor(list(self.exclude_token_ids), dtype=torch.long)
        for encoded, spans in rows:
            ids = encoded["input_ids"][0]
            labels = torch.full((length,), IGNORE_INDEX, dtype=torch.long)
            for start, end in spans:
                labels[start:end] = ids[start:end]
            if self.labels == "all":
                labels[0] = IGNORE_INDEX  # nothing predicts the first token
                labels[1 : ids.shape[0]][torch.isin(ids[:-1], excluded)] = IGNORE_INDEX  # t predicts t + 1
            batch["labels"].append(labels)
            for key in per_token:
                value = encoded[key][0] if key in encoded else torch.zeros_like(ids)
                batch[key].append(_pad_to(value, (length,), pad_id if key == "input_ids" else 0))
            for key, value in encoded.items():
                if isinstance(value, torch.Tensor) and key not in per_token:
                    images.setdefault(key, []).append(value)
        out = {key: torch.stack(values) for key, values in batch.items()}
        for key, values in images.items():
            # concatenated along dim 0, other dims zero-padded (LLaVA-NeXT's patch count varies)
            shape = [max(v.shape[d] for v in values) for d in range(1, values[0].dim())]
            out[key] = torch.cat([_pad_to(v, (v.shape[0], *shape), 0) for v in values])
        if self.position_ids is not None and (position_ids := self.position_ids(out)) is not None:
            out["position_ids"] = position_ids
        for key in self.host_inputs:
            if key in out:
                out[key] = out[key].tolist()
        return out


class RopeIndex:
    """The 3-D M-RoPE `position_ids` of a Qwen-VL batch, computed by the model's own `get_rope_index` on the CPU.

    In a forward without `position_ids` the model computes them itself, on the device, where every row and image
    synchronises the host with it (`.item()`, boolean-mask indexing): about 470 of the 574 synchronisations of an
    H200 recovery step of the zoo Qwen2.5-VL (`benchmarks/results/profile_recovery_step.md`). Given to
    `ChatCollator(position_ids=...)`, the same method runs on the same inputs in the dataloader workers. It belongs
    to a weightless instance of the base model (meta device, built from `config`); pickled (into spawned or
    forkserver dataloader workers) it carries only the config and rebuilds that instance.

    Args:
        config: the model's config (native or MLA).

    Returns (on call):
        `torch.LongTensor` `(3, batch, seq_len)`, or None for a batch without images or `mm_token_type_ids` (the
        model's plain positions apply).
    """

    def __init__(self, config):
        self.config = config
        with torch.device("meta"):
            self.model = AutoModel.from_config(config)

    def __reduce__(self):  # a converted model's classes are built at import time and do not pickle by name
        return type(self), (self.config,)

    def __call__(self, batch: dict) -> torch.Tensor | None:
        grids = {key: batch.get(key) for key in ("image_grid_thw", "video_grid_thw")}
        if all(grid is None for grid in grids.values()) or "mm_token_type_ids" not in batch:
            return None
        position_ids, _ = self.model.get_rope_index(
            batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"], attention_mask=batch["attention_mask"],
            **grids,
        )  # fmt: skip
        return position_ids


def rope_index(config) -> RopeIndex | None:
    """`RopeIndex(config)` for an M-RoPE architecture (the registry's `rope`), else None."""
    return RopeIndex(config) if arch_spec(config.model_type).rope == "mrope" else None


__all__ = ["IGNORE_INDEX", "ChatCollator", "RopeIndex", "TextWindow", "assistant_spans", "item_length", "rope_index"]
