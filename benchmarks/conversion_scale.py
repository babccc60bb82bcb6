"""Conversion at real model sizes in bounded host memory: wall time and peak RSS of `hf_mla_vlm.convert` on
random-weight checkpoints with the real shapes of Qwen2.5-VL-7B, LLaVA-NeXT-8B (llama3) and Qwen2.5-VL-72B.

The checkpoints are written here as bf16 safetensors shards straight from a config, never materialising the model
(an empty model gives names and shapes; each tensor is drawn and written, then dropped), in the published pre-v5
on-disk layout (`model.layers.*` / `visual.*` for Qwen, `language_model.model.*` / `vision_tower.*` for LLaVA).
Weights are N(0, 0.02), norms 1. The shapes come from the models' published `config.json` (Qwen/Qwen2.5-VL-7B-Instruct,
Qwen/Qwen2.5-VL-72B-Instruct, llava-hf/llama3-llava-next-8b-hf), typed into `SHAPES` below; there is no network here
to re-read them, so the fields are those values as recalled (sizes, heads, layers, vocabularies), not a download. The
token ids of the image placeholders are the tiny tokenizer's (the calibrated runs encode their conversations with
`hf_mla_vlm.tiny_models`' tokenizer; ids do not change any shape).

Each conversion runs in a fresh subprocess; its peak RSS is the kernel's `ru_maxrss` of that child
(`RUSAGE_CHILDREN`). Rows (append to the JSON, the markdown is regenerated from it):

    python benchmarks/conversion_scale.py run --shape qwen2_5_vl_7b --svd weight --device cpu
    python benchmarks/conversion_scale.py run --shape qwen2_5_vl_7b --svd md --num-samples 4 --device cpu
    python benchmarks/conversion_scale.py run --shape qwen2_5_vl_72b --layers 2 --svd weight   # a few real layers
    python benchmarks/conversion_scale.py plan --shape qwen2_5_vl_72b   # memory per stage on the meta device
    python benchmarks/conversion_scale.py check --work /tmp/scale       # 2-layer 7B: streamed == in-memory logits

GPU rows: the same `run` with `--device cuda` (calibration layers on the GPU, the rest streamed from the host).
Checkpoints go to `--work` (default /tmp/hf-mla-vlm-scale) and are deleted after each row unless `--keep`.
"""

import argparse
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from results_io import write_results

from hf_mla_vlm.conversion_scripts.rope_selection import CALIBRATED_STRATEGIES, FIXED_STRATEGIES
from hf_mla_vlm.conversion_scripts.svd import SVD_METHODS


RESULTS = Path(__file__).parent / "results" / "conversion_scale.json"

QWEN_VISION_7B = dict(
    depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_chans=3, out_hidden_size=3584, patch_size=14,
    spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
    hidden_act="silu", tokens_per_second=2,
)  # fmt: skip
QWEN_TEXT = dict(  # the fields Qwen2.5-VL-7B and -72B share
    vocab_size=152064, max_position_embeddings=128000, rms_norm_eps=1e-6, hidden_act="silu", sliding_window=32768,
    use_sliding_window=False, tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
)  # fmt: skip
SHAPES = {
    "qwen2_5_vl_7b": dict(
        arch="qwen2_5_vl", source="Qwen/Qwen2.5-VL-7B-Instruct config.json",
        text=dict(
            QWEN_TEXT, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
            num_key_value_heads=4, max_window_layers=28,
        ),
        vision=QWEN_VISION_7B,
    ),
    "qwen2_5_vl_72b": dict(
        arch="qwen2_5_vl", source="Qwen/Qwen2.5-VL-72B-Instruct config.json",
        text=dict(
            QWEN_TEXT, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
            num_key_value_heads=8, max_window_layers=80,
        ),
        vision={**QWEN_VISION_7B, "intermediate_size": 3456, "out_hidden_size": 8192},
    ),
    "llava_next_8b": dict(
        arch="llava_next", source="llava-hf/llama3-llava-next-8b-hf config.json",
        text=dict(
            model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, vocab_size=128320, max_position_embeddings=8192,
            rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        ),
        vision=dict(
            model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
            num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
        ),
        extra=dict(
            image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
            vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        ),
    ),
}  # fmt: skip
# In-memory prefix -> published on-disk prefix (the inverse of `streaming.LEGACY_PREFIXES`).
ON_DISK = {
    "qwen2_5_vl": (("model.language_model.", "model."), ("model.visual.", "visual.")),
    "llava_next": (
        ("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
        ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.image_newline", "image_newline"),
    ),
}  # fmt: skip


def build_config(shape: str, layers: int | None = None):
    """The native config of `shape` (optionally with fewer decoder layers), with the tiny tokenizer's token ids."""
    from transformers import LlavaNextConfig, Qwen2_5_VLConfig

    from hf_mla_vlm.tiny_models import build_tiny_tokenizer

    spec = SHAPES[shape]
    text = dict(spec["text"], dtype="bfloat16")
    if layers is not None:
        text["num_hidden_layers"] = layers
        if "max_window_layers" in text:
            text["max_window_layers"] = layers
    if spec["arch"] == "qwen2_5_vl":
        tok = build_tiny_tokenizer(image_token="<|image_pad|>")
        ids = {name: tok.convert_tokens_to_ids(t) for name, t in (
            ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
        )}  # fmt: skip
        text.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        config = Qwen2_5_VLConfig(text_config=text, vision_config=spec["vision"], **ids)
    else:
        tok = build_tiny_tokenizer(image_token="<image>")
        text.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        config = LlavaNextConfig(
            text_config=text, vision_config=spec["vision"], image_token_index=tok.convert_tokens_to_ids("<image>"),
            **spec["extra"],
        )  # fmt: skip
    config.dtype = "bfloat16"
    return config, tok


def processor_for(shape: str, tokenizer):
    """A processor with the tiny tokenizer and the real image geometry (patch 14; LLaVA-NeXT 336-pixel tiles)."""
    from hf_mla_vlm import tiny_models

    arch = SHAPES[shape]["arch"]
    if arch == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor

        return tiny_models._qwen_processor(Qwen2_5_VLProcessor, tokenizer)
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    pinpoints = SHAPES[shape]["extra"]["image_grid_pinpoints"]
    image = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=pinpoints
    )
    return LlavaNextProcessor(image_processor=image, **tiny_models._llava_processor_kwargs(tokenizer))


