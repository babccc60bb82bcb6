import json
import sys
from pathlib import Path

import pytest


BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def results_io():
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import each other as top-level modules
    try:
        import results_io

        yield results_io
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_write_results_writes_json_and_page(results_io, tmp_path):
    out = tmp_path / "deep" / "bench.json"
    results_io.write_results({"rows": [1, 2], "path": Path("x")}, out, lambda r: f"{len(r['rows'])} rows\n")
    assert json.loads(out.read_text()) == {"rows": [1, 2], "path": "x"}
    assert out.with_suffix(".md").read_text() == "2 rows\n"


def test_a_page_that_fails_leaves_the_previous_results(results_io, tmp_path):
    out = tmp_path / "bench.json"
    results_io.write_results({"rows": [1]}, out, lambda r: "old\n")

    def broken(result):
        raise KeyError("missing column")

    with pytest.raises(KeyError):
        results_io.write_results({"rows": [1, 2, 3]}, out, broken)
    assert json.loads(out.read_text()) == {"rows": [1]} and out.with_suffix(".md").read_text() == "old\n"
