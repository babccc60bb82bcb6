import json
from pathlib import Path

import pytest

from tests.utils import benchmark_module


@pytest.fixture
def results_io():
    with benchmark_module("results_io") as module:
        yield module


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
