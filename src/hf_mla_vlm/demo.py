# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""The README's main command: build a tiny VLM offline, convert it, and measure what changed."""

from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

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
            "original": cache_nbytes(ref_out.past_key_values) / inputs["input_ids"].numel(),
            "converted": cache_nbytes(out.past_key_values) / inputs["input_ids"].numel(),
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


__all__ = ["compare_models", "run_demo"]
