"""benchmarks/kv_compression.py: the two-phase protocol against a plain forward, the prompt-quantizing caches, the
pruning rules, and a tiny end-to-end run (CPU)."""

import json
import subprocess
import sys

import pytest
import torch

from hf_mla_vlm.tiny_models import build_tiny_vlm
from hf_mla_vlm.zoo.vqa_data import generate_split
from tests.utils import BENCHMARKS, benchmark_module


@pytest.fixture(scope="module")
def kv():
    pytest.importorskip("optimum.quanto")
    pytest.importorskip("hqq")
    with benchmark_module("kv_compression") as module:
        yield module


def _prompt(model, processor, kv):
    sample = generate_split("test", 1, seed=0, image_size=32)[0]
    text = processor.apply_chat_template(
        sample.messages(with_answer=False), tokenize=False, add_generation_prompt=True
    )
    batch = dict(processor(text=[text], images=[sample.image], return_tensors="pt"))
    marks = {model.config.image_token_id, getattr(model.config, "vision_end_token_id", None)}
    ids = batch["input_ids"][0].tolist()
    return batch, max(j for j, t in enumerate(ids) if t in marks) + 1


@pytest.mark.parametrize("arch", ["llava_next", "qwen2_5_vl"])
def test_two_phase_matches_one_forward(kv, arch):
    """Context pass + question pass with explicit positions (M-RoPE for Qwen2.5-VL) = one forward of the prompt."""
    model, processor = build_tiny_vlm(arch)
    model.eval()
    batch, ctx_len = _prompt(model, processor, kv)
    with torch.no_grad():
        full = model(**batch).logits[0, -1].float().log_softmax(-1)
    positions = kv.full_positions(model, batch)
    cache = kv.run_context(model, batch, ctx_len, positions, None)
    _, first = kv.greedy_answer(model, batch, ctx_len, positions, cache, max_new_tokens=2)
    torch.testing.assert_close(first[0], full, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llava_next", "qwen2_5_vl"])
def test_two_phase_matches_one_forward_mla(kv, arch, native_checkpoints, tmp_path):
    """The same on a converted model, with the latent unquantized and quantized on write (int8)."""
    from hf_mla_vlm.compat import CACHE_ARG
    from hf_mla_vlm.conversion_scripts.convert import convert
    from hf_mla_vlm.evaluation import load_model_and_processor
    from hf_mla_vlm.modeling.quantized_cache import MLAQuantizedCache

    mla = convert(native_checkpoints[arch], tmp_path / "mla", rope_dim=8, kv_rank=16, progress=False).output_dir
    model, processor = load_model_and_processor(mla, device="cpu")
    batch, ctx_len = _prompt(model, processor, kv)
    positions = kv.full_positions(model, batch)
    for dtype in (None, "int8"):
        with torch.no_grad():
            extra = {} if dtype is None else {CACHE_ARG: MLAQuantizedCache(config=model.config, dtype=dtype)}
            full = model(**batch, **extra).logits[0, -1].float().log_softmax(-1)
        method = {"family": "mla", "kv": dtype or "bf16"}
        cache = kv.run_context(model, batch, ctx_len, positions, kv.make_cache(model, method))
        _, first = kv.greedy_answer(model, batch, ctx_len, positions, cache, max_new_tokens=1)
        torch.testing.assert_close(first[0], full, atol=2e-4, rtol=1e-4)


def test_prompt_quantized_cache_and_pruning(kv):
    model, processor = build_tiny_vlm("llava")
    model.eval()
    batch, ctx_len = _prompt(model, processor, kv)
    positions = kv.full_positions(model, batch)
    layers = model.config.text_config.num_hidden_layers
    heads, dim = model.config.text_config.num_key_value_heads, 32
    for backend in ("quanto", "hqq"):
        for bits in (4, 2):
            cache = kv.run_context(
                model, batch, ctx_len, positions, kv.PromptQuantizedCache(backend, layers, bits, 64)
            )
            rows = ctx_len * heads
            padded = rows + (-rows % 4)
            # per kv head and token: dim * bits / 8 bytes + a scale and a zero point (float32 here), keys and values
            assert cache.nbytes() == layers * 2 * padded * (dim * bits // 8 + 2 * 4)
            assert cache.get_seq_length() == ctx_len
    with kv.scoring_presses(model) as scores:
        cache = kv.run_context(model, batch, ctx_len, positions, None)
    assert set(scores.scores) == set(kv.PRESSES)
    for press in kv.PRESSES:
        pruned = kv.pruned_cache(cache, scores.scores[press], 0.5)
        assert pruned.layers[0].keys.shape[-2] == ctx_len // 2 and cache.layers[0].keys.shape[-2] == ctx_len
        logits = kv.run_continuation(model, batch["input_ids"][:, ctx_len:], positions[:, ctx_len:], pruned)
        assert torch.isfinite(logits).all()
    # TOVA and SnapKV always keep the context's last token
    for press in ("tova", "snapkv"):
        index = scores.scores[press][0].topk(ctx_len // 2, dim=-1).indices
        assert (index == ctx_len - 1).any(-1).all()


def test_tiny_run_writes_measured_rows(tmp_path):
    pytest.importorskip("optimum.quanto")
    pytest.importorskip("hqq")
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "kv_compression.py"), "--tiny", "--out-dir", str(tmp_path), "--tag", "t",
         "--vqa-samples", "4", "--seq-len", "32", "--max-sequences", "2", "--presses", "tova,knorm"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "kv_compression_t.json").read_text())
    rows = {(row["family"], row["kv"], row.get("press")): row for row in data["rows"]}
    # bytes measured in bfloat16. tiny llava_next: 2 kv heads x 32 dims; latent 2 * 16, side row 2 * 8 + 1 -> 24
    assert rows[("original", "bf16", None)]["bytes_per_token"] == 2 * 2 * 32 * 2
    assert rows[("mla", "bf16", None)]["bytes_per_token"] == (32 + 24) * 2
    assert rows[("mla", "int8", None)]["bytes_per_token"] == 48 + 24 * 2  # 32 int8 + 1 fp16 scale, padded to 48
    assert rows[("mla", "int4", None)]["bytes_per_token"] == 32 + 24 * 2  # 16 bytes + scale + zero, padded to 32
    for backend in ("quanto", "hqq"):  # one group of 32 per head: data + bf16 scale and zero, keys and values
        assert rows[(backend, "int4", None)]["bytes_per_token"] >= 2 * 2 * (16 + 4)
        assert rows[(backend, "int2", None)]["bytes_per_token"] >= 2 * 2 * (8 + 4)
        assert rows[(backend, "int2", None)]["kl"] > rows[(backend, "int4", None)]["kl"] > 0
    mla_budgets = {row["ratio_to_original"] for row in data["rows"] if row["family"] == "mla"}
    pruning = [row for row in data["rows"] if row["family"] == "pruning"]
    assert {row["press"] for row in pruning} == {"tova", "knorm"}
    assert len(pruning) == 2 * len({int(1000 * b) for b in mla_budgets})
    assert all(row["ratio_to_original"] <= row["keep"] + 1e-9 for row in pruning)  # never above the budget
    assert rows[("mla", "int4", None)]["kl"] > rows[("mla", "int8", None)]["kl"] > 0
    assert all(row["ppl"] > 1 and 0 <= row["vqa"] <= 1 for row in data["rows"])
    page = (tmp_path / "kv_compression_t.md").read_text()
    assert "meaningless" in page and "## Checks" in page and "| original + quanto | int4 |" in page
    merged = tmp_path / "merged"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "kv_compression.py"), "--merge", str(tmp_path / "kv_compression_t.json"),
         "--out-dir", str(merged)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((merged / "kv_compression.json").read_text())["runs"][0]["rows"] == data["rows"]
    assert "### Checks" in (merged / "kv_compression.md").read_text()
