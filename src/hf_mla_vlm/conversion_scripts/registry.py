# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""Per-architecture facts, in one table: which native class to load, which MLA classes to build."""

from dataclasses import dataclass

from ..configuration.configuration_llava_mla import LlavaMLAConfig
from ..configuration.configuration_llava_next_mla import LlavaNextMLAConfig
from ..configuration.configuration_llava_onevision_mla import LlavaOnevisionMLAConfig
from ..configuration.configuration_qwen2_5_vl_mla import Qwen2_5_VLMLAConfig
from ..configuration.configuration_qwen2_vl_mla import Qwen2VLMLAConfig
from ..modeling.modeling_llava_mla import LlavaMLAForConditionalGeneration
from ..modeling.modeling_llava_next_mla import LlavaNextMLAForConditionalGeneration
from ..modeling.modeling_llava_onevision_mla import LlavaOnevisionMLAForConditionalGeneration
from ..modeling.modeling_qwen2_5_vl_mla import Qwen2_5_VLMLAForConditionalGeneration
from ..modeling.modeling_qwen2_vl_mla import Qwen2VLMLAForConditionalGeneration


@dataclass(frozen=True)
class ArchSpec:
    """How one native architecture maps to its MLA counterpart.

    Attributes:
        source_model_type: `model_type` of the native checkpoint.
        source_class: name of the native `...ForConditionalGeneration` class in `transformers`.
        mla_config_class / mla_model_class: the converted classes.
        text_layers: attribute path of the text decoder layers (in-memory names, Transformers v5).
        rope: `"1d"` (Llama/Mistral RoPE) or `"mrope"` (Qwen2.5-VL M-RoPE; kept pairs keep their t/h/w axis).
    """

    source_model_type: str
    source_class: str
    mla_config_class: type
    mla_model_class: type
    text_layers: str = "model.language_model.layers"
    rope: str = "1d"


ARCHITECTURES: dict[str, ArchSpec] = {
    "llava": ArchSpec("llava", "LlavaForConditionalGeneration", LlavaMLAConfig, LlavaMLAForConditionalGeneration),
    "llava_next": ArchSpec(
        "llava_next", "LlavaNextForConditionalGeneration", LlavaNextMLAConfig, LlavaNextMLAForConditionalGeneration
    ),
    "qwen2_5_vl": ArchSpec(
        "qwen2_5_vl",
        "Qwen2_5_VLForConditionalGeneration",
        Qwen2_5_VLMLAConfig,
        Qwen2_5_VLMLAForConditionalGeneration,
        rope="mrope",
    ),
    "qwen2_vl": ArchSpec(
        "qwen2_vl",
        "Qwen2VLForConditionalGeneration",
        Qwen2VLMLAConfig,
        Qwen2VLMLAForConditionalGeneration,
        rope="mrope",
    ),
    "llava_onevision": ArchSpec(
        "llava_onevision",
        "LlavaOnevisionForConditionalGeneration",
        LlavaOnevisionMLAConfig,
        LlavaOnevisionMLAForConditionalGeneration,
    ),
}
MLA_MODEL_TYPES = {spec.mla_config_class.model_type: spec for spec in ARCHITECTURES.values()}


def arch_spec(model_type: str) -> ArchSpec:
    """The registry entry of a native (or already converted) `model_type`, with a clear error otherwise."""
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    if model_type in MLA_MODEL_TYPES:
        return MLA_MODEL_TYPES[model_type]
    raise ValueError(
        f"Unsupported model_type {model_type!r}. hf-mla-vlm converts {sorted(ARCHITECTURES)} checkpoints "
        f"(converted ones are {sorted(MLA_MODEL_TYPES)})."
    )


__all__ = ["ARCHITECTURES", "MLA_MODEL_TYPES", "ArchSpec", "arch_spec"]
