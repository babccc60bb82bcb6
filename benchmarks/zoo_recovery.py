"""Zoo recovery: two-stage fine-tuning of zoo models converted to MLA at an aggressive setting.

For one zoo model and one setting (rope_dim, kv_rank; MKL-selected rotary pairs), three routes are measured on the
VQA test split (greedy exact match) and the Wikipedia test split (perplexity), before and after fine-tuning:

- `md`: native -> MLA (MD-SVD init) -> stage-2 fine-tuning;
- `weight`: native -> MLA (plain weight-SVD init) -> stage-2 fine-tuning;
- `stage1+2`: native -> partial RoPE -> stage-1 fine-tuning -> MLA (MD-SVD from the fine-tuned stage-1 model and its
  own activation statistics) -> stage-2 fine-tuning.

Fine-tuning uses `hf_mla_vlm.training.finetune` (transformers.Trainer, paper trainable sets, warmup-stable-decay
with 1-sqrt decay) on the zoo VQA train split. Token budgets and GPU minutes are recorded per route.

Regenerate (GPU), then merge:

    python benchmarks/zoo_recovery.py run --model llava --out /tmp/zr
    python benchmarks/zoo_recovery.py merge /tmp/zr/*.json --out benchmarks/results/zoo_recovery.json

A run writes its JSON after every route. Routes of one model may run as separate processes (`--routes md`, ...; the
steps of the tiny zoo models are host-bound, so parallel processes share one GPU well); `merge` joins the parts of
a model.
"""

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from results_io import write_results
from transformers import AutoConfig

import hf_mla_vlm  # noqa: F401
from hf_mla_vlm.assets import wikipedia_split
from hf_mla_vlm.conversations import encode_conversations
from hf_mla_vlm.conversion_scripts.convert import build_mla_config, convert
from hf_mla_vlm.conversion_scripts.statistics import collect_statistics
from hf_mla_vlm.evaluation import load_model_and_processor
from hf_mla_vlm.evaluation.perplexity import perplexity
from hf_mla_vlm.evaluation.vqa import vqa_accuracy
from hf_mla_vlm.registry import arch_spec
from hf_mla_vlm.training.finetune import finetune
from hf_mla_vlm.utils import environment
from hf_mla_vlm.zoo import generate_split
from hf_mla_vlm.zoo.models import calibration_conversations, save_zoo_model, zoo_spec


def score(path: Path, samples, texts, args) -> dict:
    model, processor = load_model_and_processor(path, device=args.device)
    vqa = vqa_accuracy(model, processor, samples, batch_size=args.batch_size, progress=False)
    ppl = perplexity(model, processor.tokenizer, texts, seq_len=args.seq_len, max_sequences=args.max_sequences)
    return {"accuracy": vqa["accuracy"], "per_type": vqa["per_type"], "ppl": ppl["ppl"]}


def statistics_of(path: Path, image_token_ids: list[int], args):
    """Calibration statistics of the checkpoint at `path` (native or stage 1), on the zoo calibration set."""
    model, processor = load_model_and_processor(path, device="cpu")
    encoded = list(encode_conversations(processor, calibration_conversations(args.model, args.calibration, args.seed)))
    return collect_statistics(model, encoded, image_token_ids, device=args.device, progress=False)


