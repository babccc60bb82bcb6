# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""Behaviour shared by the converted vision-language models: attention swap, modality mask, Hub-ready saving.

Part of the remote-code bundle: imports only torch, transformers and flat siblings.
"""

import inspect
import json
import os
import re
import sys
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import PreTrainedModel

from .mla_attention import MLAAttention
from .quantized_cache import quantized_cache_for_generation


# Files of the remote-code bundle that every architecture ships, beside its own configuration/modeling files.
COMMON_REMOTE_FILES = {
    "configuration_mla_common.py": "configuration",
    "latent_cache.py": "modeling",
    "mla_attention.py": "modeling",
    "modeling_mla_common.py": "modeling",
    "partial_rope.py": "modeling",
    "quantized_cache.py": "modeling",
    "reference.py": "kernels",
}
AUTO_CLASSES = {"AutoModel": "Model", "AutoModelForImageTextToText": "ForConditionalGeneration"}
_RELATIVE_IMPORT = re.compile(r"^from \.+(?:\w+\.)*(\w+) import", flags=re.MULTILINE)


def forward_signature_with_mask(parent_forward) -> inspect.Signature:
    """The parent's `forward` signature plus a keyword-only `image_token_mask` (generate() inspects signatures)."""
    signature = inspect.signature(parent_forward)
    params = [p for p in signature.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    params.append(inspect.Parameter("image_token_mask", inspect.Parameter.KEYWORD_ONLY, default=None))
    params += [p for p in signature.parameters.values() if p.kind == inspect.Parameter.VAR_KEYWORD]
    return signature.replace(parameters=params)


class NativeInitMixin:
    """Our classes initialise weights with the native `_init_weights` (the only new modules are `nn.Linear`), so
    they tell Transformers they are not custom code: its guard for remote code that initialises weights in place
    would otherwise skip the native rules of composite modules (e.g. CLIP's MLP init) in `from_pretrained`."""

    @classmethod
    def is_custom_code(cls) -> bool:
        return False


class MLATextModelMixin(NativeInitMixin):
    """Mixed in front of the native text model class (`LlamaModel`, `Qwen2_5_VLTextModel`, ...) by
    `mla_text_model_class`: its decoder layers hold [`MLAAttention`], which it records for `output_attentions`, and
    its tensor-parallel plan leaves the attention replicated.

    Tensor parallelism of the latent: the latent of a token is shared by every query head of the layer, so sharding
    heads would need the whole latent on every rank anyway (as vLLM does for DeepSeek). Like Transformers' own
    DeepSeek-V3 plan, the attention weights stay replicated and only the MLP is sharded.
    """

    def init_parallel_plans(self) -> None:
        super().init_parallel_plans()
        self._tp_plan = {key: style for key, style in self._tp_plan.items() if ".self_attn." not in key}


_MLA_TEXT_MODEL_CLASSES: dict[type, type] = {}


def mla_text_model_class(native_class: type) -> type:
    """`native_class` with [`MLATextModelMixin`] in front and `MLAAttention` as its recorded attention class
    (Transformers records `output_attentions` by module class, `_can_record_outputs`). Built once per class."""
    if native_class not in _MLA_TEXT_MODEL_CLASSES:
        recorded = {**(native_class._can_record_outputs or {}), "attentions": MLAAttention}
        name = f"{native_class.__name__}{_MLA_SUFFIX}"
        _MLA_TEXT_MODEL_CLASSES[native_class] = type(
            name, (MLATextModelMixin, native_class), {"_can_record_outputs": recorded, "__module__": __name__}
        )
        globals()[name] = _MLA_TEXT_MODEL_CLASSES[native_class]  # pickle finds a class by module and name
    return _MLA_TEXT_MODEL_CLASSES[native_class]


_MLA_SUFFIX = "WithMLA"


def __getattr__(name: str):
    """`<NativeTextModel>WithMLA` built on first access: unpickling a converted model in a process that has not
    built one yet looks its text model class up here by name."""
    native = name.removesuffix(_MLA_SUFFIX)
    if name.endswith(_MLA_SUFFIX) and isinstance(getattr(transformers, native, None), type):
        return mla_text_model_class(getattr(transformers, native))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def with_mla_attention(text_model, config):
    """The decoder `text_model` rebuilt as its `mla_text_model_class`, with every attention an [`MLAAttention`] of
    `config` (the top-level MLA config) that has the biases of the native attention it replaces (Qwen2-style
    models have q/k/v biases, Llama-style ones follow `attention_bias`; nothing needs a table). The new instance is
    built on the meta device and takes over the native sub-modules, so nothing is allocated twice."""
    with torch.device("meta"):
        mla_text_model = mla_text_model_class(type(text_model))(text_model.config)
    for name, child in text_model.named_children():
        setattr(mla_text_model, name, child)
    for layer_idx, layer in enumerate(mla_text_model.layers):
        native = layer.self_attn
        qkv_bias, o_bias = native.q_proj.bias is not None, native.o_proj.bias is not None
        layer.self_attn = MLAAttention(config, layer_idx, qkv_bias=qkv_bias, o_bias=o_bias)
    return mla_text_model


class MLAModelMixin:
    """Mixed in front of a native VLM base model (`LlavaModel`, `LlavaNextModel`, `Qwen2_5_VLModel`).

    * the text decoder's attentions are [`MLAAttention`] (the vision side is untouched), put in place by `post_init`
      at the end of the native `__init__`, before any weight is initialised;
    * `forward` computes the image-token mask from `input_ids` (or from `inputs_embeds`, or takes `image_token_mask`)
      and threads it down to the attention layers through `**kwargs`.
    """

    def post_init(self):
        if not isinstance(self.language_model, MLATextModelMixin):
            self.language_model = with_mla_attention(self.language_model, self.config)
        super().post_init()

    def mla_attention_modules(self) -> list[MLAAttention]:
        return [layer.self_attn for layer in self.language_model.layers]

    def image_token_mask(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None = None,
        image_token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Boolean `(batch, seq_len)` mask of the tokens routed through the image branch.

        From `image_token_mask` when it covers the current tokens, else from `input_ids`, else (like the native
        placeholder mask) by comparing `inputs_embeds` with the embeddings of the image token ids. Embeddings that
        already hold image features are not recognised: pass `image_token_mask` with them. A mask passed to
        `generate` covers the prompt only: the decode steps, which get `input_ids`, compute theirs from the ids."""
        if image_token_mask is not None and (input_ids is None or image_token_mask.shape == input_ids.shape):
            if inputs_embeds is not None and image_token_mask.shape != inputs_embeds.shape[:2]:
                raise ValueError(
                    f"image_token_mask must have shape (batch, seq_len) = {tuple(inputs_embeds.shape[:2])}, "
                    f"got {tuple(image_token_mask.shape)}."
                )
            return image_token_mask.bool()
        if input_ids is not None:
            # Comparisons with Python ints: no id tensor is built and copied to the device at every decode step.
            mask = torch.zeros_like(input_ids, dtype=torch.bool)
            for token_id in self.config.image_token_ids:
                mask |= input_ids == token_id
            return mask
        if inputs_embeds is None or self.config.mla_stage != "mla" or not self.config.modality_split:
            return None
        embeddings = self.get_input_embeddings()
        ids = [i for i in self.config.image_token_ids if i < embeddings.num_embeddings]
        image_embeds = embeddings(torch.tensor(ids, dtype=torch.long, device=inputs_embeds.device))  # (I, d)
        return (inputs_embeds.unsqueeze(-2) == image_embeds).all(-1).any(-1)

    def _mla_forward(self, parent_forward, input_ids, args, kwargs):
        mask = self.image_token_mask(input_ids, kwargs.get("inputs_embeds"), kwargs.pop("image_token_mask", None))
        if mask is not None:
            kwargs["image_token_mask"] = mask
        return parent_forward(self, input_ids, *args, **kwargs)


class MLAForConditionalGenerationMixin:
    """Mixed in front of a native `...ForConditionalGeneration` class: the same model with its base model an
    MLA one (`base_model_class`). Every native class we convert builds exactly `model` + `lm_head` (checked on
    Transformers 5.17 and 5.24), so `__init__` builds those itself instead of the native base model."""

    base_model_class: type

    def __init__(self, config):
        PreTrainedModel.__init__(self, config)  # not the native `__init__`, which would build the native base model
        self.model = self.base_model_class(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def mla_attention_modules(self) -> list[MLAAttention]:
        return self.model.mla_attention_modules()

    def image_token_mask(self, *args, **kwargs) -> torch.Tensor | None:
        return self.model.image_token_mask(*args, **kwargs)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """`generate(..., cache_config={"dtype": "int8"})` (with `cache_implementation` None, "dynamic" or
        "static") builds a quantized latent cache (`quantized_cache.py`) instead of the plain one."""
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        for name in ("cache", "past_key_values"):  # the argument's name from Transformers 5.24 on, and before
            built = model_kwargs.get(name)
            if built is not None and not getattr(built, "_is_user_defined", False):
                replacement = quantized_cache_for_generation(generation_config, self.config, built)
                if replacement is not None:
                    model_kwargs[name] = replacement


class MLAPreTrainedMixin(NativeInitMixin):
    """Saves a Hub-compatible folder: in-memory weight names, `auto_map`, and the remote-code files copied flat."""

    def save_pretrained(self, save_directory: str | os.PathLike, *args, save_original_format: bool = False, **kwargs):
        """`PreTrainedModel.save_pretrained` writing in-memory weight names, then the flat remote-code bundle and
        `auto_map`, so the folder loads with `trust_remote_code=True` where `hf_mla_vlm` is not installed."""
        self.config.auto_map = mla_auto_map(type(self.config), type(self))
        super().save_pretrained(save_directory, *args, save_original_format=save_original_format, **kwargs)
        write_remote_code(self, save_directory)


def mla_auto_map(config_class: type, model_class: type) -> dict[str, str]:
    """`auto_map` of a converted checkpoint: the base model for `AutoModel`, the LM-head model for
    `AutoModelForImageTextToText` (both in the model's modeling file, named `<Arch>MLAModel` and
    `<Arch>MLAForConditionalGeneration`)."""
    config_module = config_class.__module__.rsplit(".", 1)[-1]
    model_module = model_class.__module__.rsplit(".", 1)[-1]
    stem = model_class.__name__.removesuffix("ForConditionalGeneration").removesuffix("Model")
    return {
        "AutoConfig": f"{config_module}.{config_class.__name__}",
        **{auto: f"{model_module}.{stem}{suffix}" for auto, suffix in AUTO_CLASSES.items()},
    }


def _module_dir(obj) -> Path:
    return Path(sys.modules[type(obj).__module__].__file__).resolve().parent


def remote_code_files(model) -> dict[str, Path]:
    """Remote-code file name -> source path, for a model loaded from the package or from remote code."""
    config_module = type(model.config).__module__.rsplit(".", 1)[-1]
    model_module = type(model).__module__.rsplit(".", 1)[-1]
    config_dir, model_dir = _module_dir(model.config), _module_dir(model)
    files = {
        f"{config_module}.py": config_dir / f"{config_module}.py",
        f"{model_module}.py": model_dir / f"{model_module}.py",
    }
    # In the package the files live in `configuration/`, `modeling/` and `kernels/`; in a remote-code folder they
    # are all siblings of the modeling file.
    in_package = model_dir.name == "modeling" and (model_dir.parent / "kernels").is_dir()
    for name, subdir in COMMON_REMOTE_FILES.items():
        files[name] = (model_dir.parent / subdir if in_package else model_dir) / name
    return files


def write_remote_code(model, save_directory: str | os.PathLike) -> None:
    """Copy the remote-code files flat into `save_directory` (relative imports become `from .module import`)."""
    save_directory = Path(save_directory)
    for name, source in remote_code_files(model).items():
        text = _RELATIVE_IMPORT.sub(r"from .\1 import", source.read_text())
        (save_directory / name).write_text(text)
    config_path = save_directory / "config.json"
    config = json.loads(config_path.read_text())
    missing = [
        name
        for name in config.get("auto_map", {}).values()
        if not (save_directory / f"{name.split('.')[0]}.py").exists()
    ]
    if missing:
        raise RuntimeError(f"auto_map points to modules that were not written: {missing}")


__all__ = [
    "MLAForConditionalGenerationMixin",
    "MLAModelMixin",
    "MLAPreTrainedMixin",
    "MLATextModelMixin",
    "forward_signature_with_mask",
    "mla_auto_map",
    "mla_text_model_class",
    "remote_code_files",
    "with_mla_attention",
    "write_remote_code",
]
