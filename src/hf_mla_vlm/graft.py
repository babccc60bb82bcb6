# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""Native VLM checkpoints (LLaVA, LLaVA-NeXT, Qwen2.5-VL, Qwen2-VL) built around a real decoder language model.

No VLM or vision-encoder weights install offline, but a real language model does (`hf_mla_vlm.assets`). Grafting it
into the native Transformers VLM classes, next to a small random vision tower and projector, gives models whose text
path is a real, trained network: conversion quality and perplexity measured on them mean something, and the
text-only logits equal the language model's.

`graft_vlm(lm, tokenizer, arch)` takes any Transformers decoder LM (`LlamaForCausalLM`, `Qwen2ForCausalLM`, ...)
and keeps every weight, biases included:

- LLaVA / LLaVA-NeXT: the text config *is* the LM's config, so the text model is the LM's own class; a CLIP vision
  tower (by default hidden 128, 2 layers, 56x56 images, 14x14 patches: 16 image tokens; `VisionSpec` sets other
  sizes, as the trained towers of `hf_mla_vlm.zoo` do) and the usual two-layer projector.
- Qwen2.5-VL / Qwen2-VL: a text config with the LM's sizes and `rope_theta`, and `mrope_section` splitting the
  `head_dim / 2` rotary pairs t/h/w like Qwen's (`mrope_section`). Their attention always has q/k/v biases: the
  LM's own are copied (a Qwen2 LM keeps them), an LM without them gets zeros. For text-only inputs the t/h/w
  position ids are equal, so M-RoPE reduces to the LM's 1-D RoPE. An LM these classes cannot represent exactly
  (a `head_dim` other than `hidden_size / num_attention_heads`, scaled RoPE, sliding windows, an o_proj or MLP bias,
  extra weights such as q/k norms) is refused (`check_graftable` and the weight placement), never truncated.

Tokenizer: the LM's, with the image placeholders added as special tokens (the embeddings grow by their mean row) or,
for SmolLM2 (`build_smollm2_vlm`), `<image>`, `<|vision_start|>`, `<|vision_end|>`, `<|image_pad|>` and
`<|video_pad|>` taking over the ids of five unused code-pretraining special tokens (`<jupyter_start>` ...
`<jupyter_script>`, ids 11-15): the vocabulary is not resized, so any text that does not literally contain one of
those five markers tokenises, and scores, exactly as with SmolLM2. The chat template is ChatML (SmolLM2's, with
its system prompt for SmolLM2), extended to content lists with `{"type": "image"}` items.

Longer than the package's usual ~400 lines: one grafting path per target family (LLaVA, LLaVA-NeXT, Qwen-VL) with
the layout checks that refuse what a target cannot represent, and the logit check against the source LM.
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

from .errors import InputError


logger = logging.get_logger(__name__)

GraftArch = Literal["llava", "llava_next", "qwen2_5_vl", "qwen2_vl"]
GRAFT_ARCHS: tuple[str, ...] = ("llava", "llava_next", "qwen2_5_vl", "qwen2_vl")

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


def _qwen_style(arch: str) -> bool:
    return arch in ("qwen2_5_vl", "qwen2_vl")


def placeholder_tokens(arch: GraftArch) -> tuple[str, ...]:
    """The placeholder tokens the processor of `arch` needs in the vocabulary."""
    if _qwen_style(arch):
        return ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
    return ("<image>",)


