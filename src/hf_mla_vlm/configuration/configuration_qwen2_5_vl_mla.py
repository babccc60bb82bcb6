# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""Configuration of Qwen2.5-VL converted to Multi-Head Latent Attention."""

from transformers import Qwen2_5_VLConfig

from .configuration_mla_common import MLAConfigMixin


class Qwen2_5_VLMLAConfig(MLAConfigMixin, Qwen2_5_VLConfig):
    r"""
    [`Qwen2_5_VLConfig`] plus the MLA settings of [`MLAConfigMixin`]. Kept rotary pairs keep their own M-RoPE axis
    (temporal / height / width, from `text_config.rope_parameters["mrope_section"]`). By default the image branch
    takes the image pad, vision start/end and video pad tokens (the official code sends video tokens through the
    text branch; we do not).
    """

    model_type = "qwen2_5_vl_mla"
    image_token_attributes = ("image_token_id", "vision_start_token_id", "vision_end_token_id", "video_token_id")


__all__ = ["Qwen2_5_VLMLAConfig"]
