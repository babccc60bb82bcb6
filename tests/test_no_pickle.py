"""No code path of the package unpickles: every `torch.load` passes `weights_only=True`, nothing calls pickle."""

import re
from pathlib import Path

import hf_mla_vlm


SOURCES = sorted(Path(hf_mla_vlm.__file__).parent.rglob("*.py"))
FORBIDDEN = [
    r"weights_only\s*=\s*False",
    r"\bpickle\.loads?\(",
    r"\bcloudpickle\b",
    r"\bdill\b",
    r"\bjoblib\.load\(",
    r"allow_pickle\s*=\s*True",
    r"\bUnpickler\(",
]


def test_the_sources_are_found():
    names = {p.name for p in SOURCES}
    assert {"statistics.py", "rope_selection.py", "cli.py", "utils.py"} <= names


def test_no_unpickling_anywhere_in_the_package():
    hits = []
    for path in SOURCES:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            hits += [f"{path.name}:{number}: {line.strip()}" for pattern in FORBIDDEN if re.search(pattern, line)]
    assert hits == []


def test_every_torch_load_is_weights_only():
    calls = []
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"torch\.load\(([^)]*)\)", text):
            calls.append((path.name, match.group(1)))
    assert calls, "the rank-file reader uses torch.load (the official .pth format)"
    assert [call for call in calls if "weights_only=True" not in call[1]] == []
