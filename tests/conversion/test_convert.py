"""`convert` checks every input before the first weight is read: the source's weights are never loaded here."""

import json
import shutil

import pytest
import torch
import transformers

from hf_mla_vlm.conversion_scripts.convert import convert
from hf_mla_vlm.conversion_scripts.rope_selection import save_rank_file, scores_to_ranks
from hf_mla_vlm.errors import EnvironmentProblem, InputError, LeftoverError


@pytest.fixture
def no_weights_read(monkeypatch):
    """Fail the test if any model's weights are loaded (every from_pretrained of a model goes through here)."""

    def refuse(cls, *args, **kwargs):
        raise AssertionError(f"{cls.__name__}.from_pretrained ran: the input was checked too late")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))


def _convert(native_checkpoints, arch, out, **settings):
    settings = {"rope_dim": 8, "kv_rank": 8, "progress": False, **settings}
    return convert(native_checkpoints[arch], out, **settings)


def _ranks(tmp_path, layers, heads, pairs, name="ranks.safetensors"):
    path = tmp_path / name
    save_rank_file(scores_to_ranks(-torch.arange(float(pairs)).expand(layers, heads, -1)), path)
    return path


CASES = {
    "rank file for another model": (
        "llava", lambda t: {"rope_ranks": _ranks(t, 3, 2, 16)}, ValueError, r"has shape \(3, 2, 32\); this model needs"
    ),
    "rank file of another head_dim": (
        "llava", lambda t: {"rope_ranks": _ranks(t, 2, 2, 4)}, ValueError, "matches neither head_dim=32"
    ),
    "unreadable rank file": (
        "llava", lambda t: {"rope_ranks": t / "bad.json"}, FileNotFoundError, "does not exist"
    ),
    "axis minimum with a fixed strategy": (
        "qwen2_5_vl", lambda t: {"rope_min_per_axis": {"h": 1}}, InputError, "rope_strategy='high' selects fixed pairs"
    ),
    "axis minimum with a rank file": (
        "qwen2_5_vl", lambda t: {"rope_min_per_axis": {"h": 1}, "rope_ranks": _ranks(t, 2, 2, 16)}, InputError,
        "the rank file .* fixes the pairs already",
    ),
    "axis minimum without M-RoPE": (
        "llava", lambda t: {"rope_min_per_axis": {"h": 1}, "rope_strategy": "mkl"}, InputError, "M-RoPE models"
    ),
    "axis minimum beyond the axis": (
        "qwen2_5_vl", lambda t: {"rope_min_per_axis": {"t": 99}, "rope_strategy": "mkl"}, ValueError,
        r"min_per_axis\['t'\]=99 must lie in",
    ),
    "axis minima above rope_dim": (
        "qwen2_5_vl", lambda t: {"rope_min_per_axis": {"h": 3, "w": 3}, "rope_strategy": "2-norm"}, ValueError,
        "more than the 4 pairs kept",
    ),
    "uniform strategy that does not divide": (
        "llava", lambda t: {"rope_dim": 6, "rope_strategy": "uniform"}, ValueError, "head_dim/2=16 to be divisible"
    ),
    "image token outside the vocabulary": (
        "llava", lambda t: {"image_token_ids": [5, 10**6]}, InputError, r"image_token_ids \[1000000\] .* outside the"
    ),
    "bogus device": ("llava", lambda t: {"device": "gpu0", "svd": "md"}, InputError, "not a device torch knows"),
    "chat template without calibration": (
        "llava", lambda t: {"chat_template": t / "t.jinja"}, InputError, "this conversion runs no calibration"
    ),
    "malformed calibration JSON": (
        "llava", lambda t: {"svd": "md", "calibration": _text(t / "c.json", "[{")}, InputError,
        "c.json is not valid JSON",
    ),
    "calibration image that is not an image": (
        "llava", lambda t: {"svd": "md", "calibration": _text(t / "c.json", _one_row(t)), "num_samples": 1},
        InputError, "not an image PIL can read",
    ),
    "missing statistics file": (
        "llava", lambda t: {"svd": "md", "statistics": t / "stats.safetensors"}, FileNotFoundError, "not found"
    ),
}  # fmt: skip


def _text(path, text):
    path.write_text(text)
    return path


def _one_row(tmp_path):
    (tmp_path / "x.png").write_text("not a png")
    return json.dumps([{"image": "x.png", "conversations": [{"from": "human", "value": "<image> hi"}]}])


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_before_any_weight_is_read(case, native_checkpoints, tmp_path, no_weights_read):
    arch, settings, error, message = CASES[case]
    out = tmp_path / "out"
    with pytest.raises(error, match=message):
        _convert(native_checkpoints, arch, out, **settings(tmp_path))
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_cuda_without_a_gpu_is_an_environment_problem(native_checkpoints, tmp_path, no_weights_read, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(EnvironmentProblem, match="no CUDA GPU is available here"):
        _convert(native_checkpoints, "llava", tmp_path / "out", svd="md", device="cuda")


def test_a_leftover_of_an_interrupted_run_is_reported(native_checkpoints, tmp_path, no_weights_read):
    (tmp_path / ".out.old-20261201-101500-7").mkdir()
    with pytest.raises(LeftoverError, match=r"\.out\.old-20261201-101500-7 is the previous out, which was being"):
        _convert(native_checkpoints, "llava", tmp_path / "out")
    assert (tmp_path / ".out.old-20261201-101500-7").is_dir()  # never deleted
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        _convert(native_checkpoints, "llava", tmp_path / "file")


def test_a_source_without_chat_template_converts_with_one(native_checkpoints, tmp_path):
    source = shutil.copytree(native_checkpoints["llava"], tmp_path / "no-template")
    template = tmp_path / "template.jinja"
    shutil.move(source / "chat_template.jinja", template)
    with pytest.raises(InputError, match="has no chat template"):
        convert(source, tmp_path / "out", rope_dim=8, kv_rank=8, svd="md", num_samples=4, progress=False)
    result = convert(source, tmp_path / "out", rope_dim=8, kv_rank=8, svd="md", num_samples=4, chat_template=template,
                     progress=False)  # fmt: skip
    assert result.report["calibration"]["tokens"]["image"] > 0


def test_the_report_records_the_weight_files(native_checkpoints, tmp_path):
    import hashlib

    out = _convert(native_checkpoints, "llava", tmp_path / "out").output_dir
    files = json.loads((out / "mla_conversion_report.json").read_text())["files"]
    data = (out / "model.safetensors").read_bytes()
    assert files == {"model.safetensors": {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}}
