"""Calibrated conversion: statistics, data-driven rotary selection, activation-aware low-rank init, reports."""

import json

import pytest
import torch
from safetensors.torch import load_file

from hf_mla_vlm import cli
from hf_mla_vlm.conversations import builtin_conversations, encode_conversations, load_conversations
from hf_mla_vlm.conversion_scripts.convert import convert
from hf_mla_vlm.conversion_scripts.rope_selection import ranks_to_pairs
from hf_mla_vlm.conversion_scripts.statistics import collect_statistics
from hf_mla_vlm.registry import arch_spec
from hf_mla_vlm.tiny_models import TINY_ARCHS, save_tiny_vlm
from tests.utils import load_native, mixed_batch, relative_error


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_cli_pipeline_mkl_md_builtin(arch, native_checkpoints, tmp_path):
    out = tmp_path / "mla"
    argv = ["convert", str(native_checkpoints[arch]), "--out", str(out), "--rope-dim", "8", "--kv-rank", "8"]
    argv += ["--rope-strategy", "mkl", "--svd", "md", "--calibration", "builtin", "--num-samples", "12", "--quiet"]
    assert cli.main(argv) == 0
    report = json.loads((out / "mla_conversion_report.json").read_text())
    assert report["calibration"]["tokens"]["image"] > 0 and report["calibration"]["tokens"]["text"] > 0
    assert set(report["timings_s"]) >= {"calibration_s", "rope_selection_s", "convert_s", "total_s"}
    for layer in report["layers"]:
        assert set(layer["activation_error_heldout_share"]) == {"text", "image"}
        assert layer["decoupled_vs_joint"]["ratio"] <= 1 + 1e-9
    config = json.loads((out / "config.json").read_text())
    ranks = load_file(out / "mla_rope_ranks.safetensors")["ranks"]
    assert config["rope_pairs"] == ranks_to_pairs(ranks, 8)
    if arch_spec(arch).rope == "mrope":
        assert sum(report["mrope_axis_pairs"].values()) == 2 * 2 * 4  # layers * kv heads * kept pairs
    model, processor = load_native(out)
    inputs = mixed_batch(processor, arch)
    assert model.generate(**inputs, max_new_tokens=3, do_sample=False).shape[1] == inputs["input_ids"].shape[1] + 3


