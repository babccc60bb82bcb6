# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""Qwen2.5-VL with its text attention converted to Multi-Head Latent Attention."""

from transformers import GenerationMixin, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel

from ..configuration.configuration_qwen2_5_vl_mla import Qwen2_5_VLMLAConfig
from .modeling_mla_common import (
    MLAForConditionalGenerationMixin,
    MLAModelMixin,
    MLAPreTrainedMixin,
    forward_signature_with_mask,
)


class Qwen2_5_VLMLAModel(MLAPreTrainedMixin, MLAModelMixin, Qwen2_5_VLModel):
    config_class = Qwen2_5_VLMLAConfig
    config: Qwen2_5_VLMLAConfig

    def forward(self, input_ids=None, *args, **kwargs):
        return self._mla_forward(Qwen2_5_VLModel.forward, input_ids, args, kwargs)

    forward.__signature__ = forward_signature_with_mask(Qwen2_5_VLModel.forward)


class Qwen2_5_VLMLAForConditionalGeneration(
    MLAPreTrainedMixin, MLAForConditionalGenerationMixin, Qwen2_5_VLForConditionalGeneration, GenerationMixin
):
    config_class = Qwen2_5_VLMLAConfig
    config: Qwen2_5_VLMLAConfig
    base_model_class = Qwen2_5_VLMLAModel

    def forward(self, input_ids=None, *args, image_token_mask=None, **kwargs):
        return Qwen2_5_VLForConditionalGeneration.forward(
            self, input_ids, *args, image_token_mask=image_token_mask, **kwargs
        )

    forward.__signature__ = forward_signature_with_mask(Qwen2_5_VLForConditionalGeneration.forward)


__all__ = ["Qwen2_5_VLMLAForConditionalGeneration", "Qwen2_5_VLMLAModel"]
