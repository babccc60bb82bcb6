"""Calibration statistics are saved and loaded as safetensors + JSON; pickle files are refused without running."""

import json
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hf_mla_vlm.conversations import Conversation, builtin_conversations, encode_conversations
from hf_mla_vlm.conversion_scripts.convert import convert
from hf_mla_vlm.conversion_scripts.statistics import (
    STATISTICS_FORMAT,
    CalibrationStatistics,
    SpilledLayers,
    collect_statistics,
)
from hf_mla_vlm.errors import InputError
from tests.utils import load_native


@pytest.fixture(scope="module")
def stats(native_checkpoints) -> CalibrationStatistics:
    model, processor = load_native(native_checkpoints["llava"])
    samples = list(encode_conversations(processor, builtin_conversations(3)))
    prose = list(encode_conversations(processor, [_TEXT_ONLY]))
    return collect_statistics(
        model, samples, [model.config.image_token_id], device="cpu", progress=False, heldout_prose=prose
    )


_TEXT_ONLY = Conversation([{"role": "user", "content": [{"type": "text", "text": "what is the red circle left of"}]}])


def test_heldout_prose_feeds_only_its_own_matrix(stats, native_checkpoints):
    model, processor = load_native(native_checkpoints["llava"])
    samples = list(encode_conversations(processor, builtin_conversations(3)))
    plain = collect_statistics(model, samples, [model.config.image_token_id], device="cpu", progress=False)
    assert (stats.num_samples, stats.prose_samples, plain.prose_samples) == (3, 1, 0)
    assert stats.token_counts == plain.token_counts and stats.heldout_counts == plain.heldout_counts
    for ours, theirs in zip(stats.layers, plain.layers):
        assert theirs.prose is None and ours.prose_tokens > 0 and ours.prose.abs().sum() > 0
        for modality in ("text", "image"):
            assert torch.equal(ours.cov[modality], theirs.cov[modality])
            assert torch.equal(ours.heldout[modality], theirs.heldout[modality])
        assert torch.equal(ours.mkl, theirs.mkl)


def test_statistics_round_trip_through_safetensors(stats, tmp_path):
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    with safe_open(str(path), framework="pt") as handle:  # a plain safetensors file, JSON in its header
        metadata = handle.metadata()
    assert metadata["format"] == STATISTICS_FORMAT and json.loads(metadata["statistics"])["num_samples"] == 3
    loaded = CalibrationStatistics.load(path)
    assert (loaded.num_samples, loaded.token_counts, loaded.heldout_counts, loaded.settings, loaded.prose_samples) == (
        stats.num_samples, stats.token_counts, stats.heldout_counts, stats.settings, stats.prose_samples,
    )  # fmt: skip
    assert len(loaded.layers) == len(stats.layers)
    for ours, theirs in zip(stats.layers, loaded.layers):
        assert ours.tokens == theirs.tokens and ours.heldout_tokens == theirs.heldout_tokens
        assert ours.prose_tokens == theirs.prose_tokens and torch.equal(ours.prose, theirs.prose)
        for modality in ("text", "image"):
            assert torch.equal(ours.cov[modality], theirs.cov[modality])
            assert torch.equal(ours.heldout[modality], theirs.heldout[modality])
        for name in ("q_pair_norm", "k_pair_norm", "mkl"):
            assert torch.equal(getattr(ours, name), getattr(theirs, name))
    assert [p.name for p in tmp_path.iterdir()] == ["stats.safetensors"]  # written atomically, no temporary left
    # The d x d matrices stay in the file until a step reads them; the loaded statistics save again unchanged.
    assert isinstance(loaded.layers, SpilledLayers)
    assert all(layer.cov == {} and layer.heldout == {} and layer.prose is None for layer in loaded.layers.small)
    loaded.save(tmp_path / "again.safetensors")
    assert _tensors(tmp_path / "again.safetensors") == _tensors(path)


def _tensors(path) -> dict:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key).tolist() for key in handle.keys()}


def test_a_file_without_a_layer_matrix_is_refused_when_loaded(stats, tmp_path):
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys() if key != "layers.1.heldout.image"}
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(InputError, match="incomplete calibration statistics .*layers.1.heldout.image"):
        CalibrationStatistics.load(path)


