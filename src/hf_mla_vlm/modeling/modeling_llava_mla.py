# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""LLaVA-1.5 with its text attention converted to Multi-Head Latent Attention."""

from transformers import GenerationMixin, LlavaForConditionalGeneration, LlavaModel

from ..configuration.configuration_llava_mla import LlavaMLAConfig
from .modeling_mla_common import (
    MLAForConditionalGenerationMixin,
    MLAModelMixin,
    MLAPreTrainedMixin,
    forward_signature_with_mask,
)


class LlavaMLAModel(MLAPreTrainedMixin, MLAModelMixin, LlavaModel):
    config_class = LlavaMLAConfig
    config: LlavaMLAConfig

    def forward(self, input_ids=None, *args, **kwargs):
        return self._mla_forward(LlavaModel.forward, input_ids, args, kwargs)

    forward.__signature__ = forward_signature_with_mask(LlavaModel.forward)


class LlavaMLAForConditionalGeneration(
    MLAPreTrainedMixin, MLAForConditionalGenerationMixin, LlavaForConditionalGeneration, GenerationMixin
):
    config_class = LlavaMLAConfig
    config: LlavaMLAConfig
    base_model_class = LlavaMLAModel

    def forward(self, input_ids=None, *args, image_token_mask=None, **kwargs):
        return LlavaForConditionalGeneration.forward(
            self, input_ids, *args, image_token_mask=image_token_mask, **kwargs
        )

    forward.__signature__ = forward_signature_with_mask(LlavaForConditionalGeneration.forward)


__all__ = ["LlavaMLAForConditionalGeneration", "LlavaMLAModel"]
