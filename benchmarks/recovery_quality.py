"""Recovery quality: zoo models converted to MLA at three real KV-cache cuts, recovered by the paper's two-stage
fine-tuning (`sft`) or by self-distillation from the original (`distill`), against the original and a control.

Per zoo model (`hf_mla_vlm.zoo`: SmolLM2-135M with a trained vision tower) and per compression level (the cut
`1 - converted / original` of the per-token cache bytes against the model's real GQA cache, side-row padding
counted: at least 50%, 62.5% and 75%; `rope_dim` fixed, `kv_rank` the largest that reaches the level), rows:

- `original`: the untouched native model;
- `control`: the native model fine-tuned (stage 0, its text attention `q/k/v/o_proj`, objective `sft`) on the same
  data, steps and schedule as a recovery route: a stage-1 segment, then a stage-2 segment, each with its stage's
  steps, learning rate and warmup-stable-decay schedule;
- `none`: native -> MLA (MD-SVD init, MKL rotary pairs), no training;
- `sft`: native -> partial RoPE -> stage 1 -> MLA (MD-SVD from the fine-tuned stage-1 model and its own statistics)
  -> stage 2, label loss (assistant tokens of conversations, every token of text windows);
- `distill`: the same two stages with `objective="distill"` (KL to the native model at every non-image position).

With `--ablations`, at the 62.5% level: init `joint-act` / `weight` (md is the headline) and rotary strategy
`2-norm` / `high` (mkl is the headline), each as `none` and `distill` rows (`--ablation-routes`), first seed only.
Trained rows and the control run once per training seed (`--seeds`, default 0 and 1); `none` rows do not depend on
it and run once.

Training data (all routes and the control of a seed see the same items): packed Wikipedia windows of the
calibration split mixed with zoo VQA conversations of the train split (`--mix` text : VQA items per batch); stage 2
continues the stream where stage 1 stopped (the text repeats once its ~850K tokens are used up: `text_epochs`).
Evaluation, disjoint from training: VQA greedy exact match on the test split (overall and per question type);
perplexity on the Wikipedia test split and on a second domain (synthetic scene descriptions: the assistant texts of
`hf_mla_vlm.conversations.builtin_conversations`, text only); KL(original || model) of the
next-token distributions on held-out mixed data (Wikipedia validation windows + VQA validation conversations, at
the positions the distillation trains: every non-padding position that is not an image placeholder and has a next
token). Stage 1 does not depend on `kv_rank`, so one stage-1 model (per objective, rotary strategy and seed) serves
every level of a process; each row's `gpu_minutes` counts it in full (`stage1_reused` says where it was reused).

Regenerate (GPU; one process per model, or per model and route group, then merge; see benchmarks/zoo/README.md):

    python benchmarks/recovery_quality.py run --model llava --ablations --out /tmp/rq
    python benchmarks/recovery_quality.py merge benchmarks/results/recovery_quality.json /tmp/rq/*.json \
        --out benchmarks/results/recovery_quality.json

A run rewrites its JSON after every row; `merge` joins the parts (rows of one model from several processes) and
earlier merged results (the committed JSON, rows of earlier sessions), refusing a row that two of them hold.
"""

import argparse
import gc
import itertools
import json
import math
import os
import shutil
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from results_io import write_results
from transformers import AutoConfig
from transformers.utils import logging as transformers_logging
from zoo_quality import score
from zoo_recovery import statistics_of, tune

import hf_mla_vlm  # noqa: F401
from hf_mla_vlm.assets import wikipedia_split
from hf_mla_vlm.cache_size import kv_cache_size
from hf_mla_vlm.conversations import builtin_conversations
from hf_mla_vlm.conversion_scripts.convert import build_mla_config, convert
from hf_mla_vlm.evaluation import load_model_and_processor
from hf_mla_vlm.evaluation.perplexity import perplexity
from hf_mla_vlm.registry import arch_spec
from hf_mla_vlm.training.data import ChatCollator, TextWindow
from hf_mla_vlm.training.distill import distillation_kl, distilled_positions, mixed_training_items, text_windows
from hf_mla_vlm.utils import environment, to_device
from hf_mla_vlm.zoo import generate_split
from hf_mla_vlm.zoo.models import save_zoo_model, zoo_spec


