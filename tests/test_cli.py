import argparse
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

import hf_mla_vlm
from hf_mla_vlm import cli
from hf_mla_vlm.conversion_scripts import convert as convert_module
from hf_mla_vlm.conversion_scripts.hub import verify_folder
from hf_mla_vlm.conversion_scripts.streaming import ShardedSafetensorsWriter
from hf_mla_vlm.utils import folder_leftovers
from tests.utils import default_sigint_in_child


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


def _console_script() -> list[str]:
    """The installed `hf-mla-vlm` script beside this interpreter, else `python -m hf_mla_vlm.cli`."""
    script = Path(sys.executable).with_name("hf-mla-vlm")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "hf_mla_vlm.cli"]


def _child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}  # this checkout and Transformers, as here


HELP_LIMIT_S = 2.0  # well above the ~0.2 s it takes, for busy CI machines; importing torch alone takes longer


def test_console_script_help_is_fast_and_lists_the_exit_codes():
    started = time.perf_counter()
    done = subprocess.run([*_console_script(), "--help"], capture_output=True, text=True, env=_child_env())
    elapsed = time.perf_counter() - started
    assert done.returncode == 0 and "convert" in done.stdout and "demo" in done.stdout
    assert "exit codes:" in done.stdout and "130  interrupted" in done.stdout and "3    environment" in done.stdout
    assert elapsed < HELP_LIMIT_S, f"hf-mla-vlm --help took {elapsed:.1f} s"
    version = subprocess.run([*_console_script(), "--version"], capture_output=True, text=True, env=_child_env())
    assert version.returncode == 0 and version.stdout.strip() == f"hf-mla-vlm {hf_mla_vlm.__version__}"


EVERY_HELP = """
import argparse, contextlib, io, sys, time
started = time.perf_counter()
from hf_mla_vlm import cli
parser = cli.build_parser()
assert not {"torch", "transformers"} & set(sys.modules), "building the parser imported torch / transformers"
def commands(parser, prefix):
    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, [*prefix, name])
helped = []
for argv in commands(parser, []):
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
        cli.main([*argv, "--help"])
    assert out.getvalue().startswith("usage: hf-mla-vlm"), argv
    helped.append(" ".join(argv))
loaded = sorted({"torch", "transformers"} & set(sys.modules))
print(f"{time.perf_counter() - started:.3f}", loaded, helped)
"""


def test_every_help_imports_neither_torch_nor_transformers():
    done = subprocess.run([sys.executable, "-c", EVERY_HELP], capture_output=True, text=True, env=_child_env())
    assert done.returncode == 0, done.stderr
    elapsed, loaded, helped = done.stdout.strip().split(" ", 2)
    assert loaded == "[]" and float(elapsed) < HELP_LIMIT_S
    assert all(f"'{verb}'" in helped for verb in [*cli.COMMANDS, "zoo build", "zoo train"]), helped


def _parsers(parser: argparse.ArgumentParser, prog: str = "hf-mla-vlm"):
    """Every (sub)command's parser, with its command line."""
    yield prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{prog} {name}")


def test_typed_choices_equal_their_owners():
    """The parser types the method names to stay import-free; they must stay the owners' names."""
    from hf_mla_vlm.conversion_scripts.rope_selection import CALIBRATED_STRATEGIES, FIXED_STRATEGIES
    from hf_mla_vlm.conversion_scripts.svd import SVD_METHODS

    convert_parser = dict(_parsers(cli.build_parser()))["hf-mla-vlm convert"]
    choices = {a.dest: a.choices for a in convert_parser._actions if a.choices}
    assert tuple(choices["svd"]) == SVD_METHODS
    assert tuple(choices["rope_strategy"]) == FIXED_STRATEGIES + CALIBRATED_STRATEGIES


