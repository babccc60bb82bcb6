"""Zoo quality tables: VQA accuracy and Wikipedia perplexity of the zoo models, original and converted to MLA
without any training, over kv_rank x rope_dim x rotary strategy x low-rank initialisation.

For each zoo model (`hf_mla_vlm.zoo`: SmolLM2-135M-Instruct with a trained vision tower), calibration statistics
are collected once on the source model (zoo VQA conversations of the *train* split and Wikipedia paragraphs of the
calibration split); every setting is then converted in memory from the same statistics and scored on the VQA
*test* split (greedy generation, exact match per question type, `hf_mla_vlm.evaluation.vqa`) and the Wikipedia
test split (perplexity). For Qwen2.5-VL it also records the M-RoPE axis split of the kept pairs and, for the
calibrated strategies, the accuracy with a per-axis minimum of kept pairs.

Regenerate (GPU; one process per model, then merge):

    python benchmarks/zoo_quality.py run --model llava --out /tmp/zq      # likewise llava_next, qwen2_5_vl
    python benchmarks/zoo_quality.py merge /tmp/zq/*.json --out benchmarks/results/zoo_quality.json
"""

import argparse
import itertools
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from results_io import write_results

import hf_mla_vlm  # noqa: F401
from hf_mla_vlm.assets import wikipedia_split
from hf_mla_vlm.cache_size import kv_cache_size
from hf_mla_vlm.conversations import encode_conversations
from hf_mla_vlm.conversion_scripts.convert import build_mla_config, convert_model
from hf_mla_vlm.conversion_scripts.rope_selection import count_pairs_per_axis, select_rope_pairs
from hf_mla_vlm.conversion_scripts.statistics import collect_statistics
from hf_mla_vlm.evaluation.perplexity import perplexity
from hf_mla_vlm.evaluation.vqa import vqa_accuracy
from hf_mla_vlm.registry import arch_spec
from hf_mla_vlm.utils import environment
from hf_mla_vlm.zoo import generate_split
from hf_mla_vlm.zoo.models import build_zoo_model, calibration_conversations, zoo_spec


STRATEGIES = ("high", "uniform", "2-norm", "mkl")
SVDS = ("weight", "joint-act", "md")
ROPE_DIMS = (16, 32)
KV_RANKS = (8, 16, 32)
AXIS_MINIMUM = {"t": 0, "h": 2, "w": 2}


def eval_settings(args) -> dict:
    """The evaluation `score` runs with `args`: VQA on the test split, perplexity on Wikipedia's test split."""
    return {"vqa_split": "test", "vqa_samples": args.num_samples, "seed": args.seed, "wikipedia_split": "test",
            "seq_len": args.seq_len, "max_sequences": args.max_sequences}  # fmt: skip


def score(model, processor, samples, texts, args) -> dict:
    vqa = vqa_accuracy(model, processor, samples, batch_size=args.batch_size, progress=False)
    ppl = perplexity(model, processor.tokenizer, texts, seq_len=args.seq_len, max_sequences=args.max_sequences)
    return {"accuracy": vqa["accuracy"], "per_type": vqa["per_type"], "ppl": ppl["ppl"]}


