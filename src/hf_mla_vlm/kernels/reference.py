"""Plain-torch reference for absorbed MLA decode (one query token per sequence).

This module is the correctness oracle for the Triton kernel in :mod:`hf_mla_vlm.kernels.absorbed_decode` and the
CPU fallback of the decode path. All maths is done in float32 (float64 for the decompressed oracle) with
``torch.where`` masking, so garbage (NaN/inf) stored in masked cache rows never reaches the outputs.

Notation (one decoder layer)
----------------------------
===========  ==========================================================================
symbol       meaning
===========  ==========================================================================
``B``        batch size (sequences, one query token each)
``H``        query heads; head ``h`` belongs to kv group ``h // G`` with ``G = H // N``
``N``        kv heads (``num_kv_heads``)
``R``        rope dims per head (post-RoPE rope keys differ per kv head)
``L``        latent width, shared by all heads (any positive integer)
``T``        cached tokens (the length of the cache view handed in)
``M``        modality branches: 1 (single branch) or 2 (branch 0 = text, 1 = image)
===========  ==========================================================================

Scores and outputs::

    s[h, t]   = scale * (q_rope[h] . k_t[h // G] + q_latent[h, m_t] . c_t + q_bias[h, m_t])   (-inf where masked)
    p         = softmax_t(s)
    ctx[h, m] = sum_{t: m_t = m} p[h, t] c_t          p_sum[h, m] = sum_{t: m_t = m} p[h, t]
    lse[h]    = logsumexp_t(s[h, t])                    (-inf, and zero ctx/p_sum, when no key is valid)

With ``M == 1`` every token uses branch 0 and the modality flag is ignored. With ``M == 2`` a token is an image
token when ``hf_mla_vlm.modeling.latent_cache.is_image`` of its flag holds. The symbols are those of
``latent_cache.py``; the tests' oracles (``tests/kernels/oracles.py``) check this formulation against decompressed
attention.

Cache layout (as stored by the model, read through strided views)
-----------------------------------------------------------------
==========  =====================  =======================================================================
tensor      shape                  content
==========  =====================  =======================================================================
``latent``  ``(B, T, L)``          latents ``c_t`` (``LatentCacheLayout.views`` of the cache rows); with a
                                   ``latent_format``: ``(B, T, K)`` uint8 quantized rows (``LatentQuantization``)
``side``    ``(B, T, N*R + 1)``    columns ``g*R + i``: post-RoPE rope key of kv head ``g``; last column:
                                   modality flag (0.0 text, 1.0 image), the compute dtype
``key_mask`` ``(B, T)`` bool       True = attend; ``None`` = all ``T`` keys valid
==========  =====================  =======================================================================
"""

from __future__ import annotations

import torch

from ..modeling.latent_cache import is_image, parse_latent_format


__all__ = ["mla_decode_reference", "validate_decode_inputs"]


