"""Microbenchmark of the absorbed MLA decode kernel (one decoder layer, one query token per sequence).

Compares, per (model, latent width, batch, context):

* ``triton``: :func:`hf_mla_vlm.kernels.mla_decode_triton` on the latent cache (``M = 2`` branches, Qwen-style
  query biases, half image / half text tokens, bf16);
* ``reference``: :func:`hf_mla_vlm.kernels.mla_decode_reference` (plain torch, float32 math), skipped where its
  float32 intermediates would not fit the memory budget;
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` over the original model's *decompressed* GQA
  cache (K, V of shape ``(B, N, T, 128)`` bf16, one query token, ``enable_gqa=True``), the best of the SDPA
  backends that run.

Effective bandwidth = bytes of cache actually read / median time. For the MLA rows the bytes are the latent and
side rows of the valid tokens (``T * (L + N*R + 1) * 2`` per sequence); for SDPA they are the K and V rows
(``T * N * 128 * 2 * 2``).

``--kv-cache bf16,int8,fp8,int4`` adds rows with the latent quantized
(``latent_cache.LatentQuantization``: the kernel reads the stored int8 / fp8 / int4 values and fp16 scales and
dequantizes them in registers); their bytes count the quantized values and scales (``latent_read_bytes`` per token)
instead of ``2 * L``, and the tables give their time relative to the bf16 row of the same shape.

Times are medians over CUDA-event-timed runs with L2 flushed before every run:

* ``triton_us``: the launcher captured in a CUDA graph and replayed (GPU time of stage 1 + combine; this is how
  decode runs under CUDA graphs / ``torch.compile``), ``triton_eager_us``: ``triton.testing.do_bench`` of the
  plain Python call, which includes the launcher's host overhead wherever it exceeds the GPU time, and
  ``triton_host_us``: host time of one call;
* reference and SDPA: ``triton.testing.do_bench`` of the eager call.

* ``heads`` rows: ours and FlashInfer's ``BatchMLAPagedAttentionWrapper`` (fa3, optional: skipped where
  ``flashinfer`` does not import) on the same data at FlashInfer's shape (latent 512 + rope 64, one kv head) for
  16 / 32 / 64 / 128 query heads, both as CUDA-graph replays.

The copy bandwidth is measured in the same run. Regenerate the committed results on the H200 (FlashInfer 0.7.2.post1
and apache-tvm-ffi 0.1.15.post2 installed from wheels there)::

    PYTHONPATH=src python benchmarks/bench_decode_kernel.py --out-dir benchmarks/results --tag h200 --no-reference

``--sweep-heads`` first times explicit (heads per program, warps, tile) configurations at FlashInfer's shape (the
one-branch defaults of ``_default_config`` / ``choose_block_h`` come from it); ``--heads`` (empty: none) and
``--latents`` (empty: none) select the two tables.

``--tune`` first sweeps tile configurations (``BLOCK_T``, warps, pipeline stages) and split counts of the Triton
kernel on a few shapes and prints them, per stage-1 kernel of ``--stage1`` (``fused`` and / or ``by-branch``); the
launcher's defaults (``_default_config``, ``choose_num_splits``) were set from such a sweep of the fused kernel.
``--tune-then-bench`` then times the main table with each kernel's best configuration.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import triton
import triton.testing

from hf_mla_vlm.kernels import mla_decode_reference, mla_decode_triton
from hf_mla_vlm.modeling.latent_cache import LATENT_DTYPES, LatentQuantization, side_row_width


MODELS: dict[str, dict[str, int]] = {
    # query heads, kv heads, rope dims per kv head, original head dim
    "qwen2.5-vl-7b": {"h": 28, "n": 4, "r": 32, "head_dim": 128},
    "llama-3-8b": {"h": 32, "n": 8, "r": 32, "head_dim": 128},
}
LATENTS = (256, 512)
BATCHES = (1, 16, 64)
CONTEXTS = (8192, 32768)
REFERENCE_MEMORY_BUDGET = 24e9  # bytes of float32 intermediates the torch reference may allocate


KV_CACHES = ("bf16", *LATENT_DTYPES)  # the latent in bf16, or quantized (default group sizes)
LAYOUTS = ("runs", "random")
RUN_LENGTH = 1024  # tokens per image / text run in the "runs" layout (a Qwen2.5-VL image is 256-1280+ tokens)


def make_decode_inputs(
    b: int,
    h: int,
    n: int,
    r: int,
    lat: int,
    t: int,
    device: torch.device,
    dtype: torch.dtype = torch.bfloat16,
    layout: str = "runs",
    padded: bool = True,
    kv_cache: str = "bf16",
) -> dict[str, object]:
    """Random decode inputs in the model's cache layout (half image, half text tokens, all keys valid).

    ``kv_cache`` other than "bf16": ``keys`` holds the latents quantized (``(B, 1, T, K)`` uint8 rows, quantized
    one sequence at a time), ``latent`` is their view and ``latent_format`` the kernels' format argument.

    ``layout="runs"``: image and text tokens alternate in runs of ``RUN_LENGTH`` tokens (how images sit in a real
    cache); ``"random"``: each token's modality is drawn independently (every kernel tile mixes both, the worst
    case).

    Returns a dict with the ``mla_decode_*`` arguments plus ``keys`` ``(B, 1, T, L)`` and ``values``
    ``(B, 1, T, side_row_width(N, R))`` (``side`` is the ``N*R + 1`` view the model passes)."""
    if kv_cache == "bf16":
        keys, latent_format = torch.randn(b, 1, t, lat, device=device, dtype=dtype), None
    else:
        fmt = LatentQuantization.create(kv_cache, lat)
        keys = torch.empty(b, 1, t, fmt.row_bytes, device=device, dtype=torch.uint8)
        for i in range(b):  # bounded float32 temporaries
            keys[i] = fmt.quantize(torch.randn(1, t, lat, device=device, dtype=dtype))
        latent_format = fmt.spec
    width = side_row_width(n, r) if padded else n * r + 1  # padded = the model's cache layout (aligned rows)
    values = torch.zeros(b, 1, t, width, device=device, dtype=dtype)
    values[..., : n * r] = torch.randn(b, 1, t, n * r, device=device, dtype=dtype)
    if layout == "random":
        values[..., n * r] = (torch.rand(b, 1, t, device=device) < 0.5).to(dtype)
    elif layout == "runs":
        values[..., n * r] = ((torch.arange(t, device=device) // RUN_LENGTH) % 2 == 0).to(dtype)
    else:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return {
        "q_rope": torch.randn(b, h, r, device=device, dtype=dtype),
        "q_latent": torch.randn(b, h, 2, lat, device=device, dtype=dtype) * (128 / lat) ** 0.5,
        "q_bias": torch.randn(b, h, 2, device=device, dtype=torch.float32),
        "latent": keys[:, 0],
        "side": values[:, 0, :, : n * r + 1],
        "key_mask": None,
        "scale": 1.0 / math.sqrt(128),
        "num_kv_heads": n,
        "latent_format": latent_format,
        "keys": keys,
        "values": values,
    }


def _call_args(inp: dict[str, object]) -> tuple:
    names = ("q_rope", "q_latent", "q_bias", "latent", "side", "key_mask", "scale", "num_kv_heads")
    return tuple(inp[k] for k in names)


def _format_kwargs(inp: dict[str, object]) -> dict[str, object]:
    return {} if inp.get("latent_format") is None else {"latent_format": inp["latent_format"]}


def latent_read_bytes(lat: int, kv_cache: str = "bf16", elem: int = 2) -> int:
    """Latent bytes per token the kernel loads: ``L * elem`` in bf16; quantized, the values and the fp16 scales
    (and zero points), not the row's alignment padding."""
    if kv_cache == "bf16":
        return lat * elem
    fmt = LatentQuantization.create(kv_cache, lat)
    return fmt.scale_offset + 2 * fmt.params_per_group * fmt.num_groups


