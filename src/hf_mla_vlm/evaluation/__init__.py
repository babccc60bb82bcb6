# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""Evaluation of native and converted checkpoints: perplexity (`perplexity`), next-token fidelity against a reference
(`fidelity`), accuracy on the procedural VQA scenes (`vqa`), and `evaluate` (`evaluator`), the function behind
`hf-mla-vlm evaluate`, and `record_evaluation`, which keeps its numbers in a converted folder's report and card.
"""

from .evaluator import (
    BUILTIN_DATA,
    TASKS,
    evaluate,
    evaluation_summary,
    fidelity_batches,
    load_model_and_processor,
    load_texts,
    record_evaluation,
)
from .fidelity import BUILTIN_TEXT_PROMPTS, builtin_text_batches, next_token_fidelity
from .perplexity import model_device, perplexity, token_stream
from .vqa import vqa_accuracy, vqa_image_size


__all__ = [
    "BUILTIN_DATA",
    "BUILTIN_TEXT_PROMPTS",
    "TASKS",
    "builtin_text_batches",
    "evaluate",
    "evaluation_summary",
    "fidelity_batches",
    "load_model_and_processor",
    "load_texts",
    "model_device",
    "next_token_fidelity",
    "perplexity",
    "record_evaluation",
    "token_stream",
    "vqa_accuracy",
    "vqa_image_size",
]
