"""benchmarks/kv_compression.py end to end on a tiny random LLaVA-NeXT pair (CPU)."""

import json
import subprocess
import sys
from pathlib import Path


BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_tiny_run_writes_measured_rows(tmp_path):
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "kv_compression.py"), "--tiny", "--out-dir", str(tmp_path), "--tag", "t",
         "--vqa-samples", "4", "--seq-len", "32", "--max-sequences", "2", "--dtype", "float32"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "kv_compression_t.json").read_text())
    rows = {(row["model"], row["kv_cache"]): row for row in data["rows"]}
    assert set(rows) == {("original", "bf16"), ("mla", "bf16"), ("mla", "int8"), ("mla", "fp8"), ("mla", "int4")}
    # tiny llava_next: 2 kv heads x 32 dims (GQA: 2 * 2 * 32 float32), latent 2 * 16, side row 2 * 8 + 1 -> 24
    assert rows[("original", "bf16")]["bytes_per_token"] == 2 * 2 * 32 * 4
    assert rows[("mla", "bf16")]["bytes_per_token"] == (32 + 24) * 4
    assert rows[("mla", "int8")]["bytes_per_token"] == 48 + 24 * 4  # 32 int8 + 1 fp16 scale, padded to 48
    assert rows[("mla", "int4")]["bytes_per_token"] == 32 + 24 * 4  # 16 bytes + scale + zero point, padded to 32
    assert rows[("mla", "int4")]["kl"] > rows[("mla", "int8")]["kl"] > 0
    assert all(row["ppl"] > 1 and 0 <= row["vqa"] <= 1 for row in rows.values())
    page = (tmp_path / "kv_compression_t.md").read_text()
    assert "meaningless" in page and "| mla | int4 |" in page