MODELS = ("llava", "llava_next", "qwen2_5_vl")
LEVELS = ("50", "62.5", "75")  # minimum cut of the real KV cache, in percent
ROUTES = ("none", "sft", "distill", "control")
HEADLINE = ("md", "mkl")  # (init, rotary strategy) of the headline rows
ABLATION_LEVEL = "62.5"
ABLATIONS = (("joint-act", "mkl"), ("weight", "mkl"), ("md", "2-norm"), ("md", "high"))
ABLATION_NAMES = [":".join(setting) for setting in ABLATIONS]
QTYPES = ("color", "shape", "count", "position", "relation")
RESULTS = Path(__file__).resolve().parent / "results"


# ------------------------------------------------------------------------------------------------ settings


def level_setting(config, level: str, rope_dim: int) -> dict:
    """The largest `kv_rank` whose real cache cut (padding counted) is at least `level` percent at `rope_dim`."""
    arch, best = arch_spec(config.model_type), None
    for kv_rank in itertools.count(1):
        kv = kv_cache_size(build_mla_config(config, arch, rope_dim=rope_dim, kv_rank=kv_rank))
        if kv.reduction_vs_original < float(level) / 100:
            break
        best = (kv_rank, kv)
    if best is None:
        raise ValueError(f"rope_dim={rope_dim} alone leaves less than a {level}% cut of the KV cache.")
    kv_rank, kv = best
    return {
        "level": level,
        "rope_dim": rope_dim,
        "kv_rank": kv_rank,
        "kv_ratio": round(kv.converted / kv.original, 6),
        "kv_cut": round(kv.reduction_vs_original, 6),
        "kv_elements_per_token_layer": {"converted": kv.converted, "original": kv.original},
        "kv_bytes_per_token_bf16": {which: kv.bytes_per_token(which) for which in ("converted", "original")},
    }


# ---------------------------------------------------------------------------------------------------- data


def training_data(windows: list[TextWindow], args, seed: int) -> dict:
    """The items of stage 1 and stage 2 for training seed `seed`: the Wikipedia calibration `windows` (one packed
    stream, repeated when used up) and zoo VQA train conversations in the proportions `args.mix`, stage 2
    continuing both streams where stage 1 stopped."""
    sizes = [args.stage1_steps * args.train_batch, args.stage2_steps * args.train_batch]
    share = args.mix[0] / sum(args.mix)
    text = list(itertools.islice(itertools.cycle(windows), sum(math.ceil(share * n) for n in sizes)))
    vqa = generate_split("train", sum(math.ceil((1 - share) * n) for n in sizes), seed=seed,
                         image_size=args.image_size)  # fmt: skip
    stages, used = [], {"wikipedia": 0, "zoo-vqa": 0}
    for n in sizes:
        sources = {"wikipedia": text[used["wikipedia"] :], "zoo-vqa": vqa[used["zoo-vqa"] :]}
        sources["zoo-vqa"] = [s.to_conversation() for s in sources["zoo-vqa"][:n]]
        items = mixed_training_items(sources, args.mix, n, seed=seed + len(stages))
        n_text = sum(isinstance(item, TextWindow) for item in items)
        used = {"wikipedia": used["wikipedia"] + n_text, "zoo-vqa": used["zoo-vqa"] + n - n_text}
        stages.append(items)
    return {
        "stages": stages,
        "info": {
            "text_windows": used["wikipedia"],
            "text_tokens": used["wikipedia"] * args.text_seq_len,
            "text_windows_available": len(windows),
            "text_epochs": round(used["wikipedia"] / len(windows), 3),
            "vqa_conversations": used["zoo-vqa"],
        },
    }


def evaluation_sets(processor, image_token_ids, args) -> dict:
    """Held-out data, the same for every row (seed `args.seed`): VQA test samples, Wikipedia test texts, scene
    descriptions, and the collated KL batches (Wikipedia validation windows, VQA validation conversations)."""
    samples = generate_split("test", args.num_samples, seed=args.seed, image_size=args.image_size)
    scenes = builtin_conversations(args.scene_texts, seed=args.seed, image_size=16)
    scene_texts = [c.messages[-1]["content"][0]["text"] for c in scenes]
    parts = {
        "text": text_windows(processor, wikipedia_split("validation"), args.kl_seq_len, args.kl_text),
        "vqa": [s.to_conversation() for s in generate_split("validation", args.kl_vqa, seed=args.seed,
                                                            image_size=args.image_size)],
    }  # fmt: skip
    collate = ChatCollator(processor, labels="all", exclude_token_ids=image_token_ids)
    kl_batches = {
        part: [collate(items[i : i + args.kl_batch]) for i in range(0, len(items), args.kl_batch)]
        for part, items in parts.items()
        if items
    }
    return {"samples": samples, "wikipedia": wikipedia_split("test"), "scenes": scene_texts, "kl": kl_batches}


