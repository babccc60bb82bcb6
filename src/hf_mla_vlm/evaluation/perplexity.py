# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""Perplexity on a token stream cut into non-overlapping windows (WikiText-style), for causal LMs and VLMs."""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers.utils import logging

from ..utils import as_tokenizer
from .kv_cache import forward_cache_kwargs


logger = logging.get_logger(__name__)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter (CPU for a model without parameters)."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def token_stream(tokenizer, texts: Sequence[str], max_tokens: int | None = None) -> list[int]:
    """Token ids of `texts`, each followed by the EOS token, concatenated.

    Args:
        tokenizer: a tokenizer or a processor (its `.tokenizer` is used). No special tokens (BOS) are added.
        texts (`Sequence[str]`): the documents, in order.
        max_tokens (`int`, *optional*): stop tokenising once this many ids are collected (the result may be
            longer; it is never truncated here).

    Returns:
        `list[int]`: the ids.
    """
    tokenizer = as_tokenizer(tokenizer)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("The tokenizer has no EOS token; it is needed to separate the texts.")
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(eos)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return ids


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    seq_len: int = 512,
    max_sequences: int = 8,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: bool = True,
    kv_cache: str | None = None,
) -> dict:
    """Perplexity of `model` on `texts`: mean next-token negative log-likelihood over non-overlapping windows.

    The texts are tokenised without special tokens, each followed by EOS, and concatenated; the stream is cut into
    non-overlapping windows of `seq_len` tokens and the first `max_sequences` windows are scored (every window is
    scored independently, so its first token is context only). If the text is shorter than one window, the whole
    stream is scored as a single shorter window (with a warning). Log-probabilities are computed in float32.

    Works for a `...ForCausalLM` and for the VLMs of this package (native or MLA), which are called with text only
    (`input_ids` and `attention_mask`, no `pixel_values`).

    Args:
        model (`torch.nn.Module`): returns `.logits` of shape `(batch, seq_len, vocab)`.
        tokenizer: its tokenizer, or its processor.
        texts (`Sequence[str]`): documents (e.g. `hf_mla_vlm.assets.wikipedia_split("test")`).
        seq_len (`int`, *optional*, defaults to 512): window length in tokens.
        max_sequences (`int`, *optional*, defaults to 8): number of windows scored.
        batch_size (`int`, *optional*, defaults to 1): windows per forward pass (does not change the result beyond
            float rounding).
        device (`str` or `torch.device`, *optional*): move the model there first; defaults to the model's device.
        progress (`bool`, *optional*, defaults to `True`): show a progress bar.
        kv_cache (`str`, *optional*): `"int8"`, `"fp8"` or `"int4"` scores every window through a quantized latent
            cache (MLA models; `evaluation.kv_cache`); None / `"bf16"` without a cache.

    Returns:
        `dict`: `ppl` (exp of `nll`), `nll` (mean NLL in nats per scored token), `tokens` (scored tokens,
        `sequences * (seq_len - 1)`), `sequences` and `seq_len`.
    """
    if seq_len < 2 or max_sequences < 1 or batch_size < 1:
        raise ValueError(f"Need seq_len >= 2, max_sequences >= 1, batch_size >= 1; got {seq_len}, {max_sequences}, "
                         f"{batch_size}.")  # fmt: skip
    if device is not None:
        model.to(device)
    device = model_device(model)
    ids = token_stream(tokenizer, texts, max_tokens=seq_len * max_sequences)
    num_windows = min(max_sequences, len(ids) // seq_len)
    if num_windows == 0:
        if len(ids) < 2:
            raise ValueError("The texts hold fewer than 2 tokens; nothing to score.")
        logger.warning(f"The texts hold only {len(ids)} tokens, less than seq_len={seq_len}; scoring one window.")
        seq_len, num_windows = len(ids), 1
    windows = torch.tensor(ids[: num_windows * seq_len], dtype=torch.long).view(num_windows, seq_len)

    total_nll, total_tokens = 0.0, 0
    starts = range(0, num_windows, batch_size)
    for start in tqdm(starts, desc="Perplexity", disable=not progress, leave=False):
        input_ids = windows[start : start + batch_size].to(device)
        cache_kwargs = forward_cache_kwargs(model, kv_cache)
        logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **cache_kwargs).logits
        logits = logits[:, :-1].float()
        targets = input_ids[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        total_nll += nll.double().item()
        total_tokens += targets.numel()
    mean_nll = total_nll / total_tokens
    return {
        "ppl": math.exp(mean_nll),
        "nll": mean_nll,
        "tokens": total_tokens,
        "sequences": num_windows,
        "seq_len": seq_len,
    }


__all__ = ["model_device", "perplexity", "token_stream"]
