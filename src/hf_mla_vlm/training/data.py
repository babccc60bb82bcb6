# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""Chat conversations (text + images) -> padded training batches with labels on assistant tokens only.

Every conversation goes through the model's own processor (chat template, image placeholders expanded to one token
per image feature, pixel values, `image_sizes` / `image_grid_thw`). Labels are `-100` everywhere except on the
tokens of each assistant turn's content and the end-of-turn token that closes it, so a model learns to answer and
to stop, and never to predict the user, the system prompt or the image tokens.

Each conversation is processed once; an assistant turn is located after its header tokens (what the chat template
adds with `add_generation_prompt=True`) and checked token by token against the turn tokenised on its own (an error
otherwise, rather than silently misplaced labels).

Batches are right-padded: Llama-style models compute position ids from `cache_position` in a plain forward, so
left padding would shift every position of a shorter row. Qwen2.5-VL's 3-D M-RoPE positions are computed by the
model from `input_ids`, `image_grid_thw` and `attention_mask`, i.e. from the image grid, in training as in
inference (the collator never passes `position_ids`).
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hf_mla_vlm.conversion_scripts.calibration import Conversation
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


@dataclass
class ChatCollator:
    """Collate `Conversation`s into one right-padded batch with assistant-only labels.

    Args:
        processor: the model's processor (LLaVA, LLaVA-NeXT or Qwen2.5-VL style, or any processor with a chat
            template).
        max_length (`int`, *optional*): drop conversations longer than this many tokens (an error if a whole
            batch is dropped). Truncating would cut image tokens apart from their features.

    Returns (on call):
        `dict`: `input_ids`, `attention_mask`, `labels` and the processor's image tensors (`pixel_values` and
        `image_sizes` or `image_grid_thw`), concatenated over the batch.
    """

    processor: object
    max_length: int | None = None

    def __call__(self, conversations: Sequence[Conversation]) -> dict[str, torch.Tensor]:
        rows = []
        for conversation in conversations:
            encoded, spans = assistant_spans(self.processor, conversation)
            if self.max_length is not None and encoded["input_ids"].shape[1] > self.max_length:
                continue
            rows.append((encoded, spans))
        if not rows:
            raise ValueError(f"Every conversation of the batch is longer than max_length={self.max_length}.")
        pad_id = as_tokenizer(self.processor).pad_token_id
        if pad_id is None:
            raise ValueError("The tokenizer has no pad token.")
        length = max(encoded["input_ids"].shape[1] for encoded, _ in rows)
        batch: dict[str, list[torch.Tensor]] = {"labels": []}
        for encoded, spans in rows:
            ids = encoded["input_ids"][0]
            labels = torch.full((length,), IGNORE_INDEX, dtype=torch.long)
            for start, end in spans:
                labels[start:end] = ids[start:end]
            batch["labels"].append(labels)
            for key, value in encoded.items():
                if not isinstance(value, torch.Tensor):
                    continue
                if value.dim() == 2 and value.shape[0] == 1 and value.shape[1] == ids.shape[0]:  # per-token tensors
                    fill = pad_id if key == "input_ids" else 0
                    value = _pad_to(value[0], (length,), fill)
                    batch.setdefault(key, []).append(value)
                else:
                    batch.setdefault(key, []).append(value)
        out = {}
        for key, values in batch.items():
            if values[0].dim() == 1:  # per-token tensors, already padded to `length`
                out[key] = torch.stack(values)
                continue
            # image tensors: concatenate along dim 0, zero-padding other dims (LLaVA-NeXT's patch count varies)
            shape = [max(v.shape[d] for v in values) for d in range(1, values[0].dim())]
            out[key] = torch.cat([_pad_to(v, (v.shape[0], *shape), 0) for v in values])
        return out


__all__ = ["IGNORE_INDEX", "ChatCollator", "assistant_spans"]
