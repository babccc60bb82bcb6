"""The example scripts run offline on the tiny models, as subprocesses, the way a user runs them."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hf_mla_vlm.conversion_scripts.checks import check_checkpoint_folder


ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TIMEOUT_S = 300


def run_example(script: str, *args: str, cwd: Path) -> str:
    """Run `examples/<script>` with `args` in `cwd`, offline; return its stdout (fails the test on error)."""
    return _run_python(str(EXAMPLES / script), *args, cwd=cwd, what=f"{script} {args}")


def _run_python(*argv: str, cwd: Path, what: str) -> str:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_MODULES_CACHE": str(cwd / "hf_modules"),  # remote code imported by trust_remote_code lands here
        "TMPDIR": str(cwd),  # temporary folders too
        "PYTHONPATH": os.pathsep.join(sys.path),  # this checkout and Transformers, as here
    }
    done = subprocess.run(
        [sys.executable, *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert done.returncode == 0, f"{what} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def readme_python_snippets() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)


def test_the_readme_python_snippets_run_as_written(tmp_path):
    """The snippets run in order in one interpreter (a later one continues the first)."""
    snippets = readme_python_snippets()
    assert len(snippets) >= 2  # the API example and the quantized-cache one
    printed = _run_python("-c", "\n".join(snippets), cwd=tmp_path, what="README.md's python snippets")
    kv, generated = printed.strip().splitlines()[-2:]
    assert "'converted_bytes_per_token': 320" in kv and generated.startswith("['")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("examples")


@pytest.fixture(scope="module")
def converted(workdir) -> dict[str, Path]:
    """The convert script, run with no source (tiny random models) for two architectures."""
    folders = {}
    for arch, out in (("llava_next", "llava-next-mla"), ("qwen2_5_vl", "qwen2-5-vl-mla")):
        printed = run_example("convert.py", "--arch", arch, cwd=workdir)
        assert "No source given" in printed and "saving vs the real cache      : 68.75%" in printed, printed
        assert "converted MLA cache:        320 bytes" in printed and "84.38%" in printed, printed
        folders[out] = workdir / out
        assert check_checkpoint_folder(folders[out]) == []
    return folders


@pytest.mark.parametrize("folder", ["llava-next-mla", "qwen2-5-vl-mla"])
def test_generate_on_the_converted_folder(folder, converted, workdir):
    printed = run_example("generate.py", folder, "--max-new-tokens", "4", cwd=workdir)
    assert "Generated: '" in printed
    report = json.loads((converted[folder] / "mla_conversion_report.json").read_text())
    measured = re.search(r"KV cache: (\d+) bytes for (\d+) tokens = ([\d.]+) bytes per token", printed)
    assert measured, printed
    # The cache of a real generate() holds exactly the analytic MLA bytes per token.
    assert float(measured.group(3)) == report["kv_cache"]["converted_bytes_per_token"]
    assert any((workdir / "hf_modules").rglob("modeling_mla_common.py"))  # loaded through the remote code


def test_generate_without_a_model_converts_a_tiny_one(tmp_path):
    printed = run_example("generate.py", "--max-new-tokens", "2", cwd=tmp_path)
    assert "= 320 bytes per token" in printed


def test_push_to_hub_dry_run_only_checks(converted, workdir):
    folder = converted["llava-next-mla"]
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    printed = run_example("push_to_hub.py", str(folder), "--dry-run", cwd=workdir)
    assert (
        re.search(r"OK: \d+ files", printed)
        and "model.safetensors" in printed
        and "Dry run: nothing uploaded." in printed
    )
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before  # nothing changed


def test_push_to_hub_without_a_repo_id_converts_and_verifies_offline(tmp_path):
    printed = run_example("push_to_hub.py", cwd=tmp_path)  # as is: a tiny model, verified, nothing uploaded
    assert re.search(r"OK: \d+ files", printed) and "No --repo-id: verified only, nothing uploaded." in printed


def test_push_to_hub_dry_run_reports_problems(converted, tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "push_to_hub.py"),
            str(converted["llava-next-mla"].parent / "missing"),
            "--dry-run",
        ],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert done.returncode == 1 and "is not a folder" in done.stdout and "not pushing" in done.stdout


def test_what_the_examples_write_is_ignored_by_git(converted, workdir):
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    written = sorted(path.name for path in workdir.iterdir() if path.is_dir() and path.name != "hf_modules")
    assert "llava-next-mla-tiny-source" in written  # the tiny sources the convert scripts build, and their outputs
    for name in written:  # as if they had been run from examples/, as examples/README says
        done = subprocess.run(["git", "check-ignore", "-q", f"examples/{name}/"], cwd=ROOT)
        assert done.returncode == 0, f"examples/{name}/ is not in .gitignore"
