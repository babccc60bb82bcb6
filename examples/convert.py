"""Convert a vision-language checkpoint to Multi-Head Latent Attention (MLA) and print the KV-cache saving.

Usage:
    python convert.py                                 # builds a tiny random LLaVA-NeXT offline and converts it
    python convert.py --arch qwen2_5_vl               # the same for a tiny Qwen2.5-VL (any registered architecture)
    python convert.py llava-hf/llama3-llava-next-8b-hf --out ./llava-next-mla \
        --rope-dim 32 --kv-rank 64 --dtype bfloat16    # a real checkpoint (local folder or Hub id; its config names
                                                       # the architecture)

The output folder is a Hub-ready repo: weights, config.json with auto_map, the remote-code files, the processor
files, a model card and mla_conversion_report.json. Load it with examples/generate.py.
"""

import argparse
from pathlib import Path

import hf_mla_vlm
from hf_mla_vlm.registry import ARCH_NAMES
from hf_mla_vlm.tiny_models import save_tiny_vlm


def main() -> None:
    parser = argparse.ArgumentParser(description="Convert a vision-language checkpoint to MLA.")
    parser.add_argument("source", nargs="?", help="native checkpoint folder or Hub id (default: a tiny random model)")
    parser.add_argument(
        "--arch", default="llava_next", choices=ARCH_NAMES, help="tiny model architecture (default: %(default)s)"
    )
    parser.add_argument("--out", default=None, help="output folder (default: <arch>-mla, e.g. llava-next-mla)")
    # rotary dims kept per head, and latent width per kv head. 8/8 suits the tiny model (head_dim 32); a real
    # model (head_dim 128) needs larger values, e.g. --rope-dim 32 --kv-rank 64.
    parser.add_argument("--rope-dim", type=int, default=8)
    parser.add_argument("--kv-rank", type=int, default=8)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args()

    out = Path(args.out or f"{args.arch.replace('_', '-')}-mla")
    source = args.source
    if source is None:
        # No model given: write a tiny random model (2 layers, hidden size 128) next to the output folder.
        source = out.parent / f"{out.name}-tiny-source"
        print(f"No source given: writing a tiny random {args.arch} to {source}")
        save_tiny_vlm(args.arch, source)

    print(f"Converting {source} -> {out} (rope_dim={args.rope_dim}, kv_rank={args.kv_rank}, dtype={args.dtype})")
    result = hf_mla_vlm.convert(
        source,
        out,
        rope_dim=args.rope_dim,
        kv_rank=args.kv_rank,
        dtype=args.dtype,
        overwrite=args.overwrite,
        progress=False,
    )

    # The report (also in <out>/mla_conversion_report.json) holds the KV-cache sizes in two conventions:
    # against the model's real (GQA) cache, and against an MHA cache of the same model (the paper's convention).
    kv = result.report["kv_cache"]
    print(f"Wrote {result.output_dir} in {result.report['timings_s']['total_s']:.1f}s")
    print(f"KV cache per token, all {kv['num_layers']} layers, {kv['bytes_per_element']}-byte elements:")
    print(f"  original GQA cache : {kv['original_bytes_per_token']:>10} bytes")
    print(f"  converted MLA cache: {kv['converted_bytes_per_token']:>10} bytes")
    print(f"  saving vs the real cache      : {100 * kv['reduction_vs_original_gqa_cache']:.2f}%")
    print(f"  saving vs MHA (paper-style)   : {100 * kv['reduction_vs_mha_equivalent_paper_convention']:.2f}%")
    print(f"Next: python generate.py {result.output_dir}")


if __name__ == "__main__":
    main()