def test_every_argument_has_help_and_shows_its_default():
    checked = 0
    for prog, parser in _parsers(cli.build_parser()):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                assert all(choice.help for choice in action._choices_actions), prog
                continue
            assert action.help and action.help.strip(), f"{prog} {action.option_strings or action.dest}: no help"
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert "default" in formatter._get_help_string(action), f"{prog} {action.option_strings}"
            checked += 1
    assert checked > 100  # every verb's arguments were seen
    shown = dict(_parsers(cli.build_parser()))["hf-mla-vlm bench"].format_help()
    assert "(default: 16)" in " ".join(shown.split())  # --batch, a list, shown plainly


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


def test_evaluate_record_keeps_the_numbers_in_the_report_and_card(native_checkpoints, tmp_path, capsys):
    from hf_mla_vlm.conversion_scripts.hub import card_problems, read_report

    src = native_checkpoints["llava"]
    folder = tmp_path / "mla"
    assert cli.main(["convert", str(src), "--out", str(folder), "--rope-dim", "8", "--kv-rank", "8", "--quiet"]) == 0
    assert "has not been measured" in (folder / "README.md").read_text()
    text = tmp_path / "text.txt"
    text.write_text(" ".join(["what is this ? a cat . the dog is left of the red circle ."] * 40))
    capsys.readouterr()
    argv = ["evaluate", str(folder), "--reference", str(src), "--text-file", str(text), "--seq-len", "32"]
    assert cli.main(argv + ["--max-sequences", "2", "--num-samples", "3", "--record"]) == 0
    result = json.loads(capsys.readouterr().out)  # stdout stays one JSON document
    assert not (folder / ".README.md.before-record").exists()  # the card was the generated one: nothing to keep
    edited = (folder / "README.md").read_text() + "\nNotes the author added by hand.\n"
    (folder / "README.md").write_text(edited)
    assert cli.main(["evaluate", str(folder), "--task", "vqa", "--num-samples", "4", "--record"]) == 0
    vqa = json.loads(capsys.readouterr().out)["vqa"]
    assert (folder / ".README.md.before-record").read_text() == edited  # the hand-edited card is kept

    report, card = read_report(folder), (folder / "README.md").read_text()
    fidelity = report["evaluation"]["fidelity"]
    assert fidelity["kl"] == result["fidelity"]["kl"] > 0 and fidelity["perplexity"] == result["perplexity"]["ppl"]
    assert fidelity["reference_perplexity"] == result["reference_perplexity"]["ppl"] and fidelity["reference"] == str(
        src
    )
    assert (
        report["evaluation"]["vqa"]["vqa_accuracy"] == vqa["accuracy"]
        and "reference" not in report["evaluation"]["vqa"]
    )
    assert card_problems(card, report) == [] and f"| fidelity.kl | {fidelity['kl']:.6g} |" in card
    assert "measured quality is under" in card and "has not been measured" not in card
    assert cli.main(["verify", str(folder), "--no-forward"]) == 0  # the weights and their hashes are untouched

    native = native_checkpoints["qwen2_5_vl"]  # no report: refused before any model is loaded
    assert cli.main(["evaluate", str(native), "--text-file", str(text), "--record"]) == 2
    assert "mla_conversion_report.json is missing" in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU-only error")
def test_bench_needs_a_gpu(native_checkpoints, capsys):
    assert cli.main(["bench", str(native_checkpoints["llava"])]) == 3  # an environment problem
    assert "needs a CUDA device" in capsys.readouterr().err


# --- the error contract: one line, a documented exit code, nothing lost ---------------------------------------------
def _hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def previous(native_checkpoints, tmp_path) -> tuple[Path, dict[str, str]]:
    """A complete earlier conversion at `tmp_path/mla`, to be replaced with --overwrite, and its file hashes."""
    out = convert_module.convert(native_checkpoints["llava"], tmp_path / "mla", rope_dim=8, kv_rank=8, progress=False)
    return out.output_dir, _hashes(out.output_dir)


