"""benchmarks/flashinfer_wheel.py: the trimmed wheel keeps the batch-MLA JIT sources and every Python module."""

import zipfile

import pytest

from tests.utils import benchmark_module


MEMBERS = {
    "flashinfer/__init__.py": b"from .mla import X\n",
    "flashinfer/mla/__init__.py": b"X = 1\n",
    "flashinfer/data/csrc/batch_mla_run.cu": b"// fa2\n",
    "flashinfer/data/csrc/batch_mla_sm90_run.cu": b"// fa3\n",
    "flashinfer/data/csrc/batch_mla_config.jinja": b"{{ x }}\n",
    "flashinfer/data/csrc/tvm_ffi_utils.h": b"#pragma once\n",
    "flashinfer/data/csrc/batch_prefill.cu": b"// another family\n",
    "flashinfer/data/csrc/nv_internal/kernel.cu": b"// a family's folder\n",
    "flashinfer/data/include/flashinfer/attention/mla.cuh": b"#pragma once\n",
    "flashinfer/experimental/b12x/__init__.py": b"\n",
    "flashinfer/experimental/b12x/kernel.cubin": b"\0" * 64,
    "flashinfer/moe_ep/kernel_src/moe.cu": b"// moe\n",
}
KEPT = {"flashinfer/__init__.py", "flashinfer/mla/__init__.py", "flashinfer/data/csrc/batch_mla_run.cu",
        "flashinfer/data/csrc/batch_mla_sm90_run.cu", "flashinfer/data/csrc/batch_mla_config.jinja",
        "flashinfer/data/csrc/tvm_ffi_utils.h", "flashinfer/data/include/flashinfer/attention/mla.cuh",
        "flashinfer/experimental/b12x/__init__.py"}  # fmt: skip
RECORD = "flashinfer_python-0.7.2.post1.dist-info/RECORD"


@pytest.fixture(scope="module")
def flashinfer_wheel():
    with benchmark_module("flashinfer_wheel") as module:
        yield module


def test_trimmed_wheel_keeps_what_the_mla_jit_needs(flashinfer_wheel, tmp_path):
    wheel = tmp_path / "src" / "flashinfer_python-0.7.2.post1-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as z:
        for name, data in MEMBERS.items():
            z.writestr(name, data)
        z.writestr(RECORD, "stale\n")
    out = flashinfer_wheel.main([str(wheel), "--out", str(tmp_path / "out")])
    with zipfile.ZipFile(out) as z:
        names = set(z.namelist())
        assert names == KEPT | {RECORD}
        assert all(z.read(n) == MEMBERS[n] for n in KEPT)
        record = z.read(RECORD).decode().splitlines()
    # RECORD lists exactly the kept files with their sizes and hashes (pip checks nothing else)
    assert {line.split(",")[0] for line in record} == KEPT | {RECORD}
    assert "flashinfer/mla/__init__.py,sha256=" in "\n".join(record) and record[-1] == f"{RECORD},,"
    assert not list((tmp_path / "out").glob("*.partial"))


def test_refuses_another_wheel(flashinfer_wheel, tmp_path):
    wheel = tmp_path / "other-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("other/__init__.py", "")
    with pytest.raises(ValueError, match="not a flashinfer-python wheel"):
        flashinfer_wheel.trim_wheel(wheel, tmp_path / "out")
