# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""hf-mla-vlm: convert LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL and Qwen2.5-VL to Multi-Head Latent Attention.

Importing the package registers the converted configs and models with `AutoConfig`, `AutoModel` and
`AutoModelForImageTextToText`, so `from_pretrained` works without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from .compat import warn_if_untested
from .configuration.configuration_llava_mla import LlavaMLAConfig
from .configuration.configuration_llava_next_mla import LlavaNextMLAConfig
from .configuration.configuration_llava_onevision_mla import LlavaOnevisionMLAConfig
from .configuration.configuration_qwen2_5_vl_mla import Qwen2_5_VLMLAConfig
from .configuration.configuration_qwen2_vl_mla import Qwen2VLMLAConfig
from .kernels import is_triton_available
from .modeling.mla_attention import PEFT_TARGET_MODULES, MLAAttention, register_decode_kernel
from .modeling.modeling_llava_mla import LlavaMLAForConditionalGeneration, LlavaMLAModel
from .modeling.modeling_llava_next_mla import LlavaNextMLAForConditionalGeneration, LlavaNextMLAModel
from .modeling.modeling_llava_onevision_mla import LlavaOnevisionMLAForConditionalGeneration, LlavaOnevisionMLAModel
from .modeling.modeling_qwen2_5_vl_mla import Qwen2_5_VLMLAForConditionalGeneration, Qwen2_5_VLMLAModel
from .modeling.modeling_qwen2_vl_mla import Qwen2VLMLAForConditionalGeneration, Qwen2VLMLAModel
from .modeling.quantized_cache import MLAQuantizedCache, MLAStaticQuantizedCache
from .registry import ARCHITECTURES


__version__ = "0.1.0"

warn_if_untested()

for _spec in ARCHITECTURES.values():
    AutoConfig.register(_spec.mla_model_type, _spec.mla_config_class, exist_ok=True)
    AutoModel.register(_spec.mla_config_class, _spec.mla_base_model_class, exist_ok=True)
    AutoModelForImageTextToText.register(_spec.mla_config_class, _spec.mla_model_class, exist_ok=True)

if is_triton_available():  # absorbed decode on CUDA through the Triton kernel; the torch reference elsewhere
    from .kernels.decode_op import mla_decode_dispatch

    register_decode_kernel("cuda", mla_decode_dispatch)


def __getattr__(name):
    # The conversion API pulls in heavier modules; load it on first use.
    if name in ("convert", "ConversionResult"):
        from .conversion_scripts import convert as _convert

        return getattr(_convert, name)
    raise AttributeError(f"module 'hf_mla_vlm' has no attribute {name!r}")


__all__ = [
    "PEFT_TARGET_MODULES",
    "ConversionResult",
    "LlavaMLAConfig",
    "LlavaMLAForConditionalGeneration",
    "LlavaMLAModel",
    "LlavaNextMLAConfig",
    "LlavaNextMLAForConditionalGeneration",
    "LlavaNextMLAModel",
    "LlavaOnevisionMLAConfig",
    "LlavaOnevisionMLAForConditionalGeneration",
    "LlavaOnevisionMLAModel",
    "MLAAttention",
    "MLAQuantizedCache",
    "MLAStaticQuantizedCache",
    "Qwen2VLMLAConfig",
    "Qwen2VLMLAForConditionalGeneration",
    "Qwen2VLMLAModel",
    "Qwen2_5_VLMLAConfig",
    "Qwen2_5_VLMLAForConditionalGeneration",
    "Qwen2_5_VLMLAModel",
    "convert",
]
