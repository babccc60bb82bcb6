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

    def default_image_token_ids(self) -> list[int]:
        return [int(i) for i in (self.image_token_index, self.video_token_index) if i is not None]


__all__ = ["LlavaOnevisionMLAConfig"]
