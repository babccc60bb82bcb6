# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""VQA accuracy on the procedural scenes of `hf_mla_vlm.zoo.vqa_data`: batched greedy generation, first-word match.

`vqa_accuracy(model, processor, samples)` works for any image-text-to-text model with `generate` (native LLaVA,
LLaVA-NeXT and Qwen2.5-VL, and their MLA conversions); `vqa_image_size(processor)` gives the size at which to render
the scenes for a processor (`generate_split(..., image_size=vqa_image_size(processor))`).
"""

import math
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from ..utils import as_tokenizer, to_device
from ..zoo.vqa_data import INSTRUCTION, VQASample, per_type_accuracy, score_answer
from .kv_cache import generate_cache_kwargs
from .perplexity import model_device


logger = logging.get_logger(__name__)


def _size_value(size, key: str) -> int | None:
    """`size[key]` for a dict or a `SizeDict` (attribute access), `None` when absent or unset."""
    if size is None:
        return None
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return None if value is None else int(value)


def vqa_image_size(processor) -> int:
    """The side length at which to render the VQA scenes (square) for `processor`'s model.

    The scenes are drawn at the resolution the image processor feeds to the vision tower, so the processor does
    not resample them: no interpolation blur on the shape edges and colours, and the grid cells line up with the
    patch grid the same way for every model. The measured accuracy is then about the model (and its conversion),
    not about resizing artefacts.

    - LLaVA: the height of the image processor's `crop_size` (e.g. 336 for LLaVA-1.5). A warning is logged when
      the resize target (`size["shortest_edge"]`) differs from it: the processor then resizes and crops anyway.
    - LLaVA-NeXT: the largest square that fits one of the `image_grid_pinpoints` (the largest shorter side of a
      pinpoint). A square image of that size is matched to a pinpoint without rescaling; the largest *side* of the
      pinpoints (e.g. 1008 for `[336, 1008]`) would be downscaled to the best square pinpoint (672) instead. When
      the pinpoints hold a square of the largest side (the tiny and grafted test models), both agree. The
      low-resolution base view is always resized to `crop_size` by the processor; that cannot be avoided.
    - Qwen2.5-VL (and Qwen2-VL): the largest square within `size["longest_edge"]` pixels (`max_pixels`),
      `isqrt(max_pixels)` rounded down to a multiple of `patch_size * merge_size`, so that `smart_resize` leaves it
      unchanged. Note that the released checkpoints allow 12845056 pixels (3584 x 3584, 16384 image tokens): pass a
      smaller `image_size` explicitly for those.

    Args:
        processor: the model's processor (`LlavaProcessor`, `LlavaNextProcessor`, `LlavaOnevisionProcessor`,
            `Qwen2_5_VLProcessor` or `Qwen2VLProcessor`).

    Returns:
        `int`: the side length in pixels.

    Raises:
        `ValueError`: for another kind of processor (e.g. a tokenizer), or one without the needed settings.
    """
    from transformers import (
        LlavaNextProcessor,
        LlavaOnevisionProcessor,
        LlavaProcessor,
        Qwen2_5_VLProcessor,
        Qwen2VLProcessor,
    )

    image_processor = getattr(processor, "image_processor", None)
    if isinstance(processor, (LlavaNextProcessor, LlavaOnevisionProcessor)):
        pinpoints = getattr(image_processor, "image_grid_pinpoints", None)
        if not pinpoints:
            raise ValueError(f"{type(image_processor).__name__} has no image_grid_pinpoints.")
        return max(min(int(height), int(width)) for height, width in pinpoints)
    if isinstance(processor, LlavaProcessor):
        crop = _size_value(getattr(image_processor, "crop_size", None), "height")
        if crop is None:
            raise ValueError(f"{type(image_processor).__name__} has no crop_size['height'].")
        resize = _size_value(getattr(image_processor, "size", None), "shortest_edge")
        if resize is not None and resize != crop:
            logger.warning(
                f"The image processor resizes to shortest edge {resize} and crops to {crop}: scenes rendered at "
                f"{crop} are resampled (and cropped when the resize target is larger)."
            )
        return crop
    if isinstance(processor, (Qwen2_5_VLProcessor, Qwen2VLProcessor)):
        size = getattr(image_processor, "size", None)
        max_pixels = _size_value(size, "longest_edge") or getattr(image_processor, "max_pixels", None)
        patch = getattr(image_processor, "patch_size", None)
        merge = getattr(image_processor, "merge_size", None)
        if not (max_pixels and patch and merge):
            raise ValueError(
                f"{type(image_processor).__name__} lacks size['longest_edge'] (max pixels), patch_size or merge_size."
            )
        unit = int(patch) * int(merge)
        side = math.isqrt(int(max_pixels)) // unit * unit
        if side == 0:
            raise ValueError(f"max_pixels={max_pixels} is smaller than one {unit}x{unit} merged patch.")
        return side
    raise ValueError(
        f"Cannot choose a VQA image size for a {type(processor).__name__}: expected a LLaVA, LLaVA-NeXT or "
        "Qwen2.5-VL processor. Pass image_size (--image-size) explicitly, or evaluate a vision-language checkpoint."
    )


@torch.no_grad()
def vqa_accuracy(
    model: torch.nn.Module,
    processor,
    samples: Sequence[VQASample],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 6,
    instruction: str | None = INSTRUCTION,
    return_predictions: bool = False,
    progress: bool = True,
    kv_cache: str | None = None,
) -> dict:
    """Accuracy of `model` on VQA samples: batched greedy generation, first word of the answer vs the label.

    Each sample becomes the user turn of `sample.messages(with_answer=False)` (image, question, `instruction`)
    through the processor's chat template with the generation prompt. Batches are padded on the left
    (`padding_side="left"`), LLaVA-NeXT's varying patch counts are padded by the processor; the batch is moved to
    the model's device. The new tokens are decoded with `skip_special_tokens=True` and scored with
    `vqa_data.score_answer` (first word, case and punctuation insensitive, digits as number words).

    Args:
        model (`torch.nn.Module`): an image-text-to-text model with `generate` (native or MLA).
        processor: its processor (chat template, image processing, tokenizer).
        samples (`Sequence[VQASample]`): e.g. `generate_split("test", 500, image_size=vqa_image_size(processor))`.
        batch_size (`int`, *optional*, defaults to 32): samples per `generate` call.
        max_new_tokens (`int`, *optional*, defaults to 6): generation length (answers are single words).
        instruction (`str`, *optional*): appended to the question (defaults to "Answer with a single word.").
        return_predictions (`bool`, *optional*, defaults to `False`): also return the per-sample predictions.
        progress (`bool`, *optional*, defaults to `True`): show a progress bar.
        kv_cache (`str`, *optional*): `"int8"`, `"fp8"` or `"int4"` generates with a quantized latent cache (MLA
            models, `evaluation.kv_cache`); None / `"bf16"` with the default cache.

    Returns:
        `dict`: `accuracy` (over all samples), `per_type` (`{qtype: accuracy}`), `counts` (`{qtype: samples}`),
        `num_samples`, and with `return_predictions` also `predictions`: one `{"question", "qtype", "answer",
        "prediction", "correct"}` per sample, in order. Question types are listed in `QTYPES` order; types without
        samples are left out. Accuracy of zero samples is `nan`.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"Need batch_size >= 1 and max_new_tokens >= 1, got {batch_size} and {max_new_tokens}.")
    tokenizer = as_tokenizer(processor)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = model_device(model)
    predictions: list[dict] = []
    starts = range(0, len(samples), batch_size)
    for start in tqdm(starts, desc="VQA", disable=not progress, leave=False):
        chunk = samples[start : start + batch_size]
        texts = [
            processor.apply_chat_template(
                sample.messages(with_answer=False, instruction=instruction), tokenize=False, add_generation_prompt=True
            )
            for sample in chunk
        ]
        images = [sample.image for sample in chunk]
        batch = processor(text=texts, images=images, return_tensors="pt", padding=True, padding_side="left")
        batch = to_device(batch, device)
        output = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            **generate_cache_kwargs(model, kv_cache),
        )
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        for sample, text in zip(chunk, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
            predictions.append(
                {
                    "question": sample.question,
                    "qtype": sample.qtype,
                    "answer": sample.answer,
                    "prediction": text.strip(),
                    "correct": score_answer(text, sample.answer),
                }
            )
    result = {
        **per_type_accuracy(samples, [p["correct"] for p in predictions]),
        "num_samples": len(predictions),
    }
    if return_predictions:
        result["predictions"] = predictions
    return result


__all__ = ["vqa_accuracy", "vqa_image_size"]
