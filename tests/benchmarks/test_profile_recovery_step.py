"""benchmarks/profile_recovery_step.py: a few profiled steps of the real recovery loop (CPU smoke run: no device
columns, the host operators and the value reads that synchronise on a GPU)."""

import json

import pytest

from tests.utils import benchmark_module


def test_profiled_steps_of_the_recovery_loop(tmp_path):
    with benchmark_module("profile_recovery_step") as module:
        out = module.main(["--models", "llava", "--micro-batches", "1", "2", "--warmup-steps", "1", "--profile-steps",
                           "1", "--train-batch", "4", "--text-seq-len", "32", "--workers", "0",
                           "--out", str(tmp_path / "profile.json")])  # fmt: skip
    result = json.loads(out.read_text())
    one, two = result["rows"]
    assert (one["micro_batches"], two["micro_batches"]) == (1, 2) and result["device"] == "cpu"
    assert one["sdpa_backends"] == two["sdpa_backends"] == "default"
    for row in (one, two):
        assert row["wall_s_per_step"] > 0 and row["tokens_per_step"] > 0 and row["device_s_per_step"] is None
        assert row["host_ops_per_step"] > 1000 and row["syncs_per_step"] >= 1  # a forward reads values on the host
        assert "aten::mm" in row["top_host_ops_ms_per_step"] or "aten::addmm" in row["top_host_ops_ms_per_step"]
    # the same step's samples in two micro-batches: twice the operators (two forwards and backwards)
    assert two["host_ops_per_step"] > 1.5 * one["host_ops_per_step"]
    assert "| llava | 2 |" in out.with_suffix(".md").read_text()


def test_micro_batches_must_divide_the_batch(tmp_path, capsys):
    with benchmark_module("profile_recovery_step") as module, pytest.raises(SystemExit):
        module.main(["--micro-batches", "3", "--out", str(tmp_path / "p.json")])
    assert "must divide --train-batch 32" in capsys.readouterr().err


def test_sdpa_backend_variants_are_profiled_and_labelled(tmp_path, capsys):
    with benchmark_module("profile_recovery_step") as module:
        out = module.main(["--models", "llava", "--micro-batches", "1", "--sdpa-backends", "default", "math",
                           "--warmup-steps", "1", "--profile-steps", "1", "--train-batch", "2", "--text-seq-len", "16",
                           "--workers", "0", "--out", str(tmp_path / "profile.json")])  # fmt: skip
        with pytest.raises(SystemExit):
            module.main(["--sdpa-backends", "flash,cudnn2", "--out", str(tmp_path / "p.json")])
    assert "unknown SDPA backends ['cudnn2']" in capsys.readouterr().err
    rows = json.loads(out.read_text())["rows"]
    assert [r["sdpa_backends"] for r in rows] == ["default", "math"]
    assert "| llava | 1 | math |" in out.with_suffix(".md").read_text()
