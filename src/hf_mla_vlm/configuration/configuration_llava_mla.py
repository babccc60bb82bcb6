# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""Configuration of LLaVA-1.5 converted to Multi-Head Latent Attention."""

from transformers import LlavaConfig

from .configuration_mla_common import MLAConfigMixin


class LlavaMLAConfig(MLAConfigMixin, LlavaConfig):
    r"""
    [`LlavaConfig`] plus the MLA settings of [`MLAConfigMixin`] (`rope_dim`, `kv_rank`, `rope_pairs`,
    `image_token_ids`, `modality_split`, `mla_stage`). The text and vision sub-configs are the native ones.

    Example:

    ```python
    >>> from hf_mla_vlm import LlavaMLAConfig
    >>> config = LlavaMLAConfig(rope_dim=32, kv_rank=16)
    >>> config.mla_latent_dim  # num_key_value_heads * kv_rank
    512
    ```
    """

    model_type = "llava_mla"
    image_token_attributes = ("image_token_index",)


__all__ = ["LlavaMLAConfig"]