@pytest.mark.parametrize("svd", ["joint-act", "md"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_activation_aware_paths_are_exact_at_full_rank(arch, svd, native_checkpoints, tmp_path):
    result = convert(
        native_checkpoints[arch], tmp_path / "m", rope_dim=32, kv_rank=32, svd=svd, num_samples=6, progress=False,
        return_model=True,
    )  # fmt: skip
    original, processor = load_native(native_checkpoints[arch])
    inputs = mixed_batch(processor, arch)
    with torch.no_grad():
        expected, actual = original(**inputs).logits, result.model(**inputs).logits
    assert relative_error(expected, actual, inputs["attention_mask"].bool()) < 1e-4


@pytest.mark.parametrize("strategy", ["mkl", "2-norm"])
def test_data_driven_selection_keeps_the_pair_that_carries_attention(strategy, tmp_path):
    """Scaling one rotary pair of every query and key head up makes it dominate the logits: it must be kept."""
    model, processor = __import__("hf_mla_vlm.tiny_models", fromlist=["build_tiny_vlm"]).build_tiny_vlm("llava")
    pair, head_dim = 11, 32
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                rows = proj.weight.view(-1, head_dim, proj.in_features)
                rows[:, [pair, pair + head_dim // 2]] *= 6.0
    native = tmp_path / "native"
    model.save_pretrained(native)
    processor.save_pretrained(native)
    result = convert(
        native, tmp_path / "m", rope_dim=4, kv_rank=8, rope_strategy=strategy, num_samples=8, progress=False
    )
    pairs = json.loads((result.output_dir / "config.json").read_text())["rope_pairs"]
    assert all(pair in kept for layer in pairs for kept in layer)


def test_calibration_json_with_images(tmp_path, native_checkpoints):
    conversations = builtin_conversations(3, seed=1)
    rows = []
    for i, conv in enumerate(conversations):
        conv.images[0].save(tmp_path / f"img{i}.png")
        question = conv.messages[0]["content"][1]["text"]
        answer = conv.messages[1]["content"][0]["text"]
        rows.append({"image": f"img{i}.png", "conversations": [
            {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]})  # fmt: skip
    data = tmp_path / "calib.json"
    data.write_text(json.dumps(rows))
    loaded = load_conversations(data, 3)
    assert len(loaded) == 3 and all(len(c.images) == 1 for c in loaded)
    result = convert(
        native_checkpoints["llava"], tmp_path / "m", rope_dim=8, kv_rank=8, svd="md", calibration=data, num_samples=3,
        progress=False,
    )  # fmt: skip
    assert result.report["calibration"]["num_samples"] == 3

    rows[0]["image"] = "missing.png"
    data.write_text(json.dumps(rows))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_conversations(data, 3, seed=0)
    rows[0] = {"image": ["img1.png", "img2.png"], "conversations": rows[1]["conversations"]}
    data.write_text(json.dumps(rows))
    with pytest.raises(ValueError, match="placeholders"):
        load_conversations(data, 3)


def test_md_without_image_tokens_is_a_clear_error(tmp_path, native_checkpoints):
    data = tmp_path / "text_only.json"
    rows = [{"conversations": [{"from": "human", "value": "what is this ?"}, {"from": "gpt", "value": "a cat ."}]}]
    data.write_text(json.dumps(rows * 4))
    with pytest.raises(ValueError, match="no image tokens"):
        convert(native_checkpoints["llava"], tmp_path / "m", rope_dim=8, kv_rank=8, svd="md", calibration=data,
                num_samples=4, progress=False)  # fmt: skip
    assert not (tmp_path / "m").exists()
    # joint-act has one covariance: a text-only calibration set is fine there.
    convert(native_checkpoints["llava"], tmp_path / "m", rope_dim=8, kv_rank=8, svd="joint-act", calibration=data,
            num_samples=4, progress=False)  # fmt: skip


def test_statistics_hooks_are_always_removed_and_reusable(tmp_path):
    native = save_tiny_vlm("qwen2_5_vl", tmp_path / "native")
    model, processor = load_native(native)
    samples = list(encode_conversations(processor, builtin_conversations(6)))
    ids = model.config.image_token_id, model.config.vision_start_token_id, model.config.vision_end_token_id
    stats = collect_statistics(model, samples, list(ids), device="cpu", progress=False)
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert stats.layers[0].cov["image"].dtype == torch.float64 and stats.token_counts.image > 0
    broken = samples[:1] + [{"input_ids": samples[0]["input_ids"], "pixel_values": samples[0]["pixel_values"][:1]}]
    with pytest.raises(AttributeError):  # no image_grid_thw: the forward fails inside the hooked capture
        collect_statistics(model, broken, list(ids), device="cpu", progress=False)
    assert all(not m._forward_pre_hooks for m in model.modules())
    settings = dict(rope_dim=8, kv_rank=8, rope_strategy="mkl", svd="md", progress=False)
    a = convert(native, tmp_path / "a", statistics=stats, **settings)
    stats.save(tmp_path / "stats.pt")
    b = convert(native, tmp_path / "b", statistics=tmp_path / "stats.pt", **settings)
    assert load_file(a.output_dir / "model.safetensors").keys() == load_file(b.output_dir / "model.safetensors").keys()
    for key, value in load_file(a.output_dir / "model.safetensors").items():
        assert torch.equal(value, load_file(b.output_dir / "model.safetensors")[key]), key


@pytest.mark.parametrize(("svd", "per_layer"), [("md", 3), ("joint-act", 3)])
def test_each_factorisation_is_computed_once_per_layer(svd, per_layer, native_checkpoints, tmp_path, monkeypatch):
    """The decoupled-vs-joint diagnostic reuses the conversion's factorisations: three eigendecompositions per
    layer (text, image, joint) instead of five (md) or four (joint-act)."""
    native = native_checkpoints["llava"]
    model, processor = load_native(native)
    samples = list(encode_conversations(processor, builtin_conversations(6)))
    stats = collect_statistics(model, samples, [model.config.image_token_id], device="cpu", progress=False)
    calls = []
    real_eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda a: calls.append(a) or real_eigh(a))
    result = convert(native, tmp_path / "m", rope_dim=8, kv_rank=8, svd=svd, statistics=stats, progress=False)
    assert len(calls) == per_layer * len(stats.layers)
    for layer in result.report["layers"]:
        assert layer["decoupled_vs_joint"]["ratio"] <= 1 + 1e-9


def test_conversion_threads_follow_the_machine_unless_chosen(monkeypatch):
    from hf_mla_vlm.utils import conversion_threads, machine_threads

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    with conversion_threads() as threads:
        assert threads == torch.get_num_threads() == machine_threads() >= 1
    assert torch.get_num_threads() == before
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with conversion_threads() as threads:
        assert threads == torch.get_num_threads() == before


def test_calibration_from_a_saved_datasets_folder(tmp_path, native_checkpoints):
    datasets = pytest.importorskip("datasets")
    conversations = builtin_conversations(4, seed=2)
    rows = {
        "image": [c.images[0] for c in conversations],
        "messages": [c.messages for c in conversations],
    }
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "messages": [
                {
                    "role": datasets.Value("string"),
                    "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}],
                }
            ],
        }
    )
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(tmp_path / "ds")
    loaded = load_conversations(tmp_path / "ds", 4)
    assert len(loaded) == 4 and all(len(c.images) == 1 for c in loaded)
    result = convert(
        native_checkpoints["llava_next"], tmp_path / "m", rope_dim=8, kv_rank=8, svd="md", calibration=tmp_path / "ds",
        num_samples=4, progress=False,
    )  # fmt: skip
    assert result.report["calibration"]["tokens"]["image"] > 0
