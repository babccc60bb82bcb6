# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""The Triton absorbed-decode kernel as a `torch.library` custom op, and the entry point the model registers.

`torch.compile` treats the op as opaque (its fake implementation gives the output shapes), so the compiled decode
graph, CUDA graphs included, calls the Triton launcher instead of tracing through it. In eager mode
`mla_decode_dispatch` calls the launcher directly: the custom-op dispatcher costs host time on every layer and
step, and eager decode is bound by host time.
"""

from typing import Optional

import torch

from .absorbed_decode import mla_decode_triton


@torch.library.custom_op("hf_mla_vlm::mla_decode", mutates_args=(), device_types="cuda")
def mla_decode(
    q_rope: torch.Tensor,
    q_latent: torch.Tensor,
    q_bias: Optional[torch.Tensor],  # noqa: UP045 (schema inference wants typing.Optional)
    latent: torch.Tensor,
    side: torch.Tensor,
    key_mask: Optional[torch.Tensor],  # noqa: UP045
    scale: float,
    num_kv_heads: int,
    latent_format: Optional[str] = None,  # noqa: UP045
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as `mla_decode_reference`: returns `ctx (B, H, M, L)`, `p_sum (B, H, M)`, `lse (B, H)`."""
    return mla_decode_triton(
        q_rope, q_latent, q_bias, latent, side, key_mask, scale, num_kv_heads, latent_format=latent_format
    )


@mla_decode.register_fake
def _(q_rope, q_latent, q_bias, latent, side, key_mask, scale, num_kv_heads, latent_format=None):
    batch, heads, branches, width = q_latent.shape
    ctx = q_latent.new_empty((batch, heads, branches, width), dtype=torch.float32)
    return (
        ctx,
        q_latent.new_empty((batch, heads, branches), dtype=torch.float32),
        q_latent.new_empty((batch, heads), dtype=torch.float32),
    )


def mla_decode_dispatch(
    q_rope: torch.Tensor,
    q_latent: torch.Tensor,
    q_bias: torch.Tensor | None,
    latent: torch.Tensor,
    side: torch.Tensor,
    key_mask: torch.Tensor | None,
    scale: float,
    num_kv_heads: int,
    latent_format: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The custom op while `torch.compile` traces, the Triton launcher itself otherwise (same contract)."""
    if torch.compiler.is_compiling():
        return mla_decode(q_rope, q_latent, q_bias, latent, side, key_mask, scale, num_kv_heads, latent_format)
    return mla_decode_triton(
        q_rope, q_latent, q_bias, latent, side, key_mask, scale, num_kv_heads, latent_format=latent_format
    )


__all__ = ["mla_decode", "mla_decode_dispatch"]