def mla_bytes(b: int, t: int, lat: int, nr: int, elem: int = 2, kv_cache: str = "bf16") -> int:
    """Cache bytes the absorbed kernel must read: latent (``latent_read_bytes``), rope keys and flag of all valid
    tokens (the side rows' padding is not counted, though whole 32-byte sectors of it are fetched)."""
    return b * t * (latent_read_bytes(lat, kv_cache, elem) + (nr + 1) * elem)


def bench_ms(fn: Callable[[], object], rep: int = 100, warmup: int = 25) -> float:
    """Median milliseconds of ``fn`` with ``triton.testing.do_bench`` (L2 flushed before each call)."""
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def bench_graph_ms(fn: Callable[[], object], reps: int = 60) -> float:
    """Median milliseconds of one CUDA-graph replay of ``fn`` (GPU time without host overhead), L2 flushed first."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    times = []
    for _ in range(reps + 3):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        times.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in times[3:])


def kernel_times_us(fn: Callable[[], object], reps: int = 20) -> dict[str, float]:
    """Median GPU time per kernel of one call (torch.profiler, L2 flushed before each call): e.g. stage 1 vs the
    combine of the split-K kernel. Keys are the kernel names with a leading underscore stripped."""
    from torch.profiler import ProfilerActivity, profile

    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            flush.zero_()
            fn()
        torch.cuda.synchronize()
    per_kernel: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and "mla_decode" in event.name:
            per_kernel.setdefault(event.name.lstrip("_"), []).append(event.time_range.elapsed_us())
    return {name: statistics.median(times) for name, times in per_kernel.items()}


def host_launch_us(fn: Callable[[], object], iters: int = 50) -> float:
    """Host time of one call (what eager decode pays per layer on the CPU before the GPU starts)."""
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        best = min(best, (time.perf_counter() - start) / iters * 1e6)
        torch.cuda.synchronize()
    return best


def copy_bandwidth(device: torch.device, nbytes: int = 2 << 30) -> float:
    """Device-to-device copy, bytes read + written per second."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), rep=50)
    return 2 * nbytes / (ms * 1e-3)


