"""Padding in the recovery benchmark's training steps: the tokens a step computes (rows x the longest row of each
micro-batch) against the tokens it holds, per zoo model, for Trainer's default random batches and for
`train_sampling_strategy="batch_rebalance"` (each step's samples split by length into k micro-batches).

The steps are those of `recovery_quality.py`: `--train-batch` samples per step, text windows of `--text-seq-len`
tokens and zoo VQA train conversations in the proportions `--mix`, shuffled together; the lengths are those
`ChatCollator` gives with each zoo model's own processor (`hf_mla_vlm.training.data.item_length`). The samplers are
the Trainer's own (torch's `RandomSampler` in batches, Transformers' `BatchRebalanceSampler`), fed only the lengths,
so this runs on a CPU and measures work, not time: how many token positions every layer processes per step.

    python benchmarks/recovery_padding.py --out benchmarks/results/recovery_padding.json
"""

import argparse
import math
import statistics
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch
from results_io import write_results
from torch.utils.data import BatchSampler, RandomSampler
from transformers import AutoProcessor
from transformers.trainer_pt_utils import BatchRebalanceSampler

from hf_mla_vlm.training.data import TextWindow
from hf_mla_vlm.training.distill import mixed_training_items
from hf_mla_vlm.training.sources import ConversationDataset
from hf_mla_vlm.utils import environment
from hf_mla_vlm.zoo import generate_split
from hf_mla_vlm.zoo.models import save_zoo_model, zoo_spec


MODELS = ("llava", "llava_next", "qwen2_5_vl")


def step_work(batches: list[list[int]], lengths: list[int]) -> int:
    """Token positions computed by micro-batches `batches` (index lists) padded to their longest row."""
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


def measure(name: str, args, workdir: Path) -> dict:
    processor = AutoProcessor.from_pretrained(save_zoo_model(name, workdir / name))
    total = args.steps * args.train_batch
    share = args.mix[0] / sum(args.mix)
    n_text = math.ceil(share * total)
    conversations = generate_split("train", total - n_text, seed=args.seed, image_size=zoo_spec(name).render_size)
    sources = {
        "wikipedia": [TextWindow(tuple(range(args.text_seq_len)))] * n_text,  # only the length matters
        "zoo-vqa": [s.to_conversation() for s in conversations],
    }
    items = mixed_training_items(sources, args.mix, total, seed=args.seed)
    lengths = ConversationDataset(items).lengths(processor, num_workers=args.workers)
    held = sum(lengths)
    order = RandomSampler(range(total), generator=torch.Generator().manual_seed(args.seed))
    random = list(BatchSampler(order, args.train_batch, drop_last=False))
    rows = [{"sampler": "random", "micro_batches": 1, "computed": step_work(random, lengths)}]
    for k in args.micro_batches:
        sampler = BatchRebalanceSampler(lengths, effective_batch_size=args.train_batch, dp_size=1, grad_accum=k,
                                        seed=args.seed)  # fmt: skip
        rows.append({"sampler": "batch_rebalance", "micro_batches": k, "computed": step_work(list(sampler), lengths)})
    for row in rows:
        row["computed_per_step"] = row["computed"] / args.steps
        row["padding_fraction"] = 1 - held / row["computed"]
        row["work_vs_random"] = row["computed"] / rows[0]["computed"]
    conv_lengths = [n for item, n in zip(items, lengths) if not isinstance(item, TextWindow)]
    return {
        "model": name,
        "held_per_step": held / args.steps,
        "conversation_tokens": {
            "mean": statistics.fmean(conv_lengths),
            "max": max(conv_lengths),
            "min": min(conv_lengths),
        },  # fmt: skip
        "rows": rows,
    }


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        "# Padding in the recovery training steps",
        "",
        f"Measured {result['date']} on {result['device']} (CPU: token counts, not time; "
        f"transformers {result['environment'].get('transformers')}). Regenerate: `{result['command']}`.",
        "",
        f"{s['steps']} steps of {s['train_batch']} samples, text windows of {s['text_seq_len']} tokens : zoo VQA "
        f"train conversations = {s['mix'][0]:g} : {s['mix'][1]:g} (the steps of `recovery_quality.py`). "
        "*computed*: token positions per step, every micro-batch padded to its longest row; *held*: the real tokens.",
        "",
        "| model | conversation tokens (mean / max) | held / step | sampler | micro-batches | computed / step | "
        "padding | work vs random |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in result["models"]:
        c = m["conversation_tokens"]
        for r in m["rows"]:
            lines.append(
                f"| {m['model']} | {c['mean']:.0f} / {c['max']} | {m['held_per_step']:.0f} | {r['sampler']} | "
                f"{r['micro_batches']} | {r['computed_per_step']:.0f} | {100 * r['padding_fraction']:.1f}% | "
                f"{r['work_vs_random']:.2f}x |"
            )
    lines += ["", "GPU time is not measured here: fewer, smaller micro-batches trade padding for kernel launches."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--train-batch", type=int, default=32)
    p.add_argument("--mix", nargs=2, type=float, default=[1.0, 3.0])
    p.add_argument("--text-seq-len", type=int, default=512)
    p.add_argument("--micro-batches", nargs="+", type=int, default=[2, 4])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="/tmp/recovery_padding.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        models = [measure(name, args, Path(tmp)) for name in args.models]
    result = {
        "benchmark": "recovery_padding",
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "workers")},
        "device": "cpu",
        "environment": environment(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/recovery_padding.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "models": models,
    }
    write_results(result, args.out, markdown)
    return Path(args.out)


if __name__ == "__main__":
    main()
