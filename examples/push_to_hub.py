"""Verify a converted MLA checkpoint folder and push it to the Hugging Face Hub in one commit.

Without --repo-id (or with --dry-run) nothing leaves the machine: the folder is only verified.

Usage:
    python push_to_hub.py                                                 # converts a tiny model, then verifies it
    python push_to_hub.py ./llava-next-mla                                # only verify the folder, no network
    python push_to_hub.py ./llava-next-mla --repo-id your-name/llava-next-mla [--private] [--revision mla-v1]

The token comes from `hf auth login` or the HF_TOKEN environment variable. If the folder's model card (README.md)
lacks the Hub metadata or the measured KV numbers, the commit carries one generated from mla_conversion_report.json;
the folder itself is never modified.
"""

import argparse
import sys
import tempfile
from pathlib import Path

from hf_mla_vlm.conversion_scripts.checks import verify_folder
from hf_mla_vlm.conversion_scripts.hub import push_to_hub


def tiny_converted_model(folder: str) -> Path:
    """Build and convert a tiny random LLaVA-NeXT (only used when no folder is given)."""
    import hf_mla_vlm
    from hf_mla_vlm.tiny_models import save_tiny_vlm

    source = save_tiny_vlm("llava_next", f"{folder}/tiny-llava-next")
    return hf_mla_vlm.convert(
        source, f"{folder}/tiny-llava-next-mla", rope_dim=8, kv_rank=8, progress=False
    ).output_dir


def main() -> int:
    parser = argparse.ArgumentParser(description="Verify a converted MLA folder and push it to the Hub.")
    parser.add_argument("folder", nargs="?", help="converted checkpoint folder (default: a tiny converted model)")
    parser.add_argument("--repo-id", help="namespace/name of the model repo to push to (default: verify only)")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", help="branch to commit to (created if missing; default main)")
    parser.add_argument("--commit-message", help="default: a summary of the conversion settings")
    parser.add_argument("--dry-run", action="store_true", help="only verify the folder, even with --repo-id")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.folder) if args.folder else tiny_converted_model(tmp)
        # 1. The check: config and auto_map, flat remote code, readable safetensors with every layer's MLA weights,
        # the sha256 of each weight file against the report, and a forward pass on a few tokens.
        print(f"Verifying {folder}")
        problems = verify_folder(folder)
        for problem in problems:
            print(f"  problem: {problem}")
        if problems:
            print(f"{len(problems)} problem(s): not pushing.")
            return 1
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        print(f"OK: {len(files)} files, {sum(p.stat().st_size for p in files) / 1e6:.1f} MB")
        for path in files:
            print(f"  {path.name:40s} {path.stat().st_size:>14,d} bytes")
        if args.dry_run or not args.repo_id:
            print("Dry run: nothing uploaded." if args.dry_run else "No --repo-id: verified only, nothing uploaded.")
            return 0

        # 2. The push: create the repo (and branch), upload everything with a complete card in one commit (verified
        # already, so the forward pass is not run twice).
        print(f"Pushing to {args.repo_id} ({args.revision or 'main'}, {'private' if args.private else 'public'})")
        url = push_to_hub(
            folder, args.repo_id, private=args.private, revision=args.revision, commit_message=args.commit_message,
            forward_check=False,
        )  # fmt: skip
        print(f"Done: {url}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
