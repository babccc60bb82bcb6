"""End-to-end decode: a Qwen2.5-VL-7B-shaped model converted to MLA against the original, on one GPU.

Random bf16 weights (the text decoder has the real 7B shapes: 28 layers, hidden 3584, 28 query / 4 kv heads,
head_dim 128; the vision tower is shrunk to one block because decode never runs it). The converted model keeps
rope_dim 32 per head and kv_rank 64 (latent 256 + rope keys 4 x 32 = 128 + 1 flag + 7 padding elements per token
and layer: side rows start on 16-byte boundaries, see `side_row_width`). Caches are
filled to the context length with random values (see `hf_mla_vlm.evaluation.bench`), then decode steps are timed with
CUDA events, in the same runtime mode for both models: eager with a DynamicCache, and a StaticCache with
`torch.compile(mode="reduce-overhead")` (CUDA graphs).

Regenerate on the GPU machine:

    PYTHONPATH=src python benchmarks/bench_decode_e2e.py --out benchmarks/results/decode_h100.json

or in two commands that each fit a time limit, then joined:

    PYTHONPATH=src python benchmarks/bench_decode_e2e.py --models mla --out /tmp/e2e_mla.json
    PYTHONPATH=src python benchmarks/bench_decode_e2e.py --models original --out /tmp/e2e_original.json
    python benchmarks/bench_decode_e2e.py --merge /tmp/e2e_*.json --out benchmarks/results/decode_h100.json
"""

import argparse
import gc
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

import hf_mla_vlm
from hf_mla_vlm.cache_size import kv_cache_size
from hf_mla_vlm.evaluation.bench import bench_decode
from hf_mla_vlm.evaluation.kv_cache import KV_CACHE_DTYPES
from hf_mla_vlm.utils import environment


TEXT = dict(
    hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
    vocab_size=152064, max_position_embeddings=65536,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
)  # fmt: skip
VISION = dict(
    depth=1, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, fullatt_block_indexes=[0]
)


def build(kind: str):
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            if kind == "original":
                model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=TEXT, vision_config=VISION))
            else:
                config = hf_mla_vlm.Qwen2_5_VLMLAConfig(
                    text_config=TEXT, vision_config=VISION, rope_dim=32, kv_rank=64
                )
                model = hf_mla_vlm.Qwen2_5_VLMLAForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(torch.float32)
    return model.eval()


def merge_results(parts: list[str], out: Path) -> None:
    """Join the rows of runs made as separate commands (e.g. `--models mla`, then `--models original`)."""
    runs = [json.loads(Path(p).read_text()) for p in parts]
    result = dict(runs[0], rows=[row for run in runs for row in run["rows"]])
    result["runs"] = [{k: run[k] for k in ("command", "date", "device", "environment")} for run in runs]
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/decode_h100.json")
    parser.add_argument("--points", nargs="+", default=["16x32768", "64x32768"])
    parser.add_argument("--modes", nargs="+", default=["eager", "static-compile"])
    parser.add_argument("--compile-points", nargs="+", default=["16x32768"], help="points also run with compile")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--models", nargs="+", default=["mla", "original"], choices=["mla", "original"])
    parser.add_argument("--merge", nargs="+", default=None, help="only join the rows of these result files into --out")
    parser.add_argument(
        "--kv-caches",
        nargs="+",
        default=["bf16"],
        choices=list(KV_CACHE_DTYPES),
        help="latent formats of the MLA rows (bf16 = unquantized; int8 / fp8 / int4 quantize the latent)",
    )
    args = parser.parse_args()
    if args.merge:
        merge_results(args.merge, Path(args.out))
        return
    rows = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "decode_e2e",
        "description": __doc__.split("\n\n")[0],
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(),
        "environment": {**environment(), "cuda": torch.version.cuda},
        "rows": rows,
    }
    for kind in args.models:
        model = build(kind)
        size = kv_cache_size(model.config) if kind == "mla" else None
        per_token = (size.converted if kind == "mla" else 2 * 4 * 128) * 28 * 2  # bytes per token, all layers
        formats = args.kv_caches if kind == "mla" else ["bf16"]
        runs = [(mode, point, kv) for mode in args.modes for point in (args.points if mode == "eager" else
                args.compile_points) for kv in formats]  # fmt: skip
        for mode, point, kv_cache in runs:
            batch, context = map(int, point.split("x"))
            row = {"model": kind, "mode": mode, "batch": batch, "context": context, "kv_cache": kv_cache}
            try:
                row.update(bench_decode(model, batch, context, steps=args.steps, mode=mode, kv_cache=kv_cache))
                if kv_cache == "bf16":  # the formula counts bf16 latents; quantized rows report measured bytes
                    formula = per_token * batch * row["context"]
                    row["cache_bytes_formula_at_context"] = formula
                    row["peak_minus_weights_vs_formula"] = row["peak_minus_weights_bytes"] / formula
            except torch.OutOfMemoryError as error:
                row["error"] = f"CUDA out of memory: {str(error).splitlines()[0][:200]}"
            except Exception as error:  # record and go on with the other points
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
            gc.collect()
            torch.cuda.empty_cache()
            out.write_text(json.dumps(result, indent=2) + "\n")  # partial results survive a timeout
        del model
        gc.collect()
        torch.cuda.empty_cache()
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
