# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
r"""Latent KV caches with a quantized latent (int8, fp8 e4m3, int4), in the style of Transformers' caches.

    cache = MLAQuantizedCache(config=model.config, dtype="int8")
    model.generate(**inputs, past_key_values=cache)                  # `cache=` from Transformers 5.24 on
    cache = MLAStaticQuantizedCache(config=model.config, max_cache_len=4096, dtype="fp8")   # CUDA graphs / compile
    model.generate(**inputs, cache_implementation="static", cache_config={"dtype": "int4"})  # built by generate

Unlike Transformers' `QuantizedCache` (which hands the full-precision prompt back to attention and dequantizes the
whole cache at every step), these layers quantize every row as it is written, prefill included, and return the stored
bytes: the attention dequantizes them for the decompressed prefill and the decode kernel reads them as they are, so
every token attends to exactly what the cache holds. The format and the row layout are `latent_cache.py`'s
(`LatentQuantization`); the rope keys and the modality flag (the values slot) stay in the compute dtype.

`dtype=None` stores the latent unquantized (the layers then behave exactly as `DynamicLayer` / `StaticLayer`).

This file is part of the remote-code bundle: it imports only torch, transformers and flat siblings.
"""

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, StaticCache, StaticLayer

from .latent_cache import LATENT_DTYPES, LatentQuantization


def _latent_quantization(dtype: str | None, group_size: int | None, latent_dim: int | None):
    if dtype is None:
        if group_size is not None:
            raise ValueError("group_size is only used with a quantized latent (dtype int8, fp8 or int4).")
        return None
    if dtype not in LATENT_DTYPES:
        raise ValueError(f"dtype must be one of {LATENT_DTYPES} or None (unquantized), got {dtype!r}.")
    return None if latent_dim is None else LatentQuantization.create(dtype, latent_dim, group_size)


class _QuantizingLayerMixin:
    """Quantizes the latent (the keys slot) of every update before it is stored."""

    def _init_quantization(self, dtype: str | None, group_size: int | None, latent_dim: int | None) -> None:
        self.latent_dtype, self.group_size = dtype, group_size
        # known up front from an MLA config, else from the first update's latent width
        self.latent_quantization = _latent_quantization(dtype, group_size, latent_dim)

    def _quantize(self, key_states: torch.Tensor) -> torch.Tensor:
        if self.latent_dtype is None:
            return key_states
        if key_states.dim() != 4 or key_states.shape[1] != 1 or not key_states.is_floating_point():
            raise ValueError(
                "a quantized latent cache stores the latent of a converted MLA model (keys of shape (B, 1, S, L) in "
                f"a float dtype); got keys {key_states.dtype} {tuple(key_states.shape)}: a native model, or an MLA "
                "model in its partial-RoPE stage, has no latent to quantize."
            )
        if self.latent_quantization is None:
            self.latent_quantization = LatentQuantization.create(
                self.latent_dtype, key_states.shape[-1], self.group_size
            )
        return self.latent_quantization.quantize(key_states)


class MLAQuantizedLayer(_QuantizingLayerMixin, DynamicLayer):
    """A `DynamicLayer` whose keys are quantized latent rows `(B, 1, T, K)` uint8 (see `LatentQuantization`).
    Cropping, beam reordering and batch selection work on the stored rows unchanged."""

    def __init__(self, dtype: str | None = "int8", group_size: int | None = None, latent_dim: int | None = None):
        super().__init__()
        self._init_quantization(dtype, group_size, latent_dim)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return super().update(self._quantize(key_states), value_states, *args, **kwargs)


class MLAStaticQuantizedLayer(_QuantizingLayerMixin, StaticLayer):
    """A `StaticLayer` (preallocated, static addresses: CUDA graphs and `torch.compile`) of quantized latent rows."""

    def __init__(
        self,
        max_cache_len: int,
        dtype: str | None = "int8",
        group_size: int | None = None,
        latent_dim: int | None = None,
    ):
        super().__init__(max_cache_len=max_cache_len)
        self._init_quantization(dtype, group_size, latent_dim)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # keys and values keep their own dtypes (uint8 rows, compute-dtype side rows); Transformers 5.17's
        # StaticLayer would allocate both in the keys' dtype
        self.device = key_states.device
        self.dtype = value_states.dtype
        self.batch_size, self.num_heads = key_states.shape[:2]
        self.k_head_dim, self.v_head_dim = key_states.shape[-1], value_states.shape[-1]
        shape = (self.batch_size, self.num_heads, self.max_cache_len)
        self.keys = torch.zeros((*shape, self.k_head_dim), dtype=key_states.dtype, device=self.device)
        self.values = torch.zeros((*shape, self.v_head_dim), dtype=value_states.dtype, device=self.device)
        self.cumulative_length = self.cumulative_length.to(self.device)
        if not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(self.keys)
            torch._dynamo.mark_static_address(self.values)
            torch._dynamo.mark_static_address(self.cumulative_length)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return super().update(self._quantize(key_states), value_states, *args, **kwargs)


