"""Decode kernels for absorbed MLA attention: a Triton split-K kernel and its plain-torch reference.

``mla_decode_reference`` (CPU/GPU, torch only) is always importable; ``mla_decode_triton`` is exported only when
Triton can be imported. Use :func:`is_triton_available` to decide which one to call::

    from hf_mla_vlm.kernels import is_triton_available, mla_decode_reference

    if is_triton_available() and latent.is_cuda:
        from hf_mla_vlm.kernels import mla_decode_triton as decode
    else:
        decode = mla_decode_reference
    latent, side = attention.cache_layout.views(keys, values)  # the cached rows of one layer, see latent_cache.py
    ctx, p_sum, lse = decode(q_rope, q_latent, q_bias, latent, side, key_mask, scale, num_kv_heads)

With a quantized latent cache (``modeling/quantized_cache.py``) ``latent`` is the ``(B, T, K)`` uint8 view of the
stored rows and both take ``latent_format=layout.quantization.spec`` (e.g. ``"int8:64"``): the Triton kernel reads
the quantized bytes and dequantizes them as it loads each tile; the reference dequantizes them in torch.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from .reference import mla_decode_reference, validate_decode_inputs


@functools.lru_cache(maxsize=1)
def _triton_importable() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # a broken install counts as unavailable
        return False
    return True


def is_triton_available() -> bool:
    """True when Triton imports and a CUDA device is visible (the Triton decode kernel can run for real)."""
    return _triton_importable() and torch.cuda.is_available()


__all__ = ["is_triton_available", "mla_decode_reference", "validate_decode_inputs"]

if _triton_importable():
    from .absorbed_decode import choose_num_splits, mla_decode_triton

    __all__ += ["choose_num_splits", "mla_decode_triton"]
