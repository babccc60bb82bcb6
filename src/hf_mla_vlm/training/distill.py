# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""Recovery by self-distillation, on training data that mixes plain text with image conversations.

The paper recovers a converted model by fine-tuning on labels (VQA answers). That trains the task and, on our zoo,
costs the language (Wikipedia perplexity 13 -> 400+). Self-distillation asks the converted model (the student) to
give the next-token distributions of the original model (the teacher) at every position:

    loss = T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T))  (+ label_weight * cross-entropy)

averaged over the distilled positions: every non-padding position of a row except the image placeholders (whose
outputs no generation ever reads). The data mixes packed windows of plain text (`TextWindow`, e.g. the Wikipedia
calibration split: every token is a target) with image conversations (`Conversation`): `mixed_training_items`;
`ChatCollator(labels="all")` labels every distilled position, so Transformers' token counts count them.

With `objective="sft"` the same mixed data trains on labels (assistant tokens of the conversations, every token of
the text windows): the paper's recipe on mixed data, and the recipe of the control runs (the original model
fine-tuned the same way, see `finetune(..., stage=0)`).
"""

import random
from collections.abc import Mapping, Sequence

import torch

from ..evaluation.perplexity import token_stream
from .data import IGNORE_INDEX, TextWindow


TEXT_SOURCES = ("wikipedia",)  # plain-text sources by name: the Wikipedia calibration split (80% of the articles)


def text_windows(tokenizer, texts: Sequence[str], seq_len: int, count: int | None = None) -> list[TextWindow]:
    """The first `count` (default: every whole) non-overlapping windows of `seq_len` tokens of `texts` packed into
    one stream.

    Raises:
        `ValueError`: the texts hold fewer than `count * seq_len` tokens (fewer than `seq_len` without `count`).
    """
    if seq_len < 2 or (count is not None and count < 1):
        raise ValueError(f"seq_len must be >= 2 and count >= 1, got {seq_len} and {count}.")
    ids = token_stream(tokenizer, texts, max_tokens=None if count is None else count * seq_len)
    count = len(ids) // seq_len if count is None else count
    if count < 1 or len(ids) < count * seq_len:
        raise ValueError(f"The texts hold {len(ids)} tokens, fewer than {max(count, 1)} windows of {seq_len}.")
    return [TextWindow(tuple(ids[i * seq_len : (i + 1) * seq_len])) for i in range(count)]


def mixed_training_items(sources: Mapping[str, Sequence], weights: Sequence[float], total: int, seed: int = 0):
    """`total` items drawn from `sources` (name -> items, each list in its own order) in the proportions
    `weights`, the first ones of each source, shuffled together with `seed`. The counts per source are rounded so
    that they sum to `total` (largest remainders first).

    Raises:
        `ValueError`: weights that do not match the sources or are not positive, or a source with too few items.
    """
    names = list(sources)
    if len(weights) != len(names) or any(not w > 0 for w in weights):
        raise ValueError(f"Need one positive weight per data source ({names}), got {list(weights)}.")
    shares = [w / sum(weights) * total for w in weights]
    counts = [int(s) for s in shares]
    for i in sorted(range(len(names)), key=lambda i: counts[i] - shares[i])[: total - sum(counts)]:
        counts[i] += 1
    items = []
    for name, count in zip(names, counts):
        if len(sources[name]) < count:
            raise ValueError(f"Data source {name!r} has {len(sources[name])} items; the mix needs {count}.")
        items += list(sources[name][:count])
    random.Random(seed).shuffle(items)
    return items


# Elements of one float32 chunk of rows in `distillation_kl` (64 MiB): a chunk's softmax work holds a few blocks
# of this size, never one of the whole batch
CHUNK_ELEMENTS = 1 << 24


class _ChunkedKL(torch.autograd.Function):
    """`T^2 * KL(teacher || student)` summed over the masked rows, computed a chunk of rows at a time. The gradient
    with respect to the student logits, `T * (softmax(s / T) - softmax(t / T))` on the masked rows and 0 elsewhere,
    is written during the forward into one tensor of the logits' shape and dtype, so no float32 copy, log-softmax or
    elementwise KL of the whole `(rows, V)` block is kept for the backward (the plain formula keeps several)."""

    @staticmethod
    def forward(ctx, student, teacher, mask, temperature):
        rows, vocab = student.shape
        need_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(student) if need_grad else None
        total = student.new_zeros((), dtype=torch.float32)
        step = max(1, CHUNK_ELEMENTS // vocab)
        for start in range(0, rows, step):  # whole chunks, the mask applied by value: no host synchronisation
            end = min(start + step, rows)
            keep = mask[start:end, None]
            log_s = (student[start:end].float() / temperature).log_softmax(-1)
            log_t = (teacher[start:end].float() / temperature).log_softmax(-1)
            p_t = log_t.exp()
            total += torch.where(keep, p_t * (log_t - log_s), 0.0).sum()
            if need_grad:
                grad[start:end] = torch.where(keep, temperature * (log_s.exp_() - p_t), 0.0)
        ctx.save_for_backward(grad)
        return total * temperature**2

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None


def distillation_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Sum over the positions where `mask` is True of `T^2 * KL(teacher || student)` of the next-token
    distributions at temperature `T` (float32 math). Shapes: logits `(B, S, V)`, mask `(B, S)`.

    Memory: besides the two logits tensors, one tensor of the student logits' size (its gradient) and float32
    chunks of `CHUNK_ELEMENTS`; the teacher gets no gradient."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    if student_logits.shape != teacher_logits.shape or mask.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"student and teacher logits must have one shape (B, S, V) and the mask (B, S), got "
            f"{tuple(student_logits.shape)}, {tuple(teacher_logits.shape)} and {tuple(mask.shape)}."
        )
    vocab = student_logits.shape[-1]
    return _ChunkedKL.apply(
        student_logits.reshape(-1, vocab),
        teacher_logits.detach().reshape(-1, vocab),
        mask.reshape(-1).to(torch.bool),
        float(temperature),
    )


def distilled_positions(labels: torch.Tensor) -> torch.Tensor:
    """`(B, S)` mask of the positions whose prediction is distilled: those followed by a label (`MixedCollator`
    with `labels="all"`); the last position predicts nothing in the batch."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


__all__ = [
    "CHUNK_ELEMENTS",
    "TEXT_SOURCES",
    "distillation_kl",
    "distilled_positions",
    "mixed_training_items",
    "text_windows",
]
