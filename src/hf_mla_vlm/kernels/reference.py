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
``D``        no-rope query/key dims per head (``head_dim - R``), decompressed oracle only
``V``        value dims per head, decompressed oracle only
===========  ==========================================================================

Scores and outputs::

    s[h, t]   = scale * (q_rope[h] . k_t[h // G] + q_latent[h, m_t] . c_t + q_bias[h, m_t])   (-inf where masked)
    p         = softmax_t(s)
    ctx[h, m] = sum_{t: m_t = m} p[h, t] c_t          p_sum[h, m] = sum_{t: m_t = m} p[h, t]
    lse[h]    = logsumexp_t(s[h, t])                    (-inf, and zero ctx/p_sum, when no key is valid)

With ``M == 1`` every token uses branch 0 and the modality flag is ignored. With ``M == 2`` a token is an image
token when its flag is ``> 0.5``.

Cache layout (as stored by the model, read through strided views)
-----------------------------------------------------------------
==========  =====================  =======================================================================
tensor      shape                  content
==========  =====================  =======================================================================
``latent``  ``(B, T, L)``          latents ``c_t`` (``keys[:, 0]`` of the latent cache)
``side``    ``(B, T, N*R + 1)``    columns ``g*R + i``: post-RoPE rope key of kv head ``g``; last column:
                                   modality flag (0.0 text, 1.0 image), same dtype as the cache
``key_mask`` ``(B, T)`` bool       True = attend; ``None`` = all ``T`` keys valid
==========  =====================  =======================================================================
"""

from __future__ import annotations

import torch


__all__ = [
    "absorb_queries",
    "apply_value_up_projection",
    "mla_decode_decompressed_oracle",
    "mla_decode_reference",
    "validate_decode_inputs",
]


def validate_decode_inputs(
    q_rope: torch.Tensor,
    q_latent: torch.Tensor,
    q_bias: torch.Tensor | None,
    latent: torch.Tensor,
    side: torch.Tensor,
    key_mask: torch.Tensor | None,
    num_kv_heads: int,
) -> tuple[int, int, int, int, int, int, int]:
    """Check the shapes, dtypes and devices of the decode inputs (metadata only: never synchronises).

    Runs on every decode step and layer, so the error messages are only formatted when a check fails.

    Returns:
        ``(B, H, N, R, L, T, M)``.

    Raises:
        ValueError: with a message naming the offending argument and the expected layout.
    """
    for name, x in (("q_rope", q_rope), ("q_latent", q_latent), ("latent", latent), ("side", side)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
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
    if latent.shape[0] != b or latent.shape[2] != lat:
        raise ValueError(f"latent must have shape (B={b}, T, L={lat}), got {tuple(latent.shape)}")
    t = latent.shape[1]
    if t <= 0:
        raise ValueError("the cache view must hold at least one token (T >= 1)")
    if side.shape != (b, t, n * r + 1):
        raise ValueError(
            f"side must have shape (B, T, N*R + 1) = {(b, t, n * r + 1)} (rope keys of {n} kv heads x {r} dims, then "
            f"the modality flag), got {tuple(side.shape)}"
        )
    if side.dtype != latent.dtype:
        raise ValueError(f"side ({side.dtype}) and latent ({latent.dtype}) must share the cache dtype")
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
    """Per-token branch index ``(B, T)`` int64: the flag (``> 0.5`` = image = 1) when ``m == 2``, else zeros."""
    if m == 1:
        return torch.zeros(side.shape[:2], dtype=torch.long, device=side.device)
    return (side[..., n_rope].float() > 0.5).long()


def mla_decode_reference(
    q_rope: torch.Tensor,
    q_latent: torch.Tensor,
    q_bias: torch.Tensor | None,
    latent: torch.Tensor,
    side: torch.Tensor,
    key_mask: torch.Tensor | None,
    scale: float,
    num_kv_heads: int,
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
    ==============  =====================  ======================================================

    Returns:
        ``(ctx, p_sum, lse)``: ``ctx`` ``(B, H, M, L)`` float32, ``p_sum`` ``(B, H, M)`` float32 and ``lse``
        ``(B, H)`` float32 (natural log of the sum of exp of the scaled scores). Rows without a valid key give
        zeros and ``lse = -inf``.
    """
    b, h, n, r, lat, t, m = validate_decode_inputs(q_rope, q_latent, q_bias, latent, side, key_mask, num_kv_heads)
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


def absorb_queries(
    q_nope: torch.Tensor, w_uk: torch.Tensor, b_k: torch.Tensor | None, num_kv_heads: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fold the key up-projections into the query (computed in the dtype of ``q_nope`` promoted with ``w_uk``).

    ===========  ====================  ================================================
    argument     shape                 notes
    ===========  ====================  ================================================
    ``q_nope``   ``(B, H, D)``         no-rope part of the query
    ``w_uk``     ``(M, N*D, L)``       ``up_k.weight`` of each branch (nn.Linear layout)
    ``b_k``      ``(M, N*D)`` or None  ``up_k.bias`` of each branch
    ===========  ====================  ================================================

    Returns:
        ``q_latent`` ``(B, H, M, L)`` and ``q_bias`` ``(B, H, M)`` (``None`` when ``b_k`` is None).
    """
    b, h, d = q_nope.shape
    m, nd, lat = w_uk.shape
    n = num_kv_heads
    if h % n or nd != n * d:
        raise ValueError(f"w_uk {tuple(w_uk.shape)} must be (M, N*D, L) with N={n}, D={d} for q_nope {(b, h, d)}")
    g = h // n
    wk = w_uk.reshape(m, n, d, lat)
    qn = q_nope.reshape(b, n, g, d)
    q_latent = torch.einsum("bngd,mndl->bngml", qn, wk).reshape(b, h, m, lat)
    q_bias = None
    if b_k is not None:
        q_bias = torch.einsum("bngd,mnd->bngm", qn, b_k.reshape(m, n, d)).reshape(b, h, m)
    return q_latent, q_bias


def apply_value_up_projection(
    ctx: torch.Tensor, p_sum: torch.Tensor, w_uv: torch.Tensor, b_v: torch.Tensor | None, num_kv_heads: int
) -> torch.Tensor:
    """Turn the kernel outputs into per-head attention outputs: ``o[h] = sum_m W_uv[m, g] ctx[h, m] + p_sum b_v``.

    ===========  ====================  ================================================
    argument     shape                 notes
    ===========  ====================  ================================================
    ``ctx``      ``(B, H, M, L)``      kernel output
    ``p_sum``    ``(B, H, M)``         kernel output
    ``w_uv``     ``(M, N*V, L)``       ``up_v.weight`` of each branch
    ``b_v``      ``(M, N*V)`` or None  ``up_v.bias`` of each branch
    ===========  ====================  ================================================

    Returns:
        ``(B, H, V)`` in the promoted dtype of ``ctx`` and ``w_uv``.
    """
    b, h, m, lat = ctx.shape
    n = num_kv_heads
    mw, nv, lw = w_uv.shape
    if mw != m or lw != lat or nv % n or h % n:
        raise ValueError(f"w_uv {tuple(w_uv.shape)} must be (M={m}, N*V, L={lat}) with N={n}")
    v = nv // n
    g = h // n
    wv = w_uv.reshape(m, n, v, lat).to(ctx.dtype)
    out = torch.einsum("bngml,mnvl->bngv", ctx.reshape(b, n, g, m, lat), wv)
    if b_v is not None:
        out = out + torch.einsum("bngm,mnv->bngv", p_sum.reshape(b, n, g, m), b_v.reshape(m, n, v).to(ctx.dtype))
    return out.reshape(b, h, v)


def mla_decode_decompressed_oracle(
    q_rope: torch.Tensor,
    q_nope: torch.Tensor,
    latent: torch.Tensor,
    side: torch.Tensor,
    key_mask: torch.Tensor | None,
    scale: float,
    num_kv_heads: int,
    w_uk: torch.Tensor,
    w_uv: torch.Tensor,
    b_k: torch.Tensor | None = None,
    b_v: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ordinary (non-absorbed) GQA decode attention on explicitly decompressed K/V, in float64. Tests only.

    Each token's key for kv head ``g`` is ``[k_rope[g] | W_uk[m_t, g] c_t + b_k[m_t, g]]`` and its value is
    ``W_uv[m_t, g] c_t + b_v[m_t, g]``; query head ``h`` is ``[q_rope[h] | q_nope[h]]``.

    ===========  ====================  ================================================
    argument     shape                 notes
    ===========  ====================  ================================================
    ``q_rope``   ``(B, H, R)``         post-RoPE rope part of the query
    ``q_nope``   ``(B, H, D)``         no-rope part of the query
    ``latent``   ``(B, T, L)``         latent cache view
    ``side``     ``(B, T, N*R + 1)``   rope keys + modality flag
    ``key_mask`` ``(B, T)`` or None    True = attend
    ``w_uk``     ``(M, N*D, L)``       key up-projection per branch
    ``w_uv``     ``(M, N*V, L)``       value up-projection per branch
    ``b_k``      ``(M, N*D)`` or None  key bias per branch
    ``b_v``      ``(M, N*V)`` or None  value bias per branch
    ===========  ====================  ================================================

    Returns:
        ``(out, lse)``: ``out`` ``(B, H, V)`` float64 (zeros for rows without a valid key) and ``lse`` ``(B, H)``
        float64 (``-inf`` for such rows).
    """
    b, h, r = q_rope.shape
    d = q_nope.shape[-1]
    m, nd, lat = w_uk.shape
    n = num_kv_heads
    t = latent.shape[1]
    if q_nope.shape[:2] != (b, h) or nd != n * d or w_uv.shape[0] != m or w_uv.shape[2] != lat:
        raise ValueError("inconsistent oracle shapes: q_nope (B, H, D), w_uk (M, N*D, L), w_uv (M, N*V, L)")
    g = h // n
    v = w_uv.shape[1] // n
    f64 = torch.float64
    valid = torch.ones(b, t, dtype=torch.bool, device=latent.device) if key_mask is None else key_mask
    modality = _modality_index(side, n * r, m)
    c = torch.where(valid[..., None], latent.to(f64), 0.0)
    k_rope = torch.where(valid[..., None], side[..., : n * r].to(f64), 0.0).reshape(b, t, n, r)
    # decompress every token with every branch, then pick the token's branch
    k_all = torch.einsum("btl,mkl->btmk", c, w_uk.to(f64))  # (B, T, M, N*D)
    v_all = torch.einsum("btl,mkl->btmk", c, w_uv.to(f64))  # (B, T, M, N*V)
    if b_k is not None:
        k_all = k_all + b_k.to(f64)
    if b_v is not None:
        v_all = v_all + b_v.to(f64)
    sel = modality[:, :, None, None]
    k_nope = torch.gather(k_all, 2, sel.expand(b, t, 1, n * d))[:, :, 0].reshape(b, t, n, d)
    vals = torch.gather(v_all, 2, sel.expand(b, t, 1, n * v))[:, :, 0].reshape(b, t, n, v)
    keys = torch.cat([k_rope, k_nope], dim=-1)  # (B, T, N, R + D)
    q = torch.cat([q_rope.to(f64), q_nope.to(f64)], dim=-1).reshape(b, n, g, r + d)
    scores = torch.einsum("bngk,btnk->bngt", q, keys) * float(scale)
    scores = torch.where(valid[:, None, None, :], scores, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf for rows without keys
    p = torch.where(torch.isfinite(lse)[..., None], torch.exp(scores - lse[..., None].nan_to_num(neginf=0.0)), 0.0)
    out = torch.einsum("bngt,btnv->bngv", p, vals)
    return out.reshape(b, h, v), lse.reshape(b, h)
