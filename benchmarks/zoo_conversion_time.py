"""Wall time of the zoo demo's conversion (`hf-mla-vlm demo`: the zoo LLaVA model, rope_dim=32, kv_rank=32,
`--rope-strategy mkl --svd md`, 64 calibration samples of the default `builtin,wikipedia` mix), per stage.

Each run appends one row (labelled `--label`) to the results file, so a before/after pair lives on one page:

    python benchmarks/zoo_conversion_time.py --label after --out benchmarks/results/zoo_conversion_time.json

`--profile FILE` also writes a cProfile dump of the conversion (inspect it with `python -m pstats FILE`).
"""

import argparse
import cProfile
import hashlib
import json
import os
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

from results_io import write_results
from safetensors.torch import load_file

from hf_mla_vlm.conversion_scripts.convert import RANKS_NAME, convert
from hf_mla_vlm.utils import environment, machine_threads
from hf_mla_vlm.zoo.models import save_zoo_model


SETTINGS = dict(rope_dim=32, kv_rank=32, rope_strategy="mkl", svd="md", num_samples=64)


def measure(workdir: Path, profile: str | None) -> dict:
    native = workdir / "native"
    if not (native / "config.json").is_file():
        save_zoo_model("llava", native, overwrite=True)
    profiler = cProfile.Profile() if profile else None
    started = time.perf_counter()
    if profiler:
        profiler.enable()
    result = convert(native, workdir / "mla", overwrite=True, progress=False, **SETTINGS)
    if profiler:
        profiler.disable()
        profiler.dump_stats(profile)
    wall = time.perf_counter() - started
    ranks = load_file(result.output_dir / RANKS_NAME)["ranks"]
    timings = {key: round(value, 2) for key, value in result.report["timings_s"].items()}
    threads = result.report["environment"]["torch_threads"]
    return {"wall_s": round(wall, 2), "timings_s": timings, "torch_threads": threads,
            "ranks_sha256": hashlib.sha256(ranks.numpy().tobytes()).hexdigest()[:16]}  # fmt: skip


def markdown(result: dict) -> str:
    stages = sorted({key for row in result["runs"] for key in row["timings_s"]})
    lines = [
        "# Zoo demo conversion time (2 cores)",
        "",
        f"Conversion of `hf-mla-vlm demo` ({', '.join(f'{k}={v}' for k, v in SETTINGS.items())}), timed per stage "
        "by `benchmarks/zoo_conversion_time.py` (the report's `timings_s`). Source: `zoo_conversion_time.json`.",
        "",
        "| run | date | device | torch | transformers | load | wall s | " + " | ".join(stages) + " |",
        "|---" * (7 + len(stages)) + "|",
    ]
    for row in result["runs"]:
        env = row["environment"]
        cells = [row["label"], row["date"], row["device"], env["torch"], env["transformers"], row["load_average"]]
        cells += [f"{row['wall_s']:.1f}"] + [f"{row['timings_s'].get(s, 0):.1f}" for s in stages]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "Notes:", ""] + [f"- {row['label']}: {row['note']}" for row in result["runs"] if row.get("note")]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="name of this run's row (e.g. before, after)")
    parser.add_argument("--note", default="", help="free text shown under the table")
    parser.add_argument("--out", default="benchmarks/results/zoo_conversion_time.json", help="results JSON")
    parser.add_argument("--workdir", default="/tmp/zoo_conversion_time", help="where the checkpoints go")
    parser.add_argument("--profile", default=None, help="also write a cProfile dump here")
    args = parser.parse_args()
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "?")
    row = {"label": args.label, "note": args.note, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "device": f"{cpu}, {machine_threads()} cores", "environment": environment(),
           "command": "python benchmarks/zoo_conversion_time.py " + f"--label {args.label}",
           "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
           **measure(Path(args.workdir), args.profile)}  # fmt: skip
    out = Path(args.out)
    runs = json.loads(out.read_text())["runs"] if out.is_file() else []
    runs = [r for r in runs if r["label"] != args.label] + [row]
    write_results({"settings": SETTINGS, "runs": runs}, out, markdown)
    print(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
