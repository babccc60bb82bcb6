"""benchmarks/bench_decode_kernel.py on CPU: the quantized-latent inputs, byte counts and results page (the timing
itself needs a GPU)."""

import json
import subprocess
import sys

import pytest
import torch

from tests.utils import BENCHMARKS, benchmark_module


pytest.importorskip("triton")


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("bench_decode_kernel") as module:
        yield module


@pytest.mark.parametrize("kv_cache", ["bf16", "int8", "fp8", "int4"])
def test_inputs_are_the_models_quantized_rows(bench, kv_cache):
    from hf_mla_vlm.kernels import mla_decode_reference
    from hf_mla_vlm.modeling.latent_cache import LatentQuantization

    inp = bench.make_decode_inputs(2, 4, 2, 8, 64, 50, torch.device("cpu"), dtype=torch.float32, kv_cache=kv_cache)
    out = mla_decode_reference(*bench._call_args(inp), **bench._format_kwargs(inp))
    assert torch.isfinite(out[0]).all()
    if kv_cache == "bf16":
        assert inp["latent_format"] is None and inp["latent"].shape == (2, 50, 64)
        assert bench.latent_read_bytes(64) == 128
    else:
        fmt = LatentQuantization.from_spec(inp["latent_format"], 64)
        assert fmt.dtype == kv_cache and inp["latent"].dtype == torch.uint8
        assert inp["latent"].shape == (2, 50, fmt.row_bytes)
        assert bench.latent_read_bytes(64, kv_cache) == {"int8": 66, "fp8": 66, "int4": 36}[kv_cache]
    assert bench.mla_bytes(2, 50, 64, 16, kv_cache=kv_cache) == 2 * 50 * (bench.latent_read_bytes(64, kv_cache) + 34)


def test_qwen_l256_bytes_ratio(bench):
    """The issue's anchor shape (Qwen2.5-VL-7B, latent 256, rope keys 4 x 32): int8 reads ~0.55x the bf16 bytes."""
    ratio = bench.mla_bytes(16, 32768, 256, 128, kv_cache="int8") / bench.mla_bytes(16, 32768, 256, 128)
    assert ratio == pytest.approx((256 + 8 + 129 * 2) / ((256 + 129) * 2))
    assert 0.6 < ratio < 0.7  # the bf16 rope keys keep it above half


def test_results_page_compares_formats_with_bf16(bench, tmp_path):
    base = {"model": "qwen2.5-vl-7b", "latent": 256, "batch": 16, "context": 32768, "num_splits": 2,
            "triton_eager_us": 1.0, "reference_us": None, "reference_tbps": None, "triton_kernel_us": {}}  # fmt: skip
    rows = [
        {**base, "kv_cache": "bf16", "mla_bytes": 100, "triton_us": 10.0, "triton_tbps": 2.0,
         "sdpa_us": 20.0, "sdpa_tbps": 3.0, "sdpa_backend": "flash"},
        {**base, "kv_cache": "int8", "mla_bytes": 60, "triton_us": 5.5, "triton_tbps": 2.2},
        {**base, "kv_cache": "bf16", "stage1": "by-branch", "mla_bytes": 100, "triton_us": 8.0, "triton_tbps": 2.5},
        {**base, "kv_cache": "int8", "stage1": "by-branch", "mla_bytes": 60, "triton_us": 4.0, "triton_tbps": 3.0},
    ]  # fmt: skip
    table = bench.markdown_table(rows, copy_tbps=4.0)
    int8_line = next(line for line in table.splitlines() if "| int8 | fused |" in line)
    assert "| 0.55 | - |" in int8_line and "(flash)" in int8_line  # against bf16; fused: no comparison with itself
    # a by-branch row against the bf16 row of its own kernel and against the fused kernel on the same format
    assert "| 8.0 | 1.00 | 1.25 |" in next(line for line in table.splitlines() if "| bf16 | by-branch |" in line)
    assert "| 4.0 | 0.50 | 1.38 |" in next(line for line in table.splitlines() if "| int8 | by-branch |" in line)
    meta = {"device": "x", "torch": "t", "triton": "t", "date": "d", "copy_tbps": 4.0, "command": "c",
            "modalities": "m"}  # fmt: skip
    path = tmp_path / "decode_kernel_x.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}))
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_decode_kernel.py"), "--markdown-from", str(path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| int8 |" in path.with_suffix(".md").read_text()
    bad = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_decode_kernel.py"), "--kv-cache", "int8,int9"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2 and "int9" in bad.stderr