def tune(source: Path, out: Path, stage: int, steps: int, lr: float, args, data="zoo-vqa", seed=None, **options):
    """`finetune` for `steps` steps of `args.train_batch` samples of `data` (default: the zoo VQA train split), bf16
    on a GPU; `options` go to `finetune` (e.g. `objective`, `teacher`). Returns the stage's budget and losses.

    With `args.micro_batches` k > 1 each step's samples are split by length into k micro-batches
    (`train_sampling_strategy="batch_rebalance"`): the same loss per step, without padding the short conversations
    to the length of the text windows."""
    started = time.perf_counter()
    micro = args.micro_batches
    if micro < 1 or args.train_batch % micro:
        raise ValueError(f"--micro-batches ({micro}) must divide --train-batch ({args.train_batch}).")
    sampling = "batch_rebalance" if micro > 1 else "random"
    result = finetune(
        source, data, out, stage=stage, learning_rate=lr, per_device_train_batch_size=args.train_batch // micro,
        gradient_accumulation_steps=micro, train_sampling_strategy=sampling, max_steps=steps,
        num_samples=steps * args.train_batch,
        image_size=zoo_spec(args.model).render_size, bf16=torch.cuda.is_available(),
        seed=args.seed if seed is None else seed, logging_steps=25,
        training_args={"dataloader_num_workers": args.workers}, overwrite=True, **options,
    )  # fmt: skip
    report = result.report
    training, parameters = report["training"], report["parameters"]
    train_time = training["train_time_s"]
    return {
        "stage": stage,
        "objective": report["settings"]["objective"],
        "steps": training["steps"],
        "learning_rate": lr,
        "batch_size": args.train_batch,
        "micro_batches": micro,
        "train_sampling_strategy": sampling,
        "samples": training["steps"] * args.train_batch,
        "tokens": training["tokens_seen"],
        "train_time_s": train_time,
        "tokens_per_s": training["tokens_seen"] / train_time if train_time else None,
        "trainable_parameters": parameters["trainable"],
        "trainable_fraction": parameters["trainable_fraction"],
        "minutes": (time.perf_counter() - started) / 60,
        "losses": training["losses"][:: max(1, len(training["losses"]) // 8)] + training["losses"][-1:],
    }


def run(args, write) -> dict:
    """Score the original, then each route; ``write(result)`` is called after every route."""
    torch.manual_seed(args.seed)
    work = Path(args.workdir) / args.model / "_".join(r.replace("+", "") for r in args.routes)
    spec = zoo_spec(args.model)
    samples = generate_split("test", args.num_samples, seed=args.seed, image_size=spec.render_size)
    texts = wikipedia_split("test")
    native = save_zoo_model(args.model, work / "native")
    routes: dict[str, dict] = {"original": {"before": score(native, samples, texts, args)}}
    print(f"[{args.model}] original {routes['original']}", flush=True)
    config = AutoConfig.from_pretrained(native)
    mla_defaults = build_mla_config(config, arch_spec(config.model_type))
    image_token_ids = mla_defaults.image_token_ids  # the image branch's ids, as `convert` routes them
    stats = statistics_of(native, image_token_ids, args)
    setting = dict(rope_dim=args.rope_dim, kv_rank=args.kv_rank, progress=False, overwrite=True)
    result = {
        "model": args.model,
        "setting": {"rope_dim": args.rope_dim, "kv_rank": args.kv_rank, "rope_strategy": "mkl"},
        "routes": routes,
        "eval": {
            "vqa_split": "test",
            "vqa_samples": args.num_samples,
            "seq_len": args.seq_len,
            "max_sequences": args.max_sequences,
        },  # fmt: skip
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "environment": environment(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }

    for route in args.routes:
        t = time.perf_counter()
        entry: dict = {}
        if route in ("md", "weight"):
            mla = work / f"mla-{route}"
            report = convert(native, mla, rope_strategy="mkl", svd=route, statistics=stats, **setting).report
            entry["kv_cache"] = report["kv_cache"]
            entry["before"] = score(mla, samples, texts, args)
            tuned = work / f"mla-{route}-ft"
            entry["stage2"] = tune(mla, tuned, 2, args.steps, args.lr, args)
        else:
            stage1 = work / "stage1"
            convert(native, stage1, rope_strategy="mkl", mla_stage="partial_rope", statistics=stats, **setting)
            entry["stage1_before"] = score(stage1, samples, texts, args)
            entry["stage1"] = tune(stage1, work / "stage1-ft", 1, args.stage1_steps, args.stage1_lr, args)
            entry["stage1_after"] = score(work / "stage1-ft", samples, texts, args)
            stage1_stats = statistics_of(work / "stage1-ft", image_token_ids, args)
            mla = work / "stage1-mla"
            report = convert(work / "stage1-ft", mla, svd="md", statistics=stage1_stats, **setting).report
            entry["kv_cache"] = report["kv_cache"]
            entry["before"] = score(mla, samples, texts, args)
            tuned = work / "stage1-mla-ft"
            entry["stage2"] = tune(mla, tuned, 2, args.steps, args.lr, args)
        entry["after"] = score(tuned, samples, texts, args)
        entry["wall_minutes"] = (time.perf_counter() - t) / 60
        routes[route] = entry
        print(f"[{args.model}] {route}: {json.dumps(entry)}", flush=True)
        write(result)
    return result


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def markdown(result: dict) -> str:
    lines = [
        "# Zoo recovery: fine-tuning converted zoo models",
        "",
        result["description"],
        "",
        "VQA accuracy (%) on the test split / Wikipedia perplexity; `steps x batch` samples of the VQA train split "
        "(tokens = all input tokens seen, image tokens included). GPU min = the route's wall time on the GPU "
        "(conversion, fine-tuning and evaluation; other jobs shared the GPU).",
        "",
        "| model | setting | KV vs original | route | before | after stage 2 | stage-2 budget | GPU min | original |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in result["models"]:
        original = m["routes"]["original"]["before"]
        for route, e in m["routes"].items():
            if route == "original":
                continue
            kv = e["kv_cache"]
            ratio = kv["converted"] / kv["original"]
            budget = (
                f"{e['stage2']['steps']} x {e['stage2']['batch_size']} ({e['stage2']['tokens'] / 1e6:.2f}M tokens)"
            )
            if "stage1" in e:
                budget += f" (+ stage 1: {e['stage1']['steps']} x {e['stage1']['batch_size']})"
            lines.append(
                f"| {m['model']} | rope {m['setting']['rope_dim']}, kv {m['setting']['kv_rank']} | {ratio:.3f} | "
                f"{route} | {_pct(e['before']['accuracy'])} / {e['before']['ppl']:.1f} | "
                f"{_pct(e['after']['accuracy'])} / {e['after']['ppl']:.1f} | {budget} | {e['wall_minutes']:.1f} | "
                f"{_pct(original['accuracy'])} / {original['ppl']:.1f} |"
            )
    if result.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {note}" for note in result["notes"]]
    lines += ["", "Per question type after fine-tuning:", ""]
    for m in result["models"]:
        for route, e in m["routes"].items():
            key = "before" if route == "original" else "after"
            types = ", ".join(f"{q} {_pct(v)}" for q, v in e[key]["per_type"].items())
            lines.append(f"- {m['model']} / {route}: {types}")
    return "\n".join(lines) + "\n"


def join_parts(parts: list[dict]) -> list[dict]:
    """One entry per model: the routes of all parts of a model (separate processes) in one ``routes`` dict, the
    original's scores from the first part; ``runs`` keeps each part's command, date and wall minutes."""
    models: dict[str, dict] = {}
    for part in parts:
        run_info = {k: part.get(k) for k in ("command", "date", "device")}
        run_info["routes"] = [r for r in part["routes"] if r != "original"]
        if part["model"] not in models:
            models[part["model"]] = dict(part, routes=dict(part["routes"]), runs=[run_info])
            continue
        joined = models[part["model"]]
        if part["setting"] != joined["setting"] or part["eval"] != joined["eval"]:
            raise ValueError(f"parts of {part['model']} were run with different settings / evaluation")
        for route, entry in part["routes"].items():
            if route != "original":
                joined["routes"][route] = entry
        joined["runs"].append(run_info)
    return list(models.values())


def merge(args) -> None:
    models = join_parts([json.loads(Path(p).read_text()) for p in args.parts])
    result = {
        "benchmark": "zoo_recovery",
        "description": __doc__.split("\n\n")[0].replace("\n", " "),
        "regenerate": "python benchmarks/zoo_recovery.py run --model M --out DIR (per model); "
        "python benchmarks/zoo_recovery.py merge DIR/*.json",
        "models": models,
        "notes": args.note or [],
    }
    write_results(result, args.out, markdown)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)
    p = verbs.add_parser("run")
    p.add_argument("--model", required=True, choices=["llava", "llava_next", "qwen2_5_vl"])
    p.add_argument("--out", required=True)
    p.add_argument("--workdir", default="/tmp/zoo_recovery")
    p.add_argument("--routes", nargs="+", default=["md", "weight", "stage1+2"])
    p.add_argument("--rope-dim", type=int, default=16)
    p.add_argument("--kv-rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--stage1-steps", type=int, default=300)
    p.add_argument("--stage1-lr", type=float, default=1e-4)
    p.add_argument("--train-batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--micro-batches", type=int, default=1, help="split each step by length into this many")
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--calibration", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-sequences", type=int, default=8)
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    m = verbs.add_parser("merge")
    m.add_argument("parts", nargs="+")
    m.add_argument("--out", default="benchmarks/results/zoo_recovery.json")
    m.add_argument("--note", action="append", help="a note for the results page (repeatable)")
    args = parser.parse_args()
    if args.verb == "merge":
        merge(args)
        return
    name = args.model if args.routes == ["md", "weight", "stage1+2"] else "-".join([args.model, *args.routes])
    out = Path(args.out) / f"{name.replace('+', '')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(result: dict) -> None:
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}", flush=True)

    run(args, write)


if __name__ == "__main__":
    main()
