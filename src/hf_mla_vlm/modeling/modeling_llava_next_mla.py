# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""LLaVA-NeXT with its text attention converted to Multi-Head Latent Attention."""

from transformers import GenerationMixin, LlavaNextForConditionalGeneration, LlavaNextModel

from ..configuration.configuration_llava_next_mla import LlavaNextMLAConfig
from .modeling_mla_common import (
    MLAForConditionalGenerationMixin,
    MLAModelMixin,
    MLAPreTrainedMixin,
    forward_signature_with_mask,
)


class LlavaNextMLAModel(MLAPreTrainedMixin, MLAModelMixin, LlavaNextModel):
    config_class = LlavaNextMLAConfig
    config: LlavaNextMLAConfig

    def forward(self, input_ids=None, *args, **kwargs):
        return self._mla_forward(LlavaNextModel.forward, input_ids, args, kwargs)

    forward.__signature__ = forward_signature_with_mask(LlavaNextModel.forward)


class LlavaNextMLAForConditionalGeneration(
    MLAPreTrainedMixin, MLAForConditionalGenerationMixin, LlavaNextForConditionalGeneration, GenerationMixin
):
    config_class = LlavaNextMLAConfig
    config: LlavaNextMLAConfig
    base_model_class = LlavaNextMLAModel

    def forward(self, input_ids=None, *args, image_token_mask=None, **kwargs):
        return LlavaNextForConditionalGeneration.forward(
            self, input_ids, *args, image_token_mask=image_token_mask, **kwargs
        )

    forward.__signature__ = forward_signature_with_mask(LlavaNextForConditionalGeneration.forward)


__all__ = ["LlavaNextMLAForConditionalGeneration", "LlavaNextMLAModel"]
