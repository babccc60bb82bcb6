"""Streaming conversion: lazy source reads, the header-first sharded writer, the host / disk caches and the memory
budget; the streamed result equals the in-memory conversion and loads through remote code."""

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file

from hf_mla_vlm import cli
from hf_mla_vlm.conversion_scripts import streaming
from hf_mla_vlm.conversion_scripts.convert import build_mla_config, convert, convert_model
from hf_mla_vlm.conversion_scripts.rope_selection import select_rope_pairs
from hf_mla_vlm.conversion_scripts.streaming import (
    IntermediatesCache,
    PlannedTensor,
    ShardedSafetensorsWriter,
    SourceCheckpoint,
    empty_model,
    memory_name,
    parse_max_memory,
    parse_size,
)
from hf_mla_vlm.errors import InputError
from hf_mla_vlm.registry import arch_spec
from tests.modeling.test_hub_format import LOAD_WITHOUT_PACKAGE


SETTINGS = {"rope_dim": 8, "kv_rank": 8, "progress": False}


def _weights(folder):
    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    )
    out = {}
    for name in files:
        out.update(load_file(str(folder / name)))
    return out


@pytest.mark.parametrize(
    "text, expected",
    [("8GiB", 8 * 2**30), ("500MB", 500 * 10**6), ("1.5GB", 1_500_000_000), ("1024", 1024), (7, 7)],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["8 parsecs", "-1GB", "0", "GB", ""])
def test_parse_size_refuses_non_sizes(text):
    with pytest.raises(InputError):
        parse_size(text)


def test_parse_max_memory():
    assert parse_max_memory("cpu=8GiB, cuda=1GB") == {"cpu": 8 * 2**30, "cuda:0": 10**9}
    assert parse_max_memory({"cuda:1": 5}) == {"cuda:1": 5}
    assert parse_max_memory(None) == {}
    with pytest.raises(InputError, match="not DEVICE=SIZE"):
        parse_max_memory("8GiB")
    with pytest.raises(InputError, match="must be cpu or cuda:N"):
        parse_max_memory("gpu=8GiB")


def test_legacy_names_map_to_in_memory_names():
    expected = {"model.language_model.layers.0.mlp.up_proj.weight", "lm_head.weight", "model.visual.blocks.0.x"}
    assert memory_name("language_model.model.layers.0.mlp.up_proj.weight", expected) == next(
        iter(sorted(expected)[1:2])
    )
    assert memory_name("language_model.lm_head.weight", expected) == "lm_head.weight"
    assert (
        memory_name("model.layers.0.mlp.up_proj.weight", expected)
        == "model.language_model.layers.0.mlp.up_proj.weight"
    )
    assert memory_name("visual.blocks.0.x", expected) == "model.visual.blocks.0.x"
    assert memory_name("something.else", expected) is None


