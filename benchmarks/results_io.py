"""Writing a benchmark's results: the JSON and the markdown page made from it, each replaced atomically (a run that
stops half-way never leaves a truncated results file that looks complete)."""

import json
from collections.abc import Callable
from pathlib import Path

from hf_mla_vlm.utils import write_text_atomically


def write_results(result: dict, out: str | Path, markdown: Callable[[dict], str]) -> None:
    """`result` to `out` (JSON) and `markdown(result)` beside it (`.md`); both are rendered before either is
    written, so a page that fails to render leaves the previous files as they were."""
    out = Path(out)
    text, page = json.dumps(result, indent=2, default=str) + "\n", markdown(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out, text)
    write_text_atomically(out.with_suffix(".md"), page)
    print(f"wrote {out} and {out.with_suffix('.md')}")
