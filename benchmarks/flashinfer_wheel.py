"""Trim the FlashInfer wheel to what ``import flashinfer`` and its batch-MLA JIT modules need.

The GPU machine has no network: a missing package travels as a wheel with the working tree, which may hold 64 MiB
per call (the tracked tree takes about 45 of them). ``flashinfer-python`` 0.7.2.post1 is a 62 MB wheel, half of it
the CUDA sources of every kernel family (``flashinfer/data/csrc``) that the JIT compiles on first use. The benchmark
peer, ``flashinfer.mla.BatchMLAPagedAttentionWrapper`` (``benchmarks/bench_decode_kernel.py``), compiles only
``csrc/batch_mla_*.cu`` (fa2 and fa3 backends) against the headers (``data/include``, ``cutlass``, ``cccl``) and
the top-level ``csrc`` headers and templates. This script writes a wheel without the other sources and without the
non-Python payload of the MoE and experimental packages (kept: every ``.py`` file, so ``import flashinfer`` and its
submodules still import), its RECORD rewritten so that pip installs it as usual.

Here (with an index)::

    python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 -d /tmp/fi flashinfer-python==0.7.2.post1 apache-tvm-ffi==0.1.15.post2
    python benchmarks/flashinfer_wheel.py /tmp/fi/flashinfer_python-0.7.2.post1-py3-none-any.whl --out .fi
    cp /tmp/fi/apache_tvm_ffi-*.whl .fi/   # .fi listed in .git/info/exclude, carried by the device call

On the GPU machine (its image has the other requirements that the wrapper imports: torch, numpy, ninja, ...)::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .fi/*.whl && export PYTHONPATH=/tmp/site
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import zipfile
from pathlib import Path


CSRC = "flashinfer/data/csrc/"
SOURCE_SUFFIXES = (".cu", ".cc", ".cpp", ".c")
KEPT_SOURCES = ("batch_mla_",)  # csrc files of the batch MLA wrapper's JIT modules (fa2, fa3)
PAYLOAD_ONLY_PY = ("flashinfer/experimental/", "flashinfer/moe_ep/", "flashinfer/fused_moe/")


def keep(name: str) -> bool:
    """Whether the wheel member ``name`` is needed by ``import flashinfer`` and the batch-MLA JIT."""
    if name.startswith(CSRC):
        rest = name[len(CSRC) :]
        if "/" in rest:  # the per-family source folders
            return False
        return not rest.endswith(SOURCE_SUFFIXES) or rest.startswith(KEPT_SOURCES)
    if name.startswith(PAYLOAD_ONLY_PY):
        return name.endswith(("/", ".py"))
    return True


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def trim_wheel(wheel: Path, out_dir: Path) -> Path:
    """Write the trimmed copy of ``wheel`` into ``out_dir`` (same file name) and return its path.

    Raises:
        ValueError: ``wheel`` is not a FlashInfer wheel (no ``flashinfer/`` package or no RECORD).
    """
    with zipfile.ZipFile(wheel) as src:
        names = src.namelist()
        records = [n for n in names if n.endswith(".dist-info/RECORD")]
        if not records or not any(n.startswith("flashinfer/") for n in names):
            raise ValueError(f"{wheel} is not a flashinfer-python wheel (no flashinfer/ package or RECORD).")
        record = records[0]
        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / wheel.name
        partial = out.with_name(out.name + ".partial")
        lines = []
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                if info.filename == record or not keep(info.filename):
                    continue
                data = src.read(info)
                dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
                if not info.is_dir():
                    lines.append(_record_line(info.filename, data))
            dst.writestr(record, "\n".join([*lines, f"{record},,"]) + "\n")
    partial.replace(out)  # never a half-written wheel under the final name
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheel", type=Path, help="flashinfer_python-*.whl")
    parser.add_argument("--out", type=Path, required=True, help="folder of the trimmed wheel")
    args = parser.parse_args(argv)
    out = trim_wheel(args.wheel, args.out)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, was {args.wheel.stat().st_size / 1e6:.1f} MB)")
    return out


if __name__ == "__main__":
    main()
