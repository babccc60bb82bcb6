import json
import subprocess
import sys

import pytest

from hf_mla_vlm import cli
from hf_mla_vlm.conversion_scripts import convert as convert_module


def test_convert_cli_writes_a_complete_folder(native_checkpoints, tmp_path, capsys):
    out = tmp_path / "mla"
    args = ["convert", str(native_checkpoints["qwen2_5_vl"]), "--out", str(out), "--rope-dim", "8", "--kv-rank", "4"]
    assert cli.main(args + ["--rope-strategy", "uniform", "--dtype", "bfloat16", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "KV cache per token" in printed and str(out) in printed
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl_mla" and config["dtype"] == "bfloat16"
    assert config["rope_pairs"][0] == [[0, 4, 8, 12], [0, 4, 8, 12]]
    report = json.loads((out / "mla_conversion_report.json").read_text())
    # latent 2 kv heads * 4 + side row (2 * 8 rope + 1 flag, padded to 24) = 32 elements vs 2 * 2 * 32 = 128, bf16
    assert report["kv_cache"]["converted_bytes_per_token"] == 32 * 2 * 2
    assert report["kv_cache"]["original_bytes_per_token"] == 128 * 2 * 2
    assert set(report["timings_s"]) >= {"load_source_s", "convert_s", "save_s", "total_s"}
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers") and "75.00%" in card  # 1 - 32/128
    assert {"tokenizer.json", "chat_template.jinja", "processor_config.json"} <= {p.name for p in out.iterdir()}


def test_convert_refuses_to_overwrite_and_bad_settings(native_checkpoints, tmp_path, capsys):
    src = str(native_checkpoints["llava"])
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert cli.main(["convert", src, "--out", str(out), "--rope-dim", "8", "--kv-rank", "8"]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "keep.txt").exists()
    fresh = tmp_path / "fresh"
    assert cli.main(["convert", src, "--out", str(fresh), "--rope-dim", "7", "--kv-rank", "8"]) == 2
    assert "must be an even integer" in capsys.readouterr().err and not fresh.exists()
    assert (
        cli.main(["convert", str(tmp_path / "nowhere"), "--out", str(fresh), "--rope-dim", "8", "--kv-rank", "8"]) == 2
    )
    assert not fresh.exists()


def test_interrupted_conversion_leaves_no_folder_that_looks_complete(native_checkpoints, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "copy_processor_files", fail)
    out = tmp_path / "mla"
    with pytest.raises(KeyboardInterrupt):
        convert_module.convert(native_checkpoints["llava"], out, rope_dim=8, kv_rank=8, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its staging copy


def test_console_script_help():
    done = subprocess.run([sys.executable, "-m", "hf_mla_vlm.cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "convert" in done.stdout and "demo" in done.stdout


def test_demo_reports_exactness_and_saving(tmp_path):
    from hf_mla_vlm.demo import run_demo

    summary = run_demo("llava", tmp_path, rope_dim=8, kv_rank=8)
    assert summary["full_rank"]["greedy_tokens_equal"] and summary["full_rank"]["top1_agreement"] == 1.0
    measured = summary["compressed"]["measured_cache_bytes_per_token"]
    assert measured["converted"] == summary["kv_cache"]["converted_bytes_per_token"]
    assert measured["original"] / measured["converted"] == pytest.approx(
        128 / 40
    )  # see test_cache_holds_only_the_latent_rope_keys_and_a_flag


def test_push_refuses_a_folder_that_fails_the_load_check(native_checkpoints, capsys):
    assert cli.main(["push", str(native_checkpoints["llava"]), "user/not-converted"]) == 2
    assert "auto_map" in capsys.readouterr().err


def test_evaluate_cli_writes_json(native_checkpoints, tmp_path, capsys):
    src = native_checkpoints["qwen2_5_vl"]
    full = tmp_path / "full"
    assert cli.main(["convert", str(src), "--out", str(full), "--rope-dim", "32", "--kv-rank", "32", "--quiet"]) == 0
    text = tmp_path / "text.txt"
    text.write_text(" ".join(["what is this ? a cat . the dog is left of the red circle ."] * 40))
    out = tmp_path / "eval.json"
    argv = ["evaluate", str(full), "--reference", str(src), "--num-samples", "3", "--text-file", str(text)]
    assert cli.main(argv + ["--seq-len", "32", "--max-sequences", "2", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["data"] == "builtin" and result["fidelity"]["positions"] > 0
    assert result["fidelity"]["kl"] < 1e-6 and result["fidelity"]["top1_agreement"] == 1.0  # full rank is exact
    assert result["perplexity"]["ppl"] == pytest.approx(result["reference_perplexity"]["ppl"], rel=1e-4)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU-only error")
def test_bench_needs_a_gpu(native_checkpoints, capsys):
    assert cli.main(["bench", str(native_checkpoints["llava"])]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