def test_writer_writes_headers_first_and_checks_the_plan(tmp_path):
    tensors = {f"t{i}": torch.randn(4, 8).to(dtype) for i, dtype in enumerate([torch.float32, torch.bfloat16] * 3)}
    plan = [PlannedTensor(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    writer = ShardedSafetensorsWriter(tmp_path, plan, 200)  # two tensors of 128 / 64 bytes per shard at most
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    files = writer.close()
    assert files[-1] == "model.safetensors.index.json" and len(files) == 4
    loaded = _weights(tmp_path)
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())
    with safe_open(str(tmp_path / files[0]), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}

    bad = ShardedSafetensorsWriter(tmp_path / "bad", plan, 200)
    (tmp_path / "bad").mkdir()
    with pytest.raises(RuntimeError, match="plan's next tensor is t0"):
        bad.write("t1", tensors["t1"])
    bad.write("t0", tensors["t0"])
    with pytest.raises(RuntimeError, match="were not written"):
        bad.close()


def test_intermediates_cache_offloads_beyond_the_host_budget(tmp_path):
    hidden = [torch.randn(1, 5, 8) for _ in range(3)]
    with pytest.raises(InputError, match="--offload-folder"):
        cache = IntermediatesCache(host_budget=200)
        for i, tensor in enumerate(hidden):
            cache.put(i, tensor)
    cache = IntermediatesCache(host_budget=200, offload_folder=tmp_path)
    for i, tensor in enumerate(hidden):
        cache.put(i, tensor)
    assert cache.offloaded == 2 and cache.host_bytes == 160
    assert all(torch.equal(cache.get(i), tensor) for i, tensor in enumerate(hidden))
    cache.clear()
    assert not list(tmp_path.iterdir())


def test_source_checkpoint_refuses_bad_folders(native_checkpoints, tmp_path):
    with pytest.raises(InputError, match="safetensors weights only"):
        SourceCheckpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(InputError, match="missing"):
        SourceCheckpoint(tmp_path)
    source = SourceCheckpoint(native_checkpoints["llava"])
    config = transformers.AutoConfig.from_pretrained(native_checkpoints["qwen2_5_vl"])
    with pytest.raises(InputError, match="do not match Qwen2_5_VLForConditionalGeneration"):
        source.bind(empty_model(arch_spec("qwen2_5_vl").native_class, config))


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail if any model is loaded whole (every from_pretrained of a model goes through here)."""

    def refuse(cls, *args, **kwargs):
        raise AssertionError(f"{cls.__name__}.from_pretrained ran: the source was loaded whole")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))


def _largest_layer_bytes(folder, layers_prefix="language_model.model.layers."):
    sizes, largest_other = {}, 0
    for name, tensor in _weights(folder).items():
        size = tensor.numel() * tensor.element_size()
        if name.startswith(layers_prefix):
            layer = name[len(layers_prefix) :].split(".")[0]
            sizes[layer] = sizes.get(layer, 0) + size
        else:
            largest_other = max(largest_other, size)
    return max(max(sizes.values()), largest_other), sum(sizes.values()) + largest_other


@pytest.mark.parametrize("svd", ["weight", "md"])
def test_conversion_never_holds_the_source_whole(native_checkpoints, tmp_path, no_model_loading, svd):
    """Without from_pretrained, reading at most one decoder layer (or one other tensor) at a time."""
    src = native_checkpoints["llava"]
    extra = {"calibration": "builtin", "num_samples": 4, "heldout_prose_samples": 0} if svd == "md" else {}
    result = convert(src, tmp_path / "out", svd=svd, **SETTINGS, **extra)
    largest, total = _largest_layer_bytes(src)
    memory = result.report["memory"]
    assert memory["largest_read_bytes"] <= largest < total
    source_bytes = sum(t.numel() * t.element_size() for t in _weights(src).values())
    if svd == "weight":  # every source tensor read exactly once
        assert memory["source_bytes_read"] == source_bytes
    assert set(memory["estimated_stage_bytes"]) >= {"convert_head", "convert_layer"}


def test_streamed_shards_equal_in_memory_conversion_and_load_through_remote_code(native_checkpoints, tmp_path):
    src = native_checkpoints["qwen2_5_vl"]
    result = convert(src, tmp_path / "out", max_shard_size="40KB", **SETTINGS)
    out = result.output_dir
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    assert all(digest in result.report["files"] for digest in set(index["weight_map"].values()))

    spec = arch_spec("qwen2_5_vl")
    native = spec.native_class.from_pretrained(src, dtype=torch.float32).eval()
    pairs, _, _ = select_rope_pairs(native.config, 8, "high", None)
    config = build_mla_config(native.config, spec, rope_pairs=pairs, rope_dim=8, kv_rank=8, dtype=torch.float32)
    in_memory, _ = convert_model(native, config, spec, progress=False)
    streamed = _weights(out)
    reference = in_memory.state_dict()
    assert set(streamed) == set(reference)
    assert all(torch.equal(streamed[name], reference[name]) for name in reference)

    # loaded where hf_mla_vlm is not importable: the sharded folder's remote code, against the in-memory model
    inputs_file = tmp_path / "inputs.pt"
    ids = torch.tensor([[1, 5, 9, 17, 33, 60]])
    torch.save({"input_ids": ids}, inputs_file)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    done = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_PACKAGE, str(out), str(inputs_file), str(tmp_path / "resaved")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    loaded_class = json.loads(done.stdout.strip().splitlines()[-1])["AutoModelForImageTextToText"]
    assert loaded_class.startswith("transformers_modules.")
    with torch.no_grad():
        expected = in_memory(input_ids=ids).logits
    torch.testing.assert_close(torch.load(f"{inputs_file}.AutoModelForImageTextToText.pt"), expected, rtol=0, atol=0)


def test_offloaded_calibration_gives_the_same_checkpoint(native_checkpoints, tmp_path, monkeypatch):
    src, extra = native_checkpoints["llava"], {"svd": "md", "calibration": "builtin", "num_samples": 4}
    extra["heldout_prose_samples"] = 0
    plain = convert(src, tmp_path / "plain", **SETTINGS, **extra)
    stages = dict(plain.report["memory"]["estimated_stage_bytes"])
    budget = max(size for name, size in stages.items() if name != "hidden_states") + stages["hidden_states"] // 3
    with pytest.raises(InputError, match="pass --offload-folder"):
        convert(src, tmp_path / "refused", max_memory={"cpu": budget}, **SETTINGS, **extra)
    offload, written = tmp_path / "offload", []
    save_file = streaming.save_file
    monkeypatch.setattr(streaming, "save_file", lambda tensors, path: written.append(path) or save_file(tensors, path))
    bounded = convert(
        src, tmp_path / "bounded", max_memory={"cpu": budget}, offload_folder=offload, **SETTINGS, **extra
    )
    a, b = _weights(plain.output_dir), _weights(bounded.output_dir)
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert offload.is_dir() and not list(offload.iterdir())  # the scratch space is removed afterwards
    assert not (tmp_path / "refused").exists()
    assert any("hidden_states" in path for path in written)  # some hidden states really went to disk


def test_a_budget_below_one_stage_is_refused_before_reading(native_checkpoints, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(streaming.SourceCheckpoint, "read", refuse)
    with pytest.raises(InputError, match="below what one conversion stage holds"):
        convert(native_checkpoints["llava"], tmp_path / "out", max_memory="cpu=1KB", **SETTINGS)
    assert not (tmp_path / "out").exists()


def test_cli_memory_flags(native_checkpoints, tmp_path, capsys):
    src, out = str(native_checkpoints["llava"]), tmp_path / "out"
    base = ["convert", src, "--out", str(out), "--rope-dim", "8", "--kv-rank", "8", "--quiet"]
    assert cli.main([*base, "--max-memory", "lots"]) == 2
    assert "not DEVICE=SIZE" in capsys.readouterr().err
    assert cli.main([*base, "--max-memory", "cpu=4GiB", "--max-shard-size", "50KB"]) == 0
    assert (out / "model.safetensors.index.json").is_file()


def test_a_tied_lm_head_is_read_and_written_once(tmp_path):
    """Checkpoints of tied models store the embedding only; the converted one too, and it equals the original at
    full rank."""
    from hf_mla_vlm.tiny_models import build_tiny_vlm

    model, processor = build_tiny_vlm("qwen2_5_vl")
    model.config.tie_word_embeddings = model.config.text_config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(tmp_path / "src")
    processor.save_pretrained(tmp_path / "src")
    result = convert(tmp_path / "src", tmp_path / "out", rope_dim=32, kv_rank=32, progress=False, return_model=True)
    assert "lm_head.weight" not in _weights(result.output_dir)
    converted = result.model
    assert converted.lm_head.weight is converted.model.language_model.embed_tokens.weight
    ids = torch.tensor([[1, 5, 9, 17, 33]])
    with torch.no_grad():
        torch.testing.assert_close(converted(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-4)


def test_in_memory_bf16_conversion_computes_like_the_loaded_checkpoint(native_checkpoints, tmp_path):
    """`convert_model(..., dtype=bf16)` casts what a checkpoint holds and keeps the computed rotary frequencies in
    float32, as loading the streamed bf16 checkpoint does: the two give identical logits (casting the whole model
    rounded the frequencies to bf16 and moved the logits by a few bf16 steps)."""
    from transformers import AutoModelForImageTextToText

    src, spec = native_checkpoints["qwen2_5_vl"], arch_spec("qwen2_5_vl")
    out = tmp_path / "mla"
    convert(src, out, **SETTINGS, dtype="bfloat16")
    native = spec.native_class.from_pretrained(src, dtype=torch.float32).eval()  # the source's dtype, as streamed
    pairs, _, _ = select_rope_pairs(native.config, 8, "high", None)
    config = build_mla_config(native.config, spec, rope_pairs=pairs, rope_dim=8, kv_rank=8, dtype=torch.bfloat16)
    in_memory, _ = convert_model(native, config, spec, dtype=torch.bfloat16, progress=False)
    loaded = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True, dtype=torch.bfloat16).eval()
    frequencies = {name: b.dtype for name, b in in_memory.named_buffers() if name.endswith("inv_freq")}
    assert frequencies and set(frequencies.values()) == {torch.float32}
    assert next(in_memory.parameters()).dtype == torch.bfloat16
    ids = torch.tensor([[1, 5, 9, 17, 33, 60, 71, 80]])
    with torch.no_grad():
        torch.testing.assert_close(in_memory(input_ids=ids).logits, loaded(input_ids=ids).logits, rtol=0, atol=0)
