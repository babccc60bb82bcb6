"""benchmarks/zoo/recovery_gpu.sh's queue, with a stand-in for recovery_quality.py that records how it was run."""

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest


SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "zoo" / "recovery_gpu.sh"
STAND_IN = """import json, os, sys
import hf_mla_vlm
out = sys.argv[sys.argv.index("--out") + 1]
routes = sys.argv[sys.argv.index("--routes") + 1 : sys.argv.index("--out")]
routes = routes[: routes.index("--workers")] if "--workers" in routes else routes
name = sys.argv[sys.argv.index("--model") + 1] + "-" + "_".join(routes)
record = {"script": os.path.abspath(__file__), "package": hf_mla_vlm.__file__, "argv": sys.argv[1:]}
open(os.path.join(out, name + ".json"), "w").write(json.dumps(record))
"""


@pytest.mark.skipif(shutil.which("setsid") is None, reason="needs util-linux setsid")
def test_jobs_run_from_a_copy_of_the_tree_with_their_own_arguments(tmp_path):
    tree = tmp_path / "tree"
    (tree / "src" / "hf_mla_vlm").mkdir(parents=True)
    (tree / "benchmarks").mkdir()
    (tree / "src" / "hf_mla_vlm" / "__init__.py").write_text("")
    (tree / "src" / "hf_mla_vlm" / "assets.py").write_text("def load_smollm2():\n    pass\n")
    (tree / "benchmarks" / "recovery_quality.py").write_text(STAND_IN)
    out = tmp_path / "out"
    jobs = "llava|control;qwen2_5_vl|none distill|--label-weight 0.5 --levels 75 --workers 3"
    env = {"PATH": "/usr/bin:/bin", "JOBS": jobs, "PARALLEL": "2", "PYTHONPATH": str(tree / "elsewhere")}
    env["PATH"] = f"{Path(shutil.which('python3')).parent}:{env['PATH']}"
    subprocess.run(["bash", str(SCRIPT), str(out), "--levels", "62.5", "--seeds", "0"], cwd=tree, env=env, check=True)
    (tree / "benchmarks" / "recovery_quality.py").write_text("raise SystemExit('the changed tree was run')\n")
    deadline = time.monotonic() + 60
    while "all done" not in ((out / "queue.log").read_text() if (out / "queue.log").exists() else ""):
        assert time.monotonic() < deadline, "the queue did not finish"
        time.sleep(0.2)

    log = (out / "queue.log").read_text()
    assert log.count(" start ") == 2 and log.count("rc=0") == 2, log
    control = json.loads((out / "llava-control.json").read_text())
    distill = json.loads((out / "qwen2_5_vl-none_distill.json").read_text())
    for record in (control, distill):  # the copy taken at launch, not the tree edited since
        assert record["script"] == str(out / "code" / "benchmarks" / "recovery_quality.py")
        assert record["package"] == str(out / "code" / "src" / "hf_mla_vlm" / "__init__.py")
    assert control["argv"][:4] == ["run", "--model", "llava", "--routes"] and "--label-weight" not in control["argv"]
    tail = distill["argv"][distill["argv"].index("--seeds") :]
    assert tail == ["--seeds", "0", "--label-weight", "0.5", "--levels", "75", "--workers", "3"]  # a job's own last
    # one dataloader worker unless the job names its own: then only its own
    assert control["argv"].count("--workers") == 1 and control["argv"][control["argv"].index("--workers") + 1] == "1"
    assert distill["argv"].count("--workers") == 1