def bench_sdpa(b: int, h: int, n: int, t: int, head_dim: int, device: torch.device) -> dict[str, object]:
    """Best SDPA backend on the decompressed GQA cache; returns times per backend and the best one."""
    import warnings

    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(b, h, 1, head_dim, device=device, dtype=torch.bfloat16)
    k = torch.randn(b, n, t, head_dim, device=device, dtype=torch.bfloat16)
    v = torch.randn(b, n, t, head_dim, device=device, dtype=torch.bfloat16)
    f = torch.nn.functional.scaled_dot_product_attention
    per_backend: dict[str, float | str] = {}
    backends = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }
    for name, backend in backends.items():

        def run(backend: SDPBackend = backend) -> torch.Tensor:
            with sdpa_kernel([backend]):
                return f(q, k, v, enable_gqa=True)

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run()
                torch.cuda.synchronize()
                per_backend[name] = bench_ms(run, rep=50)
        except Exception as exc:  # a backend that does not support the case
            per_backend[name] = f"unsupported: {type(exc).__name__}"
            torch.cuda.synchronize()
    timed = {k: v for k, v in per_backend.items() if isinstance(v, float)}
    best = min(timed, key=timed.get) if timed else None
    nbytes = 2 * b * n * t * head_dim * 2
    return {
        "sdpa_backend": best,
        "sdpa_us": timed[best] * 1e3 if best else None,
        "sdpa_bytes": nbytes,
        "sdpa_tbps": nbytes / (timed[best] * 1e-3) / 1e12 if best else None,
        "sdpa_per_backend_ms": per_backend,
    }


