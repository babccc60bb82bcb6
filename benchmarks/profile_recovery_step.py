"""Where the time of a recovery training step goes: torch.profiler over a few steps of the real `finetune` loop.

The steps are those of `recovery_quality.py`'s stage 2 at one level (`distill` from the zoo original, the same data
mix, batch and learning rate): per zoo model and per `--micro-batches` value, the zoo original is converted
(`svd="weight"`: the step's cost does not depend on the factorisation's init), then `finetune` runs
`--warmup-steps + --profile-steps` steps with a callback that profiles the last `--profile-steps` of them (data
loading, teacher, student forward and backward, optimizer step: everything between two step boundaries). Per run:
wall seconds per step, device (kernel) seconds per step and the device's idle share, host operators, kernel launches
and host-device synchronisations per step (with the lines of Python that synchronise most), the top kernels and
host operators, and tokens per second.

It answers what a step is bound by (device compute, launches, synchronisation, data) before anything is changed;
on a CPU it runs as a smoke test (no device columns).

    PYTHONPATH=src python benchmarks/profile_recovery_step.py --out /tmp/prof/profile_recovery_step.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from collections import Counter
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import torch
from recovery_quality import level_setting, training_data
from results_io import write_results
from torch.autograd import DeviceType
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile
from transformers import AutoConfig, AutoProcessor, TrainerCallback

from hf_mla_vlm.assets import wikipedia_split
from hf_mla_vlm.conversion_scripts.convert import convert
from hf_mla_vlm.training.distill import text_windows
from hf_mla_vlm.training.finetune import finetune
from hf_mla_vlm.utils import environment
from hf_mla_vlm.zoo.models import save_zoo_model, zoo_spec


MODELS = ("llava", "llava_next", "qwen2_5_vl")
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}  # fmt: skip
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero")  # read a value on the host: a synchronisation on a GPU
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepProfiler(TrainerCallback):
    """Profiles optimizer steps `warmup + 1 ... warmup + steps` (from the end of step `warmup` to the end of the
    last one), and times them with the device synchronised at both ends."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps = warmup, steps
        self.profiler, self.started, self.wall_s, self.tokens = None, None, None, None
        self.sync_sites: Counter = Counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.profiler = profile(activities=activities)
            _synchronize()
            self.profiler.__enter__()
            self.started, self.tokens = time.perf_counter(), -state.num_input_tokens_seen
            self._trace_syncs(True)
        elif state.global_step == self.warmup + self.steps and self.profiler is not None:
            _synchronize()
            self.wall_s = time.perf_counter() - self.started
            self.tokens += state.num_input_tokens_seen  # the profiled steps' (non-padding) tokens
            self._trace_syncs(False)
            self.profiler.__exit__(None, None, None)

    def _trace_syncs(self, on: bool) -> None:
        """On a GPU, record where the host synchronises with the device: `torch.cuda.set_sync_debug_mode("warn")`
        warns at every synchronising call, from the Python line that made it."""
        if not torch.cuda.is_available():
            return
        if on:
            self._recording = warnings.catch_warnings(record=True)
            self._log = self._recording.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            return
        torch.cuda.set_sync_debug_mode("default")
        self._recording.__exit__(None, None, None)
        for w in self._log:
            if "synchroniz" in str(w.message):
                self.sync_sites[f"{Path(w.filename).name}:{w.lineno}"] += 1


