# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""Training utilities: chat batches with assistant-only labels."""

from hf_mla_vlm.training.data import IGNORE_INDEX, ChatCollator, assistant_spans


__all__ = ["IGNORE_INDEX", "ChatCollator", "assistant_spans"]
