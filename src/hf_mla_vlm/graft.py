# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""Native LLaVA / LLaVA-NeXT / Qwen2.5-VL checkpoints whose language model is the real SmolLM2-135M-Instruct.

No VLM or vision-encoder weights install offline, but a real language model does (`hf_mla_vlm.assets`). Grafting it
into the native Transformers VLM classes, next to a small random vision tower and projector, gives test models
whose text path is a real, trained network: conversion quality and perplexity measured on them mean something, and
the text-only logits equal SmolLM2's exactly.

- LLaVA / LLaVA-NeXT: the text config *is* SmolLM2's `LlamaConfig`; a CLIP vision tower (by default hidden 128,
  2 layers, 56x56 images, 14x14 patches: 16 image tokens; `VisionSpec` sets other sizes, as the trained towers of
  `hf_mla_vlm.zoo` do) and the usual two-layer projector.
- Qwen2.5-VL: a `Qwen2_5_VLTextConfig` with SmolLM2's sizes, `rope_theta` 1e5 and `mrope_section` [8, 12, 12]
  (head_dim 64). The q/k/v biases that Qwen2.5-VL always has are set to zero; for text-only inputs the t/h/w
  position ids are equal, so M-RoPE reduces to SmolLM2's 1-D RoPE. Vision: depth 2, hidden 128,
  `out_hidden_size` 576.

Tokenizer: SmolLM2's, with the image placeholders `<image>`, `<|vision_start|>`, `<|vision_end|>`,
`<|image_pad|>` and `<|video_pad|>` taking over the ids of five unused code-pretraining special tokens
(`<jupyter_start>` ... `<jupyter_script>`, ids 11-15). The vocabulary and the embeddings are not resized, so any
text that does not literally contain one of those five markers tokenises, and scores, exactly as with SmolLM2.
The chat template is SmolLM2's, extended to content lists with `{"type": "image"}` items.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import GenerationConfig, PreTrainedTokenizerFast
from transformers.initialization import no_init_weights
from transformers.utils import logging

from .configuration.configuration_mla_common import text_head_dim


logger = logging.get_logger(__name__)

GraftArch = Literal["llava", "qwen2_5_vl", "llava_next"]
GRAFT_ARCHS: tuple[str, ...] = ("llava", "llava_next", "qwen2_5_vl")

# Placeholder token -> the unused SmolLM2 special token whose id it takes over (no vocabulary resize).
REUSED_TOKENS: dict[str, str] = {
    "<|vision_start|>": "<jupyter_start>",
    "<|vision_end|>": "<jupyter_text>",
    "<|image_pad|>": "<jupyter_code>",
    "<|video_pad|>": "<jupyter_output>",
    "<image>": "<jupyter_script>",
}
SMOLLM2_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
IMAGE_SIZE = 56
PATCH_SIZE = 14
QWEN_MROPE_SECTION = [8, 12, 12]


@dataclass(frozen=True)
class VisionSpec:
    """Size of the vision side of a grafted VLM (the defaults are the small random towers of the tests).

    Args:
        image_size: side of the CLIP tower's square input (LLaVA, LLaVA-NeXT: each anyres tile and the base view);
            for Qwen2.5-VL the processor resizes every image to at most `qwen_max_pixels`.
        hidden_size / num_layers / num_heads / intermediate_size: the vision transformer.
        feature_layer: LLaVA's `vision_feature_layer` (`-2`, LLaVA-1.5's choice, leaves the last layer unused).
        qwen_max_pixels / qwen_min_pixels: Qwen2.5-VL's pixel budget (the processor's `longest_edge` and
            `shortest_edge`, in pixels).
        qwen_full_attention_blocks: Qwen2.5-VL blocks with full attention (the others use windows of
            `qwen_window_size` pixels).
    """

    image_size: int = IMAGE_SIZE
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int | None = None  # LLaVA: 4 x hidden, Qwen2.5-VL: 2 x hidden
    feature_layer: int = -2
    qwen_min_pixels: int = 56 * 56
    qwen_max_pixels: int = 224 * 224
    qwen_window_size: int = 56
    qwen_full_attention_blocks: tuple[int, ...] = (1,)

    @property
    def pinpoints(self) -> list[list[int]]:
        """LLaVA-NeXT's anyres grid: 1x2, 2x1 and 2x2 tiles of `image_size`."""
        s = self.image_size
        return [[s, 2 * s], [2 * s, s], [2 * s, 2 * s]]


