"""benchmarks/recovery_quality.py end to end on a tiny random LLaVA (CPU, 1 training step per stage)."""

import json

import pytest

from tests.utils import benchmark_module


REQUIRED = ("model", "rope_dim", "kv_rank", "kv_ratio", "route", "init", "rope_strategy", "seed", "vqa", "ppl", "kl",
            "tokens", "gpu_minutes", "tokens_per_s", "vqa_per_type", "ppl_scenes", "top1")  # fmt: skip
TINY = ["--stage1-steps", "1", "--stage2-steps", "1", "--train-batch", "2", "--workers", "0", "--calibration", "4",
        "--num-samples", "4", "--batch-size", "4", "--seq-len", "32", "--max-sequences", "2", "--scene-texts", "20",
        "--scene-seq-len", "32", "--scene-windows", "2", "--kl-text", "2", "--kl-seq-len", "32", "--kl-vqa", "2",
        "--kl-batch", "2", "--text-seq-len", "32", "--rope-dim", "8", "--progress"]  # fmt: skip


@pytest.fixture(scope="module")
def recovery_quality():
    with benchmark_module("recovery_quality") as module:
        yield module


def test_rows_merge_and_page(recovery_quality, native_checkpoints, tmp_path):
    common = ["--model", "llava", "--native", str(native_checkpoints["llava"]), "--seeds", "0", *TINY]
    common += ["--out", str(tmp_path / "parts"), "--workdir", str(tmp_path / "work")]
    main = recovery_quality.main
    headline = main(["run", *common, "--levels", "62.5", "75", "--routes", "none", "distill", "control",
                     "--micro-batches", "2"])  # fmt: skip
    # the ablations split over two processes (--ablation-settings), each its own part
    ablate = ["run", *common, "--routes", "--ablations", "--ablation-routes", "none", "--ablation-settings"]
    split = [main([*ablate, *settings]) for settings in (["weight:mkl", "joint-act:mkl"], ["md:2-norm", "md:high"])]
    assert split[0].name == "llava-L50_62.5_75-noheadline-abl-joint-act-mkl_weight-mkl-s0.json" != split[1].name
    rows = json.loads(headline.read_text())["rows"]
    assert [(r["route"], r["level"]) for r in rows] == [
        ("original", None), ("control", None), ("none", "62.5"), ("distill", "62.5"), ("none", "75"),
        ("distill", "75"),
    ]  # fmt: skip
    for row in rows:
        assert all(key in row for key in REQUIRED), set(REQUIRED) - set(row)
        if row["level"]:
            assert row["kv_ratio"] <= 1 - float(row["level"]) / 100
            real = row["kv_cache_report"]
            assert row["kv_ratio"] == pytest.approx(real["converted"] / real["original"])
    original, control, _, distill62, _, distill75 = rows
    assert original["kl"] == pytest.approx(0.0, abs=1e-6) and original["top1"] == 1.0
    assert control["tokens"] == distill62["tokens"] > 0  # the same items
    assert [s["stage"] for s in control["stages"]] == [0, 0] and [s["stage"] for s in distill75["stages"]] == [1, 2]
    assert distill75["stages"][0]["reused"] and distill75["gpu_minutes"] > distill75["wall_minutes"]  # stage 1 shared
    # each step split by length into 2 micro-batches: a loader detail recorded per stage, not a budget
    stages = control["stages"] + distill62["stages"]
    assert {(s["micro_batches"], s["train_sampling_strategy"]) for s in stages} == {(2, "batch_rebalance")}
    assert "micro_batches" not in json.loads(headline.read_text())["settings"]
    ablations = [json.loads(part.read_text())["rows"][1:] for part in split]
    assert [[(r["init"], r["rope_strategy"]) for r in rows] for rows in ablations] == [
        list(recovery_quality.ABLATIONS[:2]), list(recovery_quality.ABLATIONS[2:])
    ]  # fmt: skip
    assert all(r["route"] == "none" and r["level"] == "62.5" and not r["headline"] for r in sum(ablations, []))

    out = tmp_path / "merged.json"
    ablation = tmp_path / "ablation.json"  # the two ablation parts, merged as one
    main(["merge", *map(str, split), "--out", str(ablation)])
    main(["merge", str(headline), str(ablation), "--out", str(out)])
    merged = json.loads(out.read_text())["models"][0]
    assert len(merged["rows"]) == 6 + 4 and len(merged["runs"]) == 3
    # An earlier merge's results (the committed JSON) join new parts as the parts themselves would, notes kept.
    earlier, again = tmp_path / "earlier.json", tmp_path / "again.json"
    main(["merge", str(headline), "--out", str(earlier), "--note", "earlier run"])
    main(["merge", str(earlier), str(ablation), "--out", str(again)])
    joined = json.loads(again.read_text())
    assert joined["models"] == json.loads(out.read_text())["models"] and joined["notes"] == ["earlier run"]
    with pytest.raises(ValueError, match="in two parts"):  # a part merged before is not counted twice
        main(["merge", str(again), str(ablation), "--out", str(out)])
    page = out.with_suffix(".md").read_text()
    assert "| - | - | 1.000 | original |" in page and "| weight | mkl | - |" in page and "recovery_quality.py" in page
    with pytest.raises(ValueError, match="in two parts"):
        main(["merge", str(headline), str(headline), "--out", str(out)])
    # The label weight is a field of the distill rows: a part trained with a label loss joins one without as rows of
    # their own, and a part written before (the weight in its settings) reads as weight 0.
    assert [r["label_weight"] for r in rows] == [None, None, None, 0.0, None, 0.0]
    older, weighted = json.loads(headline.read_text()), json.loads(headline.read_text())
    older["settings"]["label_weight"] = 0.0
    for row in older["rows"]:
        del row["label_weight"]
    weighted["rows"] = [dict(r, label_weight=0.5) for r in weighted["rows"] if r["route"] in ("original", "distill")]
    for name, document in (("older", older), ("weighted", weighted)):
        (tmp_path / f"{name}.json").write_text(json.dumps(document))
    main(["merge", str(tmp_path / "older.json"), str(tmp_path / "weighted.json"), "--out", str(out)])
    both = json.loads(out.read_text())["models"][0]
    assert "label_weight" not in both["settings"]
    assert sorted((r["level"], r["label_weight"]) for r in both["rows"] if r["route"] == "distill") == [
        ("62.5", 0.0), ("62.5", 0.5), ("75", 0.0), ("75", 0.5)
    ]  # fmt: skip
    assert "| distill + 0.5 labels | md | mkl | 0 |" in out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit, match="CPU"):  # smoke numbers never land in benchmarks/results
        main(["merge", str(headline), "--out", str(recovery_quality.RESULTS / "recovery_quality.json")])
