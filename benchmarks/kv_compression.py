"""KV-cache compression of a converted MLA model at measured bytes per token: the latent in bf16 vs int8 / fp8 / int4.

For every latent format (``--kv-cache``) of the MLA model, and for the original model it was converted from:

* cache bytes per token and decoder layer, measured from the tensors of a cache filled by a forward pass (scales,
  zero points, padding and the compute-dtype rope keys counted), and the ratio to the original model's GQA cache;
* VQA accuracy per question type on the procedural scenes, text perplexity and next-token KL to the original on
  the built-in text conversations (``hf_mla_vlm.evaluation``'s functions with ``kv_cache=...``: the latent is
  quantized at prefill too).

Not measured yet (issue 16): Transformers' quantized caches (quanto / HQQ) and token pruning (kvpress) on the
original model at the same byte budgets.

Run on a real pair (GPU recommended), or ``--tiny`` for a tiny random pair built offline (a smoke run: its numbers
are meaningless)::

    PYTHONPATH=src python benchmarks/kv_compression.py --model ./llava-mla --reference ./llava \\
        --text-file wikipedia --out-dir benchmarks/results
    PYTHONPATH=src python benchmarks/kv_compression.py --tiny --out-dir /tmp/kv --vqa-samples 8
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

import torch

from hf_mla_vlm.cache_size import cache_nbytes
from hf_mla_vlm.compat import CACHE_ARG, output_cache
from hf_mla_vlm.evaluation import (
    builtin_text_batches,
    load_model_and_processor,
    load_texts,
    next_token_fidelity,
    perplexity,
    vqa_accuracy,
    vqa_image_size,
)
from hf_mla_vlm.evaluation.kv_cache import KV_CACHE_DTYPES, forward_cache_kwargs, latent_dtype
from hf_mla_vlm.utils import environment
from hf_mla_vlm.zoo.vqa_data import generate_split


def measured_bytes_per_token(model, kv_cache: str | None, seq_len: int = 16) -> float:
    """Bytes per token and layer held by the cache after a forward pass over `seq_len` text tokens."""
    ids = torch.full((1, seq_len), 5, dtype=torch.long, device=next(model.parameters()).device)
    quantized = latent_dtype(model, kv_cache) is not None
    kwargs = forward_cache_kwargs(model, kv_cache) if quantized else {"use_cache": True}
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    cache = kwargs.get(CACHE_ARG) or output_cache(out)
    return cache_nbytes(cache) / (seq_len * len(cache.layers))


def run(args: argparse.Namespace) -> dict:
    """Load both models once; measure the original, then the MLA model with each latent format."""
    reference, ref_processor = load_model_and_processor(args.reference, dtype=args.dtype)
    model, processor = load_model_and_processor(args.model, dtype=args.dtype)
    image_size = args.image_size or vqa_image_size(processor)
    samples = generate_split("test", args.vqa_samples, seed=0, image_size=image_size)
    texts, text_label = load_texts(args.text_file) if args.text_file else (None, None)
    batches = builtin_text_batches(processor)
    ppl_kwargs = dict(seq_len=args.seq_len, max_sequences=args.max_sequences, progress=args.progress)

    def measure(candidate, candidate_processor, kv_cache: str | None) -> dict:
        vqa = vqa_accuracy(candidate, candidate_processor, samples, progress=args.progress, kv_cache=kv_cache)
        ppl = None if texts is None else perplexity(candidate, candidate_processor, texts, **ppl_kwargs,
                                                     kv_cache=kv_cache)["ppl"]  # fmt: skip
        kl = 0.0 if candidate is reference else next_token_fidelity(reference, candidate, batches, kv_cache=kv_cache)
        return {"vqa": vqa["accuracy"], "vqa_per_type": vqa["per_type"], "ppl": ppl,
                "kl": kl if isinstance(kl, float) else kl["kl"]}  # fmt: skip

    original_bytes = measured_bytes_per_token(reference, None)
    rows = [{"model": "original", "kv_cache": "bf16", "bytes_per_token": original_bytes, "ratio_to_original": 1.0,
             **measure(reference, ref_processor, None)}]  # fmt: skip
    print(json.dumps(rows[-1]), flush=True)
    for kv_cache in args.kv_cache:
        per_token = measured_bytes_per_token(model, kv_cache)
        row = {"model": "mla", "kv_cache": kv_cache, "bytes_per_token": per_token}
        rows.append({**row, "ratio_to_original": per_token / original_bytes, **measure(model, processor, kv_cache)})
        print(json.dumps(rows[-1]), flush=True)
    return {
        "meta": {
            "model": str(args.model), "reference": str(args.reference), "dtype": args.dtype, "text": text_label,
            "vqa_samples": len(samples), "image_size": image_size, "tiny": args.tiny,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "PYTHONPATH=src python " + " ".join(sys.argv), "environment": environment(),
        },
        "rows": rows,
    }  # fmt: skip


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def results_markdown(data: dict) -> str:
    meta, rows = data["meta"], data["rows"]
    types = sorted({t for row in rows for t in row["vqa_per_type"]})
    head = "| model | KV | bytes / token / layer | / original | VQA | " + " | ".join(types) + " | ppl | KL |\n"
    head += "|---" * (7 + len(types)) + "|\n"
    lines = [
        f"| {row['model']} | {row['kv_cache']} | {row['bytes_per_token']:.0f} | {row['ratio_to_original']:.3f} | "
        f"{row['vqa']:.3f} | "
        + " | ".join(_fmt(row["vqa_per_type"].get(t), ".3f") for t in types)
        + f" | {_fmt(row['ppl'], '.3f')} | {row['kl']:.2e} |"
        for row in rows
    ]
    warning = "\n**Tiny random models: a smoke run, the numbers are meaningless.**\n" if meta["tiny"] else ""
    return (
        f"# KV-cache compression: {meta['model']} (original {meta['reference']})\n{warning}\n"
        f"{meta['date']}, dtype {meta['dtype']}, {meta['vqa_samples']} VQA samples (test split, scenes of "
        f"{meta['image_size']} px), perplexity on {meta['text']}. Regenerate: `{meta['command']}`\n\n"
        "Bytes per token and layer are measured from a filled cache (scales, zero points, padding and the rope keys "
        "in the compute dtype counted). KL: next-token KL to the original on the built-in text conversations. The "
        "latent is quantized at prefill too.\n\n" + head + "\n".join(lines) + "\n"
    )


def _tiny_pair(workdir: Path) -> tuple[Path, Path, Path]:
    from hf_mla_vlm.conversion_scripts.convert import convert
    from hf_mla_vlm.tiny_models import WORDS, save_tiny_vlm

    native = save_tiny_vlm("llava_next", workdir / "native")
    mla = convert(native, workdir / "mla", rope_dim=8, kv_rank=16, progress=False).output_dir
    generator = torch.Generator().manual_seed(0)
    words = [WORDS[i] for i in torch.randint(2, len(WORDS), (2000,), generator=generator).tolist()]
    text = workdir / "text.txt"
    text.write_text(" ".join(words))
    return native, mla, text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="the converted MLA checkpoint")
    p.add_argument("--reference", help="the original checkpoint it was converted from")
    p.add_argument("--tiny", action="store_true", help="build a tiny random pair instead (offline smoke run)")
    p.add_argument("--kv-cache", default=",".join(KV_CACHE_DTYPES), help="latent formats, comma-separated")
    p.add_argument("--text-file", default=None, help="perplexity text (a file, 'wikipedia', 'wikipedia:SPLIT')")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-sequences", type=int, default=8)
    p.add_argument("--vqa-samples", type=int, default=500)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out-dir", default=None, help="write kv_compression[_<tag>].json/.md here")
    p.add_argument("--tag", default=None)
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    args.kv_cache = [kv.strip() for kv in args.kv_cache.split(",") if kv.strip()]
    unknown = [kv for kv in args.kv_cache if kv not in KV_CACHE_DTYPES]
    if unknown:
        p.error(f"--kv-cache: unknown formats {unknown}; choose from {','.join(KV_CACHE_DTYPES)}")
    if not args.tiny and not (args.model and args.reference):
        p.error("pass --model and --reference, or --tiny")
    with tempfile.TemporaryDirectory() as workdir:
        if args.tiny:
            args.reference, args.model, text = _tiny_pair(Path(workdir))
            args.text_file = args.text_file or str(text)
            args.image_size = args.image_size or 32
        data = run(args)
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = "kv_compression" + (f"_{args.tag}" if args.tag else "")
        (out / f"{stem}.json").write_text(json.dumps(data, indent=2, default=str))
        (out / f"{stem}.md").write_text(results_markdown(data))
        print(f"wrote {out / stem}.json and .md")


if __name__ == "__main__":
    main()
