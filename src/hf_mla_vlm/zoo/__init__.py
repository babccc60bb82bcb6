# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""Datasets and tasks for training and evaluating converted models (procedural VQA)."""

from . import vqa_data
from .vqa_data import *  # noqa: F403 (the public names of vqa_data, listed once in its __all__)


__all__ = list(vqa_data.__all__)
