"""benchmarks/recovery_padding.py: the work of the recovery steps under both samplers (CPU, the real zoo Qwen2.5-VL
processor)."""

import json

from tests.utils import benchmark_module


def test_step_work_pads_each_micro_batch_to_its_longest_row():
    with benchmark_module("recovery_padding") as module:
        assert module.step_work([[0, 1], [2]], [5, 9, 3]) == 2 * 9 + 3


def test_batch_rebalance_computes_fewer_positions_for_the_same_tokens(tmp_path):
    with benchmark_module("recovery_padding") as module:
        out = module.main(["--models", "qwen2_5_vl", "--steps", "4", "--train-batch", "8", "--micro-batches", "2",
                           "--workers", "0", "--out", str(tmp_path / "padding.json")])  # fmt: skip
    result = json.loads(out.read_text())
    (model,) = result["models"]
    random, rebalanced = model["rows"]
    assert (random["sampler"], rebalanced["sampler"], rebalanced["micro_batches"]) == ("random", "batch_rebalance", 2)
    assert random["computed_per_step"] <= 8 * 512  # 8 rows, none longer than a text window
    assert model["held_per_step"] <= rebalanced["computed_per_step"] < random["computed_per_step"]
    assert rebalanced["work_vs_random"] < 1 and 0 <= rebalanced["padding_fraction"] < random["padding_fraction"]
    assert "| qwen2_5_vl |" in out.with_suffix(".md").read_text()
