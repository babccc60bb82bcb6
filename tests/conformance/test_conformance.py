"""Transformers' own model tests (ModelTesterMixin, GenerationTesterMixin, PipelineTesterMixin) on the MLA classes.

The upstream tree (`../shared/conformance/transformers-tests`, a trimmed copy of Transformers' test suite) is copied
to a temporary folder with `upstream/` of this folder as its `tests/mla/`, and run there by a pytest subprocess per
architecture and setting, against the installed Transformers. A test that fails on an MLA class fails here unless
the same upstream test fails on the native class too (then it tests behaviour the installed Transformers lacks;
it is reported, not counted against us). Skipped where `../shared` is absent. See README.md for the counts.
"""

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import transformers


TREE = Path(__file__).resolve().parents[3] / "shared" / "conformance" / "transformers-tests"
ARCHS = {
    "llava": "NativeLlavaTest",
    "llava_next": "NativeLlavaNextTest",
    "qwen2_5_vl": "NativeQwen2_5_VLTest",
    "qwen2_vl": "NativeQwen2VLTest",
    "llava_onevision": "NativeLlavaOnevisionTest",
}
# The settings to run (comma-separated `MLA_CONFORMANCE_SETTINGS`, default both): CI's second pass, on Transformers
# 5.17, runs `compressed` only to stay inside its time limit (README.md has the counts of both on both versions).
SETTINGS = tuple(os.environ.get("MLA_CONFORMANCE_SETTINGS", "full,compressed").split(","))
if not set(SETTINGS) <= {"full", "compressed"}:
    raise ValueError(f"MLA_CONFORMANCE_SETTINGS must name full and/or compressed, got {SETTINGS}.")
RESULTS = os.environ.get("MLA_CONFORMANCE_RESULTS")  # optional JSON-lines file the counts are appended to

pytestmark = pytest.mark.skipif(not TREE.is_dir(), reason=f"the upstream test tree is not at {TREE}")


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("conformance") / "transformers-tests"
    shutil.copytree(TREE, root)
    (root / "src").mkdir(exist_ok=True)
    (root / "src" / "transformers").symlink_to(Path(transformers.__file__).parent)  # test_pipeline_mixin reads it
    shutil.copytree(Path(__file__).parent / "upstream", root / "tests" / "mla")
    return root


def run_upstream(tree: Path, targets: list[str], setting: str, junit: Path) -> dict[str, str]:
    """Run `targets` in the tree; test name -> "passed" | "failed" | "skipped" (xfail counts as skipped)."""
    env = {**os.environ, "MLA_CONFORMANCE_SETTING": setting, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", f"--junitxml={junit}"]
    done = subprocess.run(command + targets, cwd=tree, env=env, capture_output=True, text=True, timeout=3600)
    if not junit.exists():
        pytest.fail(f"the upstream run wrote no report:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    outcomes = {}
    for case in ET.parse(junit).iter("testcase"):
        kinds = {child.tag for child in case}
        outcome = "failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"
        name = case.get("name")
        if outcomes.get(name) != "failed":  # a name can repeat (subtests); any failure counts
            outcomes[name] = outcome
    return outcomes


@pytest.mark.slow
@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("arch", ARCHS)
def test_upstream_model_tests_pass_on_the_mla_classes(arch, setting, tree, tmp_path):
    outcomes = run_upstream(tree, [f"tests/mla/test_{arch}_mla.py"], setting, tmp_path / "mla.xml")
    failed = sorted(name for name, outcome in outcomes.items() if outcome == "failed")
    native = {}
    if failed:  # the same upstream tests on the native class, under the same set-up
        targets = [f"tests/mla/test_native.py::{ARCHS[arch]}::{name}" for name in failed]
        native = run_upstream(tree, targets, "full", tmp_path / "native.xml")
    fails_natively = [name for name in failed if native.get(name) == "failed"]
    regressions = [name for name in failed if name not in fails_natively]
    counts = {outcome: sum(o == outcome for o in outcomes.values()) for outcome in ("passed", "failed", "skipped")}
    row = {
        "transformers": transformers.__version__,
        "arch": arch,
        "setting": setting,
        **counts,
        "fails_natively": fails_natively,
        "regressions": regressions,
    }
    print(json.dumps(row))
    if RESULTS:
        with open(RESULTS, "a") as handle:
            handle.write(json.dumps(row) + "\n")
    assert counts["passed"] > 100, row  # the upstream classes really ran
    assert not regressions, row
