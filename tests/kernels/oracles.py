"""Test oracles of the absorbed decode: the query absorption and value up-projection written out plainly, and
decompressed GQA attention in float64 (symbols of ``hf_mla_vlm.modeling.latent_cache``: ``P`` no-rope dims, ``V``
value dims per head). The model's own absorption is ``MLAAttention.decode_weights``; these prove the formulation."""

from __future__ import annotations

import torch

from hf_mla_vlm.modeling.latent_cache import is_image


def absorb_queries(
    q_nope: torch.Tensor, w_uk: torch.Tensor, b_k: torch.Tensor | None, num_kv_heads: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fold the key up-projections into the query (computed in the dtype of ``q_nope`` promoted with ``w_uk``).

    ===========  ====================  ================================================
    argument     shape                 notes
    ===========  ====================  ================================================
    ``q_nope``   ``(B, H, P)``         no-rope part of the query
    ``w_uk``     ``(M, N*P, L)``       ``up_k.weight`` of each branch (nn.Linear layout)
    ``b_k``      ``(M, N*P)`` or None  ``up_k.bias`` of each branch
    ===========  ====================  ================================================

    Returns:
        ``q_latent`` ``(B, H, M, L)`` and ``q_bias`` ``(B, H, M)`` (``None`` when ``b_k`` is None).
    """
    b, h, d = q_nope.shape
    m, nd, lat = w_uk.shape
    n = num_kv_heads
    if h % n or nd != n * d:
        raise ValueError(f"w_uk {tuple(w_uk.shape)} must be (M, N*P, L) with N={n}, P={d} for q_nope {(b, h, d)}")
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
    ``q_nope``   ``(B, H, P)``         no-rope part of the query
    ``latent``   ``(B, T, L)``         latent cache view
    ``side``     ``(B, T, N*R + 1)``   rope keys + modality flag
    ``key_mask`` ``(B, T)`` or None    True = attend
    ``w_uk``     ``(M, N*P, L)``       key up-projection per branch
    ``w_uv``     ``(M, N*V, L)``       value up-projection per branch
    ``b_k``      ``(M, N*P)`` or None  key bias per branch
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
        raise ValueError("inconsistent oracle shapes: q_nope (B, H, P), w_uk (M, N*P, L), w_uv (M, N*V, L)")
    g = h // n
    v = w_uv.shape[1] // n
    f64 = torch.float64
    valid = torch.ones(b, t, dtype=torch.bool, device=latent.device) if key_mask is None else key_mask
    modality = is_image(side[..., n * r]).long() if m == 2 else torch.zeros(b, t, dtype=torch.long, device=side.device)
    c = torch.where(valid[..., None], latent.to(f64), 0.0)
    k_rope = torch.where(valid[..., None], side[..., : n * r].to(f64), 0.0).reshape(b, t, n, r)
    # decompress every token with every branch, then pick the token's branch
    k_all = torch.einsum("btl,mkl->btmk", c, w_uk.to(f64))  # (B, T, M, N*P)
    v_all = torch.einsum("btl,mkl->btmk", c, w_uv.to(f64))  # (B, T, M, N*V)
    if b_k is not None:
        k_all = k_all + b_k.to(f64)
    if b_v is not None:
        v_all = v_all + b_v.to(f64)
    sel = modality[:, :, None, None]
    k_nope = torch.gather(k_all, 2, sel.expand(b, t, 1, n * d))[:, :, 0].reshape(b, t, n, d)
    vals = torch.gather(v_all, 2, sel.expand(b, t, 1, n * v))[:, :, 0].reshape(b, t, n, v)
    keys = torch.cat([k_rope, k_nope], dim=-1)  # (B, T, N, R + P)
    q = torch.cat([q_rope.to(f64), q_nope.to(f64)], dim=-1).reshape(b, n, g, r + d)
    scores = torch.einsum("bngk,btnk->bngt", q, keys) * float(scale)
    scores = torch.where(valid[:, None, None, :], scores, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf for rows without keys
    p = torch.where(torch.isfinite(lse)[..., None], torch.exp(scores - lse[..., None].nan_to_num(neginf=0.0)), 0.0)
    out = torch.einsum("bngt,btnv->bngv", p, vals)
    return out.reshape(b, h, v), lse.reshape(b, h)
