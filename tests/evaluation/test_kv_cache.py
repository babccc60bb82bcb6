"""`evaluate(..., kv_cache=...)` / `hf-mla-vlm evaluate --kv-cache`: scoring through a quantized latent cache."""

import json

import pytest

from hf_mla_vlm import cli
from hf_mla_vlm.evaluation import evaluate
from hf_mla_vlm.evaluation.kv_cache import KV_CACHE_DTYPES
from tests.utils import random_texts


def test_kv_cache_choices_match_the_cli():
    assert tuple(cli.KV_CACHE_CHOICES) == KV_CACHE_DTYPES


def test_evaluate_with_a_quantized_latent_cache(native_checkpoints, tmp_path):
    """Full-rank conversion (= the original): bf16 latent reproduces the reference; an int8 latent changes the
    perplexity a little and the fidelity measurably (so the quantized cache is used at prefill), int4 more."""
    from hf_mla_vlm.conversion_scripts.convert import convert

    native = native_checkpoints["llava_next"]
    full = convert(native, tmp_path / "full", rope_dim=32, kv_rank=32, progress=False).output_dir
    text_file = tmp_path / "text.txt"
    text_file.write_text("\n".join(random_texts(num=20)))
    settings = dict(reference=native, text_file=text_file, seq_len=32, max_sequences=2, progress=False)
    results = {kv: evaluate(full, **settings, kv_cache=kv) for kv in ("bf16", "int8", "int4")}
    json.dumps(results["int8"])
    assert results["bf16"]["fidelity"]["kl"] < 1e-6 and results["int8"]["settings"]["kv_cache"] == "int8"
    kl = {kv: r["fidelity"]["kl"] for kv, r in results.items()}
    assert 1e-7 < kl["int8"] < kl["int4"], kl
    ppl = {kv: r["perplexity"]["ppl"] for kv, r in results.items()}
    assert ppl["int8"] != ppl["bf16"] and ppl["int8"] == pytest.approx(ppl["bf16"], rel=0.02), ppl
    for r in results.values():  # the reference is never quantized
        assert r["reference_perplexity"] == results["bf16"]["reference_perplexity"]

    vqa = evaluate(full, task="vqa", vqa_samples=4, vqa_batch_size=2, image_size=32, progress=False, kv_cache="fp8")
    assert vqa["vqa"]["num_samples"] == 4

    with pytest.raises(ValueError, match="no latent cache"):
        evaluate(native, text_file=text_file, seq_len=32, max_sequences=1, progress=False, kv_cache="int8")
    with pytest.raises(ValueError, match="Unknown kv_cache"):
        evaluate(full, text_file=text_file, kv_cache="int2")


def test_cli_evaluate_kv_cache(native_checkpoints, tmp_path, capsys):
    from hf_mla_vlm.conversion_scripts.convert import convert

    full = convert(native_checkpoints["llava"], tmp_path / "full", rope_dim=8, kv_rank=8, progress=False).output_dir
    text_file = tmp_path / "text.txt"
    text_file.write_text("\n".join(random_texts(num=20)))
    args = ["evaluate", str(full), "--text-file", str(text_file), "--seq-len", "32", "--max-sequences", "1"]
    assert cli.main([*args, "--kv-cache", "int4"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{") :])["settings"]["kv_cache"] == "int4"
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*args, "--kv-cache", "int3"])
    assert exit_info.value.code == 2
    native = ["evaluate", str(native_checkpoints["llava"]), *args[2:]]
    assert cli.main([*native, "--kv-cache", "int8"]) == 2  # a native model has no latent cache