@torch.no_grad()
def write_random_checkpoint(shape: str, folder: Path, layers: int | None = None, seed: int = 0) -> dict:
    """A random bf16 checkpoint of `shape` in `folder` (5 GB shards, published layout), never materialised."""
    from transformers import LlavaNextForConditionalGeneration, Qwen2_5_VLForConditionalGeneration

    from hf_mla_vlm.conversion_scripts.streaming import (
        PlannedTensor,
        ShardedSafetensorsWriter,
        empty_model,
        plan_of,
        weight_names,
    )

    started = time.perf_counter()
    config, tokenizer = build_config(shape, layers)
    arch = SHAPES[shape]["arch"]
    model_class = Qwen2_5_VLForConditionalGeneration if arch == "qwen2_5_vl" else LlavaNextForConditionalGeneration
    model = empty_model(model_class, config)
    names, _ = weight_names(model)

    def on_disk(name: str) -> str:
        for new, old in ON_DISK[arch]:
            if name.startswith(new):
                return old + name[len(new) :]
        return name

    plan = [PlannedTensor(on_disk(p.name), p.shape, p.dtype) for p in plan_of(model, names, torch.bfloat16)]
    folder.mkdir(parents=True, exist_ok=True)
    writer = ShardedSafetensorsWriter(folder, plan, "5GB")
    generator = torch.Generator().manual_seed(seed)
    for item in plan:
        if item.name.endswith(("norm.weight", "layernorm.weight", "ln_q.weight", "norm1.weight", "norm2.weight")):
            tensor = torch.ones(item.shape, dtype=item.dtype)
        elif item.name.endswith("bias"):
            tensor = torch.zeros(item.shape, dtype=item.dtype)
        else:
            tensor = torch.empty(item.shape, dtype=torch.float32).normal_(0.0, 0.02, generator=generator)
            tensor = tensor.to(item.dtype)
        writer.write(item.name, tensor)
        del tensor
    files = writer.close()
    config.save_pretrained(folder)
    processor_for(shape, tokenizer).save_pretrained(folder)
    size = sum((folder / f).stat().st_size for f in files)
    return {"bytes": size, "files": len(files), "write_s": time.perf_counter() - started}


CHILD = """
import json, resource, sys, time
from hf_mla_vlm import convert
kwargs = json.loads(sys.argv[1])
t = time.perf_counter()
result = convert(**kwargs)
print("RESULT " + json.dumps({"wall_s": time.perf_counter() - t, "report_memory": result.report["memory"],
    "timings": result.report["timings_s"], "files": len(result.report["files"]),
    "layer_seconds": [layer["seconds"] for layer in result.report["layers"]],
    "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def convert_in_child(kwargs: dict) -> dict:
    """Run `convert(**kwargs)` in a fresh interpreter; returns its report numbers and the child's peak RSS."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(kwargs)], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"conversion failed:\n{proc.stderr[-4000:]}")
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    out = json.loads(line[len("RESULT ") :])
    out["process_wall_s"] = wall
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return out


