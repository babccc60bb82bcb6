import os
import signal

import numpy as np
import pytest
import torch


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(autouse=True)
def _default_sigint():
    """Ctrl-C raises KeyboardInterrupt in every test, also where the suite was started in the background (a shell
    starts background jobs with SIGINT ignored, and Python then installs no handler): the fault-injection tests send
    real SIGINTs."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="session")
def native_checkpoints(tmp_path_factory):
    """Tiny random native checkpoints (folder per architecture), built once per session."""
    from hf_mla_vlm.tiny_models import TINY_ARCHS, save_tiny_vlm

    root = tmp_path_factory.mktemp("native")
    return {arch: save_tiny_vlm(arch, root / arch) for arch in TINY_ARCHS}


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
