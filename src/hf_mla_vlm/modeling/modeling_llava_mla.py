# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""LLaVA-1.5 with its text attention converted to Multi-Head Latent Attention."""

from transformers import GenerationMixin, LlavaForConditionalGeneration

from ..configuration.configuration_llava_mla import LlavaMLAConfig
from .modeling_mla_common import MLAModelMixin, forward_signature_with_mask


class LlavaMLAForConditionalGeneration(MLAModelMixin, LlavaForConditionalGeneration, GenerationMixin):
    config_class = LlavaMLAConfig
    config: LlavaMLAConfig

    def __init__(self, config: LlavaMLAConfig):
        super().__init__(config)
        self._swap_text_attention()
        self.post_init()

    def forward(self, input_ids=None, *args, **kwargs):
        return self._mla_forward(LlavaForConditionalGeneration.forward, input_ids, args, kwargs)

    forward.__signature__ = forward_signature_with_mask(LlavaForConditionalGeneration.forward)


__all__ = ["LlavaMLAForConditionalGeneration"]