def launch_config(inp: dict[str, object], m: int, overrides: dict[str, int]) -> dict[str, int]:
    """The tile configuration, heads per program and split count the launcher uses for ``inp`` (with
    ``overrides``)."""
    from hf_mla_vlm.kernels.absorbed_decode import (
        _default_config,
        _pow2,
        _row_alignment,
        _sm_count,
        choose_block_h,
        choose_combine_tile,
        choose_num_splits,
    )

    b, h, lat = inp["q_latent"].shape[0], inp["q_latent"].shape[1], inp["q_latent"].shape[-1]
    rows = 1 if overrides.get("by_branch") else m  # query rows per head in a stage-1 program
    block_h = overrides.get("block_h") or choose_block_h(h, rows, max(16, _pow2(lat)))
    block_h = min(block_h, max(16 // rows, _pow2(h)))
    head_blocks = -(-h // block_h)
    aligned = _row_alignment(inp["side"]) > 1
    block_t, warps, stages = _default_config(lat, rows, 2, inp["key_mask"] is not None, aligned, block_h)
    block_t = overrides.get("block_t", block_t)
    warps = overrides.get("num_warps", warps)
    sms = _sm_count(inp["latent"].device)
    splits = overrides.get("num_splits") or choose_num_splits(
        b * head_blocks, inp["latent"].shape[1], sms, block_t, 2 if warps <= 4 else 1
    )
    combined = splits > 1 or overrides.get("by_branch")
    combine_chunk_s, combine_block_l = choose_combine_tile(b * h, lat, splits, sms) if combined else (0, 0)
    return dict(
        block_t=block_t,
        num_warps=warps,
        num_stages=overrides.get("num_stages", stages),
        block_h=block_h,
        head_blocks=head_blocks,
        num_splits=splits,
        combine_chunk_s=combine_chunk_s,
        combine_block_l=combine_block_l,
    )


def reference_memory(b: int, h: int, t: int, lat: int) -> float:
    """Rough peak bytes of the float32 reference's intermediates."""
    return 3 * b * t * lat * 4 + 8 * b * h * 2 * t * 4


def bench_mla(
    model: str,
    lat: int,
    b: int,
    t: int,
    device: torch.device,
    with_reference: bool,
    overrides: dict[str, int],
    layout: str = "runs",
    padded: bool = True,
    kv_cache: str = "bf16",
) -> dict[str, object]:
    """Triton kernel (and the torch reference) on one shape; the inputs are freed on return."""
    cfg = MODELS[model]
    h, n, r = cfg["h"], cfg["n"], cfg["r"]
    inp = make_decode_inputs(b, h, n, r, lat, t, device, layout=layout, padded=padded, kv_cache=kv_cache)
    args = _call_args(inp)
    fmt_kwargs = _format_kwargs(inp)
    nbytes = mla_bytes(b, t, lat, n * r, kv_cache=kv_cache)
    row: dict[str, object] = {
        "model": model, "h": h, "n": n, "r": r, "latent": lat, "kv_cache": kv_cache, "batch": b, "context": t,
        "layout": layout, "side_row": inp["values"].shape[-1], "latent_format": inp["latent_format"],
        "latent_read_bytes_per_token": latent_read_bytes(lat, kv_cache),
        "stage1": "by-branch" if overrides.get("by_branch") else "fused",
    }  # fmt: skip
    row.update(mla_bytes=nbytes, **launch_config(inp, 2, overrides))

    def kernel() -> object:
        return mla_decode_triton(*args, **fmt_kwargs, **overrides)

    out = kernel()
    torch.cuda.synchronize()
    ms = bench_graph_ms(kernel)
    eager_ms = bench_ms(kernel)
    row.update(
        triton_us=ms * 1e3,
        triton_tbps=nbytes / (ms * 1e-3) / 1e12,
        triton_eager_us=eager_ms * 1e3,
        triton_eager_tbps=nbytes / (eager_ms * 1e-3) / 1e12,
        triton_host_us=host_launch_us(kernel),
        triton_kernel_us=kernel_times_us(kernel),
    )
    if with_reference and reference_memory(b, h, t, lat) < REFERENCE_MEMORY_BUDGET:
        ref = mla_decode_reference(*args, **fmt_kwargs)
        row["max_rel_err_ctx"] = ((out[0] - ref[0]).abs().max() / ref[0].abs().max()).item()
        row["max_abs_err_lse"] = (out[2] - ref[2]).abs().max().item()
        ref = None
        ms_ref = bench_ms(lambda: mla_decode_reference(*args, **fmt_kwargs), rep=20, warmup=5)
        row.update(reference_us=ms_ref * 1e3, reference_tbps=nbytes / (ms_ref * 1e-3) / 1e12)
    else:
        row.update(reference_us=None, reference_tbps=None, reference_note="skipped (memory budget)")
    return row


def bench_row(
    model: str,
    lat: int,
    b: int,
    t: int,
    device: torch.device,
    with_reference: bool,
    overrides: dict[str, int],
    layout: str = "runs",
    padded: bool = True,
    kv_cache: str = "bf16",
    with_sdpa: bool = True,
) -> dict[str, object]:
    row = bench_mla(model, lat, b, t, device, with_reference, overrides, layout, padded, kv_cache)
    torch.cuda.empty_cache()
    cfg = MODELS[model]
    if with_sdpa:  # once per shape: it does not depend on the latent format
        row.update(bench_sdpa(b, cfg["h"], cfg["n"], t, cfg["head_dim"], device))
    torch.cuda.empty_cache()
    return row


# FlashInfer's MLA shape (DeepSeek-V2/V3): one latent of 512 + rope keys of 64 shared by all query heads.
HEAD_COUNTS = (16, 32, 64, 128)
PEER_LATENT, PEER_ROPE, PEER_PAGE = 512, 64, 64
PEER_SHAPES = ((1, 32768), (16, 8192), (16, 32768), (64, 8192), (64, 32768))


def graph_or_eager_ms(fn: Callable[[], object]) -> tuple[float, str]:
    """CUDA-graph replay time of ``fn`` where it can be captured, else ``do_bench`` of the eager call."""
    try:
        return bench_graph_ms(fn), "graph"
    except Exception:  # not capturable (e.g. a host sync inside)
        torch.cuda.synchronize()
        return bench_ms(fn), "eager"


def flashinfer_peer(q_nope, q_pe, ckv, kpe, t: int, scale: float) -> Callable[[], torch.Tensor]:
    """FlashInfer ``BatchMLAPagedAttentionWrapper`` (fa3 backend) planned for one query token per sequence over
    ``t`` cached tokens in pages of ``PEER_PAGE``; returns the call."""
    import warnings

    import flashinfer

    b, h, _ = q_nope.shape
    device = q_nope.device
    pages = ckv.shape[0] // b
    workspace = torch.empty(128 << 20, dtype=torch.int8, device=device)
    wrapper = flashinfer.mla.BatchMLAPagedAttentionWrapper(workspace, backend="fa3")
    i32 = torch.int32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the flat CSR plan form is deprecated, not removed, in 0.7.2
        wrapper.plan(
            torch.arange(b + 1, dtype=i32, device=device),
            torch.arange(b + 1, dtype=i32, device=device) * pages,
            torch.arange(b * pages, dtype=i32, device=device),
            torch.full((b,), t, dtype=i32, device=device),
            h, PEER_LATENT, PEER_ROPE, PEER_PAGE, False, scale, q_nope.dtype, ckv.dtype,
        )  # fmt: skip

    def run() -> torch.Tensor:
        try:
            return wrapper.run(query=(q_nope, q_pe), kv_cache=(ckv, kpe))
        except TypeError:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return wrapper.run(q_nope, q_pe, ckv, kpe)

    return run


def bench_heads_row(h: int, b: int, t: int, device: torch.device, with_peer: bool) -> dict[str, object]:
    """Ours and FlashInfer fa3 at FlashInfer's shape (latent 512 + rope 64, one kv head, bf16), same data."""
    pages = -(-t // PEER_PAGE)
    dtype = torch.bfloat16
    ckv = torch.randn(b * pages, PEER_PAGE, PEER_LATENT, device=device, dtype=dtype)
    kpe = torch.randn(b * pages, PEER_PAGE, PEER_ROPE, device=device, dtype=dtype)
    q_nope = torch.randn(b, h, PEER_LATENT, device=device, dtype=dtype) * (128 / PEER_LATENT) ** 0.5
    q_pe = torch.randn(b, h, PEER_ROPE, device=device, dtype=dtype)
    scale = 1.0 / math.sqrt(128 + PEER_ROPE)
    width = side_row_width(1, PEER_ROPE)
    values = torch.zeros(b, 1, t, width, device=device, dtype=dtype)  # rope keys + flag (0: one branch), padded
    values[:, 0, :, :PEER_ROPE] = kpe.view(b, pages * PEER_PAGE, PEER_ROPE)[:, :t]
    inp = {
        "q_rope": q_pe, "q_latent": q_nope.unsqueeze(2), "q_bias": None,
        "latent": ckv.view(b, pages * PEER_PAGE, PEER_LATENT)[:, :t], "side": values[:, 0, :, : PEER_ROPE + 1],
        "key_mask": None, "scale": scale, "num_kv_heads": 1,
    }  # fmt: skip
    args = _call_args(inp)
    ours_bytes = mla_bytes(b, t, PEER_LATENT, PEER_ROPE)
    peer_bytes = b * t * (PEER_LATENT + PEER_ROPE) * 2
    row: dict[str, object] = {"heads": h, "batch": b, "context": t, "mla_bytes": ours_bytes, "peer_bytes": peer_bytes}
    row.update(launch_config(inp, 1, {}))
    out = mla_decode_triton(*args)
    ref = mla_decode_reference(*args) if b * t <= 16 * 8192 else None
    if ref is not None:
        row["max_rel_err_ctx"] = ((out[0] - ref[0]).abs().max() / ref[0].abs().max()).item()
    ms, how = graph_or_eager_ms(lambda: mla_decode_triton(*args))
    row.update(ours_us=ms * 1e3, ours_tbps=ours_bytes / (ms * 1e-3) / 1e12, ours_timing=how)
    if with_peer:
        try:
            run = flashinfer_peer(q_nope, q_pe, ckv, kpe, t, scale)
            peer_out = run()
            torch.cuda.synchronize()
            row["peer_vs_ours_rel_err"] = (
                (peer_out.float() - out[0][:, :, 0]).abs().max() / out[0].abs().max()
            ).item()
            ms, how = graph_or_eager_ms(run)
            row.update(peer_us=ms * 1e3, peer_tbps=peer_bytes / (ms * 1e-3) / 1e12, peer_timing=how)
            row["ours_over_peer_throughput"] = row["peer_us"] / row["ours_us"]
        except Exception as exc:  # FlashInfer missing, or this shape unsupported
            row["peer_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return row


def sweep_heads(device: torch.device, rows: list[dict[str, object]]) -> None:
    """Our kernel's tile configurations at FlashInfer's shape, 16-128 heads (sets the launcher's head blocks)."""
    for h in HEAD_COUNTS:
        for b, t in ((16, 8192), (64, 32768)):
            pages = -(-t // PEER_PAGE)
            width = side_row_width(1, PEER_ROPE)
            values = torch.zeros(b, 1, t, width, device=device, dtype=torch.bfloat16)
            values[..., :PEER_ROPE] = torch.randn(b, 1, t, PEER_ROPE, device=device, dtype=torch.bfloat16)
            latent = torch.randn(b, t, PEER_LATENT, device=device, dtype=torch.bfloat16)
            q_lat = torch.randn(b, h, 1, PEER_LATENT, device=device, dtype=torch.bfloat16) * 0.5
            q_pe = torch.randn(b, h, PEER_ROPE, device=device, dtype=torch.bfloat16)
            call = (q_pe, q_lat, None, latent, values[:, 0, :, : PEER_ROPE + 1], None, 0.07, 1)
            ref = mla_decode_triton(*call)  # checked against the reference by the tests; here: configs agree
            nbytes = mla_bytes(b, t, PEER_LATENT, PEER_ROPE)
            for block_h in (16, 32, 64):
                for warps in (4, 8):
                    for block_t in (32, 64):
                        kw = dict(block_h=block_h, num_warps=warps, block_t=block_t)
                        tag = f"sweep H{h:<3d} B{b:<3d} T{t:<6d} pages {pages}"
                        _tune_trial(rows, tag, call, ref, nbytes, kw)
            latent = values = None
            torch.cuda.empty_cache()


def heads_markdown(meta: dict[str, object], rows: list[dict[str, object]]) -> str:
    head = (
        "| heads | B | T | heads/program x programs | splits | ours µs | ours TB/s | ours / copy | "
        "FlashInfer fa3 µs | FlashInfer TB/s | ours throughput / FlashInfer |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        lines.append(
            f"| {r['heads']} | {r['batch']} | {r['context']} | {r['block_h']} x {r['head_blocks']} | "
            f"{r['num_splits']} | {r['ours_us']:.1f} | **{r['ours_tbps']:.2f}** | "
            f"{r['ours_tbps'] / meta['copy_tbps']:.2f} | {_fmt(r.get('peer_us'), '.1f')} | "
            f"{_fmt(r.get('peer_tbps'), '.2f')} | {_fmt(r.get('ours_over_peer_throughput'), '.2f')} |"
        )
    errors = sorted({r["peer_error"] for r in rows if r.get("peer_error")})
    note = "".join(f"\nFlashInfer: {e}\n" for e in errors)
    return head + "\n".join(lines) + "\n" + note


def _fmt(x: object, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _shape(row: dict[str, object]) -> tuple:
    return row["model"], row["latent"], row["batch"], row["context"]


def _stage1(row: dict[str, object]) -> str:
    return row.get("stage1", "fused")  # rows written before the by-branch stage 1 existed: the fused one


def _kv(row: dict[str, object]) -> str:
    return row.get("kv_cache", "bf16")  # rows written before quantized latents existed: bf16


def markdown_table(rows: list[dict[str, object]], copy_tbps: float) -> str:
    head = (
        "| model | L | KV | stage 1 | B | T | MLA MB | splits | triton µs (graph) | / bf16 | fused µs / this µs | "
        "stage 1 + combine µs | triton TB/s | / copy | triton eager µs | ref µs | ref TB/s | SDPA GQA µs (backend) | "
        "SDPA TB/s | SDPA µs / triton µs |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    bf16 = {(_shape(row), _stage1(row)): row for row in rows if _kv(row) == "bf16"}
    fused = {(_shape(row), _kv(row)): row for row in rows if _stage1(row) == "fused"}
    sdpa = {_shape(row): row for row in rows if row.get("sdpa_us") is not None}
    lines = []
    for row in rows:
        base = bf16.get((_shape(row), _stage1(row)))
        ratio = None if base is None else row["triton_us"] / base["triton_us"]
        peer = fused.get((_shape(row), _kv(row)))
        vs_fused = None if peer is None or peer is row else peer["triton_us"] / row["triton_us"]
        row = {**sdpa.get(_shape(row), {}), **row}  # the shape's SDPA numbers on every latent format's row
        sd = row.get("sdpa_us")
        speed = None if sd is None else sd / row["triton_us"]
        kernels = row.get("triton_kernel_us") or {}
        stages = sorted(kernels, key=lambda k: "combine" in k)  # stage 1 (fused or by branch), then the combine
        parts = " + ".join(f"{kernels[k]:.1f}" for k in stages)
        lines.append(
            f"| {row['model']} | {row['latent']} | {_kv(row)} | {_stage1(row)} | {row['batch']} | "
            f"{row['context']} | {row['mla_bytes'] / 1e6:.1f} | {row['num_splits']} | {row['triton_us']:.1f} | "
            f"{_fmt(ratio, '.2f')} | {_fmt(vs_fused, '.2f')} | {parts or '-'} | "
            f"**{row['triton_tbps']:.2f}** | {row['triton_tbps'] / copy_tbps:.2f} | "
            f"{row['triton_eager_us']:.1f} | {_fmt(row['reference_us'], '.0f')} | "
            f"{_fmt(row['reference_tbps'], '.2f')} | "
            f"{_fmt(sd, '.1f')} ({row.get('sdpa_backend')}) | {_fmt(row.get('sdpa_tbps'), '.2f')} | "
            f"{_fmt(speed, '.2f')} |"
        )
    return head + "\n".join(lines) + "\n"


def results_markdown(
    meta: dict[str, object], rows: list[dict[str, object]], heads_rows: list[dict[str, object]] | None = None
) -> str:
    """The results page: header with the environment and method, then the tables."""
    heads = ""
    if heads_rows:
        heads = (
            "\n## Head counts, against FlashInfer\n\n"
            f"FlashInfer {meta.get('flashinfer')} `BatchMLAPagedAttentionWrapper` (fa3 backend, pages of {PEER_PAGE}) "
            f"and ours on the same data at FlashInfer's shape: latent {PEER_LATENT} + rope {PEER_ROPE}, one kv head, "
            "bf16, one branch, no bias; both timed as CUDA-graph replays (L2 flushed). TB/s counts each kernel's own "
            f"bytes (ours `{PEER_LATENT} + {PEER_ROPE} + 1` elements per token, FlashInfer `{PEER_LATENT} + "
            f"{PEER_ROPE}`); the last column is the time ratio (> 1: ours faster).\n\n"
        ) + heads_markdown(meta, heads_rows)
    return (
        f"# Absorbed MLA decode kernel: {meta['device']}\n\n"
        f"torch {meta['torch']}, triton {meta['triton']}, {meta['date']}; measured device copy "
        f"{meta['copy_tbps']:.2f} TB/s (read + write).\n\n"
        f"Regenerate: `{meta['command']}`\n\n"
        f"One decoder layer, one query token per sequence, bf16 cache, {meta['modalities']}, all keys valid. MLA "
        "bytes = latent + rope keys + flag (`L + N*R + 1` elements per token; padding not counted; a quantized latent "
        "(`KV` int8 / fp8 / int4, default groups) counts its values and fp16 scales instead of `2 L` bytes, and "
        "`/ bf16` is its time over the bf16 row's); SDPA reads the "
        "original model's decompressed "
        "GQA cache (`2 * N * 128` elements per token, best of the flash / efficient / cuDNN backends). Medians, L2 "
        "flushed before every run; `triton µs (graph)` is a CUDA-graph replay (GPU time), `triton eager µs` the plain "
        "Python call under `triton.testing.do_bench` (host-bound at small sizes); `stage 1 + combine µs` are the two "
        "kernels' medians under torch.profiler (one split: no combine, except by branch); `stage 1` fused = both "
        "branches' queries over every tile, by-branch = each branch over its own range of a chunk, and `fused µs / "
        "this µs` compares them (> 1: this row faster). `/ copy` = triton TB/s over the measured "
        "copy bandwidth.\n\n" + markdown_table(rows, meta["copy_tbps"]) + heads
    )


def run_benchmark(args: argparse.Namespace, overrides: dict[tuple[int, str], dict[str, int]] | None = None) -> None:
    device = torch.device("cuda")
    overrides = overrides or {}
    meta = {
        "device": torch.cuda.get_device_name(device),
        "sm_count": torch.cuda.get_device_properties(device).multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "PYTHONPATH=src python " + " ".join(sys.argv),
        "dtype": "bfloat16",
        "modalities": "M = 2 branches, half image / half text tokens "
        + (f"in alternating runs of {RUN_LENGTH}" if args.layout == "runs" else "drawn independently per token")
        + ", Qwen-style query biases, no key padding, side rows "
        + (
            "of N*R + 1 elements (unaligned)"
            if args.unpadded_side
            else "padded to 16-byte units as in the model's cache"
        ),
        "timing": "median of CUDA-event-timed runs, L2 flushed before each; triton_us = CUDA-graph replay, "
        "triton_eager_us / reference / SDPA = triton.testing.do_bench of the eager call",
        "tile_overrides": {f"L{lat} {stage1}": v for (lat, stage1), v in overrides.items()},
    }
    meta["copy_tbps"] = copy_bandwidth(device) / 1e12
    print(f"# {meta['device']} torch {meta['torch']} triton {meta['triton']}: copy {meta['copy_tbps']:.2f} TB/s")
    try:
        import flashinfer

        meta["flashinfer"] = flashinfer.__version__
    except Exception as exc:  # optional peer
        meta["flashinfer"] = f"unavailable ({type(exc).__name__}: {str(exc)[:200]})"
    print(f"# flashinfer: {meta['flashinfer']}", flush=True)
    sweep: list[dict[str, object]] = []
    if args.sweep_heads:
        sweep_heads(device, sweep)
    heads_rows = []
    for h in args.heads:
        for b, t in PEER_SHAPES:
            row = bench_heads_row(h, b, t, device, with_peer=not meta["flashinfer"].startswith("unavailable"))
            heads_rows.append(row)
            print(
                f"heads {h:<3d} B{b:<3d} T{t:<6d} {row['block_h']}x{row['head_blocks']} splits {row['num_splits']}: "
                f"ours {row['ours_us']:8.1f} us {row['ours_tbps']:5.2f} TB/s | flashinfer "
                f"{_fmt(row.get('peer_us'), '8.1f')} us {_fmt(row.get('peer_tbps'), '5.2f')} TB/s "
                f"{row.get('peer_error', '')} err {_fmt(row.get('max_rel_err_ctx'), '.1e')} / "
                f"{_fmt(row.get('peer_vs_ours_rel_err'), '.1e')}",
                flush=True,
            )
            torch.cuda.empty_cache()
    rows = []
    models = [m for m in MODELS if not args.models or m in args.models]
    shapes = [(m, lat, b, t) for m in models for lat in args.latents for b in args.batches for t in args.contexts]
    variants = [(kv_cache, stage1) for kv_cache in args.kv_cache for stage1 in args.stage1]
    for model, lat, b, t in shapes:
        for i, (kv_cache, stage1) in enumerate(variants):
            tiles = {**overrides.get((lat, stage1), {}), **({"by_branch": True} if stage1 == "by-branch" else {})}
            row = bench_row(
                model, lat, b, t, device, not args.no_reference, tiles, args.layout, not args.unpadded_side,
                kv_cache, with_sdpa=i == 0,
            )  # fmt: skip
            rows.append(row)
            print(
                f"{model:14s} L{lat:<4d} {kv_cache:4s} {stage1:9s} B{b:<3d} T{t:<6d} triton "
                f"{row['triton_us']:8.1f} us {row['triton_tbps']:5.2f} TB/s (eager {row['triton_eager_us']:7.1f} us, "
                "host "
                f"{row['triton_host_us']:.0f} us, splits {row['num_splits']}, kernels "
                + " ".join(f"{k} {v:.1f}" for k, v in row["triton_kernel_us"].items())
                + ") | "
                f"ref {_fmt(row['reference_us'], '8.0f')} us | sdpa {_fmt(row.get('sdpa_us'), '8.1f')} us "
                f"{_fmt(row.get('sdpa_tbps'), '.2f')} TB/s ({row.get('sdpa_backend')}) "
                f"err {_fmt(row.get('max_rel_err_ctx'), '.1e')}",
                flush=True,
            )
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        data = {"meta": meta, "rows": rows, "heads_rows": heads_rows, "sweep": sweep}
        (out / f"decode_kernel_{args.tag}.json").write_text(json.dumps(data, indent=2))
        (out / f"decode_kernel_{args.tag}.md").write_text(results_markdown(meta, rows, heads_rows))
        print(f"wrote {out}/decode_kernel_{args.tag}.json and .md")


TUNE_CONFIGS = {
    # latent width -> candidate (block_t, num_warps, num_stages)
    256: [(64, 8, 2), (32, 4, 3), (32, 4, 2), (64, 4, 2), (64, 4, 3), (32, 8, 3), (16, 4, 3)],
    512: [(64, 8, 2), (32, 8, 3), (32, 8, 2), (16, 8, 2), (32, 4, 2), (64, 4, 2)],
}


def _tune_trial(
    results: list[dict[str, object]], tag: str, call: tuple, ref: tuple, nbytes: int, kw: dict[str, object]
) -> float:
    """Time one launcher configuration (CUDA-graph replay), print it, append it to ``results``."""
    tag = tag + " " + " ".join(f"{k}={v}" for k, v in kw.items())
    try:
        out = mla_decode_triton(*call, **kw)
        torch.cuda.synchronize()
    except Exception as exc:
        print(f"{tag} FAILED {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        return float("inf")
    err = ((out[0] - ref[0]).abs().max() / ref[0].abs().max()).item()
    ms = bench_graph_ms(lambda: mla_decode_triton(*call, **kw), reps=30)
    if not err < 5e-2:  # a wrong result never wins
        print(f"{tag} WRONG RESULT (rel err {err:.2e})", flush=True)
        ms = float("inf")
    tbps = nbytes / (ms * 1e-3) / 1e12
    results.append(dict(tag=tag, us=ms * 1e3, tbps=tbps, err=err))
    print(f"{tag} {ms * 1e3:8.1f} us {tbps:5.2f} TB/s err {err:.1e}", flush=True)
    return ms


def run_tune(args: argparse.Namespace) -> dict[tuple[int, str], dict[str, object]]:
    """Sweep tile configs, then split counts, per stage-1 kernel of ``args.stage1``; returns the best launcher
    options per (latent width, stage-1 kernel) (on the unmasked batch-16 shape)."""
    device = torch.device("cuda")
    shapes = [
        # model, latent, batch, context, with a key mask, split counts to try
        ("qwen2.5-vl-7b", 256, 16, 8192, False, (8, 12, 16, 24, 32)),
        ("qwen2.5-vl-7b", 256, 16, 8192, True, ()),
        ("qwen2.5-vl-7b", 256, 64, 8192, True, ()),
        ("qwen2.5-vl-7b", 512, 16, 8192, False, (8, 16)),
    ]
    results: list[dict[str, object]] = []
    best_per_lat: dict[tuple[int, str], tuple[float, dict[str, object]]] = {}
    for model, lat, b, t, with_mask, split_list in shapes:
        cfg = MODELS[model]
        nbytes = mla_bytes(b, t, lat, cfg["n"] * cfg["r"])
        inp = make_decode_inputs(
            b, cfg["h"], cfg["n"], cfg["r"], lat, t, device, layout=args.layout, padded=not args.unpadded_side
        )
        if with_mask:
            mask = torch.ones(b, t, dtype=torch.bool, device=device)
            mask[:, : t // 8] = False  # left padding of 1/8 of the context
            inp["key_mask"] = mask
        call = _call_args(inp)
        ref = mla_decode_reference(*call)
        for stage1 in args.stage1:
            tag = f"{model:14s} L{lat} B{b:<3d} T{t} mask{int(with_mask)} {stage1}"
            kernel = {"by_branch": True} if stage1 == "by-branch" else {}
            best = None
            for bt, w, st in TUNE_CONFIGS[lat]:
                kw = dict(kernel, block_t=bt, num_warps=w, num_stages=st)
                ms = _tune_trial(results, tag, call, ref, nbytes, kw)
                if best is None or ms < best[0]:
                    best = (ms, kw)
            for splits in split_list:  # split counts with the best configuration
                _tune_trial(results, tag, call, ref, nbytes, dict(best[1], num_splits=splits))
            if b == 16 and not with_mask:
                best_per_lat[lat, stage1] = best
            print(f"==> best {best}\n", flush=True)
        inp = call = ref = None
        torch.cuda.empty_cache()
    if args.out_dir:
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.out_dir) / "tune.json").write_text(json.dumps(results, indent=1))
    return {key: kw for key, (_, kw) in best_per_lat.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=None, help="write decode_kernel_<tag>.json/.md here")
    p.add_argument("--markdown-from", default=None, help="only rewrite the .md page of this results JSON")
    p.add_argument("--tag", default="h100")
    p.add_argument("--models", nargs="*", default=None, choices=list(MODELS))
    p.add_argument("--latents", nargs="*", type=int, default=list(LATENTS))
    p.add_argument("--batches", nargs="*", type=int, default=list(BATCHES))
    p.add_argument("--contexts", nargs="*", type=int, default=list(CONTEXTS))
    p.add_argument("--no-reference", action="store_true", help="skip the torch reference")
    p.add_argument(
        "--kv-cache",
        type=lambda text: [part.strip() for part in text.split(",") if part.strip()],
        default=["bf16"],
        help=f"latent formats of the main table, comma-separated from {','.join(KV_CACHES)} (default bf16; bf16 is "
        "added first when missing, it is what the other rows are compared with)",
    )
    p.add_argument("--layout", choices=LAYOUTS, default="runs", help="image/text token layout of the cache")
    p.add_argument(
        "--stage1",
        nargs="+",
        choices=["fused", "by-branch"],
        default=["fused"],
        help="stage-1 kernels of the main table: the launcher's default (fused: both branches' queries over every "
        "tile) and/or by branch (each branch over its own range of a chunk), each row timed in the same run",
    )
    p.add_argument(
        "--unpadded-side",
        action="store_true",
        help="side rows of N*R + 1 elements (unaligned) instead of the model's padded layout",
    )
    p.add_argument(
        "--heads", nargs="*", type=int, default=list(HEAD_COUNTS), help="head counts at FlashInfer's 512 + 64 shape"
    )
    p.add_argument("--sweep-heads", action="store_true", help="sweep heads per program / warps / tiles there first")
    p.add_argument("--tune", action="store_true", help="sweep tile configs / splits")
    p.add_argument(
        "--tune-then-bench", action="store_true", help="sweep, then benchmark with the best tile config per latent"
    )
    args = p.parse_args()
    unknown = [kv for kv in args.kv_cache if kv not in KV_CACHES]
    if unknown:
        p.error(f"--kv-cache: unknown formats {unknown}; choose from {','.join(KV_CACHES)}")
    args.kv_cache = ["bf16"] + [kv for kv in dict.fromkeys(args.kv_cache) if kv != "bf16"]
    if args.markdown_from:
        data = json.loads(Path(args.markdown_from).read_text())
        page = results_markdown(data["meta"], data["rows"], data.get("heads_rows"))
        Path(args.markdown_from).with_suffix(".md").write_text(page)
        return
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA device")
    if args.tune or args.tune_then_bench:
        best = run_tune(args)
        print(f"best tile configs: {best}", flush=True)
        if args.tune_then_bench:
            run_benchmark(args, best)
    else:
        run_benchmark(args)


if __name__ == "__main__":
    main()
