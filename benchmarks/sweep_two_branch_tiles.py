"""Sweep of the decode kernel's tile configurations at the converted models' two-branch shapes.

For Qwen2.5-VL-7B latent 256 / 512 and Llama-3-8B latent 512 (``M = 2`` branches, batch 16, context 32k, bf16,
the model's padded side rows), times the launcher's default configuration and every combination of query heads per
program (``block_h``), tile length, warps and pipeline stages as CUDA-graph replays (L2 flushed), and writes them
with their effective bandwidth. It answers whether another tile choice brings the kernel nearer the copy bandwidth
(``benchmarks/results/decode_kernel_h200.md``); configurations that do not fit in shared memory are recorded as
such. Run on the GPU machine::

    PYTHONPATH=src python benchmarks/sweep_two_branch_tiles.py \\
        --out benchmarks/results/decode_kernel_h200_two_branch_sweep.json
"""

import argparse
import datetime
import functools
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import triton
from bench_decode_kernel import MODELS, _call_args, bench_graph_ms, make_decode_inputs, mla_bytes

from hf_mla_vlm.kernels import mla_decode_triton


SHAPES = (("qwen2.5-vl-7b", 256), ("qwen2.5-vl-7b", 512), ("llama-3-8b", 512))
GRID = dict(block_h=(32, 16, 8), block_t=(32, 64), num_warps=(4, 8), num_stages=(2, 3))


def sweep(batch: int, context: int, seconds_per_shape: float) -> list[dict]:
    device = torch.device("cuda")
    rows = []
    for model, lat in SHAPES:
        cfg = MODELS[model]
        call = _call_args(make_decode_inputs(batch, cfg["h"], cfg["n"], cfg["r"], lat, context, device))
        nbytes = mla_bytes(batch, context, lat, cfg["n"] * cfg["r"])
        base = bench_graph_ms(functools.partial(mla_decode_triton, *call), reps=30)
        rows.append(dict(model=model, latent=lat, config="default", us=base * 1e3, tbps=nbytes / base / 1e9))
        print(f"{model} L{lat} default {base * 1e3:.1f} us {nbytes / base / 1e9:.2f} TB/s", flush=True)
        deadline = time.time() + seconds_per_shape
        for values in itertools.product(*GRID.values()):
            if time.time() > deadline:
                rows.append(dict(model=model, latent=lat, config="time limit: rest of the grid not run"))
                break
            kw = dict(zip(GRID, values))
            try:
                ms = bench_graph_ms(functools.partial(mla_decode_triton, *call, **kw), reps=20)
            except triton.runtime.errors.OutOfResources:
                rows.append(dict(model=model, latent=lat, config=kw, error="does not fit in shared memory"))
                continue
            row = dict(model=model, latent=lat, config=kw, us=ms * 1e3, tbps=nbytes / ms / 1e9, vs_default=base / ms)
            rows.append(row)
            print(f"  {kw} {ms * 1e3:.1f} us {row['tbps']:.2f} TB/s x{row['vs_default']:.2f}", flush=True)
        call = None
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="results JSON")
    parser.add_argument("--batch", type=int, default=16, help="sequences (default 16)")
    parser.add_argument("--context", type=int, default=32768, help="cached tokens per sequence (default 32768)")
    parser.add_argument("--seconds-per-shape", type=float, default=70.0, help="time limit per shape (default 70)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this sweep needs a CUDA device")
    rows = sweep(args.batch, args.context, args.seconds_per_shape)
    meta = dict(
        device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join(["python", *sys.argv]), batch=args.batch, context=args.context,
    )  # fmt: skip
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
