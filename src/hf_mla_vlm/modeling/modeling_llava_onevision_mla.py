# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""LLaVA-OneVision with its text attention converted to Multi-Head Latent Attention."""

from transformers import GenerationMixin, LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel

from ..configuration.configuration_llava_onevision_mla import LlavaOnevisionMLAConfig
from .modeling_mla_common import (
    MLAForConditionalGenerationMixin,
    MLAModelMixin,
    MLAPreTrainedMixin,
    forward_signature_with_mask,
)


class LlavaOnevisionMLAModel(MLAPreTrainedMixin, MLAModelMixin, LlavaOnevisionModel):
    config_class = LlavaOnevisionMLAConfig
    config: LlavaOnevisionMLAConfig

    def forward(self, input_ids=None, *args, **kwargs):
        return self._mla_forward(LlavaOnevisionModel.forward, input_ids, args, kwargs)

    forward.__signature__ = forward_signature_with_mask(LlavaOnevisionModel.forward)


class LlavaOnevisionMLAForConditionalGeneration(
    MLAPreTrainedMixin, MLAForConditionalGenerationMixin, LlavaOnevisionForConditionalGeneration, GenerationMixin
):
    config_class = LlavaOnevisionMLAConfig
    config: LlavaOnevisionMLAConfig
    base_model_class = LlavaOnevisionMLAModel

    def forward(self, input_ids=None, *args, image_token_mask=None, **kwargs):
        return LlavaOnevisionForConditionalGeneration.forward(
            self, input_ids, *args, image_token_mask=image_token_mask, **kwargs
        )

    forward.__signature__ = forward_signature_with_mask(LlavaOnevisionForConditionalGeneration.forward)


__all__ = ["LlavaOnevisionMLAForConditionalGeneration", "LlavaOnevisionMLAModel"]
