# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""Qwen2.5-VL with its text attention converted to Multi-Head Latent Attention."""

from transformers import GenerationMixin, Qwen2_5_VLForConditionalGeneration

from ..configuration.configuration_qwen2_5_vl_mla import Qwen2_5_VLMLAConfig
from .modeling_mla_common import MLAModelMixin, forward_signature_with_mask


class Qwen2_5_VLMLAForConditionalGeneration(MLAModelMixin, Qwen2_5_VLForConditionalGeneration, GenerationMixin):
    config_class = Qwen2_5_VLMLAConfig
    config: Qwen2_5_VLMLAConfig

    def __init__(self, config: Qwen2_5_VLMLAConfig):
        super().__init__(config)
        self._swap_text_attention()
        self.post_init()

    def forward(self, input_ids=None, *args, **kwargs):
        return self._mla_forward(Qwen2_5_VLForConditionalGeneration.forward, input_ids, args, kwargs)

    forward.__signature__ = forward_signature_with_mask(Qwen2_5_VLForConditionalGeneration.forward)


__all__ = ["Qwen2_5_VLMLAForConditionalGeneration"]