def environment_row() -> dict:
    from hf_mla_vlm.utils import environment

    return {
        **environment(), "cpu_count": os.cpu_count(),
        "memory_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "load_average_1_5_15": os.getloadavg(),  # the machine is shared: wall times are noisy
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip


def run(args) -> dict:
    work = Path(args.work)
    source, output = work / f"{args.shape}-{args.layers or 'all'}", work / f"{args.shape}-mla"
    written = None
    if not (source / "config.json").is_file():
        written = write_random_checkpoint(args.shape, source, args.layers)
    config, _ = build_config(args.shape, args.layers)
    kwargs = dict(
        source=str(source), output_dir=str(output), rope_dim=args.rope_dim, kv_rank=args.kv_rank, svd=args.svd,
        rope_strategy=args.rope_strategy, overwrite=True, progress=False, device=args.device,
        max_memory=args.max_memory, offload_folder=args.offload_folder,
    )  # fmt: skip
    if args.svd != "weight" or args.rope_strategy in CALIBRATED_STRATEGIES:
        kwargs.update(calibration="builtin", num_samples=args.num_samples, heldout_prose_samples=0)
    measured = convert_in_child(kwargs)
    row = {
        "shape": args.shape, "config_source": SHAPES[args.shape]["source"],
        "num_layers": config.text_config.num_hidden_layers, "svd": args.svd, "device": args.device,
        "rope_strategy": args.rope_strategy,
        "num_samples": args.num_samples if "calibration" in kwargs else 0, "rope_dim": args.rope_dim,
        "kv_rank": args.kv_rank, "max_memory": args.max_memory, "checkpoint_written": written, **measured,
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "environment": environment_row(),
    }  # fmt: skip
    row["source_bytes"] = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    full = SHAPES[args.shape]["text"]["num_hidden_layers"]
    if row["num_layers"] < full and measured["layer_seconds"]:  # a few real layers: project to the full depth
        per_layer = sum(measured["layer_seconds"]) / len(measured["layer_seconds"])
        calibration_per_layer = measured["timings"].get("calibration_s", 0.0) / row["num_layers"]
        row["projection"] = {
            "full_layers": full, "seconds_per_layer_convert": per_layer,
            "seconds_per_layer_calibration": calibration_per_layer,
            "projected_wall_s": measured["wall_s"] + (full - row["num_layers"]) * (per_layer + calibration_per_layer),
            "method": "measured wall + (full - measured layers) x (mean convert seconds per layer + calibration "
            "seconds / layers); the hash of the larger output is not included",
        }  # fmt: skip
    if not args.keep:
        shutil.rmtree(output, ignore_errors=True)
        shutil.rmtree(source, ignore_errors=True)
    return row


def plan(args) -> dict:
    """Memory per stage of the streamed conversion from the meta device (`streaming.stage_memory`)."""
    from hf_mla_vlm.conversion_scripts.convert import build_mla_config
    from hf_mla_vlm.conversion_scripts.streaming import empty_model, stage_memory, weight_names
    from hf_mla_vlm.registry import arch_spec

    config, _ = build_config(args.shape, args.layers)
    spec = arch_spec(config.model_type)
    source = empty_model(spec.native_class, config)
    mla = empty_model(
        spec.mla_model_class, build_mla_config(config, spec, rope_dim=args.rope_dim, kv_rank=args.kv_rank)
    )
    names, _ = weight_names(source)
    params = sum(t.numel() for n, t in source.state_dict().items() if n in set(names))
    stages = {}
    for calibrated, tokens in ((False, 0), (True, args.tokens)):
        stages["calibrated" if calibrated else "weight"] = stage_memory(
            source, mla, spec.text_layers, source_dtype=torch.bfloat16, target_dtype=torch.bfloat16,
            calibrated=calibrated, calibration_tokens=tokens,
        )  # fmt: skip
    return {
        "shape": args.shape, "kind": "plan", "num_layers": config.text_config.num_hidden_layers,
        "parameters": params, "bf16_checkpoint_bytes": 2 * params, "calibration_tokens": args.tokens,
        "stage_bytes": stages, "environment": environment_row(),
    }  # fmt: skip


@torch.no_grad()
def check(args) -> dict:
    """2-layer 7B-shaped Qwen2.5-VL: the streamed conversion, loaded with `AutoModelForImageTextToText` (here the
    package's registered class; `tests/conversion/test_streaming.py` loads the same sharded layout where the package
    is not importable, through the bundled remote code), against the in-memory `convert_model`: every tensor, and
    the logits on a short text prompt, both bf16."""
    from transformers import AutoModelForImageTextToText

    from hf_mla_vlm.conversion_scripts.convert import build_mla_config, convert_model
    from hf_mla_vlm.conversion_scripts.rope_selection import select_rope_pairs
    from hf_mla_vlm.registry import arch_spec

    work = Path(args.work)
    source, output = work / "qwen2_5_vl_7b-2-check", work / "qwen2_5_vl_7b-2-check-mla"
    write_random_checkpoint("qwen2_5_vl_7b", source, layers=2)
    streamed = convert_in_child(
        dict(source=str(source), output_dir=str(output), rope_dim=args.rope_dim, kv_rank=args.kv_rank, svd="weight",
             overwrite=True, progress=False)
    )  # fmt: skip
    ids = torch.tensor([[1, 20, 33, 47, 58, 61, 75, 89, 90, 101, 113, 127]])
    spec = arch_spec("qwen2_5_vl")
    native = spec.native_class.from_pretrained(source, dtype=torch.bfloat16).eval()
    config = native.config
    pairs, _, _ = select_rope_pairs(config, args.rope_dim, "high", None)
    mla_config = build_mla_config(
        config, spec, rope_pairs=pairs, dtype=torch.bfloat16, rope_dim=args.rope_dim, kv_rank=args.kv_rank
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build the in-memory model in bf16 (a float32 one does not fit here)
    try:
        in_memory, _ = convert_model(native, mla_config, spec, svd="weight", dtype=torch.bfloat16, progress=False)
    finally:
        torch.set_default_dtype(previous)
    del native
    with torch.no_grad():
        reference = in_memory(input_ids=ids).logits.float()
    weights = compare_weights(in_memory.state_dict(), output)
    del in_memory
    loaded = AutoModelForImageTextToText.from_pretrained(output, trust_remote_code=True, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        logits = loaded(input_ids=ids).logits.float()
    difference = (logits - reference).abs().max().item()
    row = {
        "shape": "qwen2_5_vl_7b", "kind": "logits_check", "num_layers": 2, "prompt_tokens": ids.shape[1],
        "loaded_class": f"{type(loaded).__module__}.{type(loaded).__name__}",
        "max_abs_logit_difference": difference, "max_abs_logit": reference.abs().max().item(),
        "logits_equal": bool(torch.equal(logits, reference)), "weights": weights,
        "logits_finite": bool(torch.isfinite(logits).all()), "streamed": streamed, "environment": environment_row(),
    }  # fmt: skip
    if not args.keep:
        shutil.rmtree(output, ignore_errors=True)
        shutil.rmtree(source, ignore_errors=True)
    return row


def compare_weights(state: dict[str, torch.Tensor], folder: Path) -> dict:
    """The streamed checkpoint's tensors against an in-memory model's state dict, one tensor at a time."""
    from safetensors import safe_open

    differing, missing, worst = [], [], 0.0
    seen = set()
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                seen.add(name)
                if name not in state:
                    missing.append(name)
                    continue
                saved, kept = f.get_tensor(name), state[name]
                if saved.dtype != kept.dtype or saved.shape != kept.shape or not torch.equal(saved, kept):
                    differing.append(name)
                    if saved.shape == kept.shape:
                        worst = max(worst, (saved.float() - kept.float()).abs().max().item())
    not_saved = sorted(set(state) - seen)
    return {"tensors": len(seen), "differing": differing[:20], "num_differing": len(differing),
            "max_abs_difference": worst, "only_in_file": missing[:20], "only_in_memory": not_saved[:20]}  # fmt: skip


def save(row: dict, path: Path) -> None:
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    rows.append(row)
    write_results({"rows": rows}, path, lambda result: markdown(result["rows"]))


def markdown(rows: list[dict]) -> str:
    gib = 2**30
    lines = [
        "# Conversion at scale: wall time and peak host memory",
        "",
        "Generated by `benchmarks/conversion_scale.py` from `conversion_scale.json` (random weights, real shapes; see",
        "the script's docstring for the configs' source and the method). Peak RSS is the conversion subprocess's",
        "`ru_maxrss`. The CPU rows ran on a 2-core, 24 GB machine shared with other jobs (each row's JSON records the",
        "load average), so wall times are upper bounds; a projected wall time extends a few-layer run to the full",
        "depth with its measured seconds per layer. GPU rows come from the same commands with `--device cuda` on a",
        "GPU machine; a shape or setting without a row here was not measured.",
        "",
        "| shape | layers | rope | svd | samples | device | source GiB | wall s | peak RSS GiB | peak device GiB "
        "| projected wall s | machine | date |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.get("kind") in ("plan", "logits_check"):
            continue
        env = row["environment"]
        projection = row.get("projection")
        projected = f"{projection['projected_wall_s']:.0f} ({projection['full_layers']} layers)" if projection else "-"
        device_bytes = row.get("report_memory", {}).get("peak_device_bytes_during_calibration")
        device_peak = f"{device_bytes / gib:.2f}" if device_bytes else "-"
        lines.append(
            f"| {row['shape']} | {row['num_layers']} | {row.get('rope_strategy', 'high')} | {row['svd']} | "
            f"{row['num_samples']} | {row['device']} | {row['source_bytes'] / gib:.1f} | {row['wall_s']:.0f} | "
            f"{row['peak_rss_bytes'] / gib:.2f} | {device_peak} | {projected} | "
            f"{env.get('cpu_count', '?')} cores, torch {env.get('torch', '?')}, transformers "
            f"{env.get('transformers', '?')} | {env['date'][:10]} |"
        )
    for row in rows:
        if row.get("kind") == "plan":
            lines += ["", f"## Memory per stage from the meta device: {row['shape']} ({row['num_layers']} layers)", ""]
            size = row["bf16_checkpoint_bytes"] / gib
            lines.append(f"{row['parameters'] / 1e9:.2f} B parameters, bf16 checkpoint {size:.0f} GiB.")
            lines += ["", "| run | stage | GiB |", "|---|---|---|"]
            for run_kind, stages in row["stage_bytes"].items():
                lines += [f"| {run_kind} | {name} | {size / gib:.2f} |" for name, size in stages.items()]
        if row.get("kind") == "logits_check":
            lines += [
                "", "## Streamed output vs in-memory conversion (logits)", "",
                f"{row['shape']} with {row['num_layers']} layers, loaded by `AutoModelForImageTextToText` as "
                f"`{row['loaded_class']}`, "
                f"{row['prompt_tokens']}-token prompt: max |logit difference| = "
                f"{row['max_abs_logit_difference']:.3g}"
                + (f" (largest |logit| {row['max_abs_logit']:.3g}; logits equal: {row['logits_equal']})"
                   if "max_abs_logit" in row else "") + ".",
            ]  # fmt: skip
            if "weights" in row:
                w = row["weights"]
                lines.append(
                    f"Weights: {w['tensors']} tensors in the streamed checkpoint, {w['num_differing']} differ from "
                    f"the in-memory conversion's (max |difference| {w['max_abs_difference']:.3g}); only in the file: "
                    f"{w['only_in_file'] or 'none'}; only in memory: {w['only_in_memory'] or 'none'}."
                )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "plan", "check"):
        p = sub.add_parser(name)
        p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2_5_vl_7b", help="model shape (default 7B)")
        p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the config's)")
        p.add_argument("--rope-dim", type=int, default=32, help="kept rotary dims per head (default 32)")
        p.add_argument("--kv-rank", type=int, default=64, help="latent width per kv head (default 64)")
        p.add_argument("--svd", default="weight", choices=SVD_METHODS, help="default weight")
        p.add_argument(
            "--rope-strategy",
            default="high",
            choices=FIXED_STRATEGIES + CALIBRATED_STRATEGIES,
            help="kept rotary pairs (default high; 2-norm / mkl calibrate)",
        )
        p.add_argument("--num-samples", type=int, default=4, help="calibration samples (default 4)")
        p.add_argument("--device", default="cpu", help="calibration device (default cpu; cuda for GPU rows)")
        p.add_argument("--max-memory", default=None, help="convert's max_memory, e.g. cpu=8GiB (default none)")
        p.add_argument("--offload-folder", default=None, help="convert's offload_folder (default none)")
        p.add_argument("--tokens", type=int, default=2048, help="plan: calibration tokens (default 2048)")
        p.add_argument("--work", default="/tmp/hf-mla-vlm-scale", help="checkpoint folder (default /tmp/...)")
        p.add_argument("--keep", action="store_true", help="keep the checkpoints")
        p.add_argument("--results", type=Path, default=RESULTS, help=f"JSON to append to (default {RESULTS})")
    args = parser.parse_args(argv)
    row = {"run": run, "plan": plan, "check": check}[args.command](args)
    save(row, args.results)
    print(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