def _error_line(err: str, verb: str = "convert") -> str:
    lines = [line for line in err.splitlines() if line.startswith(f"hf-mla-vlm {verb}: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def _full_disk_writer(kind: str):
    """`ShardedSafetensorsWriter.write` (the conversion's weight writer) on a disk that fills up half-way: it writes
    part of a shard, then fails as safetensors does (a SafetensorError carrying the OS error) or as a plain write
    does (OSError ENOSPC)."""

    def write(self, name, tensor):
        (self.folder / self.files[0]).write_bytes(b"\0" * 1000)
        if kind == "safetensors":
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        raise OSError(errno.ENOSPC, "No space left on device", str(self.folder / self.files[0]))

    return write


@pytest.mark.parametrize("kind", ["safetensors", "oserror"])
def test_disk_full_while_replacing_a_folder(previous, native_checkpoints, monkeypatch, capsys, kind):
    out, before = previous
    monkeypatch.setattr(ShardedSafetensorsWriter, "write", _full_disk_writer(kind))
    argv = ["convert", str(native_checkpoints["llava"]), "--out", str(out), "--rope-dim", "8", "--kv-rank", "4"]
    assert cli.main(argv + ["--overwrite", "--quiet"]) == 3
    line = _error_line(capsys.readouterr().err)
    assert "the disk is full" in line and "No space left on device" in line and "free space" in line
    assert _hashes(out) == before and folder_leftovers(out) == []  # the old checkpoint, complete; nothing else
    assert verify_folder(out) == []  # and it still loads and runs


def test_ctrl_c_while_writing(previous, native_checkpoints, monkeypatch, capsys):
    out, before = previous

    def interrupted(self, name, tensor):
        (self.folder / self.files[0]).write_bytes(b"\0" * 1000)
        signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(ShardedSafetensorsWriter, "write", interrupted)
    argv = ["convert", str(native_checkpoints["llava"]), "--out", str(out), "--rope-dim", "8", "--kv-rank", "4"]
    assert cli.main(argv + ["--overwrite", "--quiet"]) == 130
    assert "interrupted" in _error_line(capsys.readouterr().err)
    assert _hashes(out) == before and folder_leftovers(out) == []


CHILD = """
import os, sys, time
real_rename = os.rename
renames = []
def rename(source, target):
    real_rename(source, target)
    renames.append(target)
    if len(renames) == 2:  # the old folder was just renamed aside; the new one is not in place yet
        print("WINDOW", flush=True)
        time.sleep(120)
os.rename = rename
from hf_mla_vlm import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_real_sigint_in_the_worst_window_of_the_swap(previous, native_checkpoints, tmp_path):
    """SIGINT from outside while the old folder is renamed aside and the new one is not yet in place."""
    out, before = previous
    argv = ["convert", str(native_checkpoints["llava"]), "--out", str(out), "--rope-dim", "8", "--kv-rank", "4"]
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, *argv, "--overwrite", "--quiet"], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        preexec_fn=default_sigint_in_child,
    )  # fmt: skip
    try:
        assert child.stdout.readline().strip() == "WINDOW"
        assert not out.exists()  # really inside the window
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 130, err
    assert "interrupted" in _error_line(err)
    assert _hashes(out) == before and verify_folder(out) == []  # the old checkpoint was put back, complete
    (leftover,) = folder_leftovers(out)  # the complete new one, named, kept
    assert leftover.name.startswith(".mla.new-") and verify_folder(leftover) == []
    assert str(leftover) in err  # named when it happened ...
    assert cli.main(argv + ["--overwrite"]) == 2  # ... and by the next run, which deletes nothing
    assert leftover.is_dir()


@pytest.mark.parametrize(
    "extra, code, message",
    [
        (["--device", "gpu0"], 2, "'gpu0' (--device) is not a device torch knows"),
        (["--device", "cuda"], 3, "no CUDA GPU is available here"),
        (["--rope-strategy", "high", "--rope-min-per-axis", "h=1"], 2, "selects fixed pairs"),
        (["--image-token-ids", "99999999"], 2, "outside the text vocabulary"),
        (["--rope-min-per-axis", "h=x"], 2, "--rope-min-per-axis expects e.g. 't=0,h=2,w=2'"),
    ],
)
def test_bad_input_and_environment_are_one_line(native_checkpoints, tmp_path, monkeypatch, capsys, extra, code,
                                                 message):  # fmt: skip
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["convert", str(native_checkpoints["llava"]), "--out", str(tmp_path / "o"), "--rope-dim", "8"]
    assert cli.main(argv + ["--kv-rank", "8", "--svd", "md", *extra]) == code
    assert message in _error_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_debug_adds_the_traceback(native_checkpoints, tmp_path, capsys):
    argv = ["convert", str(native_checkpoints["llava"]), "--out", str(tmp_path / "o"), "--rope-dim", "7"]
    assert cli.main(argv + ["--kv-rank", "8", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1].startswith(
        "hf-mla-vlm convert: error: "
    )


def test_a_calibration_file_that_is_not_an_image(native_checkpoints, tmp_path, capsys):
    (tmp_path / "cat.jpg").write_text("<html>not found</html>")
    rows = [{"image": "cat.jpg", "conversations": [{"from": "human", "value": "<image>\nwhat?"}]}]
    (tmp_path / "calib.json").write_text(json.dumps(rows))
    argv = ["convert", str(native_checkpoints["llava"]), "--out", str(tmp_path / "o"), "--rope-dim", "8"]
    assert cli.main(argv + ["--kv-rank", "8", "--svd", "md", "--calibration", str(tmp_path / "calib.json")]) == 2
    assert f"Calibration image {tmp_path / 'cat.jpg'} is not an image" in _error_line(capsys.readouterr().err)


def test_quiet_silences_transformers_progress_bars(native_checkpoints, tmp_path, capsys):
    argv = ["convert", str(native_checkpoints["llava"]), "--rope-dim", "8", "--kv-rank", "8"]
    assert cli.main(argv + ["--out", str(tmp_path / "a")]) == 0
    assert "Converting layers" in capsys.readouterr().err  # what there is to silence (the source is streamed)
    assert cli.main(argv + ["--out", str(tmp_path / "b"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "Converting layers" not in err and "Loading weights" not in err and "it/s" not in err


def test_a_larger_cache_is_called_larger(native_checkpoints, tmp_path, capsys):
    out = tmp_path / "full"  # full rank: latent 2 * 32 plus the side row 2 * 32 + 1 padded to 72, vs 2 * 2 * 32
    argv = ["convert", str(native_checkpoints["qwen2_5_vl"]), "--out", str(out), "--rope-dim", "32", "--kv-rank", "32"]
    assert cli.main(argv + ["--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "6.2% larger than the original cache" in printed and "smaller than the original" not in printed
    card = (out / "README.md").read_text()
    assert "6.25% larger than the real cache" in card and "the count includes the padding" in card
    assert "| 136 |" in card and "the converted cache is larger than the original one" in card


def test_verify_cli(previous, capsys):
    out, _ = previous
    assert cli.main(["verify", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out.startswith(f"verified {out}")
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-3] ^= 1
    (out / "model.safetensors").write_bytes(bytes(data))
    assert cli.main(["verify", str(out)]) == 2
    assert "does not match the sha256 recorded in mla_conversion_report.json" in capsys.readouterr().err


def test_evaluate_checks_the_device_before_loading(native_checkpoints, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["evaluate", str(native_checkpoints["llava"]), "--device", "cuda"]) == 3
    assert "no CUDA GPU is available here" in _error_line(capsys.readouterr().err, "evaluate")


def test_push_to_hub_in_offline_mode_is_refused_before_converting(native_checkpoints, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    argv = ["convert", str(native_checkpoints["llava"]), "--out", str(tmp_path / "o"), "--rope-dim", "8"]
    assert cli.main(argv + ["--kv-rank", "8", "--push-to-hub", "user/repo"]) == 3
    assert "offline mode is on" in _error_line(capsys.readouterr().err) and list(tmp_path.iterdir()) == []