def _config_sizes(config, num_layers: int | None) -> tuple[int, int | None]:
    """`(decoder layers, latent width or None)` from an MLA config (top-level or text config) or `num_layers`."""
    if config is None:
        if num_layers is None:
            raise ValueError("pass the model's config (or num_layers) to build a quantized latent cache.")
        return num_layers, None
    latent_dim = getattr(config, "mla_latent_dim", None)  # the top-level MLA config knows it
    text = config.get_text_config(decoder=True)
    return (text.num_hidden_layers if num_layers is None else num_layers), latent_dim


class _LatentQuantizationMixin:
    @property
    def latent_quantization(self) -> LatentQuantization | None:
        """The format of the cached latent (None: unquantized, or not known before the first update)."""
        return self.layers[0].latent_quantization if self.layers else None


class MLAQuantizedCache(_LatentQuantizationMixin, DynamicCache):
    """A growing latent cache with the latent quantized (see the module docstring).

    Args:
        config: the model's config (`model.config`; its text config is enough, the latent width is then taken from
            the first update).
        dtype: `"int8"` (symmetric), `"fp8"` (e4m3), `"int4"` (asymmetric, two per byte), or None (unquantized).
        group_size: latent elements per scale (default: 64 for int8 / int4, 128 for fp8, reduced to a divisor of
            the latent width).
        num_layers: decoder layers, when no config is given.
    """

    def __init__(
        self,
        config=None,
        dtype: str | None = "int8",
        group_size: int | None = None,
        num_layers: int | None = None,
    ):
        layers_count, latent_dim = _config_sizes(config, num_layers)
        layers = [MLAQuantizedLayer(dtype, group_size, latent_dim) for _ in range(layers_count)]
        Cache.__init__(self, layers=layers)  # not DynamicCache's: it would build layers from the config's types


class MLAStaticQuantizedCache(_LatentQuantizationMixin, StaticCache):
    """A preallocated latent cache of `max_cache_len` tokens with the latent quantized (`torch.compile`, CUDA
    graphs). Arguments as [`MLAQuantizedCache`], plus `max_cache_len`."""

    def __init__(
        self,
        config=None,
        max_cache_len: int | None = None,
        dtype: str | None = "int8",
        group_size: int | None = None,
        num_layers: int | None = None,
    ):
        if not isinstance(max_cache_len, int) or max_cache_len <= 0:
            raise ValueError(f"max_cache_len must be a positive int, got {max_cache_len!r}.")
        layers_count, latent_dim = _config_sizes(config, num_layers)
        layers = [MLAStaticQuantizedLayer(max_cache_len, dtype, group_size, latent_dim) for _ in range(layers_count)]
        Cache.__init__(self, layers=layers)  # not StaticCache's: it would build layers from the config's types


def quantized_cache_for_generation(generation_config, config, cache):
    """The cache `generate` should use when `cache_config` names a latent `dtype` (`cache_implementation` None,
    "dynamic" or "static"), else None. `cache` is the one `generate` built (a static one gives `max_cache_len`)."""
    cache_config = generation_config.cache_config
    implementation = generation_config.cache_implementation
    if not isinstance(cache_config, dict) or "dtype" not in cache_config:
        return None
    if implementation not in (None, "dynamic", "static"):
        raise ValueError(
            "cache_config={'dtype': ...} (a quantized latent cache) works with cache_implementation None, 'dynamic' "
            f"or 'static', got {implementation!r}."
        )
    kwargs = {k: cache_config[k] for k in ("dtype", "group_size") if k in cache_config}
    unknown = sorted(set(cache_config) - {"dtype", "group_size"})
    if unknown:
        raise ValueError(f"unknown cache_config keys for a quantized latent cache: {unknown} (use dtype, group_size).")
    if implementation == "static":
        return MLAStaticQuantizedCache(config=config, max_cache_len=cache.get_max_length(), **kwargs)
    return MLAQuantizedCache(config=config, **kwargs)


__all__ = [
    "MLAQuantizedCache",
    "MLAQuantizedLayer",
    "MLAStaticQuantizedCache",
    "MLAStaticQuantizedLayer",
    "quantized_cache_for_generation",
]
