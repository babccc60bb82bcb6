# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""Every per-architecture fact of the package, in one table.

A converted architecture is one `ArchSpec` here plus one config file (`configuration/configuration_<name>_mla.py`),
one model file (`modeling/modeling_<name>_mla.py`) and one tiny builder (`tiny_models.TINY_BUILDERS`). Everything
else (conversion, the CLI's choices, the training rules, the Hub checks, the benchmarks) reads this table.

What the table does not hold, because the models carry it themselves:

* the attention biases: a converted layer takes the q/k/v and o biases of the native attention it replaces
  (`modeling_mla_common.with_mla_attention`), so no bias table exists, in the package or in remote code;
* the image-branch token ids: each MLA config class names the config attributes they come from
  (`image_token_attributes`), and a conversion stores the ids in the config.

This module imports no torch and no transformers: the CLI reads the names for its `--help`. Classes are resolved
on first use.
"""

import importlib
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ArchSpec:
    """One native vision-language architecture and its MLA counterpart.

    Attributes:
        name: `model_type` of the native checkpoint (`llava`); the MLA one is `<name>_mla`.
        class_prefix: class-name prefix: native `<prefix>ForConditionalGeneration` / `<prefix>Model` in
            `transformers`, MLA `<prefix>MLAConfig`, `<prefix>MLAModel`, `<prefix>MLAForConditionalGeneration`.
        rope: `"1d"` (Llama-style RoPE) or `"mrope"` (Qwen's M-RoPE: a kept pair keeps its t/h/w axis).
        aligner: regex (`re.search`) of the vision-to-text aligner's parameters (the `official` trainable set).
        zoo: whether `hf_mla_vlm.zoo` has a trained model of this architecture (`hf-mla-vlm zoo build NAME`).
        text_layers: attribute path of the text decoder layers (in-memory names, Transformers v5).
        vision_attention: `module:Class` of the vision tower's attention when, without flash attention, it calls
            the attention once per image and window (Qwen's towers); training batches it into one call per block
            (`hf_mla_vlm.zoo.batched_attention`). None: the tower has no such module.
        host_inputs: processor outputs that the model only reads on the host (`.tolist()` per image: LLaVA-NeXT's
            `image_sizes`). The training collator passes them as lists, which stay on the host; as a device tensor
            each read synchronises the host with the device.
    """

    name: str
    class_prefix: str
    rope: Literal["1d", "mrope"]
    aligner: str
    zoo: bool = False
    text_layers: str = "model.language_model.layers"
    vision_attention: str | None = None
    host_inputs: tuple[str, ...] = ()

    @property
    def mla_model_type(self) -> str:
        return f"{self.name}_mla"

    @property
    def source_model_type(self) -> str:
        return self.name

    @property
    def source_class(self) -> str:
        """Name of the native `...ForConditionalGeneration` class in `transformers`."""
        return f"{self.class_prefix}ForConditionalGeneration"

    @property
    def native_class(self) -> type:
        return getattr(importlib.import_module("transformers"), self.source_class)

    @property
    def mla_config_class(self) -> type:
        module = importlib.import_module(f"hf_mla_vlm.configuration.configuration_{self.name}_mla")
        return getattr(module, f"{self.class_prefix}MLAConfig")

    @property
    def mla_model_class(self) -> type:
        """The MLA `...ForConditionalGeneration` class."""
        return getattr(self._modeling_module(), f"{self.class_prefix}MLAForConditionalGeneration")

    @property
    def mla_base_model_class(self) -> type:
        return getattr(self._modeling_module(), f"{self.class_prefix}MLAModel")

    @property
    def vision_attention_class(self) -> type | None:
        """The class named by `vision_attention` (None without one)."""
        if self.vision_attention is None:
            return None
        module, name = self.vision_attention.split(":")
        return getattr(importlib.import_module(module), name)

    def _modeling_module(self):
        return importlib.import_module(f"hf_mla_vlm.modeling.modeling_{self.name}_mla")


_PROJECTOR = r"^model\.multi_modal_projector\."
ARCHITECTURES: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        ArchSpec("llava", "Llava", "1d", _PROJECTOR, zoo=True),
        ArchSpec(
            "llava_next",
            "LlavaNext",
            "1d",
            rf"{_PROJECTOR}|^model\.image_newline$",
            zoo=True,
            host_inputs=("image_sizes",),
        ),
        ArchSpec(
            "llava_onevision",
            "LlavaOnevision",
            "1d",
            rf"{_PROJECTOR}|^model\.image_newline$",
            host_inputs=("image_sizes",),
        ),
        ArchSpec(
            "qwen2_vl",
            "Qwen2VL",
            "mrope",
            r"^model\.visual\.merger\.",
            vision_attention="transformers.models.qwen2_vl.modeling_qwen2_vl:VisionAttention",
        ),
        ArchSpec(
            "qwen2_5_vl",
            "Qwen2_5_VL",
            "mrope",
            r"^model\.visual\.merger\.",
            zoo=True,
            vision_attention="transformers.models.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VLVisionAttention",
        ),
    )
}
MLA_MODEL_TYPES: dict[str, ArchSpec] = {spec.mla_model_type: spec for spec in ARCHITECTURES.values()}
ARCH_NAMES: tuple[str, ...] = tuple(ARCHITECTURES)
ZOO_NAMES: tuple[str, ...] = tuple(spec.name for spec in ARCHITECTURES.values() if spec.zoo)


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


__all__ = ["ARCHITECTURES", "ARCH_NAMES", "MLA_MODEL_TYPES", "ZOO_NAMES", "ArchSpec", "arch_spec"]