def summarise(callback: StepProfiler) -> dict:
    """The per-step numbers of a profiled run. Synchronisations: on a GPU the runtime's synchronising calls, on a
    CPU the operators that read a tensor's value on the host (they synchronise on a GPU)."""
    steps, wall, cuda = callback.steps, callback.wall_s, torch.cuda.is_available()
    averages = callback.profiler.key_averages()
    kernels = Counter({e.key: e.self_device_time_total for e in averages if e.device_type == DeviceType.CUDA})
    host = [e for e in averages if e.key.startswith("aten::") and e.device_type != DeviceType.CUDA]
    count = Counter({e.key: e.count for e in averages})
    syncs = sum(count[name] for name in (SYNC_CALLS if cuda else SYNC_OPS))
    device_s = sum(kernels.values()) / 1e6 if cuda else None
    top_host = sorted(host, key=lambda e: -e.self_cpu_time_total)[:12]
    return {
        "profiled_steps": steps,
        "wall_s_per_step": wall / steps,
        "device_s_per_step": device_s / steps if cuda else None,
        "device_idle_share": 1 - device_s / wall if cuda else None,
        "tokens_per_step": callback.tokens / steps,
        "tokens_per_s": callback.tokens / wall,
        "host_ops_per_step": sum(e.count for e in host) / steps,
        "kernel_launches_per_step": sum(count[name] for name in LAUNCH_CALLS) / steps if cuda else None,
        "syncs_per_step": syncs / steps,
        "sync_sites_per_step": {site: n / steps for site, n in callback.sync_sites.most_common(8)},
        "top_kernels_ms_per_step": {name[:90]: t / 1e3 / steps for name, t in kernels.most_common(12)},
        "top_host_ops_ms_per_step": {e.key: e.self_cpu_time_total / 1e3 / steps for e in top_host},
    }


def sdpa_variant(value: str) -> tuple[str, ...]:
    """`default` (torch's own choice: no restriction) or comma-separated `SDPA_BACKENDS` names."""
    if value == "default":
        return ()
    names = tuple(value.split(","))
    unknown = [name for name in names if name not in SDPA_BACKENDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown SDPA backends {unknown}: choose 'default' or from {list(SDPA_BACKENDS)}"
        )
    return names


def measure(model_name: str, micro_batches: int, args, work: Path, sdpa: tuple[str, ...] = ()) -> dict:
    native = save_zoo_model(model_name, work / model_name / "native", overwrite=True)
    config = AutoConfig.from_pretrained(native)
    setting = level_setting(config, args.level, args.rope_dim)
    student = work / model_name / "mla"
    if not student.exists():
        convert(native, student, rope_dim=args.rope_dim, kv_rank=setting["kv_rank"], svd="weight", progress=False)
    processor = AutoProcessor.from_pretrained(native)
    steps = args.warmup_steps + args.profile_steps
    data_args = SimpleNamespace(**vars(args), stage1_steps=0, stage2_steps=steps,
                                image_size=zoo_spec(model_name).render_size)  # fmt: skip
    windows = text_windows(processor, wikipedia_split("calibration"), args.text_seq_len)
    items = training_data(windows, data_args, seed=0)["stages"][1]
    callback = StepProfiler(args.warmup_steps, args.profile_steps)
    # scaled_dot_product_attention restricted to these backends for the run (every attention call of both models)
    with sdpa_kernel([SDPA_BACKENDS[name] for name in sdpa]) if sdpa else nullcontext():
        finetune(
            student, items, work / model_name / f"ft-{micro_batches}", stage=2, objective="distill", teacher=native,
            label_weight=args.label_weight, learning_rate=args.lr,
            per_device_train_batch_size=args.train_batch // micro_batches, gradient_accumulation_steps=micro_batches,
            train_sampling_strategy="batch_rebalance" if micro_batches > 1 else "random", max_steps=steps,
            bf16=torch.cuda.is_available(), seed=0, logging_steps=steps,
            training_args={"dataloader_num_workers": args.workers}, callbacks=[callback], overwrite=True,
        )  # fmt: skip
    if callback.wall_s is None:
        raise RuntimeError(f"The run ended before step {steps}: nothing was profiled.")
    return {
        "model": model_name,
        "level": args.level,
        "kv_rank": setting["kv_rank"],
        "micro_batches": micro_batches,
        "sdpa_backends": ",".join(sdpa) or "default",
        **summarise(callback),
    }


