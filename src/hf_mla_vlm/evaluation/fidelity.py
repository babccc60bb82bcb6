# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""Next-token fidelity of a (converted) model against its reference: KL divergence and top-1 agreement."""

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers.utils import logging

from ..utils import to_device
from .kv_cache import forward_cache_kwargs
from .perplexity import model_device


logger = logging.get_logger(__name__)

# Prompts of `builtin_text_batches`: (user message, assistant answer). Rendered through the chat template as a
# two-turn conversation, so the answer positions are scored too.
BUILTIN_TEXT_PROMPTS: tuple[tuple[str, str], ...] = (
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Describe the image.", "The image shows a red circle to the left of a blue square."),
    ("Explain photosynthesis in one sentence.",
     "Plants use sunlight, water and carbon dioxide to make sugar and release oxygen."),
    ("Write a haiku about the sea.", "Grey waves fold and break, salt wind carries gull voices, the tide keeps time."),
    ("What is 12 times 7?", "12 times 7 is 84."),
    ("Name three colours.", "Red, green and blue."),
    ("Who wrote Romeo and Juliet?", "Romeo and Juliet was written by William Shakespeare."),
    ("Translate 'good morning' into French.", "Good morning in French is 'bonjour'."),
)  # fmt: skip


def builtin_text_batches(processor) -> list[dict]:
    """One batch per built-in conversation (`BUILTIN_TEXT_PROMPTS`), rendered with the processor's chat template.

    Args:
        processor: a VLM processor or a tokenizer. Without a chat template, the question and answer are joined
            with a space.

    Returns:
        `list[dict]`: `input_ids` and `attention_mask` (batch 1, no padding) per conversation.
    """
    tokenizer = getattr(processor, "tokenizer", None) or processor
    has_template = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
    batches = []
    for question, answer in BUILTIN_TEXT_PROMPTS:
        if has_template:
            messages = [
                {"role": "user", "content": [{"type": "text", "text": question}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            ]
            text = processor.apply_chat_template(messages, tokenize=False)
        else:
            text = f"{question} {answer}"
        encoded = tokenizer([text], return_tensors="pt", add_special_tokens=False)
        batches.append({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})
    return batches


@torch.no_grad()
def next_token_fidelity(
    reference: torch.nn.Module,
    model: torch.nn.Module,
    batches: Iterable[Mapping],
    *,
    device: str | torch.device | None = None,
    progress: bool = False,
    kv_cache: str | None = None,
) -> dict:
    """How closely `model` reproduces `reference`'s next-token distributions on the same inputs.

    For every batch both models run on the same inputs (processor outputs: `input_ids`, `attention_mask`,
    `pixel_values`, `image_grid_thw`, ... are passed through unchanged) and, at every valid position (attention
    mask 1; all positions without a mask), it computes in float32:
    `KL(p_ref || p_model) = sum_v p_ref(v) * (log p_ref(v) - log p_model(v))` and whether the argmaxes agree.

    Args:
        reference (`torch.nn.Module`): the source model (e.g. the native VLM).
        model (`torch.nn.Module`): the model compared with it (e.g. its MLA conversion).
        batches (`Iterable[Mapping]`): model inputs; tensors are moved to each model's device.
        device (`str` or `torch.device`, *optional*): move both models there first; defaults to where they are.
        progress (`bool`, *optional*, defaults to `False`): show a progress bar.
        kv_cache (`str`, *optional*): `"int8"`, `"fp8"` or `"int4"` runs `model` (not the reference) through a
            quantized latent cache (`evaluation.kv_cache`); None / `"bf16"` without a cache.

    Returns:
        `dict`: `kl` (mean KL over valid positions, in nats; per-position values are clamped at 0), `kl_max`
        (largest per-position KL), `top1_agreement` (fraction of positions with the same argmax), `positions`
        (number of valid positions), `batches`.
    """
    if device is not None:
        reference.to(device)
        model.to(device)
    reference_device, model_device_ = model_device(reference), model_device(model)
    kl_sum, kl_max, agree, positions, num_batches = 0.0, 0.0, 0, 0, 0
    for batch in tqdm(batches, desc="Fidelity", disable=not progress, leave=False):
        ref_logits = reference(**to_device(batch, reference_device), use_cache=False).logits
        logits = model(**to_device(batch, model_device_), **forward_cache_kwargs(model, kv_cache)).logits
        if ref_logits.shape != logits.shape:
            raise ValueError(f"Logit shapes differ: reference {tuple(ref_logits.shape)}, model {tuple(logits.shape)}.")
        ref_logp = F.log_softmax(ref_logits.float(), dim=-1)
        logp = F.log_softmax(logits.float().to(ref_logp.device), dim=-1)
        # (batch, seq); clamped at 0: float rounding can make a mathematically zero KL slightly negative.
        kl = F.kl_div(logp, ref_logp, reduction="none", log_target=True).sum(-1).clamp_min(0.0)
        mask = batch.get("attention_mask")
        mask = torch.ones(kl.shape, dtype=torch.bool) if mask is None else mask.bool()
        mask = mask.to(kl.device)
        valid_kl = kl[mask]
        kl_sum += valid_kl.double().sum().item()
        if valid_kl.numel():
            kl_max = max(kl_max, valid_kl.max().item())
        agree += (ref_logp.argmax(-1) == logp.argmax(-1))[mask].sum().item()
        positions += int(mask.sum().item())
        num_batches += 1
    if positions == 0:
        raise ValueError("No valid positions: the batches are empty or fully masked.")
    return {
        "kl": kl_sum / positions,
        "kl_max": kl_max,
        "top1_agreement": agree / positions,
        "positions": positions,
        "batches": num_batches,
    }


__all__ = ["BUILTIN_TEXT_PROMPTS", "builtin_text_batches", "next_token_fidelity"]
