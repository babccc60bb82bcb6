"""The asset cache (dequantised SmolLM2) is replaced crash-safely: a failed rewrite keeps the previous cache."""

import errno
import json

import pytest

from hf_mla_vlm import assets


class _Saves:
    def __init__(self, name: str, fail: bool = False) -> None:
        self.name, self.fail = name, fail

    def save_pretrained(self, path) -> None:
        path.mkdir(parents=True, exist_ok=True)  # as Transformers' save_pretrained does
        (path / self.name).write_text("new")
        if self.fail:
            raise OSError(errno.ENOSPC, "No space left on device", str(path / self.name))


STAMP = {"gguf_file": "x.gguf", "gguf_size": 1, "transformers": "5"}


def _old_cache(folder):
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_text("old")
    (folder / "config.json").write_text("{}")


def test_a_failed_cache_rewrite_keeps_the_old_cache(tmp_path):
    folder = tmp_path / "smollm2"
    _old_cache(folder)
    with pytest.raises(OSError, match="No space left"):
        assets._write_cache(_Saves("model.safetensors"), _Saves("tokenizer.json", fail=True), folder, STAMP)
    assert (folder / "model.safetensors").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["smollm2"]


def test_a_cache_rewrite_replaces_the_old_cache_and_names_leftovers(tmp_path, caplog):
    folder = tmp_path / "smollm2"
    _old_cache(folder)
    leftover = tmp_path / ".smollm2.0123abcd.incomplete"  # a killed earlier write
    leftover.mkdir()
    with caplog.at_level("WARNING"):
        assets._write_cache(_Saves("model.safetensors"), _Saves("tokenizer.json"), folder, STAMP)
    assert (folder / "model.safetensors").read_text() == "new" and json.loads((folder / "hf_mla_vlm_source.json")
                                                                              .read_text()) == STAMP  # fmt: skip
    assert leftover.is_dir() and str(leftover) in caplog.text and "not deleted" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == [".smollm2.0123abcd.incomplete", "smollm2"]
