# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""Decode throughput and memory of a model at a given batch and context (GPU).

The cache is filled to `context` tokens with random values (half image, half text tokens for MLA caches) instead of a
prefill: decode speed and memory depend on the cache size, not its content, and a 32k-token prefill of a 7B model
would cost minutes of GPU time per point. Decode steps are timed with CUDA events after warm-up.
"""

import time
from typing import Literal

import torch
from transformers import DynamicCache, StaticCache

from ..cache_size import cache_nbytes
from ..compat import CACHE_ARG
from ..configuration.configuration_mla_common import text_head_dim
from ..modeling.quantized_cache import MLAQuantizedCache, MLAStaticQuantizedCache
from ..registry import arch_spec
from .kv_cache import latent_dtype


Mode = Literal["eager", "static-compile"]


def _is_mla(model) -> bool:
    return hasattr(model, "mla_attention_modules") and model.config.mla_stage == "mla"


def cache_layer(model, batch: int, context: int, dtype: torch.dtype, device, generator) -> tuple:
    """Random (keys, values) of one layer in the model's own cache layout."""
    text = model.config.text_config
    if _is_mla(model):
        layout = model.mla_attention_modules()[0].cache_layout
        like = {"device": device, "dtype": dtype}
        latent = torch.randn(batch, context, layout.latent_dim, generator=generator, **like)
        rope_keys = torch.randn(batch, layout.num_kv_heads, context, layout.rope_dim, generator=generator, **like)
        image = (torch.arange(context, device=device) < context // 2).expand(batch, context)  # image, then text
        return layout.pack(latent, rope_keys, image)
    head_dim = text_head_dim(text)
    shape = (batch, text.num_key_value_heads, context, head_dim)
    return torch.randn(shape, device=device, dtype=dtype, generator=generator), torch.randn(
        shape, device=device, dtype=dtype, generator=generator
    )


@torch.no_grad()
def bench_decode(
    model, batch: int, context: int, *, steps: int = 16, warmup: int = 3, mode: Mode = "eager", kv_cache: str = "bf16"
) -> dict:
    """Decode `steps` tokens per sequence after a cache of `context` tokens; returns tokens/s and memory.
    `kv_cache` "int8" / "fp8" / "int4" quantizes an MLA model's latent (`evaluation.kv_cache`)."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    text = model.config.text_config
    torch.cuda.empty_cache()
    weights_bytes = torch.cuda.memory_allocated(device)
    quantized = latent_dtype(model, kv_cache)
    if mode == "eager":
        cache = DynamicCache(config=text) if quantized is None else MLAQuantizedCache(model.config, dtype=quantized)
    elif quantized is None:
        cache = StaticCache(config=text, max_cache_len=context + warmup + steps)
    else:
        cache = MLAStaticQuantizedCache(model.config, max_cache_len=context + warmup + steps, dtype=quantized)
    generator = torch.Generator(device=device).manual_seed(0)
    for idx in range(text.num_hidden_layers):  # one layer of random rows at a time: the cache copies them
        cache.update(*cache_layer(model, batch, context, dtype, device, generator), idx)
    cache_bytes = cache_nbytes(cache)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)  # the peak of decoding, not of filling the cache
    total = context + warmup + steps
    columns = torch.arange(total, device=device)
    token = torch.full((batch, 1), 7, dtype=torch.long, device=device)

    def step(position: int):
        pos = torch.full((batch, 1), position, dtype=torch.long, device=device)
        if arch_spec(model.config.model_type).rope == "mrope":  # (3, B, 1): the t/h/w positions of a text token
            pos = pos.unsqueeze(0).expand(3, batch, 1)
        # eager: the mask covers the cache and the new token; static: fixed width, unfilled rows masked
        width = position + 1 if mode == "eager" else total
        mask = (columns[:width] <= position).long().expand(batch, width)
        return forward(input_ids=token, **{CACHE_ARG: cache}, attention_mask=mask, position_ids=pos)

    forward = model if mode == "eager" else torch.compile(model, mode="reduce-overhead", fullgraph=False)
    started = time.perf_counter()
    for i in range(warmup):
        step(context + i).logits.sum().item()
    warmup_s = time.perf_counter() - started
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(steps):
        logits = step(context + warmup + i).logits
    end.record()
    torch.cuda.synchronize(device)
    seconds = start.elapsed_time(end) / 1000
    assert torch.isfinite(logits.float()).all(), "non-finite logits"
    peak = torch.cuda.max_memory_allocated(device)
    return {
        "mode": mode,
        "kv_cache": kv_cache,
        "batch": batch,
        "context": context,
        "steps": steps,
        "tokens_per_s": batch * steps / seconds,
        "ms_per_step": 1000 * seconds / steps,
        "warmup_s": warmup_s,
        "weights_bytes": weights_bytes,
        "cache_bytes_measured": cache_bytes,
        "peak_bytes": peak,
        "peak_minus_weights_bytes": peak - weights_bytes,
    }


__all__ = ["bench_decode", "cache_layer"]