# ---------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def heldout_kl(reference, model, batches) -> dict:
    """Mean KL(reference || model) of the next-token distributions and top-1 agreement, over the distilled
    positions of `ChatCollator(labels="all")` batches (`distilled_positions`)."""
    kl, agree, positions = 0.0, 0, 0
    device = next(model.parameters()).device
    for batch in batches:
        inputs = to_device({k: v for k, v in batch.items() if k != "labels"}, device)
        mask = distilled_positions(batch["labels"]).to(device)
        ref = reference(**inputs, use_cache=False).logits
        out = model(**inputs, use_cache=False).logits
        kl += distillation_kl(out, ref, mask).item()
        agree += (ref.argmax(-1) == out.argmax(-1))[mask].sum().item()
        positions += int(mask.sum())
    return {"kl": kl / positions, "top1": agree / positions, "positions": positions}


def evaluate(path: Path, reference, sets: dict, args) -> dict:
    model, processor = load_model_and_processor(path, device=args.device)
    scores = score(model, processor, sets["samples"], sets["wikipedia"], args)
    scenes = perplexity(model, processor.tokenizer, sets["scenes"], seq_len=args.scene_seq_len,
                        max_sequences=args.scene_windows, progress=False)  # fmt: skip
    parts = {part: heldout_kl(reference, model, batches) for part, batches in sets["kl"].items()}
    positions = sum(p["positions"] for p in parts.values())
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {
        "vqa": scores["accuracy"],
        "vqa_per_type": scores["per_type"],
        "ppl": scores["ppl"],
        "ppl_scenes": scenes["ppl"],
        # pooled over the positions of both parts; per part in kl_parts
        "kl": sum(p["kl"] * p["positions"] for p in parts.values()) / positions,
        "top1": sum(p["top1"] * p["positions"] for p in parts.values()) / positions,
        "kl_parts": parts,
    }


# ---------------------------------------------------------------------------------------------------- run


def planned_rows(args) -> list[dict]:
    """The rows of this process: control per seed, per level `none` then the trained routes per seed, then the
    ablations (first seed)."""
    rows = [dict(route="control", seed=seed) for seed in args.seeds if "control" in args.routes]
    headline = dict(zip(("init", "rope_strategy"), HEADLINE))
    for level in args.levels:
        if "none" in args.routes:
            rows.append(dict(route="none", level=level, seed=None, **headline))
        for seed, route in itertools.product(args.seeds, ("sft", "distill")):
            if route in args.routes:
                rows.append(dict(route=route, level=level, seed=seed, **headline))
    if args.ablations:
        chosen = [setting for setting in ABLATIONS if ":".join(setting) in args.ablation_settings]
        for (init, strategy), route in itertools.product(chosen, args.ablation_routes):
            seed = None if route == "none" else args.seeds[0]
            rows.append(dict(route=route, level=ABLATION_LEVEL, seed=seed, init=init, rope_strategy=strategy))
    for row in rows:
        if row["route"] == "distill":
            row["label_weight"] = args.label_weight
    return rows


def row_fields(plan: dict, setting: dict | None, model: str) -> dict:
    """The identifying fields of a row (`setting` None: the original model's cache)."""
    return {
        "model": model,
        "route": plan["route"],
        "level": plan.get("level"),
        "rope_dim": setting and setting["rope_dim"],
        "kv_rank": setting and setting["kv_rank"],
        "kv_ratio": setting["kv_ratio"] if setting else 1.0,
        "kv_cut": setting["kv_cut"] if setting else 0.0,
        "init": plan.get("init"),
        "rope_strategy": plan.get("rope_strategy"),
        "seed": plan.get("seed"),
        # the weight of the label loss beside the KL: part of a distill row's recipe (None for the other routes)
        "label_weight": plan.get("label_weight"),
        "headline": (plan.get("init"), plan.get("rope_strategy")) in (HEADLINE, (None, None)),
    }


