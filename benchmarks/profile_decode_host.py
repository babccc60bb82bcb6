"""Where the host time of one eager decode step goes (GPU machine): torch.profiler and cProfile summaries.

Builds the Qwen2.5-VL-7B-shaped model of ``bench_decode_e2e.py`` (MLA and/or original), fills a DynamicCache, runs
eager decode steps and writes, per model: wall ms/step, the profiler's CPU and CUDA totals, the top operators by
host time and count, and the top Python functions (cProfile). Also profiles the Triton launcher on its own.

    PYTHONPATH=src python benchmarks/profile_decode_host.py --out-dir /tmp/prof
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time
from pathlib import Path

import torch
from bench_decode_e2e import build
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache

from hf_mla_vlm.compat import CACHE_ARG
from hf_mla_vlm.evaluation.bench import cache_layer


def _pstats(pr: cProfile.Profile, key: str, limit: int = 45) -> str:
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats(key).print_stats(limit)
    return buf.getvalue()


@torch.no_grad()
def profile_model(kind: str, batch: int, context: int, out: Path) -> dict:
    model = build(kind)
    text = model.config.text_config
    cache = DynamicCache(config=text)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for idx in range(text.num_hidden_layers):
        cache.update(*cache_layer(model, batch, context, torch.bfloat16, "cuda", gen), idx)
    token = torch.full((batch, 1), 7, dtype=torch.long, device="cuda")
    position = [context]

    def step():
        p = position[0]
        position[0] += 1
        pos = torch.full((batch, 1), p, dtype=torch.long, device="cuda").unsqueeze(0).expand(3, batch, 1)
        mask = torch.ones(batch, p + 1, dtype=torch.long, device="cuda")
        return model(input_ids=token, **{CACHE_ARG: cache}, attention_mask=mask, position_ids=pos)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        step()
    host_ms = (time.perf_counter() - t0) / 5 * 1e3  # host time to enqueue (GPU may lag behind)
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) / 5 * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    cpu_total = sum(e.self_cpu_time_total for e in events) / 1e3
    # device time of the kernels only (the operator rows repeat their kernels' time), as the profiler's table sums it
    cuda_total = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / 1e3
    n_ops = sum(e.count for e in events if e.key.startswith("aten::"))
    (out / f"{kind}_ops_by_cpu.txt").write_text(events.table(sort_by="self_cpu_time_total", row_limit=40))
    (out / f"{kind}_ops_by_cuda.txt").write_text(events.table(sort_by="self_device_time_total", row_limit=30))
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    pr.disable()
    (out / f"{kind}_cprofile_tottime.txt").write_text(_pstats(pr, "tottime"))
    (out / f"{kind}_cprofile_cumtime.txt").write_text(_pstats(pr, "cumulative"))
    res = dict(
        kind=kind, batch=batch, context=context, host_enqueue_ms_per_step=host_ms, wall_ms_per_step=wall_ms,
        profiler_self_cpu_ms=cpu_total, profiler_self_cuda_ms=cuda_total, aten_ops_per_step=n_ops,
    )  # fmt: skip
    print(json.dumps(res), flush=True)
    model = cache = None  # free before the next model
    torch.cuda.empty_cache()
    return res


def profile_launcher(out: Path) -> dict:
    from bench_decode_kernel import _call_args, make_decode_inputs

    from hf_mla_vlm.kernels import mla_decode_triton

    inp = make_decode_inputs(16, 28, 4, 32, 256, 8192, torch.device("cuda"))
    args = _call_args(inp)
    mla_decode_triton(*args)
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    t0 = time.perf_counter()
    pr.enable()
    for _ in range(200):
        mla_decode_triton(*args)
    pr.disable()
    us = (time.perf_counter() - t0) / 200 * 1e6
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(200):
        mla_decode_triton(*args)
    plain_us = (time.perf_counter() - t0) / 200 * 1e6
    torch.cuda.synchronize()
    (out / "launcher_cprofile.txt").write_text(_pstats(pr, "tottime", 30))
    res = dict(launcher_host_us=plain_us, launcher_host_us_under_cprofile=us)
    print(json.dumps(res), flush=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--models", nargs="+", default=["mla", "original"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=8192)
    args = p.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {"launcher": profile_launcher(out)}
    for kind in args.models:
        results[kind] = profile_model(kind, args.batch, args.context, out)
    (out / "summary.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
