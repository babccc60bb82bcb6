# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""Qwen2-VL with its text attention converted to Multi-Head Latent Attention."""

from transformers import GenerationMixin, Qwen2VLForConditionalGeneration, Qwen2VLModel

from ..configuration.configuration_qwen2_vl_mla import Qwen2VLMLAConfig
from .modeling_mla_common import (
    MLAForConditionalGenerationMixin,
    MLAModelMixin,
    MLAPreTrainedMixin,
    forward_signature_with_mask,
)


class Qwen2VLMLAModel(MLAPreTrainedMixin, MLAModelMixin, Qwen2VLModel):
    config_class = Qwen2VLMLAConfig
    config: Qwen2VLMLAConfig

    def forward(self, input_ids=None, *args, **kwargs):
        return self._mla_forward(Qwen2VLModel.forward, input_ids, args, kwargs)

    forward.__signature__ = forward_signature_with_mask(Qwen2VLModel.forward)


class Qwen2VLMLAForConditionalGeneration(
    MLAPreTrainedMixin, MLAForConditionalGenerationMixin, Qwen2VLForConditionalGeneration, GenerationMixin
):
    config_class = Qwen2VLMLAConfig
    config: Qwen2VLMLAConfig
    base_model_class = Qwen2VLMLAModel

    def forward(self, input_ids=None, *args, image_token_mask=None, **kwargs):
        return Qwen2VLForConditionalGeneration.forward(
            self, input_ids, *args, image_token_mask=image_token_mask, **kwargs
        )

    forward.__signature__ = forward_signature_with_mask(Qwen2VLForConditionalGeneration.forward)


__all__ = ["Qwen2VLMLAForConditionalGeneration", "Qwen2VLMLAModel"]