def chat_template(arch: GraftArch, system_prompt: str | None = SMOLLM2_SYSTEM_PROMPT) -> str:
    """A ChatML template (SmolLM2's, and Qwen2's format), accepting `content` as a string or a list of `text` /
    `image` (/ `video`) items.

    For string content (and lists of text items) it renders exactly like SmolLM2's own template (with the default
    `system_prompt`, inserted when the conversation has no system message; `None`: no default system message).
    Image items become `<image>` (LLaVA, LLaVA-NeXT) or `<|vision_start|><|image_pad|><|vision_end|>` (Qwen2.5-VL,
    Qwen2-VL); the processor expands them to one placeholder per image feature.
    """
    if _qwen_style(arch):
        image = "<|vision_start|><|image_pad|><|vision_end|>"
        video = "<|vision_start|><|video_pad|><|vision_end|>"
    else:
        image = video = "<image>"
    system = (
        "{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\n" + system_prompt + "<|im_end|>\n' }}{% endif %}"
        if system_prompt is not None
        else ""
    )
    return (
        "{% for message in messages %}" + system + "{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for item in message['content'] %}"
        "{% if item['type'] == 'image' %}{{ '" + image + "' }}"
        "{% elif item['type'] == 'video' %}{{ '" + video + "' }}"
        "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
        "{{ '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )


def build_vlm_tokenizer(
    source_tokenizer,
    arch: GraftArch,
    *,
    reused_tokens: dict[str, str] | None = REUSED_TOKENS,
    system_prompt: str | None = SMOLLM2_SYSTEM_PROMPT,
) -> PreTrainedTokenizerFast:
    """The source LM's tokenizer with the image placeholders of `arch`.

    Args:
        source_tokenizer: a fast tokenizer (by default SmolLM2's, from `hf_mla_vlm.assets.load_smollm2`).
        arch (`str`): one of `GRAFT_ARCHS` (sets `image_token` and the chat template).
        reused_tokens: `{placeholder: unused token}`: each placeholder takes over the id of an unused special token,
            so the vocabulary keeps its size (default: SmolLM2's five `<jupyter_*>` tokens). `None` or `{}`: the
            placeholders missing from the vocabulary are appended as new special tokens (the grafted model's
            embeddings then grow by as many rows, see `graft_vlm`).
        system_prompt: default system message of the chat template (`None`: none).

    Returns:
        `PreTrainedTokenizerFast`: left padding, `image_token` (and for Qwen-style architectures `video_token`)
        registered as extra special tokens.

    Raises:
        `InputError`: `reused_tokens` names a token the tokenizer does not have (or a placeholder it already has).
    """
    from tokenizers import AddedToken, Tokenizer

    state = json.loads(source_tokenizer.backend_tokenizer.to_str())
    if reused_tokens:
        vocab = state["model"].get("vocab")
        by_content = {token["content"]: token for token in state["added_tokens"]}
        for new, old in reused_tokens.items():
            if not isinstance(vocab, dict) or old not in vocab or old not in by_content or new in vocab:
                raise InputError(
                    f"Cannot rename {old!r} to {new!r}: the tokenizer has no special token {old!r} (or already has "
                    f"{new!r}); pass reused_tokens=None to append the placeholders as new tokens."
                )
            vocab[new] = vocab.pop(old)
            by_content[old]["content"] = new
    backend = Tokenizer.from_str(json.dumps(state))
    existing = backend.get_vocab()
    missing = [token for token in placeholder_tokens(arch) if token not in existing]
    if missing:
        backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in missing])
    extra = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"} if _qwen_style(arch) else {}
    extra.setdefault("image_token", "<image>")
    max_length = getattr(source_tokenizer, "model_max_length", None)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=source_tokenizer.bos_token,
        eos_token=source_tokenizer.eos_token,
        unk_token=source_tokenizer.unk_token,
        # SmolLM2-Instruct pads with <|im_end|>; GGUF loaders disagree on its pad token
        pad_token=source_tokenizer.eos_token
        if reused_tokens
        else (source_tokenizer.pad_token or source_tokenizer.eos_token),
        extra_special_tokens=extra,
        padding_side="left",
        chat_template=chat_template(arch, system_prompt),
        model_max_length=max_length if isinstance(max_length, int) and max_length < 10**9 else 8192,
    )
    if len(tokenizer) != len(source_tokenizer) + len(missing):
        raise RuntimeError(f"Vocabulary size changed ({len(source_tokenizer)} -> {len(tokenizer)}).")
    return tokenizer


def _token_id(tokenizer, token: str) -> int:
    return tokenizer.convert_tokens_to_ids(token)


def mrope_section(head_dim: int) -> list[int]:
    """Qwen's t/h/w split of the `head_dim / 2` rotary pairs (`[16, 24, 24]` for 128, `[8, 12, 12]` for 64)."""
    pairs = head_dim // 2
    spatial = 3 * pairs // 8
    return [pairs - 2 * spatial, spatial, spatial]


