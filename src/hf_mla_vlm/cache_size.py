# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""KV-cache size: analytic per config (design.md section 8) and measured from the tensors a cache holds."""

from dataclasses import asdict, dataclass

import torch

from .configuration.configuration_mla_common import text_head_dim
from .modeling.latent_cache import side_row_width


@dataclass(frozen=True)
class KVCacheSize:
    """Cached elements per token per layer, before and after conversion.

    `converted` counts what our cache really holds: the latent (`num_kv_heads * kv_rank`) and the side row
    (`num_kv_heads * rope_dim` rope keys and one modality flag, padded to whole 16-byte units: `side_row_width`);
    the `partial_rope` stage caches full keys and values. `mha_equivalent` is the denominator of the paper's
    percentages (`2 * num_q_heads * head_dim`), which compares a GQA model against an MHA cache.
    """

    original: int
    converted: int
    mha_equivalent: int
    num_layers: int
    bytes_per_element: int

    @property
    def reduction_vs_original(self) -> float:
        return 1.0 - self.converted / self.original

    @property
    def reduction_vs_mha_equivalent(self) -> float:
        return 1.0 - self.converted / self.mha_equivalent

    def bytes_per_token(self, which: str) -> int:
        """Bytes per token over all layers for `which` in {"original", "converted", "mha_equivalent"}."""
        return getattr(self, which) * self.num_layers * self.bytes_per_element

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "original_bytes_per_token": self.bytes_per_token("original"),
            "converted_bytes_per_token": self.bytes_per_token("converted"),
            "mha_equivalent_bytes_per_token": self.bytes_per_token("mha_equivalent"),
            "reduction_vs_original_gqa_cache": round(self.reduction_vs_original, 6),
            "reduction_vs_mha_equivalent_paper_convention": round(self.reduction_vs_mha_equivalent, 6),
        }


def kv_cache_size(config, dtype: torch.dtype = torch.bfloat16) -> KVCacheSize:
    """Analytic cache size of an MLA config (`LlavaMLAConfig`, ...) against its source architecture."""
    text = config.text_config
    head_dim, n_q, n_kv = text_head_dim(text), text.num_attention_heads, text.num_key_value_heads
    if config.mla_stage == "mla":
        converted = n_kv * config.kv_rank + side_row_width(n_kv, config.rope_dim)
    else:
        converted = 2 * n_kv * head_dim
    return KVCacheSize(
        original=2 * n_kv * head_dim,
        converted=converted,
        mha_equivalent=2 * n_q * head_dim,
        num_layers=text.num_hidden_layers,
        bytes_per_element=torch.empty((), dtype=dtype).element_size(),
    )


def cache_nbytes(cache) -> int:
    """Bytes actually held by a Transformers `Cache` (every tensor of every layer)."""
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


__all__ = ["KVCacheSize", "cache_nbytes", "kv_cache_size"]