def markdown(result: dict) -> str:
    def cell(value, digits=3):
        if value is None:
            return "-"
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    lines = [
        "# Recovery training step profile",
        "",
        f"{result['date']}, {result['device']}, torch {result['environment']['torch']}, transformers "
        f"{result['environment']['transformers']}. Command: `{result['command']}`",
        "",
        result["description"],
        "",
        "| model | micro-batches | SDPA backends | wall s / step | device s / step | device idle | tokens / s | "
        "host ops / step | launches / step | syncs / step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['micro_batches']} | {r.get('sdpa_backends', 'default')} | "
            f"{cell(r['wall_s_per_step'])} | {cell(r['device_s_per_step'])} | "
            f"{cell(r['device_idle_share'], 2)} | {r['tokens_per_s']:.0f} | {r['host_ops_per_step']:.0f} | "
            f"{cell(r['kernel_launches_per_step'], 0)} | {r['syncs_per_step']:.0f} |"
        )
    for r in result["rows"]:
        lines += [
            "",
            f"## {r['model']}, {r['micro_batches']} micro-batch(es), SDPA {r.get('sdpa_backends', 'default')}",
        ]
        if r["sync_sites_per_step"]:
            lines += ["", "| where the host synchronises | calls / step |", "|---|---|"]
            lines += [f"| `{site}` | {n:g} |" for site, n in r["sync_sites_per_step"].items()]
        for key, title in (("top_kernels_ms_per_step", "kernel"), ("top_host_ops_ms_per_step", "host operator")):
            if r[key]:
                lines += ["", f"| {title} | ms / step |", "|---|---|"]
                lines += [f"| `{name}` | {t:.2f} |" for name, t in r[key].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file (a .md beside it)")
    parser.add_argument("--models", nargs="+", default=["llava_next", "qwen2_5_vl"], choices=MODELS)
    parser.add_argument("--micro-batches", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--level", default="62.5", help="KV-cache cut of the student (recovery_quality's levels)")
    parser.add_argument("--rope-dim", type=int, default=16)
    parser.add_argument("--warmup-steps", type=int, default=8)
    parser.add_argument("--profile-steps", type=int, default=4)
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--mix", nargs=2, type=float, default=[1.0, 3.0])
    parser.add_argument("--text-seq-len", type=int, default=512)
    parser.add_argument("--label-weight", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--workers", type=int, default=3, help="dataloader workers")
    parser.add_argument("--sdpa-backends", nargs="+", type=sdpa_variant, default=[()], metavar="VARIANT",
                        help="runs per variant: 'default' (torch's choice) or backends to restrict "
                             "scaled_dot_product_attention to, e.g. 'flash,efficient,math' (no cuDNN)")  # fmt: skip
    parser.add_argument("--workdir", default=None, help="checkpoints (default: a temporary folder)")
    args = parser.parse_args(argv)
    for micro in args.micro_batches:
        if micro < 1 or args.train_batch % micro:
            parser.error(f"--micro-batches {micro} must divide --train-batch {args.train_batch}.")
    if args.warmup_steps < 1 or args.profile_steps < 1:
        parser.error("--warmup-steps and --profile-steps must be at least 1.")
    os.environ.setdefault("TQDM_DISABLE", "1")
    result = {
        "benchmark": "profile_recovery_step",
        "description": __doc__.split("\n\n")[0].replace("\n", " "),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "environment": environment(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/profile_recovery_step.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": vars(args),
        "rows": [],
    }
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.workdir or scratch)
        for name in args.models:
            for micro in args.micro_batches:
                for sdpa in args.sdpa_backends:
                    row = measure(name, micro, args, work, sdpa)
                    label = f"{name} x{micro} SDPA {row['sdpa_backends']}"
                    print(f"[profile] {label}: {row['wall_s_per_step']:.3f} s/step", flush=True)
                    result["rows"].append(row)
                    write_results(result, out, markdown)
    return out


if __name__ == "__main__":
    main()