def validate_decode_inputs(
    q_rope: torch.Tensor,
    q_latent: torch.Tensor,
    q_bias: torch.Tensor | None,
    latent: torch.Tensor,
    side: torch.Tensor,
    key_mask: torch.Tensor | None,
    num_kv_heads: int,
    latent_format: str | None = None,
) -> tuple[int, int, int, int, int, int, int]:
    """Check the shapes, dtypes and devices of the decode inputs (metadata only: never synchronises).

    Runs on every decode step and layer, so the error messages are only formatted when a check fails. With a
    ``latent_format`` (``LatentQuantization.spec``, e.g. ``"int8:64"``) ``latent`` holds the quantized rows
    ``(B, T, K)`` uint8 of ``latent_cache.LatentQuantization`` and ``side`` the compute dtype.

    Returns:
        ``(B, H, N, R, L, T, M)``.

    Raises:
        ValueError: with a message naming the offending argument and the expected layout.
    """
    for name, x in (("q_rope", q_rope), ("q_latent", q_latent), ("latent", latent), ("side", side)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point() and not (name == "latent" and latent_format is not None):
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if q_rope.dim() != 3:
        raise ValueError(f"q_rope must have shape (B, H, R), got {tuple(q_rope.shape)}")
    if q_latent.dim() != 4:
        raise ValueError(f"q_latent must have shape (B, H, M, L), got {tuple(q_latent.shape)}")
    if latent.dim() != 3:
        raise ValueError(f"latent must have shape (B, T, L) (pass keys[:, 0]), got {tuple(latent.shape)}")
    if side.dim() != 3:
        raise ValueError(f"side must have shape (B, T, N*R + 1) (pass values[:, 0]), got {tuple(side.shape)}")
    b, h, r = q_rope.shape
    _, _, m, lat = q_latent.shape
    if not isinstance(num_kv_heads, int) or num_kv_heads <= 0:
        raise ValueError(f"num_kv_heads must be a positive int, got {num_kv_heads!r}")
    n = num_kv_heads
    if b <= 0 or h <= 0 or r <= 0:
        raise ValueError(f"q_rope must have non-empty dims, got {tuple(q_rope.shape)}")
    if h % n:
        raise ValueError(f"the number of query heads ({h}) must be a multiple of num_kv_heads ({n})")
    if q_latent.shape[:2] != (b, h):
        raise ValueError(f"q_latent leading dims {tuple(q_latent.shape[:2])} must match q_rope's (B, H) = {(b, h)}")
    if m not in (1, 2):
        raise ValueError(f"q_latent must have M = 1 or 2 modality branches (dim 2), got {m}")
    if lat <= 0:
        raise ValueError("q_latent's latent width (dim 3) must be positive")
    if latent_format is None:
        if latent.shape[0] != b or latent.shape[2] != lat:
            raise ValueError(f"latent must have shape (B={b}, T, L={lat}), got {tuple(latent.shape)}")
        if side.dtype != latent.dtype:
            raise ValueError(f"side ({side.dtype}) and latent ({latent.dtype}) must share the cache dtype")
    else:
        quant = parse_latent_format(latent_format, lat)
        if latent.dtype != torch.uint8 or latent.shape[0] != b or latent.shape[2] != quant.row_bytes:
            raise ValueError(
                f"a {latent_format} latent must be uint8 rows of shape (B={b}, T, K={quant.row_bytes}) "
                f"(LatentQuantization of L={lat}), got {latent.dtype} {tuple(latent.shape)}"
            )
    t = latent.shape[1]
    if t <= 0:
        raise ValueError("the cache view must hold at least one token (T >= 1)")
    if side.shape != (b, t, n * r + 1):
        raise ValueError(
            f"side must have shape (B, T, N*R + 1) = {(b, t, n * r + 1)} (rope keys of {n} kv heads x {r} dims, then "
            f"the modality flag), got {tuple(side.shape)}"
        )
    if q_rope.dtype != q_latent.dtype:
        raise ValueError(f"q_rope ({q_rope.dtype}) and q_latent ({q_latent.dtype}) must have the same dtype")
    device = latent.device
    same_device = q_rope.device == device and q_latent.device == device and side.device == device
    if q_bias is not None:
        if not isinstance(q_bias, torch.Tensor):
            raise ValueError(f"q_bias must be a tensor or None, got {type(q_bias).__name__}")
        if q_bias.shape != (b, h, m):
            raise ValueError(f"q_bias must have shape (B, H, M) = {(b, h, m)}, got {tuple(q_bias.shape)}")
        if not q_bias.is_floating_point():
            raise ValueError(f"q_bias must be floating point, got {q_bias.dtype}")
        same_device = same_device and q_bias.device == device
    if key_mask is not None:
        if not isinstance(key_mask, torch.Tensor):
            raise ValueError(f"key_mask must be a tensor or None, got {type(key_mask).__name__}")
        if key_mask.dtype != torch.bool:
            raise ValueError(f"key_mask must be a bool tensor (True = attend), got {key_mask.dtype}")
        if key_mask.shape != (b, t):
            raise ValueError(
                f"key_mask must have shape (B, T) = {(b, t)} matching the cache view, got {tuple(key_mask.shape)}"
            )
        same_device = same_device and key_mask.device == device
    if not same_device:
        tensors = [q_rope, q_latent, latent, side] + [x for x in (q_bias, key_mask) if x is not None]
        raise ValueError(f"all inputs must be on one device, got {sorted({str(x.device) for x in tensors})}")
    return b, h, n, r, lat, t, m


def _modality_index(side: torch.Tensor, n_rope: int, m: int) -> torch.Tensor:
    """Per-token branch index ``(B, T)`` int64: 1 for the image branch (``latent_cache.is_image`` of the flag) when
    ``m == 2``, else zeros."""
    if m == 1:
        return torch.zeros(side.shape[:2], dtype=torch.long, device=side.device)
    return is_image(side[..., n_rope]).long()


def mla_decode_reference(
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
    """Absorbed MLA decode attention in plain torch (float32 math): the oracle and the CPU fallback.

    ==============  =====================  ======================================================
    argument        shape                  notes
    ==============  =====================  ======================================================
    ``q_rope``      ``(B, H, R)``          post-RoPE rope part of the query
    ``q_latent``    ``(B, H, M, L)``       absorbed queries ``W_uk[m]^T q_nope``, one per branch
    ``q_bias``      ``(B, H, M)`` or None  score offset per branch (``q_nope . b_k[m]``)
    ``latent``      ``(B, T, L)``          latent cache view (any strides)
    ``side``        ``(B, T, N*R + 1)``    rope keys (head-major) + modality flag column
    ``key_mask``    ``(B, T)`` bool/None   True = attend
    ``scale``       float                  ``1/sqrt(head_dim)`` of the original model
    ``latent_format`` str or None          quantized latent (``LatentQuantization.spec``): ``latent`` is then
                                           ``(B, T, K)`` uint8 rows, dequantized here (float32)
    ==============  =====================  ======================================================

    Returns:
        ``(ctx, p_sum, lse)``: ``ctx`` ``(B, H, M, L)`` float32, ``p_sum`` ``(B, H, M)`` float32 and ``lse``
        ``(B, H)`` float32 (natural log of the sum of exp of the scaled scores). Rows without a valid key give
        zeros and ``lse = -inf``.
    """
    b, h, n, r, lat, t, m = validate_decode_inputs(
        q_rope, q_latent, q_bias, latent, side, key_mask, num_kv_heads, latent_format
    )
    if latent_format is not None:
        latent = parse_latent_format(latent_format, lat).dequantize(latent)
    g = h // n
    nr = n * r
    valid = torch.ones(b, t, dtype=torch.bool, device=latent.device) if key_mask is None else key_mask
    modality = _modality_index(side, nr, m)  # (B, T)

    c = torch.where(valid[..., None], latent.float(), 0.0)  # (B, T, L), NaN-free
    k_rope = side[..., :nr].float().reshape(b, t, n, r)
    qr = q_rope.float().reshape(b, n, g, r)
    s_rope = torch.einsum("bngr,btnr->bngt", qr, k_rope).reshape(b, h, t)
    s_lat_all = torch.einsum("bhml,btl->bhmt", q_latent.float(), c)  # (B, H, M, T)
    idx = modality[:, None, None, :].expand(b, h, 1, t)
    s_lat = torch.gather(s_lat_all, 2, idx)[:, :, 0]  # (B, H, T)
    scores = s_rope + s_lat
    if q_bias is not None:
        scores = scores + torch.gather(q_bias.float(), 2, modality[:, None, :].expand(b, h, t))
    scores = torch.where(valid[:, None, :], scores * float(scale), float("-inf"))

    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(scores - row_max)  # exp(-inf) = 0 for masked keys
    denom = e.sum(dim=-1, keepdim=True)
    has_key = denom > 0
    p = e / torch.where(has_key, denom, torch.ones_like(denom))
    lse = torch.where(has_key, row_max + torch.log(torch.where(has_key, denom, 1.0)), float("-inf"))[..., 0]

    onehot = torch.nn.functional.one_hot(modality, m).to(p.dtype)  # (B, T, M)
    p_m = p[:, :, None, :] * onehot.permute(0, 2, 1)[:, None, :, :]  # (B, H, M, T)
    ctx = torch.einsum("bhmt,btl->bhml", p_m, c)
    p_sum = p_m.sum(dim=-1)
    return ctx.contiguous(), p_sum.contiguous(), lse.contiguous()
