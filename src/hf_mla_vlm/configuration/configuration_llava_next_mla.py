# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""Configuration of LLaVA-NeXT converted to Multi-Head Latent Attention."""

from transformers import LlavaNextConfig

from .configuration_mla_common import MLAConfigMixin


class LlavaNextMLAConfig(MLAConfigMixin, LlavaNextConfig):
    r"""
    [`LlavaNextConfig`] plus the MLA settings of [`MLAConfigMixin`]. Every AnyRes feature (base image, tiles and
    `image_newline`) sits on an `<image>` placeholder, so `image_token_index` alone marks the image modality.
    """

    model_type = "llava_next_mla"
    image_token_attributes = ("image_token_index",)


__all__ = ["LlavaNextMLAConfig"]
