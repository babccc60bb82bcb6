"""The zoo originals themselves: VQA per question type (real generation) and what they kept of SmolLM2's language.

For each zoo model rebuilt from a weights file (`hf_mla_vlm.zoo.build_zoo_model`: vision side and, where the file
holds one, the language model's low-rank delta merged in), this measures on the VQA *test* split the exact-match
accuracy per question type (`hf_mla_vlm.evaluation.vqa`) and, on the Wikipedia *test* split, the perplexity of the
zoo model next to that of SmolLM2-135M-Instruct itself on the same windows, and the mean per-token
KL(SmolLM2 || zoo model). Issue 13 asks of every zoo original: VQA >= 85% overall, >= 70% on position and on
relation questions, perplexity within 2% of SmolLM2's.

Regenerate (GPU):

    python benchmarks/zoo_originals.py --out benchmarks/results/zoo_originals.json   # the package's weights
    python benchmarks/zoo_originals.py --weights-dir DIR --out /tmp/zo.json   # DIR/<model>.safetensors
"""

import argparse
import copy
import hashlib
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from results_io import write_results
from zoo_quality import eval_settings

import hf_mla_vlm  # noqa: F401
from hf_mla_vlm.assets import load_smollm2, wikipedia_split
from hf_mla_vlm.evaluation.perplexity import perplexity, token_stream
from hf_mla_vlm.evaluation.vqa import vqa_accuracy
from hf_mla_vlm.training.distill import distillation_kl
from hf_mla_vlm.utils import environment
from hf_mla_vlm.zoo import generate_split
from hf_mla_vlm.zoo.models import ZOO, build_zoo_model, weights_path, zoo_spec


TARGETS = {"accuracy": 0.85, "position": 0.70, "relation": 0.70, "ppl_ratio": 1.02}


@torch.no_grad()
def text_kl(model, reference, tokenizer, texts, seq_len: int, max_sequences: int, device) -> float:
    """Mean per-token KL(reference || model) of the next-token distributions over the perplexity windows."""
    ids = token_stream(tokenizer, texts, max_tokens=seq_len * max_sequences)
    windows = torch.tensor(ids[: len(ids) // seq_len * seq_len], device=device).view(-1, seq_len)
    total = 0.0
    for row in windows:
        row = row[None]
        mask = torch.ones(row.shape, dtype=torch.bool, device=device)
        total += distillation_kl(model(input_ids=row).logits, reference(input_ids=row).logits, mask).item()
    return total / windows.numel()


def training_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return json.loads((handle.metadata() or {}).get("training", "{}"))


def run(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    smollm2 = load_smollm2()
    reference = copy.deepcopy(smollm2[0]).to(device).eval()  # the zoo models are built from the CPU copy
    texts = wikipedia_split("test")
    base = perplexity(reference, smollm2[1], texts, seq_len=args.seq_len, max_sequences=args.max_sequences)["ppl"]
    print(f"SmolLM2 ppl {base:.3f}", flush=True)
    rows = []
    for name in args.models:
        t = time.perf_counter()
        path = Path(args.weights_dir) / f"{name}.safetensors" if args.weights_dir else weights_path(name)
        model, processor = build_zoo_model(name, weights=path, smollm2=smollm2)
        model.to(device)
        samples = generate_split("test", args.num_samples, seed=args.seed, image_size=zoo_spec(name).render_size)
        vqa = vqa_accuracy(model, processor, samples, batch_size=args.batch_size, progress=False)
        ppl = perplexity(model, processor.tokenizer, texts, seq_len=args.seq_len, max_sequences=args.max_sequences)
        kl = text_kl(model, reference, processor.tokenizer, texts, args.seq_len, args.max_sequences, device)
        training = training_metadata(path)
        row = {
            "model": name,
            "weights": str(path),
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "lm_rank": training.get("lm_rank", 0),
            "training": training,
            "vqa": vqa["accuracy"],
            "per_type": vqa["per_type"],
            "ppl": ppl["ppl"],
            "smollm2_ppl": base,
            "ppl_ratio": ppl["ppl"] / base,
            "text_kl": kl,
            "seconds": round(time.perf_counter() - t, 1),
        }
        row["meets_targets"] = (
            row["vqa"] >= TARGETS["accuracy"]
            and all(row["per_type"].get(q, 0.0) >= TARGETS[q] for q in ("position", "relation"))
            and row["ppl_ratio"] <= TARGETS["ppl_ratio"]
        )
        print({k: v for k, v in row.items() if k != "training"}, flush=True)
        rows.append(row)
        model.to("cpu")
    return {
        "rows": rows,
        "targets": TARGETS,
        "eval": eval_settings(args),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "environment": environment(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def markdown(result: dict) -> str:
    env = result["environment"]
    ev = result["eval"]
    lines = [
        "# Zoo originals: VQA and language",
        "",
        f"Measured {result['date']} on {result['device']} (torch {env.get('torch')}, transformers "
        f"{env.get('transformers')}). Command: `{result['command']}`.",
        "",
        f"VQA: exact match (greedy generation) on {ev['vqa_samples']} test-split samples (seed {ev['seed']}). "
        f"Text: perplexity on {ev['max_sequences']} windows of {ev['seq_len']} tokens of the Wikipedia test split, "
        "beside SmolLM2-135M-Instruct's on the same windows, and the mean per-token KL(SmolLM2 || zoo model). "
        f"Targets (issue 13): VQA >= {_pct(TARGETS['accuracy'])}%, position and relation >= "
        f"{_pct(TARGETS['position'])}%, perplexity <= {TARGETS['ppl_ratio']:.2f}x SmolLM2's.",
        "",
        "| model | LM delta rank | VQA | color | shape | count | position | relation | ppl | SmolLM2 ppl | ratio | "
        "text KL | targets met |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        types = [
            _pct(row["per_type"].get(q, float("nan"))) for q in ("color", "shape", "count", "position", "relation")
        ]
        lines.append(
            f"| {row['model']} | {row['lm_rank']} | {_pct(row['vqa'])} | {' | '.join(types)} | {row['ppl']:.2f} | "
            f"{row['smollm2_ppl']:.2f} | {row['ppl_ratio']:.3f} | {row['text_kl']:.4f} | "
            f"{'yes' if row['meets_targets'] else 'no'} |"
        )
    lines += ["", "Training settings of each weights file: the JSON's `training` field (from the file's metadata)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(ZOO), choices=list(ZOO), help="zoo models to score")
    parser.add_argument("--weights-dir", default=None, help="folder of <model>.safetensors (default: the package's)")
    parser.add_argument("--out", required=True, help="results JSON (the markdown page is written beside it)")
    parser.add_argument("--num-samples", type=int, default=600, help="VQA test samples")
    parser.add_argument("--batch-size", type=int, default=100, help="VQA generation batch")
    parser.add_argument("--seq-len", type=int, default=512, help="Wikipedia window length")
    parser.add_argument("--max-sequences", type=int, default=64, help="Wikipedia windows scored")
    parser.add_argument("--seed", type=int, default=0, help="VQA sample seed")
    parser.add_argument("--device", default=None, help="default: cuda if available")
    args = parser.parse_args()
    write_results(run(args), args.out, markdown)


if __name__ == "__main__":
    main()