def chat_template(arch: GraftArch) -> str:
    """SmolLM2's chat template, accepting `content` as a string or a list of `text` / `image` (/ `video`) items.

    For string content (and lists of text items) it renders exactly like SmolLM2's own template. Image items
    become `<image>` (LLaVA, LLaVA-NeXT) or `<|vision_start|><|image_pad|><|vision_end|>` (Qwen2.5-VL); the processor
    expands them to one placeholder per image feature.
    """
    if arch == "qwen2_5_vl":
        image = "<|vision_start|><|image_pad|><|vision_end|>"
        video = "<|vision_start|><|video_pad|><|vision_end|>"
    else:
        image = video = "<image>"
    return (
        "{% for message in messages %}"
        "{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\n" + SMOLLM2_SYSTEM_PROMPT + "<|im_end|>\n' }}{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for item in message['content'] %}"
        "{% if item['type'] == 'image' %}{{ '" + image + "' }}"
        "{% elif item['type'] == 'video' %}{{ '" + video + "' }}"
        "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
        "{{ '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )


def build_vlm_tokenizer(smollm2_tokenizer, arch: GraftArch) -> PreTrainedTokenizerFast:
    """SmolLM2's tokenizer with the image placeholders renamed into five unused special-token ids.

    Args:
        smollm2_tokenizer: the tokenizer returned by `hf_mla_vlm.assets.load_smollm2`.
        arch (`str`): `"llava"`, `"llava_next"` or `"qwen2_5_vl"` (sets `image_token` and the chat template).

    Returns:
        `PreTrainedTokenizerFast`: same vocabulary size (49152), left padding, `image_token` (and for Qwen2.5-VL
        `video_token`) registered as extra special tokens.
    """
    from tokenizers import Tokenizer

    state = json.loads(smollm2_tokenizer.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    by_content = {token["content"]: token for token in state["added_tokens"]}
    for new, old in REUSED_TOKENS.items():
        if old not in vocab or old not in by_content or new in vocab:
            raise ValueError(f"Cannot rename {old!r} to {new!r}: this is not the SmolLM2 tokenizer.")
        vocab[new] = vocab.pop(old)
        by_content[old]["content"] = new
    backend = Tokenizer.from_str(json.dumps(state))
    extra = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"} if arch == "qwen2_5_vl" else {}
    extra.setdefault("image_token", "<image>")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=smollm2_tokenizer.bos_token,
        eos_token=smollm2_tokenizer.eos_token,
        unk_token=smollm2_tokenizer.unk_token,
        pad_token=smollm2_tokenizer.eos_token,  # SmolLM2-Instruct pads with <|im_end|>; GGUF loaders disagree
        extra_special_tokens=extra,
        padding_side="left",
        chat_template=chat_template(arch),
        model_max_length=8192,
    )
    if len(tokenizer) != len(smollm2_tokenizer):
        raise RuntimeError(f"Vocabulary size changed ({len(smollm2_tokenizer)} -> {len(tokenizer)}).")
    return tokenizer


def _token_id(tokenizer, token: str) -> int:
    return tokenizer.convert_tokens_to_ids(token)


def _build_config(arch: GraftArch, text_config, tokenizer, vision_spec: VisionSpec):
    from transformers import LlavaConfig, LlavaNextConfig, Qwen2_5_VLConfig

    text = text_config.to_dict()
    for key in ("quantization_config", "_name_or_path", "architectures", "transformers_version", "dtype"):
        text.pop(key, None)
    text["pad_token_id"] = tokenizer.pad_token_id
    if arch in ("llava", "llava_next"):
        v = vision_spec
        vision = dict(
            model_type="clip_vision_model", hidden_size=v.hidden_size,
            intermediate_size=v.intermediate_size or 4 * v.hidden_size, num_hidden_layers=v.num_layers,
            num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=PATCH_SIZE,
            projection_dim=v.hidden_size,
        )  # fmt: skip
        common = dict(
            text_config=text,
            vision_config=vision,
            image_token_index=_token_id(tokenizer, "<image>"),
            vision_feature_layer=v.feature_layer,
            vision_feature_select_strategy="default",
            tie_word_embeddings=text_config.tie_word_embeddings,
        )
        if arch == "llava":
            return LlavaConfig(image_seq_length=(v.image_size // PATCH_SIZE) ** 2, **common)
        return LlavaNextConfig(image_grid_pinpoints=v.pinpoints, **common)
    if arch != "qwen2_5_vl":
        raise ValueError(f"Unknown architecture {arch!r}; choose one of {GRAFT_ARCHS}.")
    head_dim = text_head_dim(text_config)
    if sum(QWEN_MROPE_SECTION) * 2 != head_dim:
        raise ValueError(f"mrope_section {QWEN_MROPE_SECTION} needs head_dim 64, got {head_dim}.")
    qwen_text = dict(
        vocab_size=text_config.vocab_size,
        hidden_size=text_config.hidden_size,
        intermediate_size=text_config.intermediate_size,
        num_hidden_layers=text_config.num_hidden_layers,
        num_attention_heads=text_config.num_attention_heads,
        num_key_value_heads=text_config.num_key_value_heads,
        hidden_act=text_config.hidden_act,
        max_position_embeddings=text_config.max_position_embeddings,
        rms_norm_eps=text_config.rms_norm_eps,
        use_sliding_window=False,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": text_config.rope_parameters["rope_theta"],
            "mrope_section": list(QWEN_MROPE_SECTION),
        },
        bos_token_id=text_config.bos_token_id,
        eos_token_id=text_config.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    v = vision_spec
    vision = dict(
        depth=v.num_layers, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size or 2 * v.hidden_size,
        num_heads=v.num_heads, out_hidden_size=text_config.hidden_size, patch_size=PATCH_SIZE, spatial_merge_size=2,
        temporal_patch_size=2, window_size=v.qwen_window_size,
        fullatt_block_indexes=list(v.qwen_full_attention_blocks),
    )  # fmt: skip
    return Qwen2_5_VLConfig(
        text_config=qwen_text,
        vision_config=vision,
        image_token_id=_token_id(tokenizer, "<|image_pad|>"),
        video_token_id=_token_id(tokenizer, "<|video_pad|>"),
        vision_start_token_id=_token_id(tokenizer, "<|vision_start|>"),
        vision_end_token_id=_token_id(tokenizer, "<|vision_end|>"),
        tie_word_embeddings=text_config.tie_word_embeddings,
    )


def _build_processor(arch: GraftArch, tokenizer, vision_spec: VisionSpec):
    from transformers import (
        LlavaImageProcessorPil,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
        LlavaProcessor,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    template = chat_template(arch)
    if arch == "qwen2_5_vl":
        size = {"shortest_edge": vision_spec.qwen_min_pixels, "longest_edge": vision_spec.qwen_max_pixels}
        kwargs = dict(patch_size=PATCH_SIZE, merge_size=2, temporal_patch_size=2, size=size)
        return Qwen2_5_VLProcessor(
            image_processor=Qwen2VLImageProcessor(**kwargs),
            video_processor=Qwen2VLVideoProcessor(**kwargs),
            tokenizer=tokenizer,
            chat_template=template,
        )
    common = dict(
        tokenizer=tokenizer, patch_size=PATCH_SIZE, vision_feature_select_strategy="default", image_token="<image>",
        num_additional_image_tokens=1, chat_template=template,
    )  # fmt: skip
    side = vision_spec.image_size
    sizes = dict(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    if arch == "llava":
        return LlavaProcessor(image_processor=LlavaImageProcessorPil(**sizes), **common)
    image_processor = LlavaNextImageProcessorPil(image_grid_pinpoints=vision_spec.pinpoints, **sizes)
    return LlavaNextProcessor(image_processor=image_processor, **common)


def _language_model_state(smollm2_model, arch: GraftArch, num_layers: int) -> dict[str, torch.Tensor]:
    """SmolLM2's weights under the VLM's in-memory names (plus zero q/k/v biases for Qwen2.5-VL)."""
    state = {}
    for name, tensor in smollm2_model.model.state_dict().items():
        state[f"model.language_model.{name}"] = tensor
    state["lm_head.weight"] = smollm2_model.lm_head.weight
    if arch == "qwen2_5_vl":
        for layer in range(num_layers):
            prefix = f"model.language_model.layers.{layer}.self_attn."
            for proj in ("q_proj", "k_proj", "v_proj"):
                weight = state[prefix + proj + ".weight"]
                state[prefix + proj + ".bias"] = torch.zeros(weight.shape[0], dtype=weight.dtype)
    return state


@torch.no_grad()
def build_smollm2_vlm(
    arch: GraftArch,
    *,
    vision_seed: int = 0,
    dtype: torch.dtype = torch.float32,
    smollm2: tuple | None = None,
    vision_spec: VisionSpec | None = None,
):
    """A native Transformers VLM whose language model is SmolLM2-135M-Instruct, with a small random vision tower.

    Text-only inputs (`input_ids` without `pixel_values`) give exactly SmolLM2's logits (max |diff| = 0 in
    float32 on CPU, checked in the tests).

    Args:
        arch (`str`): `"llava"` (`LlavaForConditionalGeneration`), `"llava_next"`
            (`LlavaNextForConditionalGeneration`) or `"qwen2_5_vl"` (`Qwen2_5_VLForConditionalGeneration`).
        vision_seed (`int`, *optional*, defaults to 0):
            Seed of the random vision tower and projector (the global RNG state is left untouched).
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): dtype of the returned model.
        smollm2 (`tuple`, *optional*):
            `(model, tokenizer)` from `hf_mla_vlm.assets.load_smollm2()`, to avoid loading it again. Its weights
            are copied, not shared.
        vision_spec (`VisionSpec`, *optional*): size of the vision tower and images (default: `VisionSpec()`).

    Returns:
        `tuple`: `(model, processor)`, the model in eval mode.

    Raises:
        `hf_mla_vlm.assets.MissingAssetError`: SmolLM2 is not installed (the message gives the pip command).
    """
    from transformers import (
        LlavaForConditionalGeneration,
        LlavaNextForConditionalGeneration,
        Qwen2_5_VLForConditionalGeneration,
    )

    from .assets import load_smollm2

    if arch not in GRAFT_ARCHS:
        raise ValueError(f"Unknown architecture {arch!r}; choose one of {GRAFT_ARCHS}.")
    source_model, source_tokenizer = smollm2 if smollm2 is not None else load_smollm2()
    tokenizer = build_vlm_tokenizer(source_tokenizer, arch)
    vision_spec = vision_spec or VisionSpec()
    config = _build_config(arch, source_model.config, tokenizer, vision_spec)
    model_class = {
        "llava": LlavaForConditionalGeneration,
        "llava_next": LlavaNextForConditionalGeneration,
        "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    }[arch]
    with no_init_weights():  # the language model is overwritten below: skip its random initialisation
        model = model_class(config)
    state = _language_model_state(source_model, arch, config.text_config.num_hidden_layers)
    missing, unexpected = model.load_state_dict(state, strict=False)
    language_missing = [name for name in missing if name.startswith("model.language_model.")]
    if language_missing or unexpected:
        raise RuntimeError(f"SmolLM2 weights do not fit the {arch} model: missing={language_missing}, "
                           f"unexpected={unexpected}")  # fmt: skip
    model.tie_weights()
    for name in state:  # as `from_pretrained` does: mark loaded tensors so that only the rest is initialised
        model.get_parameter_or_buffer(name)._is_hf_initialized = True
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(vision_seed)
        model.initialize_weights()  # the vision tower, the projector and non-persistent buffers
    model.generation_config = GenerationConfig(
        bos_token_id=source_model.config.bos_token_id,
        eos_token_id=source_model.config.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.config.name_or_path = f"smollm2-135m-{arch}"
    model.to(dtype)
    return model.eval(), _build_processor(arch, tokenizer, vision_spec)


def save_smollm2_vlm(
    arch: GraftArch,
    out_dir: str | os.PathLike,
    *,
    vision_seed: int = 0,
    dtype: torch.dtype = torch.float32,
    smollm2: tuple | None = None,
) -> Path:
    """Build `build_smollm2_vlm(arch, ...)` and save it as a native checkpoint folder (safetensors, config,
    generation config, processor and chat template) that `hf_mla_vlm.convert(...)` and
    `AutoModelForImageTextToText.from_pretrained` accept.

    Args:
        arch (`str`): `"llava"`, `"llava_next"` or `"qwen2_5_vl"`.
        out_dir (`str` or `os.PathLike`): folder to write (created if needed).
        vision_seed (`int`, *optional*, defaults to 0): seed of the random vision tower.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): dtype of the saved weights.
        smollm2 (`tuple`, *optional*): a preloaded `(model, tokenizer)` from `load_smollm2()`.

    Returns:
        `Path`: `out_dir`.
    """
    model, processor = build_smollm2_vlm(arch, vision_seed=vision_seed, dtype=dtype, smollm2=smollm2)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    logger.info(f"Saved the SmolLM2-135M {arch} checkpoint to {out_dir}")
    return out_dir


__all__ = [
    "GRAFT_ARCHS",
    "REUSED_TOKENS",
    "VisionSpec",
    "build_smollm2_vlm",
    "build_vlm_tokenizer",
    "chat_template",
    "save_smollm2_vlm",
]
