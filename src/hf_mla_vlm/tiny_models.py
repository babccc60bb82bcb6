# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""Tiny random LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL and Qwen2.5-VL checkpoints built in code (no hub access).

Used by the tests, the examples and the README demo. The models are the native Transformers classes with random
weights and a word-level tokenizer; their processors are real (image resizing, placeholder expansion).
"""

import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


TinyArch = Literal["llava", "llava_next", "qwen2_5_vl", "qwen2_vl", "llava_onevision"]
TINY_ARCHS: tuple[str, ...] = ("llava", "llava_next", "qwen2_5_vl", "qwen2_vl", "llava_onevision")

SPECIAL_TOKENS = [
    "<pad>", "<s>", "</s>", "<unk>", "<image>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
    "<|vision_end|>", "<|im_start|>", "<|im_end|>",
]  # fmt: skip
WORDS = [
    "USER:", "ASSISTANT:", "system", "user", "assistant", "describe", "the", "image", "a", "cat", "dog", "what",
    "is", "this", "?", ".", "red", "green", "blue", "circle", "square", "left", "right", "of", "above", "below",
]  # fmt: skip
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image> {% elif item['type'] == 'text' %}{{ item['text'] }} {% endif %}"
    "{% endfor %}{% endif %}{% if message['role'] != 'user' %}</s> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|> {{ message['role'] }} "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|> {% elif item['type'] == 'text' %}"
    "{{ item['text'] }} {% endif %}{% endfor %}{% endif %}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def build_tiny_tokenizer(vocab_size: int = 256, image_token: str = "<image>") -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer with the image/video special tokens of LLaVA and Qwen2.5-VL, left padding.

    `image_token` is the placeholder the processor expands (`<image>` for LLaVA, `<|image_pad|>` for Qwen2.5-VL).
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + WORDS)}
    for i in range(len(vocab), vocab_size):
        vocab[f"w{i}"] = i
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": image_token},
        padding_side="left",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[4:]})
    return tokenizer


def _text_config(tokenizer, num_layers: int, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int):
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=3 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _vision_clip() -> dict:
    return dict(
        model_type="clip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, image_size=28, patch_size=14, projection_dim=64,
    )  # fmt: skip


def _llava_processor_kwargs(tokenizer) -> dict:
    return dict(
        tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default", image_token="<image>",
        num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE,
    )  # fmt: skip


_ROPE = {"rope_type": "default", "rope_theta": 1e4}
PINPOINTS = [[28, 56], [56, 28], [56, 56]]


def _llama_text(text: dict, head_dim: int) -> dict:
    return {**text, "model_type": "llama", "head_dim": head_dim, "rope_parameters": _ROPE}


def _tiny_llava(tokenizer, text: dict, head_dim: int):
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaImageProcessorPil, LlavaProcessor

    config = LlavaConfig(
        text_config=_llama_text(text, head_dim), vision_config=_vision_clip(), image_seq_length=4,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )  # fmt: skip
    image_processor = LlavaImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(image_processor=image_processor, **_llava_processor_kwargs(tokenizer))
    return LlavaForConditionalGeneration(config), processor


def _tiny_llava_next(tokenizer, text: dict, head_dim: int):
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    config = LlavaNextConfig(
        text_config=_llama_text(text, head_dim), vision_config=_vision_clip(), image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )  # fmt: skip
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, image_grid_pinpoints=PINPOINTS
    )
    processor = LlavaNextProcessor(image_processor=image_processor, **_llava_processor_kwargs(tokenizer))
    return LlavaNextForConditionalGeneration(config), processor


def _tiny_llava_onevision(tokenizer, text: dict, head_dim: int):
    """LLaVA-OneVision with a Qwen2 text model (q/k/v biases) and a SigLIP tower, anyres tiles of 28 pixels."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    vision = dict(
        model_type="siglip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, image_size=28, patch_size=14,
    )  # fmt: skip
    config = LlavaOnevisionConfig(
        text_config={**text, "model_type": "qwen2", "rope_parameters": _ROPE}, vision_config=vision,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<|video_pad|>"), image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-1, vision_feature_select_strategy="full",
    )  # fmt: skip
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": 28, "width": 28}, image_grid_pinpoints=PINPOINTS)
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor, video_processor=LlavaOnevisionVideoProcessor(), tokenizer=tokenizer,
        num_image_tokens=4, vision_feature_select_strategy="full", image_token="<image>",
        video_token="<|video_pad|>", chat_template=LLAVA_CHAT_TEMPLATE,
    )  # fmt: skip
    return LlavaOnevisionForConditionalGeneration(config), processor


