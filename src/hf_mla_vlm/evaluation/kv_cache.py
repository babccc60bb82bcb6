# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""The `--kv-cache` choice of `evaluate` and `bench`: the latent of an MLA model's cache in the compute dtype
(`"bf16"`) or quantized (`"int8"`, `"fp8"`, `"int4"`, see `modeling/quantized_cache.py`).

A quantized latent is quantized at prefill too: forward passes that score a whole sequence at once (perplexity,
fidelity) run with a fresh quantized cache, so every position attends to the dequantized rows the cache holds, as it
does in generation.
"""

from ..compat import CACHE_ARG
from ..modeling.quantized_cache import MLAQuantizedCache


KV_CACHE_DTYPES = ("bf16", "int8", "fp8", "int4")  # "bf16": the latent unquantized, in the model's compute dtype


def latent_dtype(model, kv_cache: str | None) -> str | None:
    """The quantized latent dtype for `kv_cache` (None for "bf16" / None); a quantized one needs an MLA model."""
    if kv_cache is None or kv_cache == "bf16":
        return None
    if kv_cache not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache must be one of {KV_CACHE_DTYPES}, got {kv_cache!r}.")
    if not hasattr(model, "mla_attention_modules") or getattr(model.config, "mla_stage", None) != "mla":
        raise ValueError(
            f"kv_cache={kv_cache!r} quantizes the latent of an MLA model's cache; {type(model).__name__} has no "
            "latent cache (a native model, or a stage-1 partial-RoPE model)."
        )
    return kv_cache


def forward_cache_kwargs(model, kv_cache: str | None) -> dict:
    """Keyword arguments of a scoring forward pass: no cache, or a fresh quantized one (quantized prefill)."""
    dtype = latent_dtype(model, kv_cache)
    if dtype is None:
        return {"use_cache": False}
    return {CACHE_ARG: MLAQuantizedCache(config=model.config, dtype=dtype), "use_cache": True}


def generate_cache_kwargs(model, kv_cache: str | None) -> dict:
    """Keyword arguments of one `generate` call: nothing, or a fresh quantized cache."""
    dtype = latent_dtype(model, kv_cache)
    return {} if dtype is None else {CACHE_ARG: MLAQuantizedCache(config=model.config, dtype=dtype)}


__all__ = ["KV_CACHE_DTYPES", "forward_cache_kwargs", "generate_cache_kwargs", "latent_dtype"]