def run(args) -> dict:
    torch.manual_seed(args.seed)
    spec = zoo_spec(args.model)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    source, processor = build_zoo_model(args.model)
    arch = arch_spec(source.config.model_type)
    samples = generate_split("test", args.num_samples, seed=args.seed, image_size=spec.render_size)
    texts = wikipedia_split("test")

    t = time.perf_counter()
    original = score(source.to(device), processor, samples, texts, args)
    source.to("cpu")
    print(f"[{args.model}] original {original} ({time.perf_counter() - t:.1f}s)", flush=True)

    t = time.perf_counter()
    defaults = build_mla_config(source.config, arch)
    encoded = list(encode_conversations(processor, calibration_conversations(args.model, args.calibration, args.seed)))
    stats = collect_statistics(source, encoded, defaults.image_token_ids, device=device, progress=False)
    source.to("cpu")
    calibration = {
        "samples": args.calibration,
        "tokens": {"text": stats.token_counts.text, "image": stats.token_counts.image},
        "seconds": round(time.perf_counter() - t, 1),
    }
    print(f"[{args.model}] statistics {calibration}", flush=True)

    section = (getattr(source.config.text_config, "rope_parameters", None) or {}).get("mrope_section")
    settings = [(r, k, s, v, None) for r, k, s, v in itertools.product(ROPE_DIMS, KV_RANKS, STRATEGIES, SVDS)]
    if section:  # Qwen2.5-VL: calibrated strategies with the per-axis minimum, MD-SVD
        settings += [
            (r, k, s, "md", AXIS_MINIMUM) for r, k, s in itertools.product(ROPE_DIMS, KV_RANKS, ("2-norm", "mkl"))
        ]
    rows = []
    header = {"model": args.model, "spec": spec.to_dict(), "original": original, "calibration": calibration}
    for rope_dim, kv_rank, strategy, svd, minimum in settings[: args.limit]:
        t = time.perf_counter()
        pairs, _, _ = select_rope_pairs(source.config, rope_dim, strategy, stats=stats, rope_min_per_axis=minimum)
        config = build_mla_config(source.config, arch, rope_dim=rope_dim, kv_rank=kv_rank, rope_pairs=pairs)
        model, _ = convert_model(source, config, arch, svd=svd, stats=stats, progress=False)
        result = score(model.to(device), processor, samples, texts, args)
        kv = kv_cache_size(config)
        row = {
            "model": args.model,
            "rope_dim": rope_dim,
            "kv_rank": kv_rank,
            "rope_strategy": strategy,
            "svd": svd,
            "axis_minimum": minimum,
            "kv_bytes_per_token": kv.bytes_per_token("converted"),
            "kv_bytes_per_token_original": kv.bytes_per_token("original"),
            "kv_bytes_vs_original": round(kv.converted / kv.original, 4),
            **result,
        }
        if section:
            row["mrope_axis_pairs"] = count_pairs_per_axis(pairs, list(section))
        rows.append(row)
        print(f"  {row} ({time.perf_counter() - t:.1f}s)", flush=True)
        if args.partial:  # rows so far, in case the run is cut short
            Path(args.partial).write_text(json.dumps({**header, "rows": rows, "complete": False}, indent=2) + "\n")
        del model
    return {
        **header,
        "complete": True,
        "eval": eval_settings(args),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "environment": environment(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "rows": rows,
    }


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def markdown(result: dict) -> str:
    lines = [
        "# Zoo quality: conversion to MLA without training",
        "",
        result["description"],
        "",
        f"Regenerate: `{result['regenerate']}`.",
        "",
        "## 1. Original models",
        "",
        "| model | device | date | VQA acc. | color | shape | count | position | relation | Wikipedia ppl |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in result["models"]:
        o, p = m["original"], m["original"]["per_type"]
        cells = [_pct(p.get(q, float("nan"))) for q in ("color", "shape", "count", "position", "relation")]
        lines.append(f"| {m['model']} | {m['device']} | {m['date'][:10]} | {_pct(o['accuracy'])} | "
                     + " | ".join(cells) + f" | {o['ppl']:.2f} |")  # fmt: skip
    lines += [
        "",
        "## 2. Converted without training",
        "",
        "VQA exact-match accuracy (%) / Wikipedia perplexity per low-rank initialisation. KV = bytes per token of the "
        "MLA cache (latent + rope keys + modality flag) against the original GQA cache.",
        "",
    ]
    for m in result["models"]:
        header = "| rope_dim | kv_rank | KV | strategy | weight | joint-act | md | position (md) |"
        lines += [f"### {m['model']}", "", header, "|---|---|---|---|---|---|---|---|"]
        table: dict = {}
        for row in m["rows"]:
            if row["axis_minimum"]:
                continue
            key = (row["rope_dim"], row["kv_rank"], f"{row['kv_bytes_vs_original']:.3f}", row["rope_strategy"])
            table.setdefault(key, {})[row["svd"]] = row
        for key, cells in table.items():
            values = [f"{_pct(cells[s]['accuracy'])} / {cells[s]['ppl']:.1f}" if s in cells else "-" for s in SVDS]
            position = _pct(cells["md"]["per_type"].get("position", float("nan"))) if "md" in cells else "-"
            lines.append("| " + " | ".join(str(k) for k in key) + " | " + " | ".join(values) + f" | {position} |")
        lines.append("")
    qwen = [m for m in result["models"] if any("mrope_axis_pairs" in r for r in m["rows"])]
    for m in qwen:
        lines += [
            f"## 3. {m['model']}: M-RoPE axis split of the kept pairs (all layers and kv heads), md init",
            "",
            "| rope_dim | kv_rank | strategy | axis minimum | pairs t/h/w | VQA acc. | position acc. |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in m["rows"]:
            if row["svd"] != "md":
                continue
            axes = row["mrope_axis_pairs"]
            minimum = ",".join(f"{k}={v}" for k, v in row["axis_minimum"].items()) if row["axis_minimum"] else "-"
            lines.append(
                f"| {row['rope_dim']} | {row['kv_rank']} | {row['rope_strategy']} | {minimum} | "
                f"{axes.get('t', 0)}/{axes.get('h', 0)}/{axes.get('w', 0)} | {_pct(row['accuracy'])} | "
                f"{_pct(row['per_type'].get('position', float('nan')))} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


RUN_FIELDS = ("eval", "device", "environment", "date")


def merge(args) -> None:
    models = [json.loads(Path(p).read_text()) for p in args.parts]
    models.sort(key=lambda m: ["llava", "llava_next", "qwen2_5_vl"].index(m["model"]))
    complete = [m for m in models if m.get("complete")]
    for m in models:
        if m.get("complete"):
            continue
        # A `--partial` file holds every row written so far but not the run's metadata: take it from a complete
        # part of the same run, and say so.
        expected = len(ROPE_DIMS) * len(KV_RANKS) * len(STRATEGIES) * len(SVDS)
        if len(m["rows"]) < expected or not complete:
            raise ValueError(f"{m['model']}: incomplete part ({len(m['rows'])} of {expected} rows).")
        m.update({key: complete[0][key] for key in RUN_FIELDS})
        m["complete"] = True
        m["metadata_from"] = f"{complete[0]['model']} part of the same run (this part is its --partial file)"
    result = {
        "benchmark": "zoo_quality",
        "description": __doc__.split("\n\n")[0].replace("\n", " "),
        "regenerate": "for M in llava llava_next qwen2_5_vl; do python benchmarks/zoo_quality.py run --model $M "
        "--out DIR; done; python benchmarks/zoo_quality.py merge DIR/*.json",
        "models": models,
    }
    write_results(result, args.out, markdown)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)
    run_parser = verbs.add_parser("run")
    run_parser.add_argument("--model", required=True, choices=["llava", "llava_next", "qwen2_5_vl"])
    run_parser.add_argument("--out", required=True, help="folder for <model>.json")
    run_parser.add_argument("--num-samples", type=int, default=300, help="VQA test samples")
    run_parser.add_argument("--calibration", type=int, default=64, help="calibration conversations")
    run_parser.add_argument("--batch-size", type=int, default=100)
    run_parser.add_argument("--seq-len", type=int, default=512)
    run_parser.add_argument("--max-sequences", type=int, default=8)
    run_parser.add_argument("--device", default=None)
    run_parser.add_argument("--seed", type=int, default=0)
    run_parser.add_argument("--limit", type=int, default=None, help="only the first N settings (smoke test)")
    run_parser.add_argument("--partial", default=None, help="rewrite this JSON file after every setting")
    merge_parser = verbs.add_parser("merge")
    merge_parser.add_argument("parts", nargs="+")
    merge_parser.add_argument("--out", default="benchmarks/results/zoo_quality.json")
    args = parser.parse_args()
    if args.verb == "merge":
        merge(args)
        return
    result = run(args)
    out = Path(args.out) / f"{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