def run(args, write) -> dict:
    """Score the original, then every planned row; ``write(result)`` is called after every row."""
    torch.manual_seed(args.seed)
    work = Path(args.workdir) / args.name
    native = Path(args.native) if args.native else save_zoo_model(args.model, work / "native", overwrite=True)
    config = AutoConfig.from_pretrained(native)
    image_token_ids = build_mla_config(config, arch_spec(config.model_type)).image_token_ids
    levels = sorted(set(args.levels) | ({ABLATION_LEVEL} if args.ablations else set()), key=float)
    settings = {level: level_setting(config, level, args.rope_dim) for level in levels}
    reference, processor = load_model_and_processor(native, device=args.device)
    reference.requires_grad_(False)
    sets = evaluation_sets(processor, image_token_ids, args)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {
        "model": args.model,
        "levels": settings,
        "settings": {key: value for key, value in vars(args).items() if key not in RUN_ONLY},
        "device": device,
        "environment": environment(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": args.command,
        "data": {},
        "rows": [],
    }

    def add(row: dict, started: float) -> None:
        row["wall_minutes"] = (time.perf_counter() - started) / 60
        row["gpu_minutes"] = row["wall_minutes"] + sum(s["minutes"] for s in row.get("stages", []) if s.get("reused"))
        row.update(device=device, date=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        result["rows"].append(row)
        print(f"[{args.name}] {json.dumps({k: v for k, v in row.items() if k != 'stages'})}", flush=True)
        write(result)

    t = time.perf_counter()
    original = row_fields({"route": "original"}, None, args.model)
    add({**original, **evaluate(native, reference, sets, args), "tokens": 0, "tokens_per_s": None}, t)
    native_stats = statistics_of(native, image_token_ids, args)
    data_cache: dict[int, dict] = {}
    stage1_cache: dict[tuple, dict] = {}
    windows: list[TextWindow] = []

    def data_of(seed: int) -> list:
        if seed not in data_cache:
            windows[:] = windows or text_windows(processor, wikipedia_split("calibration"), args.text_seq_len)
            data_cache[seed] = training_data(windows, args, seed)
            result["data"][str(seed)] = data_cache[seed]["info"]
        return data_cache[seed]["stages"]

    def stage1(objective: str, strategy: str, seed: int, kv_rank: int) -> dict:
        """The fine-tuned stage-1 checkpoint (shared by every level) and its calibration statistics."""
        key = (objective, strategy, seed)
        if key in stage1_cache:
            return dict(stage1_cache[key], reused=True)
        t = time.perf_counter()
        folder = work / f"stage1-{objective}-{strategy}-s{seed}"
        convert(native, folder, rope_dim=args.rope_dim, kv_rank=kv_rank, rope_strategy=strategy,
                mla_stage="partial_rope", statistics=native_stats, progress=False, overwrite=True)  # fmt: skip
        summary = tune(folder, folder.with_name(folder.name + "-ft"), 1, args.stage1_steps, args.stage1_lr, args,
                       data=data_of(seed)[0], seed=seed, **objective_options(objective, native, args))  # fmt: skip
        shutil.rmtree(folder)
        tuned = folder.with_name(folder.name + "-ft")
        stats = statistics_of(tuned, image_token_ids, args)
        summary["minutes"] = (time.perf_counter() - t) / 60  # conversion, training and statistics
        stage1_cache[key] = {**summary, "path": tuned, "stats": stats, "reused": False}
        return stage1_cache[key]

    for plan in planned_rows(args):
        t = time.perf_counter()
        route, seed = plan["route"], plan["seed"]
        setting = settings[plan["level"]] if route != "control" else None
        row = row_fields(plan, setting, args.model)
        folder = work / f"row-{len(result['rows'])}"
        if route == "control":  # stage 0 with the stage-1 budget, then with the stage-2 budget, on the same data
            steps, lrs = (args.stage1_steps, args.stage2_steps), (args.stage1_lr, args.stage2_lr)
            source, stages = native, []
            for i, items in enumerate(data_of(seed)):
                out = folder / f"segment{i + 1}"
                stages.append(tune(source, out, 0, steps[i], lrs[i], args, data=items, seed=seed))
                source = out
            tuned = source
        elif route == "none":
            tuned, stages = folder / "mla", []
            report = convert(native, tuned, rope_dim=args.rope_dim, kv_rank=setting["kv_rank"],
                             rope_strategy=plan["rope_strategy"], svd=plan["init"], statistics=native_stats,
                             progress=False, overwrite=True).report  # fmt: skip
            row["kv_cache_report"] = report["kv_cache"]
        else:
            first = stage1(route, plan["rope_strategy"], seed, setting["kv_rank"])
            mla = folder / "mla"
            report = convert(first["path"], mla, rope_dim=args.rope_dim, kv_rank=setting["kv_rank"], svd=plan["init"],
                             statistics=first["stats"], progress=False, overwrite=True).report  # fmt: skip
            row["kv_cache_report"] = report["kv_cache"]
            tuned = folder / "mla-ft"
            second = tune(mla, tuned, 2, args.stage2_steps, args.stage2_lr, args, data=data_of(seed)[1], seed=seed,
                          **objective_options(route, native, args))  # fmt: skip
            stages = [{k: v for k, v in first.items() if k not in ("path", "stats")}, second]
        if "kv_cache_report" in row:
            real = row["kv_cache_report"]
            if real["converted"] != setting["kv_elements_per_token_layer"]["converted"]:
                raise RuntimeError(f"The converted cache ({real}) is not the planned one ({setting}).")
        row.update(evaluate(tuned, reference, sets, args))
        tokens = sum(s["tokens"] for s in stages)
        train_s = sum(s["train_time_s"] or 0 for s in stages)
        row.update(tokens=tokens, tokens_per_s=tokens / train_s if train_s else None, stages=stages)
        add(row, t)
        if not args.keep_checkpoints:
            shutil.rmtree(folder, ignore_errors=True)
    if not args.keep_checkpoints:
        for entry in stage1_cache.values():
            shutil.rmtree(entry["path"], ignore_errors=True)
    return result


def objective_options(objective: str, native: Path, args) -> dict:
    if objective != "distill":
        return {"objective": "sft"}
    return {"objective": "distill", "teacher": native, "temperature": args.temperature,
            "label_weight": args.label_weight}  # fmt: skip


# ------------------------------------------------------------------------------------------------ markdown


def _spread(values: list) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), ((max(values) - min(values)) / 2 if len(values) > 1 else None)


def _cell(values: list, scale: float = 1.0, digits: int = 1, delta_from: float | None = None) -> str:
    mean, spread = _spread(values)
    if mean is None:
        return "-"
    if delta_from is not None:
        return f"{scale * (mean - delta_from):+.{digits}f}"
    text = f"{scale * mean:.{digits}f}"
    return text + (f" ±{scale * spread:.{digits}f}" if spread is not None else "")


ROW_ORDER = ("original", "control", "none", "sft", "distill")


def _order(row: dict) -> tuple:
    """original, control, then per level the headline routes, then the ablations."""
    return (row["route"] not in ("original", "control"), float(row["level"] or 0), not row["headline"],
            ROW_ORDER.index(row["route"]), str(row["init"]), str(row["rope_strategy"]),
            row.get("label_weight") or 0.0)  # fmt: skip


def _tokens(values: list) -> str:
    mean = statistics.fmean(values)
    return "-" if not mean else f"{mean / 1e6:.2f}M" if mean >= 1e5 else f"{mean:.0f}"


def _route(row: dict) -> str:
    """The route's name in the tables: distill with a label loss says its weight."""
    weight = row.get("label_weight")
    return f"{row['route']} + {weight:g} labels" if weight else row["route"]


def _groups(rows: list[dict]) -> list[list[dict]]:
    """Rows that differ only by seed, in table order."""
    groups: dict[tuple, list[dict]] = {}
    for row in sorted(rows, key=_order):
        groups.setdefault(tuple(row.get(k) for k in ROW_KEY if k != "seed"), []).append(row)
    return list(groups.values())


def markdown(result: dict) -> str:
    lines = [
        "# Recovery quality: zoo models at three real KV-cache cuts",
        "",
        result["description"],
        "",
        f"Regenerate: `{result['regenerate']}`.",
        "",
        "Every number below was measured by the runs listed under each model (command, device, date); a setting "
        "without a row was not run. Columns: KV = converted / original bytes per token of the real cache (GQA "
        "original, MLA latent + rope keys + modality flag padded to 16 bytes); VQA = exact match (%) on the zoo "
        "test split, Δ ctrl = VQA minus the control's (points); ppl = Wikipedia test perplexity, Δ orig = minus the "
        "original's; scenes = perplexity on synthetic scene descriptions (a second text domain); KL = KL(original "
        "|| row) in nats per position on held-out mixed data (Wikipedia validation windows + VQA validation "
        "conversations, non-image positions), top-1 = agreement of the argmax there (%); tokens = training tokens "
        "seen (both stages, padding not counted); tok/s = tokens per second of the training loops; GPU min = wall "
        "minutes of the row (conversion, training, statistics, evaluation; a reused stage 1 counted in full). Two "
        "seeds: mean ±half the range.",
        "",
    ]
    for m in result["models"]:
        rows = m["rows"]
        original = next(r for r in rows if r["route"] == "original")
        controls = [r["vqa"] for r in rows if r["route"] == "control"]
        control_vqa = statistics.fmean(controls) if controls else None
        lines += [f"## {m['model']}", "", "Runs:", ""]
        for run_info in m["runs"]:
            versions = ", ".join(f"{k} {v}" for k, v in run_info["environment"].items())
            lines.append(f"- `{run_info['command']}` on {run_info['device']}, {run_info['date']} ({versions})")
        budgets = ", ".join(f"{k} {m['settings'][k]}" for k in BUDGET_KEYS)
        data = [
            f"seed {s}: {d['text_windows']} Wikipedia windows ({d['text_epochs']} epochs of the calibration split), "
            f"{d['vqa_conversations']} VQA conversations"
            for s, d in m["data"].items()
        ]
        lines += [
            "",
            f"Budgets: {budgets}. Training data: {'; '.join(data) or 'none (no row was trained)'}.",
            "",
            "| level | rope / kv_rank | KV | route | init | rope | seeds | VQA | Δ ctrl | ppl | Δ orig | scenes | "
            "KL | top-1 | tokens | tok/s | GPU min |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]  # fmt: skip
        types = []
        for group in _groups(rows):
            r = group[0]
            seeds = ",".join(str(g["seed"]) for g in group if g["seed"] is not None) or "-"
            level = f"≥{r['level']}%" if r["level"] else "-"
            shape = f"{r['rope_dim']} / {r['kv_rank']}" if r["rope_dim"] else "-"
            c = {key: [g[key] for g in group] for key in METRICS}
            cells = [
                _cell(c["vqa"], 100),
                _cell(c["vqa"], 100, delta_from=control_vqa) if control_vqa is not None else "-",
                _cell(c["ppl"], digits=2),
                _cell(c["ppl"], digits=2, delta_from=original["ppl"]),
                _cell(c["ppl_scenes"], digits=2),
                _cell(c["kl"], digits=4),
                _cell(c["top1"], 100),
                _tokens(c["tokens"]),
                _cell(c["tokens_per_s"], digits=0),
                _cell(c["gpu_minutes"], digits=1),
            ]
            setting = [level, shape, f"{r['kv_ratio']:.3f}", _route(r), r["init"] or "-", r["rope_strategy"] or "-"]
            lines.append("| " + " | ".join([*setting, seeds, *cells]) + " |")
            per_type = [_cell([g["vqa_per_type"].get(q) for g in group], 100) for q in QTYPES]
            label = " / ".join(str(x) for x in (level, _route(r), r["init"], r["rope_strategy"]) if x and x != "-")
            types.append(f"| {label or r['route']} | {seeds} | " + " | ".join(per_type) + " |")
        lines += ["", "VQA per question type (%):", "", "| row | seeds | " + " | ".join(QTYPES) + " |",
                  "|---|---|" + "---|" * len(QTYPES), *types, ""]  # fmt: skip
    if result.get("notes"):
        lines += ["Notes:", ""] + [f"- {note}" for note in result["notes"]] + [""]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- merge


# (label_weight is a field of the distill rows, not a setting shared by a model's parts)
RUN_ONLY = ("verb", "out", "workdir", "name", "native", "keep_checkpoints", "levels", "routes", "seeds",
            "ablations", "ablation_routes", "ablation_settings", "device", "workers", "micro_batches", "progress",
            "command", "label_weight")  # fmt: skip
BUDGET_KEYS = ("stage1_steps", "stage2_steps", "train_batch", "stage1_lr", "stage2_lr", "mix", "text_seq_len",
               "temperature", "rope_dim")  # fmt: skip
ROW_KEY = ("route", "level", "init", "rope_strategy", "seed", "label_weight")
METRICS = ("vqa", "ppl", "ppl_scenes", "kl", "top1", "tokens", "tokens_per_s", "gpu_minutes")


def join_parts(parts: list[dict]) -> list[dict]:
    """One entry per model: the rows of all its parts (the original's from the first part), after checking that
    the parts share settings, levels and training data; ``runs`` keeps each part's command, device and date."""
    models: dict[str, dict] = {}
    for part in parts:
        runs = _runs(part)
        if part["model"] not in models:
            models[part["model"]] = dict(part, rows=list(part["rows"]), data=dict(part["data"]), runs=runs)
            for key in RUN_KEYS:
                models[part["model"]].pop(key, None)
            continue
        joined = models[part["model"]]
        for key in ("settings", "levels"):
            shared = set(part[key]) & set(joined[key])
            if any(part[key][k] != joined[key][k] for k in shared):
                raise ValueError(f"Parts of {part['model']} were run with different {key}.")
            joined[key].update(part[key])
        for seed, info in part["data"].items():
            if joined["data"].setdefault(seed, info) != info:
                raise ValueError(f"Parts of {part['model']} trained seed {seed} on different data.")
        seen = {tuple(r.get(k) for k in ROW_KEY) for r in joined["rows"]}
        for row in part["rows"]:
            key = tuple(row.get(k) for k in ROW_KEY)
            if row["route"] == "original":
                continue
            if key in seen:
                raise ValueError(f"{part['model']}: row {key} is in two parts; merge one of them only.")
            joined["rows"].append(row)
            seen.add(key)
        joined["runs"].extend(runs)
    return [models[name] for name in MODELS if name in models]


RUN_KEYS = ("command", "device", "date", "environment")


def _runs(part: dict) -> list[dict]:
    """The runs behind a part: its own, or those an earlier merge recorded (a model entry of a results file)."""
    return part["runs"] if "runs" in part else [{k: part[k] for k in RUN_KEYS}]


def parts_of(document: dict) -> list[dict]:
    """The parts in a file: a `run` part, or every model entry of an earlier `merge`'s results (rows measured in
    earlier sessions), so that new parts join the committed results. Parts written before the label weight became
    a field of the distill rows carry it in their settings: it moves to their distill rows."""
    parts = document["models"] if document.get("benchmark") == "recovery_quality" else [document]
    for part in parts:
        weight = part["settings"].pop("label_weight", None)
        for row in part["rows"]:
            row.setdefault("label_weight", weight if row["route"] == "distill" else None)
    return parts


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder)


def merge(args) -> None:
    documents = [json.loads(Path(p).read_text()) for p in args.parts]
    files = [(p, part) for p, document in zip(args.parts, documents) for part in parts_of(document)]
    parts = [part for _, part in files]
    notes = [note for document in documents for note in document.get("notes", [])]  # an earlier merge's
    out = Path(args.out)
    cpu = sorted({p for p, part in files if any(run["device"] == "cpu" for run in _runs(part))})
    if cpu and _inside(out, RESULTS) and not args.allow_cpu:
        raise SystemExit(f"{cpu} ran on the CPU (a smoke test?); its numbers do not belong in {RESULTS}. Pass "
                         "--allow-cpu if this is really meant.")  # fmt: skip
    result = {
        "benchmark": "recovery_quality",
        "description": __doc__.split("\n\n")[0].replace("\n", " "),
        "regenerate": "python benchmarks/recovery_quality.py run --model M --ablations --out DIR (per model M in "
        "llava llava_next qwen2_5_vl, or split by route and seed as in benchmarks/zoo/README.md); "
        "python benchmarks/recovery_quality.py merge benchmarks/results/recovery_quality.json DIR/*.json (the "
        "committed results first, to keep their rows)",
        "models": join_parts(parts),
        "notes": notes + (args.note or []),
    }
    write_results(result, out, markdown)


# --------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> Path | None:
    """The command line (`argv`: its arguments, default `sys.argv[1:]`); returns the part `run` wrote."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)
    p = verbs.add_parser("run")
    p.add_argument("--model", required=True, choices=MODELS)
    p.add_argument("--out", required=True, help="folder of this process's part, <name>.json")
    p.add_argument("--name", default=None, help="part name (default: from the model, levels, routes and seeds)")
    p.add_argument("--workdir", default="/tmp/recovery_quality", help="checkpoints (removed after each row)")
    p.add_argument("--native", default=None, help="native checkpoint to use instead of building the zoo model")
    p.add_argument("--keep-checkpoints", action="store_true")
    p.add_argument("--levels", nargs="+", default=list(LEVELS), choices=LEVELS)
    p.add_argument(
        "--routes",
        nargs="*",
        default=list(ROUTES),
        choices=ROUTES,
        help="headline routes; `--routes` alone with --ablations runs the ablations only",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="training seeds")
    p.add_argument("--ablations", action="store_true", help=f"init and rotary ablations at {ABLATION_LEVEL}%%")
    p.add_argument("--ablation-routes", nargs="+", default=["none", "distill"], choices=["none", "sft", "distill"])
    p.add_argument("--ablation-settings", nargs="+", default=ABLATION_NAMES, choices=ABLATION_NAMES,
                   metavar="INIT:ROPE", help=f"the ablations to run (default all: {' '.join(ABLATION_NAMES)}), e.g. "
                                             "to split them over processes")  # fmt: skip
    p.add_argument("--rope-dim", type=int, default=16, help="rotary dims kept per head at every level")
    # training budgets (defaults: a few H200 minutes per route)
    p.add_argument("--stage1-steps", type=int, default=200)
    p.add_argument("--stage2-steps", type=int, default=400)
    p.add_argument("--stage1-lr", type=float, default=1e-4)
    p.add_argument("--stage2-lr", type=float, default=2e-4)
    p.add_argument("--train-batch", type=int, default=32)
    p.add_argument("--mix", nargs=2, type=float, default=[1.0, 3.0], help="Wikipedia windows : VQA conversations")
    p.add_argument("--text-seq-len", type=int, default=512, help="tokens per packed training text window")
    p.add_argument("--temperature", type=float, default=1.0, help="distillation temperature")
    p.add_argument("--label-weight", type=float, default=0.0, help="label loss added to the distillation KL")
    p.add_argument("--workers", type=int, default=4, help="dataloader workers")
    p.add_argument("--micro-batches", type=int, default=1,
                   help="split each training step by length into this many micro-batches (batch_rebalance: the "
                        "same loss, less padding, more host work: slower on the H200, see "
                        "profile_recovery_step.md; recorded per stage)")  # fmt: skip
    p.add_argument("--calibration", type=int, default=64, help="calibration conversations for the statistics")
    # evaluation
    p.add_argument("--eval-seed", dest="seed", type=int, default=0, help="seed of the evaluation / calibration data")
    p.add_argument("--num-samples", type=int, default=500, help="VQA test samples")
    p.add_argument("--batch-size", type=int, default=100, help="VQA generation batch")
    p.add_argument("--seq-len", type=int, default=512, help="Wikipedia perplexity window")
    p.add_argument("--max-sequences", type=int, default=16, help="Wikipedia perplexity windows")
    p.add_argument("--scene-texts", type=int, default=600, help="scene descriptions (second text domain)")
    p.add_argument("--scene-seq-len", type=int, default=256)
    p.add_argument("--scene-windows", type=int, default=16)
    p.add_argument("--kl-text", type=int, default=64, help="held-out Wikipedia validation windows for the KL")
    p.add_argument("--kl-seq-len", type=int, default=512)
    p.add_argument("--kl-vqa", type=int, default=256, help="held-out VQA validation conversations for the KL")
    p.add_argument("--kl-batch", type=int, default=16)
    p.add_argument("--device", default=None)
    p.add_argument("--progress", action="store_true", help="show progress bars")
    m = verbs.add_parser("merge")
    m.add_argument("parts", nargs="+", help="`run` parts, and earlier merged results (e.g. the committed JSON)")
    m.add_argument("--out", default=str(RESULTS / "recovery_quality.json"))
    m.add_argument("--note", action="append", help="a note for the results page (repeatable)")
    m.add_argument("--allow-cpu", action="store_true", help="merge CPU parts into benchmarks/results anyway")
    args = parser.parse_args(argv)
    if args.verb == "merge":
        merge(args)
        return None
    if not args.progress:
        os.environ.setdefault("TQDM_DISABLE", "1")  # the per-batch bars of perplexity, generation, training
        transformers_logging.disable_progress_bar()  # weight loading and saving
    if _inside(Path(args.out), RESULTS):
        raise SystemExit(f"Write parts outside {RESULTS} (e.g. /tmp/rq); `merge` writes the results there.")
    if not args.routes and not args.ablations:
        raise SystemExit("Nothing to run: give --routes and/or --ablations.")
    args.image_size = zoo_spec(args.model).render_size
    # the script as the repository names it (a run from a copy of the tree, as recovery_gpu.sh makes, says the same)
    args.command = " ".join([Path(sys.executable).name, "benchmarks/recovery_quality.py", *(argv or sys.argv[1:])])
    chosen = [name for name in ABLATION_NAMES if name in args.ablation_settings]  # a share of them: named in the part
    ablations = "abl" + ("-" + "_".join(chosen).replace(":", "-") if chosen != ABLATION_NAMES else "")
    args.name = args.name or "-".join(
        [args.model, "L" + "_".join(args.levels), "_".join(args.routes) or "noheadline"]
        + ([ablations] if args.ablations else []) + ([f"lw{args.label_weight:g}"] if args.label_weight else [])
        + ["s" + "_".join(map(str, args.seeds))]
    )  # fmt: skip
    out = Path(args.out) / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(result: dict) -> None:
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")

    run(args, write)
    print(f"wrote {out}", flush=True)
    return out


if __name__ == "__main__":
    main()