def check_graftable(text_config, arch: GraftArch) -> None:
    """Refuse a language model whose attention `arch` cannot represent exactly.

    LLaVA and LLaVA-NeXT keep the LM's own class (any decoder LM Transformers builds with `AutoModel`). Qwen2.5-VL
    and Qwen2-VL rebuild it as their text model: Llama/Qwen2-style layers (RMSNorm, SwiGLU MLP without biases,
    q/k/v with biases (zeros when the LM has none), o_proj without bias), `head_dim = hidden_size /
    num_attention_heads` and plain RoPE (`rope_type` default) on every layer.

    Raises:
        `InputError`: the LM does not fit (the message says what, and that LLaVA keeps any layout).
    """
    if arch not in GRAFT_ARCHS:
        raise InputError(f"Unknown architecture {arch!r}; choose one of {GRAFT_ARCHS}.")
    if not _qwen_style(arch):
        return
    hint = "graft it into llava or llava_next instead (they keep the language model's own class)"
    hidden, heads = text_config.hidden_size, text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or hidden // heads
    if hidden % heads or head_dim != hidden // heads:
        raise InputError(
            f"{arch}'s text attention derives head_dim = hidden_size / num_attention_heads = {hidden} / {heads}, but "
            f"this {text_config.model_type} LM has head_dim {head_dim}: its attention weights cannot be represented; "
            f"{hint}."
        )
    rope = getattr(text_config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise InputError(
            f"{arch} applies plain M-RoPE, but this LM uses rope_type {rope.get('rope_type')!r} ({rope}); {hint}."
        )
    if getattr(text_config, "use_sliding_window", False):
        raise InputError(f"This LM uses sliding-window attention, which the grafted {arch} would not apply; {hint}.")


def _text_state(language_model) -> dict[str, torch.Tensor]:
    """The LM's weights under a VLM's in-memory names (`model.language_model.*`, `lm_head.weight`)."""
    state = {f"model.language_model.{n}": t for n, t in language_model.base_model.state_dict().items()}
    state["lm_head.weight"] = language_model.get_output_embeddings().weight
    return state


def _grow_vocabulary(state: dict[str, torch.Tensor], vocab_size: int) -> None:
    """Append rows (the mean of the existing rows) to the embeddings and the output head, up to `vocab_size`."""
    for name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        weight = state[name]
        extra = vocab_size - weight.shape[0]
        if extra > 0:
            state[name] = torch.cat([weight, weight.mean(0, keepdim=True).expand(extra, -1)])


def _build_config(arch: GraftArch, text_config, tokenizer, vision_spec: VisionSpec):
    from transformers import LlavaConfig, LlavaNextConfig, Qwen2_5_VLConfig, Qwen2VLConfig

    vocab_size = max(len(tokenizer), text_config.vocab_size)
    if arch in ("llava", "llava_next"):
        text = text_config.to_dict()
        for key in ("quantization_config", "_name_or_path", "architectures", "transformers_version", "dtype"):
            text.pop(key, None)
        text["pad_token_id"] = tokenizer.pad_token_id
        text["vocab_size"] = vocab_size
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
    check_graftable(text_config, arch)
    rope = getattr(text_config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(text_config, "rope_theta", 10000.0))
    qwen_text = dict(
        vocab_size=vocab_size,
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
            "rope_theta": theta,
            "mrope_section": mrope_section(text_config.hidden_size // text_config.num_attention_heads),
        },
        bos_token_id=text_config.bos_token_id,
        eos_token_id=text_config.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    token_ids = dict(
        image_token_id=_token_id(tokenizer, "<|image_pad|>"),
        video_token_id=_token_id(tokenizer, "<|video_pad|>"),
        vision_start_token_id=_token_id(tokenizer, "<|vision_start|>"),
        vision_end_token_id=_token_id(tokenizer, "<|vision_end|>"),
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    v = vision_spec
    if arch == "qwen2_vl":
        vision = dict(
            depth=v.num_layers, embed_dim=v.hidden_size, hidden_size=text_config.hidden_size, num_heads=v.num_heads,
            mlp_ratio=(v.intermediate_size or 2 * v.hidden_size) // v.hidden_size, patch_size=PATCH_SIZE,
            spatial_merge_size=2, temporal_patch_size=2,
        )  # fmt: skip
        return Qwen2VLConfig(text_config=qwen_text, vision_config=vision, **token_ids)
    vision = dict(
        depth=v.num_layers, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size or 2 * v.hidden_size,
        num_heads=v.num_heads, out_hidden_size=text_config.hidden_size, patch_size=PATCH_SIZE, spatial_merge_size=2,
        temporal_patch_size=2, window_size=v.qwen_window_size,
        fullatt_block_indexes=list(v.qwen_full_attention_blocks),
    )  # fmt: skip
    return Qwen2_5_VLConfig(text_config=qwen_text, vision_config=vision, **token_ids)


def _build_processor(arch: GraftArch, tokenizer, vision_spec: VisionSpec, template: str):
    from transformers import (
        LlavaImageProcessorPil,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
        LlavaProcessor,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    if _qwen_style(arch):
        size = {"shortest_edge": vision_spec.qwen_min_pixels, "longest_edge": vision_spec.qwen_max_pixels}
        kwargs = dict(patch_size=PATCH_SIZE, merge_size=2, temporal_patch_size=2, size=size)
        processor_class = Qwen2_5_VLProcessor if arch == "qwen2_5_vl" else Qwen2VLProcessor
        return processor_class(
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


@torch.no_grad()
def check_text_logits(language_model, model, tokenizer, num_tokens: int = 16) -> float:
    """Relative difference of the grafted `model`'s text-only logits from the `language_model`'s on a probe of
    `num_tokens` ordinary token ids (spread over the source vocabulary, placeholders excluded); raises when it
    exceeds the rounding of the dtype (1e-5 in float32, 2e-2 otherwise).

    Raises:
        `RuntimeError`: the grafted language path does not reproduce the source LM (a layout this module does not
            know, e.g. a scaled embedding or a custom attention scale).
    """
    vocab = language_model.config.vocab_size
    skip = {tokenizer.convert_tokens_to_ids(token) for token in tokenizer.all_special_tokens}
    ids = [i for i in torch.linspace(0, vocab - 1, 4 * num_tokens).long().tolist() if i not in skip][:num_tokens]
    input_ids = torch.tensor([ids], device=next(model.parameters()).device)
    expected = language_model(input_ids=input_ids.to(language_model.device)).logits.float().cpu()
    actual = model(input_ids=input_ids).logits[..., :vocab].float().cpu()
    difference = ((expected - actual).norm() / expected.norm().clamp_min(1e-30)).item()
    tolerance = 1e-5 if next(model.parameters()).dtype == torch.float32 else 2e-2
    if not difference <= tolerance:
        raise RuntimeError(
            f"The grafted {type(model).__name__} does not reproduce {type(language_model).__name__}'s text logits "
            f"(relative difference {difference:.3g} > {tolerance:g}): this language model's layers are not "
            "represented exactly; graft it into llava or llava_next, which keep its own class."
        )
    return difference


@torch.no_grad()
def graft_vlm(
    language_model,
    tokenizer,
    arch: GraftArch,
    *,
    vision_seed: int = 0,
    dtype: torch.dtype | None = None,
    vision_spec: VisionSpec | None = None,
    reused_tokens: dict[str, str] | None = None,
    system_prompt: str | None = None,
    name: str | None = None,
    check_logits: bool = True,
):
    """A native Transformers VLM around any decoder language model (`...ForCausalLM`), with a small random vision
    tower and projector.

    Every weight of the LM is kept, biases included: LLaVA / LLaVA-NeXT hold the LM's own class; Qwen2.5-VL /
    Qwen2-VL hold it as their text model when its layout fits (`check_graftable`), with the LM's q/k/v biases (or
    zeros when it has none). Text-only inputs give the LM's logits (over its vocabulary; checked on a probe when
    `check_logits`).

    Args:
        language_model: e.g. a `LlamaForCausalLM` or `Qwen2ForCausalLM` (its weights are copied, not shared).
        tokenizer: its fast tokenizer.
        arch (`str`): one of `GRAFT_ARCHS`.
        vision_seed: seed of the random vision tower and projector (the global RNG state is left untouched).
        dtype: dtype of the returned model (default: the LM's).
        vision_spec: size of the vision tower and images (default: `VisionSpec()`).
        reused_tokens: placeholders taking over unused token ids (`build_vlm_tokenizer`); default: placeholders
            missing from the vocabulary are appended, and the embeddings grow by the mean row.
        system_prompt: default system message of the ChatML chat template (`None`: none).
        name: the model's `name_or_path`.
        check_logits: compare the text-only logits with the LM's on a probe (`check_text_logits`).

    Returns:
        `tuple`: `(model, processor)`, the model in eval mode.

    Raises:
        `InputError`: an architecture this module does not build, or an LM it cannot represent (`check_graftable`,
            or weights that have no place in the VLM).
        `RuntimeError`: the grafted text logits differ from the LM's.
    """
    from transformers import (
        LlavaForConditionalGeneration,
        LlavaNextForConditionalGeneration,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLForConditionalGeneration,
    )

    check_graftable(language_model.config, arch)
    source_dtype = next(language_model.parameters()).dtype
    vlm_tokenizer = build_vlm_tokenizer(tokenizer, arch, reused_tokens=reused_tokens, system_prompt=system_prompt)
    vision_spec = vision_spec or VisionSpec()
    config = _build_config(arch, language_model.config, vlm_tokenizer, vision_spec)
    model_class = {
        "llava": LlavaForConditionalGeneration,
        "llava_next": LlavaNextForConditionalGeneration,
        "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
        "qwen2_vl": Qwen2VLForConditionalGeneration,
    }[arch]
    with no_init_weights():  # the language model is overwritten below: skip its random initialisation
        model = model_class(config)
    state = _text_state(language_model)
    _grow_vocabulary(state, config.text_config.vocab_size)
    target = model.state_dict()
    # Qwen-VL text attention always has q/k/v biases: an LM without them gets zeros (the same function).
    for key, tensor in target.items():
        if (
            key not in state
            and key.startswith("model.language_model.")
            and key.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))
        ):
            state[key] = torch.zeros_like(tensor)
    unplaced = [key for key in state if key not in target]
    if unplaced:
        raise InputError(
            f"{arch} has no place for {len(unplaced)} weights of this {language_model.config.model_type} LM (e.g. "
            f"{unplaced[:4]}); grafting would drop them. Graft it into llava or llava_next, which keep its own class."
        )
    mismatched = [key for key in state if state[key].shape != target[key].shape]
    if mismatched:
        key = mismatched[0]
        raise InputError(
            f"{arch} cannot hold {key} of this LM: shape {tuple(state[key].shape)} vs {tuple(target[key].shape)}."
        )
    missing = [key for key in target if key.startswith("model.language_model.") and key not in state]
    if missing:
        raise InputError(f"This LM lacks weights the {arch} text model needs (e.g. {missing[:4]}).")
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    for key in state:  # as `from_pretrained` does: mark loaded tensors so that only the rest is initialised
        model.get_parameter_or_buffer(key)._is_hf_initialized = True
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(vision_seed)
        model.initialize_weights()  # the vision tower, the projector and non-persistent buffers
    model.generation_config = GenerationConfig(
        bos_token_id=language_model.config.bos_token_id,
        eos_token_id=language_model.config.eos_token_id,
        pad_token_id=vlm_tokenizer.pad_token_id,
    )
    model.config.name_or_path = name or f"{language_model.config.model_type}-{arch}-graft"
    model.to(source_dtype).eval()
    if check_logits:
        check_text_logits(language_model, model, vlm_tokenizer)
    model.to(dtype or source_dtype)
    processor = _build_processor(arch, vlm_tokenizer, vision_spec, chat_template(arch, system_prompt))
    return model, processor


def build_smollm2_vlm(
    arch: GraftArch,
    *,
    vision_seed: int = 0,
    dtype: torch.dtype = torch.float32,
    smollm2: tuple | None = None,
    vision_spec: VisionSpec | None = None,
):
    """A native Transformers VLM whose language model is SmolLM2-135M-Instruct, with a small random vision tower
    (`graft_vlm` with SmolLM2's reused placeholder ids and system prompt).

    Text-only inputs (`input_ids` without `pixel_values`) give exactly SmolLM2's logits (checked in the tests).

    Args:
        arch (`str`): `"llava"` (`LlavaForConditionalGeneration`), `"llava_next"`
            (`LlavaNextForConditionalGeneration`), `"qwen2_5_vl"` (`Qwen2_5_VLForConditionalGeneration`) or
            `"qwen2_vl"` (`Qwen2VLForConditionalGeneration`).
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
    from .assets import load_smollm2

    if arch not in GRAFT_ARCHS:
        raise ValueError(f"Unknown architecture {arch!r}; choose one of {GRAFT_ARCHS}.")
    source_model, source_tokenizer = smollm2 if smollm2 is not None else load_smollm2()
    return graft_vlm(
        source_model, source_tokenizer, arch, vision_seed=vision_seed, dtype=dtype, vision_spec=vision_spec,
        reused_tokens=REUSED_TOKENS, system_prompt=SMOLLM2_SYSTEM_PROMPT, name=f"smollm2-135m-{arch}",
    )  # fmt: skip


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
    "check_graftable",
    "check_text_logits",
    "graft_vlm",
    "mrope_section",
    "placeholder_tokens",
    "save_smollm2_vlm",
]
