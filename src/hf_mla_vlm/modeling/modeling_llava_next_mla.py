# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""LLaVA-NeXT with its text attention converted to Multi-Head Latent Attention."""

from transformers import GenerationMixin, LlavaNextForConditionalGeneration

from ..configuration.configuration_llava_next_mla import LlavaNextMLAConfig
from .modeling_mla_common import MLAModelMixin, forward_signature_with_mask


class LlavaNextMLAForConditionalGeneration(MLAModelMixin, LlavaNextForConditionalGeneration, GenerationMixin):
    config_class = LlavaNextMLAConfig
    config: LlavaNextMLAConfig

    def __init__(self, config: LlavaNextMLAConfig):
        super().__init__(config)
        self._swap_text_attention()
        self.post_init()

    def forward(self, input_ids=None, *args, **kwargs):
        return self._mla_forward(LlavaNextForConditionalGeneration.forward, input_ids, args, kwargs)

    forward.__signature__ = forward_signature_with_mask(LlavaNextForConditionalGeneration.forward)


__all__ = ["LlavaNextMLAForConditionalGeneration"]