def _mrope_text(text: dict, head_dim: int) -> dict:
    unit = head_dim // 16
    mrope = [2 * unit, 3 * unit, 3 * unit]  # t/h/w sections, summing to head_dim / 2 like Qwen's [16, 24, 24]
    return {**text, "rope_parameters": {**_ROPE, "mrope_section": mrope}}


def _qwen_token_ids(tokenizer) -> dict:
    return dict(
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )


def _qwen_processor(processor_class, tokenizer):
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    size = {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}
    kwargs = dict(patch_size=14, merge_size=2, temporal_patch_size=2, size=size)
    return processor_class(
        image_processor=Qwen2VLImageProcessor(**kwargs),
        video_processor=Qwen2VLVideoProcessor(**kwargs),
        tokenizer=tokenizer,
        chat_template=QWEN_CHAT_TEMPLATE,
    )


def _tiny_qwen2_5_vl(tokenizer, text: dict, head_dim: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    vision = dict(
        depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=text["hidden_size"],
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
    )  # fmt: skip
    config = Qwen2_5_VLConfig(
        text_config=_mrope_text(text, head_dim), vision_config=vision, **_qwen_token_ids(tokenizer)
    )
    return Qwen2_5_VLForConditionalGeneration(config), _qwen_processor(Qwen2_5_VLProcessor, tokenizer)


def _tiny_qwen2_vl(tokenizer, text: dict, head_dim: int):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    vision = dict(
        depth=2, embed_dim=64, hidden_size=text["hidden_size"], num_heads=2, mlp_ratio=2, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2,
    )  # fmt: skip
    config = Qwen2VLConfig(text_config=_mrope_text(text, head_dim), vision_config=vision, **_qwen_token_ids(tokenizer))
    return Qwen2VLForConditionalGeneration(config), _qwen_processor(Qwen2VLProcessor, tokenizer)


# One builder per architecture: (tokenizer, text config dict, head_dim) -> (native model, processor).
TINY_BUILDERS = {
    "llava": _tiny_llava,
    "llava_next": _tiny_llava_next,
    "qwen2_5_vl": _tiny_qwen2_5_vl,
    "qwen2_vl": _tiny_qwen2_vl,
    "llava_onevision": _tiny_llava_onevision,
}
QWEN_STYLE = ("qwen2_5_vl", "qwen2_vl")  # image placeholder <|image_pad|> and the Qwen chat template


def build_tiny_vlm(
    arch: TinyArch,
    *,
    seed: int = 0,
    num_layers: int = 2,
    hidden_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    init_std: float = 0.1,
):
    """A tiny random native VLM and its processor. Head dim is `hidden_size // num_heads`.

    `init_std` is larger than the usual 0.02 so that attention patterns are far from uniform and a wrong rotary
    pair or modality branch changes the logits visibly.
    """
    if arch not in TINY_BUILDERS:
        raise ValueError(f"Unknown tiny architecture {arch!r}; choose one of {TINY_ARCHS}.")
    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer(image_token="<|image_pad|>" if arch in QWEN_STYLE else "<image>")
    head_dim = hidden_size // num_heads
    text = _text_config(tokenizer, num_layers, hidden_size, num_heads, num_kv_heads, head_dim)
    model, processor = TINY_BUILDERS[arch](tokenizer, text, head_dim)
    _reinit(model, init_std)
    return model.eval(), processor


@torch.no_grad()
def _reinit(model: torch.nn.Module, std: float) -> None:
    for name, param in model.named_parameters():
        if param.dim() >= 2:
            param.normal_(0.0, std)
        elif name.endswith("bias"):
            param.normal_(0.0, std)


def tiny_image(seed: int = 0, size: tuple[int, int] = (40, 60)) -> Image.Image:
    """A random RGB image (height, width)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((*size, 3)) * 255).astype("uint8"))


def tiny_prompt(arch: TinyArch, words: str = "describe the image", with_image: bool = True) -> str:
    """A chat-formatted prompt with one image placeholder (expanded by the processor)."""
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": words}]
    template = QWEN_CHAT_TEMPLATE if arch in QWEN_STYLE else LLAVA_CHAT_TEMPLATE
    from jinja2 import Template

    return Template(template).render(messages=[{"role": "user", "content": content}], add_generation_prompt=True)


def save_tiny_vlm(arch: TinyArch, out_dir: str | os.PathLike, **kwargs) -> Path:
    """Build a tiny random VLM and save it with its processor as a native Transformers checkpoint folder."""
    model, processor = build_tiny_vlm(arch, **kwargs)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


__all__ = [
    "TINY_ARCHS",
    "build_tiny_tokenizer",
    "build_tiny_vlm",
    "save_tiny_vlm",
    "tiny_image",
    "tiny_prompt",
]