class _Payload:
    """Unpickling this creates a marker file: what a crafted statistics file could do."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_pickle_statistics_file_is_refused_without_running_it(tmp_path, native_checkpoints, writer):
    marker = tmp_path / "code-ran"
    path = tmp_path / "stats.pt"
    if writer == "torch.save":
        torch.save({"layers": _Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(_Payload(marker)))
    assert not marker.exists()
    with pytest.raises(InputError, match="saved with pickle .* refused. Regenerate them"):
        CalibrationStatistics.load(path)
    with pytest.raises(InputError, match="saved with pickle"):
        convert(native_checkpoints["llava"], tmp_path / "out", rope_dim=8, kv_rank=8, rope_strategy="mkl",
                statistics=path, progress=False)  # fmt: skip
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_other_files_are_refused(tmp_path):
    save_file({"x": torch.zeros(2)}, tmp_path / "weights.safetensors")
    with pytest.raises(InputError, match="not hf-mla-vlm calibration statistics"):
        CalibrationStatistics.load(tmp_path / "weights.safetensors")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="is not a calibration statistics file"):
        CalibrationStatistics.load(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="not found"):
        CalibrationStatistics.load(tmp_path / "absent.safetensors")
    save_file({"x": torch.zeros(2)}, tmp_path / "cut.safetensors", metadata={"format": STATISTICS_FORMAT})
    with pytest.raises(InputError, match="incomplete calibration statistics"):
        CalibrationStatistics.load(tmp_path / "cut.safetensors")


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _collect(model, processor, device="cpu", **kwargs):
    samples = list(encode_conversations(processor, builtin_conversations(9)))
    prose = list(encode_conversations(processor, [_TEXT_ONLY]))
    return collect_statistics(model, samples, [model.config.image_token_id], device=device, progress=False,
                              heldout_prose=prose, **kwargs)  # fmt: skip


def test_the_statistics_thread_gives_the_inline_statistics(native_checkpoints, threads):
    """With two torch threads the float64 statistics run on a second thread beside the layer forwards, one torch
    thread each: every field equals the inline computation's on one thread (same inputs, same order, same draws)."""
    model, processor = load_native(native_checkpoints["qwen2_5_vl"])
    threads(1)
    inline = _collect(model, processor)
    threads(2)
    pipelined = _collect(model, processor)
    assert torch.get_num_threads() == 2  # restored after the layer loops
    assert inline.token_counts == pipelined.token_counts and inline.heldout_counts == pipelined.heldout_counts
    for ours, theirs in zip(pipelined.layers, inline.layers):
        for name in ("q_pair_norm", "k_pair_norm", "mkl", "prose"):
            assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
        for modality in ("text", "image"):
            assert torch.equal(ours.cov[modality], theirs.cov[modality])
            assert torch.equal(ours.heldout[modality], theirs.heldout[modality])
        assert (ours.tokens, ours.heldout_tokens, ours.prose_tokens) == (
            theirs.tokens, theirs.heldout_tokens, theirs.prose_tokens)  # fmt: skip


@pytest.mark.parametrize("count", [1, 2])
def test_non_finite_attention_inputs_name_the_layer_and_sample(native_checkpoints, threads, count):
    model, processor = load_native(native_checkpoints["llava"])
    with torch.no_grad():
        model.model.language_model.layers[1].input_layernorm.weight[3] = float("nan")
    threads(count)
    with pytest.raises(ValueError, match="Layer 1: non-finite attention inputs on calibration sample 0"):
        _collect(model, processor)
    assert torch.get_num_threads() == count  # restored when the statistics thread failed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ["llava", "qwen2_5_vl"])
def test_statistics_accumulated_on_cuda_equal_the_host_ones(native_checkpoints, arch):
    """On a CUDA device the float64 sums (covariances, MKL in device-sized blocks) run beside the layer; each finished
    layer comes back to the host. The model runs in float64 on both devices: in float32 the forwards alone differ by
    up to 1e-4 relative between the H200 and the CPU (measured 2026-12-02), which would hide an error of the sums."""
    model, processor = load_native(native_checkpoints[arch])
    model = model.to(torch.float64)
    host = _collect(model, processor)
    device = _collect(model, processor, device="cuda")
    assert next(model.parameters()).device.type == "cpu"  # the layers went back after the run
    assert host.token_counts == device.token_counts
    for ours, theirs in zip(device.layers, host.layers):
        for name in ("q_pair_norm", "k_pair_norm", "mkl"):
            value = getattr(ours, name)
            assert value.device.type == "cpu" and value.dtype == torch.float64, name
            assert torch.allclose(value, getattr(theirs, name), rtol=1e-6, atol=1e-9), name
        # the sums of outer products, compared as matrices (an entry near zero is a cancellation of large terms)
        matrices = [(f"{field}.{m}", getattr(ours, field)[m], getattr(theirs, field)[m])
                    for field in ("cov", "heldout") for m in ("text", "image")]  # fmt: skip
        for name, value, expected in [*matrices, ("prose", ours.prose, theirs.prose)]:
            assert value.device.type == "cpu" and value.dtype == torch.float64, name
            assert (value - expected).norm() <= 1e-6 * expected.norm(), name
