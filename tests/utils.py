"""Helpers shared by the tests (not fixtures)."""

import contextlib
import importlib
import importlib.util
import signal
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from hf_mla_vlm.tiny_models import WORDS, tiny_image, tiny_prompt


def mixed_batch(processor, arch: str) -> dict:
    """Two prompts of different lengths (left padding), each with one image of a different size."""
    texts = [tiny_prompt(arch, "describe the image"), tiny_prompt(arch, "what is left of the red circle ? a cat")]
    return processor(images=[tiny_image(0), tiny_image(1, (56, 30))], text=texts, return_tensors="pt", padding=True)


def load_native(path):
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(path)


def relative_error(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    if mask is not None:
        a, b = a[mask], b[mask]
    return ((a.double() - b.double()).norm() / a.double().norm()).item()


def perturb_image_branch(model, std: float = 0.05, seed: int = 1) -> None:
    """Make the image branch differ from the text branch so that routing mistakes change the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for attn in model.mla_attention_modules():
            for proj in (attn.kv_a_proj["image"], attn.kv_b_proj["image"]):
                for param in proj.parameters():
                    param.add_(torch.randn(param.shape, generator=generator) * std)


def default_sigint_in_child() -> None:
    """`preexec_fn` for a child Python process that a test interrupts with SIGINT: a shell starts background jobs
    with SIGINT ignored, and a Python started that way installs no KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def require(*packages: str) -> None:
    """Skip unless every package is installed (without importing it)."""
    for package in packages:
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"needs the offline asset package {package!r}")


def random_texts(num: int = 12, words: int = 9) -> list[str]:
    """Seeded sentences of the tiny models' vocabulary."""
    generator = torch.Generator().manual_seed(0)
    body = WORDS[2:]
    return [
        " ".join(body[i] for i in torch.randint(len(body), (words,), generator=generator).tolist()) for _ in range(num)
    ]


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@contextlib.contextmanager
def benchmark_module(name: str):
    """A script of `benchmarks/` imported as a module (the scripts import each other as top-level modules, so their
    folder is on `sys.path` while the module is in use)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))
