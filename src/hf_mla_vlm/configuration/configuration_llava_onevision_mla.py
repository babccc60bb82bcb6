# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""Configuration of LLaVA-OneVision converted to Multi-Head Latent Attention."""

from transformers import LlavaOnevisionConfig

from .configuration_mla_common import MLAConfigMixin


class LlavaOnevisionMLAConfig(MLAConfigMixin, LlavaOnevisionConfig):
    r"""
    [`LlavaOnevisionConfig`] plus the MLA settings of [`MLAConfigMixin`]. By default the image branch takes the image
    and video placeholder tokens.
    """

    model_type = "llava_onevision_mla"
    image_token_attributes = ("image_token_index", "video_token_index")


__all__ = ["LlavaOnevisionMLAConfig"]
