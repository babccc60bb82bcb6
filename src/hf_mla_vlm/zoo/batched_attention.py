# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""Qwen's vision attention in one SDPA call per layer, for training (the zoo tower and `finetune`).

Without flash attention, Transformers' Qwen2-VL and Qwen2.5-VL vision attentions split the packed patches of a
batch into its chunks (one per image in the full-attention blocks, one per window in Qwen2.5-VL's others) and call
the attention once per chunk: a training batch makes a call per image and per window in every block, and as many in
the backward, each on a few dozen tokens (on a GPU, a few kernel launches each for almost no work).
`BatchedVisionAttention` computes the same attention in one call: chunks of equal length as a batch, otherwise under
a block-diagonal mask over the packed sequence. `batch_vision_attention` swaps it into a model for the duration of a
training run, as a subclass of the architecture's own class (the registry's `vision_attention`) holding the same
weights under the same names; the saved weights are those of the native modules.
"""

import functools
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision
from transformers.utils.generic import is_flash_attention_requested

from hf_mla_vlm.registry import ARCHITECTURES, MLA_MODEL_TYPES


class BatchedVisionAttention(nn.Module):
    """Mixin over a Qwen vision attention (`qkv`, `proj`, `num_heads`, `scaling`, `attention_dropout`): every chunk
    of `cu_seqlens` in one SDPA call (flash attention, which reads `cu_seqlens` itself, is left to the parent)."""

    def forward(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, **kwargs):
        if is_flash_attention_requested(self.config):
            return super().forward(hidden_states, cu_seqlens, position_embeddings, max_seqlen, **kwargs)
        seq_length = hidden_states.shape[0]
        qkv = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        query, key = apply_rotary_pos_emb_vision(qkv[0], qkv[1], *position_embeddings)
        states = (query, key, qkv[2])  # (T, heads, head_dim) each
        dropout = self.attention_dropout if self.training else 0.0
        lengths = cu_seqlens.diff()
        if (lengths == lengths[0]).all():  # chunks of one length: a batch of them
            chunks = [s.reshape(len(lengths), -1, self.num_heads, s.shape[-1]).transpose(1, 2) for s in states]
            out = F.scaled_dot_product_attention(*chunks, dropout_p=dropout, scale=self.scaling).transpose(1, 2)
        else:  # the packed sequence, each token attending to its own chunk only
            chunk = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
            mask = (chunk[:, None] == chunk[None, :])[None, None]
            packed = [s.transpose(0, 1)[None] for s in states]
            out = F.scaled_dot_product_attention(*packed, attn_mask=mask, dropout_p=dropout, scale=self.scaling)
            out = out[0].transpose(0, 1)
        return self.proj(out.reshape(seq_length, -1))


@functools.cache
def batched_class(native: type) -> type:
    """`BatchedVisionAttention` over the vision attention class `native` (one class per native class)."""
    return type(f"Batched{native.__name__}", (BatchedVisionAttention, native), {})


@contextmanager
def batch_vision_attention(model: nn.Module):
    """Swap every vision attention of `model` that the registry names (`ArchSpec.vision_attention`, found by the
    model's `model_type`, native or converted) for its `BatchedVisionAttention` holding the same `qkv` and `proj`
    modules for the block, and put the originals back after (however the block ends). Yields the number of modules
    swapped (0 for architectures without such a module)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = ARCHITECTURES.get(model_type) or MLA_MODEL_TYPES.get(model_type)
    native = spec.vision_attention_class if spec is not None else None
    originals = {name: module for name, module in model.named_modules() if native and type(module) is native}
    for name, module in originals.items():
        batched = batched_class(native)(module.config)
        batched.qkv, batched.proj = module.qkv, module.proj
        batched.train(module.training)
        model.set_submodule(name, batched)
    try:
        yield len(originals)
    finally:
        for name, module in originals.items():
            module.train(model.get_submodule(name).training)
            model.set_submodule(name, module)


__all__ = ["BatchedVisionAttention", "batch_vision_attention", "batched_class"]
