"""Triton split-K decode kernel for converted (absorbed) MLA attention with modality-specific branches.

One program handles **all query heads** of one sequence over one contiguous chunk of cached tokens: every latent
tile ``(BLOCK_T, L)`` is read from HBM once and shared by the ``H`` heads (MQA over the latent). The per-kv-head
rope keys are handled as one ``(BLOCK_H, N*R)`` block-diagonal query (row ``h`` holds ``q_rope[h]`` in the
columns of its kv group ``h // G``, zeros elsewhere) against the ``(BLOCK_T, N*R)`` rope tile, so the rope part
is a single tensor-core dot as well. With two branches (``M == 2``) both absorbed queries are dotted with the
tile, the per-token modality flag selects the score, and the probabilities go to one of two accumulators.

Stage 1 (``_mla_decode_stage1``): grid ``(B, num_splits)``; online softmax in base 2 with fp32 accumulation.
With one split it writes the final outputs directly; otherwise it writes un-normalised partial accumulators and
the running max, and stage 2 (``_mla_decode_combine``, grid ``(B, H)``) merges them with the log-sum-exp rule.

Everything the launcher decides depends on shapes only (``B``, ``T``, the SM count), never on tensor values, so
it does not synchronise with the host and can be captured in a CUDA graph. ``T`` is a run-time kernel argument
(no recompilation per length). Masked and out-of-range keys are removed with ``tl.where`` (never multiplied by
zero), so NaN or inf stored in unused cache rows cannot leak.

Performance notes (H100, Triton 3.6; ``benchmarks/results/decode_kernel_h100.md``): the fp32 accumulators of the two
branches (``2 x 32 x L``) and the absorbed queries live in registers, so at most two 4-warp programs (``M * L <=
512``) or one 8-warp program (wider) fit on an SM; ``choose_num_splits`` sizes the grid to whole waves of those.
The side rows (``N*R + 1`` elements, an odd stride) cannot be loaded with 16-byte vectors. A tokens-x-heads tile
orientation that would let Hopper's wgmma take the dots was tried and dropped: Triton 3.6 produced wrong results
and illegal memory accesses for some of its configurations.

Shapes (see :mod:`hf_mla_vlm.kernels.reference` for the maths):

==============  =====================  =============================================================
tensor          shape                  notes
==============  =====================  =============================================================
``q_rope``      ``(B, H, R)``          same dtype as ``q_latent`` (made contiguous: small)
``q_latent``    ``(B, H, M, L)``       cast to the cache dtype for the tensor-core dots (made contiguous)
``q_bias``      ``(B, H, M)`` or None  any float dtype (made contiguous)
``latent``      ``(B, T, L)``          ``keys[:, 0]``; last dim contiguous
``side``        ``(B, T, N*R + 1)``    ``values[:, 0]``; last dim contiguous
``key_mask``    ``(B, T)`` bool/None   any strides
``ctx``         ``(B, H, M, L)``       float32 output
``p_sum``       ``(B, H, M)``          float32 output
``lse``         ``(B, H)``             float32 output (natural log)
==============  =====================  =============================================================
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from .reference import validate_decode_inputs


__all__ = ["choose_num_splits", "mla_decode_triton"]

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


@triton.jit(do_not_specialize=["T", "tokens_per_split"])
def _mla_decode_stage1(
    q_rope_ptr,
    q_lat_ptr,
    q_bias_ptr,
    latent_ptr,
    side_ptr,
    mask_ptr,
    acc_ptr,
    psum_ptr,
    stat_ptr,
    T,
    tokens_per_split,
    qk_scale,
    stride_c_b,
    stride_c_t,
    stride_s_b,
    stride_s_t,
    stride_km_b,
    stride_km_t,
    H: tl.constexpr,
    G: tl.constexpr,
    R: tl.constexpr,
    NR: tl.constexpr,
    L: tl.constexpr,
    M: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_NR: tl.constexpr,
    BLOCK_L: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
    STATIC_CHUNK: tl.constexpr,
):
    """Attend all heads of sequence ``program_id(0)`` to token chunk ``program_id(1)`` (grid ``(B, S)``).

    The queries are contiguous: ``q_rope`` ``(B, H, R)``, ``q_lat`` ``(B, H, M, L)``, ``q_bias`` ``(B, H, M)``.
    Outputs (contiguous): ``acc`` ``(B, S, H, M, L)``, ``psum`` ``(B, S, H, M)``, ``stat`` ``(B, S, H)``. With
    ``SINGLE_SPLIT`` (``S == 1``) they receive the final ``ctx``, ``p_sum`` and the natural-log ``lse``; otherwise
    the un-normalised accumulators, the un-normalised per-branch probability sums and the running max of the base-2
    scores (``-inf`` for a chunk without valid keys).
    """
    pid_b = tl.program_id(0).to(tl.int64)  # batch offsets of large caches overflow int32
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    if UPCAST_DOTS:  # Triton's CPU interpreter computes bf16 dots wrongly: run them in fp32 there
        cdtype = tl.float32
    else:
        cdtype = latent_ptr.dtype.element_ty

    offs_h = tl.arange(0, BLOCK_H)
    offs_l = tl.arange(0, BLOCK_L)
    offs_c = tl.arange(0, BLOCK_NR)
    offs_tt = tl.arange(0, BLOCK_T)
    h_ok = offs_h < H
    l_ok = offs_l < L
    c_ok = offs_c < NR
    hl_mask = h_ok[:, None] & l_ok[None, :]

    # block-diagonal rope query (BLOCK_H, BLOCK_NR): row h holds q_rope[h] in the columns of kv group h // G
    grp_c = offs_c // R
    qr_mask = h_ok[:, None] & c_ok[None, :] & (grp_c[None, :] == (offs_h // G)[:, None])
    qr_ptrs = q_rope_ptr + pid_b * (H * R) + offs_h[:, None] * R + (offs_c % R)[None, :]
    qr = tl.load(qr_ptrs, mask=qr_mask, other=0.0).to(cdtype)
    ql_ptrs = q_lat_ptr + pid_b * (H * M * L) + offs_h[:, None] * (M * L) + offs_l[None, :]
    ql0 = tl.load(ql_ptrs, mask=hl_mask, other=0.0).to(cdtype)  # (BLOCK_H, BLOCK_L)
    if M == 2:
        ql1 = tl.load(ql_ptrs + L, mask=hl_mask, other=0.0).to(cdtype)
    if HAS_BIAS:
        qb_ptrs = q_bias_ptr + pid_b * (H * M) + offs_h * M
        bias0 = tl.load(qb_ptrs, mask=h_ok, other=0.0).to(tl.float32) * qk_scale
        if M == 2:
            bias1 = tl.load(qb_ptrs + 1, mask=h_ok, other=0.0).to(tl.float32) * qk_scale

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    ps0 = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_H, BLOCK_L], dtype=tl.float32)
    if M == 2:
        ps1 = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK_H, BLOCK_L], dtype=tl.float32)

    t_start = pid_s * tokens_per_split
    t_end = tl.minimum(t_start + tokens_per_split, T)
    c_base = latent_ptr + pid_b * stride_c_b + offs_l[None, :]
    s_base = side_ptr + pid_b * stride_s_b
    # the trip count is the same for every chunk (the last one masks its tail). STATIC_CHUNK > 0 (interpreter only)
    # makes it a compile-time constant: Triton 3.6's interpreter cannot use a run-time scalar (nor any assigned
    # variable) as a loop bound under numpy >= 2.4, hence the inline expression
    for t0 in range(0, STATIC_CHUNK if STATIC_CHUNK > 0 else tokens_per_split, BLOCK_T):
        offs_t = t_start + t0 + offs_tt
        t_ok = offs_t < t_end
        # the tile loads are masked by position only (so that Triton pipelines them); padding rows are zeroed with
        # tl.where below, so garbage (NaN) stored there never reaches a dot
        c = tl.load(c_base + offs_t[:, None] * stride_c_t, mask=t_ok[:, None] & l_ok[None, :], other=0.0)
        kr = tl.load(
            s_base + offs_t[:, None] * stride_s_t + offs_c[None, :], mask=t_ok[:, None] & c_ok[None, :], other=0.0
        )
        if M == 2:
            flag = tl.load(s_base + offs_t * stride_s_t + NR, mask=t_ok, other=0.0)
            is_img = flag.to(tl.float32) > 0.5
        if HAS_MASK:
            km = tl.load(mask_ptr + pid_b * stride_km_b + offs_t * stride_km_t, mask=t_ok, other=0)
            valid = t_ok & (km != 0)
            c = tl.where(valid[:, None], c, 0.0)
            kr = tl.where(valid[:, None], kr, 0.0)
        else:
            valid = t_ok
        c = c.to(cdtype)
        kr = kr.to(cdtype)

        # scores (BLOCK_H, BLOCK_T) in base 2: rope part + the token's branch latent part + the branch bias
        scores = tl.dot(qr, tl.trans(kr), input_precision=DOT_PRECISION)
        s_lat0 = tl.dot(ql0, tl.trans(c), input_precision=DOT_PRECISION)
        if M == 2:
            s_lat1 = tl.dot(ql1, tl.trans(c), input_precision=DOT_PRECISION)
            scores += tl.where(is_img[None, :], s_lat1, s_lat0)
        else:
            scores += s_lat0
        scores = scores * qk_scale
        if HAS_BIAS:
            if M == 2:
                scores += tl.where(is_img[None, :], bias1[:, None], bias0[:, None])
            else:
                scores += bias0[:, None]
        scores = tl.where(valid[None, :], scores, float("-inf"))

        # online softmax; m_ref = 0 while no key was valid (avoids -inf - -inf)
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(scores - m_ref[:, None])
        if M == 2:
            p1 = tl.where(is_img[None, :], p, 0.0)
            p0 = tl.where(is_img[None, :], 0.0, p)
            ps1 = ps1 * alpha + tl.sum(p1, axis=1)
            acc1 = acc1 * alpha[:, None] + tl.dot(p1.to(cdtype), c, input_precision=DOT_PRECISION)
        else:
            p0 = p
        ps0 = ps0 * alpha + tl.sum(p0, axis=1)
        acc0 = acc0 * alpha[:, None] + tl.dot(p0.to(cdtype), c, input_precision=DOT_PRECISION)
        m_i = m_new

    row = pid_b * n_splits + pid_s  # row of the (B, S) output grid
    acc_ptrs = acc_ptr + row * (H * M * L) + offs_h[:, None] * (M * L) + offs_l[None, :]
    ps_ptrs = psum_ptr + row * (H * M) + offs_h * M
    st_ptrs = stat_ptr + row * H + offs_h
    if SINGLE_SPLIT:
        denom = ps0
        if M == 2:
            denom += ps1
        has_key = denom > 0.0
        inv = tl.where(has_key, 1.0 / tl.where(has_key, denom, 1.0), 0.0)
        acc0 = acc0 * inv[:, None]
        ps0 = ps0 * inv
        if M == 2:
            acc1 = acc1 * inv[:, None]
            ps1 = ps1 * inv
        stat = tl.where(has_key, (m_i + tl.log2(tl.where(has_key, denom, 1.0))) * 0.6931471805599453, float("-inf"))
    else:
        stat = m_i
    tl.store(acc_ptrs, acc0, mask=hl_mask)
    tl.store(ps_ptrs, ps0, mask=h_ok)
    if M == 2:
        tl.store(acc_ptrs + L, acc1, mask=hl_mask)
        tl.store(ps_ptrs + 1, ps1, mask=h_ok)
    tl.store(st_ptrs, stat, mask=h_ok)


@triton.jit
def _mla_decode_combine(
    acc_ptr,
    psum_ptr,
    stat_ptr,
    ctx_ptr,
    p_sum_ptr,
    lse_ptr,
    S,
    H: tl.constexpr,
    ML: tl.constexpr,
    M: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_ML: tl.constexpr,
    BLOCK_M: tl.constexpr,
    STATIC_S: tl.constexpr,
):
    """Merge the ``S`` partial results of head ``program_id(1)`` of sequence ``program_id(0)``.

    Inputs are stage 1's contiguous partials ``acc`` ``(B, S, H, M*L)``, ``psum`` ``(B, S, H, M)`` and ``stat``
    ``(B, S, H)`` (base-2 running max); outputs are contiguous ``ctx`` ``(B, H, M*L)``, ``p_sum`` ``(B, H, M)``
    and ``lse`` ``(B, H)``.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_x = tl.arange(0, BLOCK_ML)
    offs_m = tl.arange(0, BLOCK_M)
    x_ok = offs_x < ML
    m_ok = offs_m < M
    row = pid_b * S * H + pid_h  # (b, s=0, h) in units of rows of (B, S, H)

    maxes = tl.load(stat_ptr + row + offs_s * H, mask=offs_s < S, other=float("-inf"))
    g_max = tl.max(maxes, axis=0)
    g_ref = tl.where(g_max == float("-inf"), 0.0, g_max)
    acc = tl.zeros([BLOCK_ML], dtype=tl.float32)
    ps = tl.zeros([BLOCK_M], dtype=tl.float32)
    for s in range(0, STATIC_S if STATIC_S > 0 else S):  # STATIC_S: interpreter only, see STATIC_CHUNK
        r = row + s * H
        m_s = tl.load(stat_ptr + r)
        w = tl.where(m_s == float("-inf"), 0.0, tl.exp2(m_s - g_ref))
        a = tl.load(acc_ptr + r * ML + offs_x, mask=x_ok, other=0.0)
        acc += tl.where(w > 0.0, a * w, 0.0)
        pv = tl.load(psum_ptr + r * M + offs_m, mask=m_ok, other=0.0)
        ps += tl.where(w > 0.0, pv * w, 0.0)
    denom = tl.sum(ps, axis=0)
    has_key = denom > 0.0
    inv = tl.where(has_key, 1.0 / tl.where(has_key, denom, 1.0), 0.0)
    out_row = pid_b * H + pid_h
    tl.store(ctx_ptr + out_row * ML + offs_x, acc * inv, mask=x_ok)
    tl.store(p_sum_ptr + out_row * M + offs_m, ps * inv, mask=m_ok)
    lse = tl.where(has_key, (g_ref + tl.log2(tl.where(has_key, denom, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(lse_ptr + out_row, lse)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=16)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_splits(
    batch: int,
    num_tokens: int,
    sm_count: int,
    block_t: int,
    programs_per_sm: int = 1,
    min_tokens_per_split: int = 256,
    max_waves: int = 4,
) -> int:
    """Split-K factor from shapes only (never from tensor values, so it is CUDA-graph safe).

    Stage 1 programs are large (their accumulators fill most of the register file), so only ``programs_per_sm``
    of them are resident per SM (1 with 8 warps, 2 with 4 warps). The grid ``batch * splits`` is chosen to fill
    whole waves of ``sm_count * programs_per_sm`` programs: among the split counts with chunks of at least
    ``min_tokens_per_split`` tokens (partial results cost ``2 * H * M * L * 4`` bytes per program, written and read
    back) and at most ``max_waves`` waves, take the one with the best wave efficiency, preferring fewer splits.
    """
    if batch <= 0 or num_tokens <= 0 or sm_count <= 0 or programs_per_sm <= 0:
        raise ValueError(
            f"batch ({batch}), num_tokens ({num_tokens}), sm_count ({sm_count}) and programs_per_sm "
            f"({programs_per_sm}) must be positive"
        )
    slots = sm_count * programs_per_sm
    max_splits = max(1, min(triton.cdiv(num_tokens, max(min_tokens_per_split, block_t)), 256))
    best, best_eff = 1, -1.0
    for splits in range(1, max_splits + 1):
        programs = batch * splits
        waves = triton.cdiv(programs, slots)
        if waves > max_waves and splits > 1:
            break
        eff = programs / (slots * waves)
        if eff > best_eff + 0.05:
            best, best_eff = splits, eff
    return best


def _default_config(lat: int, m: int, elem_size: int, has_mask: bool) -> tuple[int, int, int]:
    """``(BLOCK_T, num_warps, num_stages)`` by the size of the accumulators, as tuned on an H100 (Triton 3.6).

    Up to 512 accumulator columns (``M * L``, e.g. two branches of 256) a 4-warp program with 32-token tiles lets
    two programs share an SM, which hides latency better than one 8-warp program; wider accumulators need 8 warps.
    The key mask's ``tl.where`` costs a staging buffer in shared memory, hence the smaller tile with a mask at
    ``L = 512``. If a configuration still does not fit, the launcher retries it with fewer stages / a smaller tile.
    """
    acc_cols = m * max(16, triton.next_power_of_2(lat))
    if elem_size >= 4:
        return 16, (4 if acc_cols <= 256 else 8), 2
    if acc_cols <= 512:
        return 32, 4, 3
    return (32, 8, 2) if has_mask else (64, 8, 2)


# (cache dtype, L, M, N*R, has_mask, BLOCK_T, num_warps, num_stages) -> (BLOCK_T, num_stages) that fit in smem
_CONFIG_THAT_FITS: dict[tuple, tuple[int, int]] = {}


def mla_decode_triton(
    q_rope: torch.Tensor,
    q_latent: torch.Tensor,
    q_bias: torch.Tensor | None,
    latent: torch.Tensor,
    side: torch.Tensor,
    key_mask: torch.Tensor | None,
    scale: float,
    num_kv_heads: int,
    num_splits: int | None = None,
    *,
    block_t: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Absorbed MLA decode with the Triton split-K kernel (same contract as ``mla_decode_reference``).

    ==============  =====================  ======================================================
    argument        shape                  notes
    ==============  =====================  ======================================================
    ``q_rope``      ``(B, H, R)``          post-RoPE rope part of the query
    ``q_latent``    ``(B, H, M, L)``       absorbed queries, one per branch (M = 1 or 2)
    ``q_bias``      ``(B, H, M)`` or None  score offset per branch
    ``latent``      ``(B, T, L)``          ``keys[:, 0]`` of the latent cache (strided view, no copy)
    ``side``        ``(B, T, N*R + 1)``    ``values[:, 0]``: rope keys (head-major) + modality flag
    ``key_mask``    ``(B, T)`` bool/None   True = attend
    ``scale``       float                  ``1/sqrt(head_dim)`` of the original model
    ``num_splits``  int or None            split-K factor; None = from (B, T, SM count)
    ==============  =====================  ======================================================

    The (small) query tensors are made contiguous; the cache views are read in place. ``block_t``, ``num_warps``
    and ``num_stages`` override the tile configuration (for tuning).

    Returns:
        ``(ctx, p_sum, lse)``: ``(B, H, M, L)``, ``(B, H, M)``, ``(B, H)``, all float32. Rows without a valid key
        give zeros and ``lse = -inf``.

    Raises:
        ValueError: bad shapes/dtypes/devices, a CPU tensor without ``TRITON_INTERPRET=1``, a cache view whose last
            dim is not contiguous, or a bad ``num_splits``/tile override.
    """
    b, h, n, r, lat, t, m = validate_decode_inputs(q_rope, q_latent, q_bias, latent, side, key_mask, num_kv_heads)
    device = latent.device
    if device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"mla_decode_triton needs CUDA tensors (got {device}); use mla_decode_reference on CPU, or set "
            "TRITON_INTERPRET=1 before importing triton to run the kernel in the Triton interpreter"
        )
    supported = (torch.float16, torch.bfloat16, torch.float32)
    if latent.dtype not in supported or q_latent.dtype not in supported:
        raise ValueError(
            f"cache and queries must be float16, bfloat16 or float32, got {latent.dtype}/{q_latent.dtype}"
        )
    if latent.stride(-1) != 1 or side.stride(-1) != 1:
        raise ValueError(
            "latent and side must be contiguous in their last dim (pass keys[:, 0] / values[:, 0] of the cache), got "
            f"strides {latent.stride()} and {side.stride()}"
        )
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite float (1/sqrt(head_dim)), got {scale!r}")

    nr = n * r
    cfg_t, cfg_w, cfg_s = _default_config(lat, m, latent.element_size(), key_mask is not None)
    tile_given = block_t is not None or num_stages is not None
    block_t = cfg_t if block_t is None else block_t
    num_warps = cfg_w if num_warps is None else num_warps
    num_stages = cfg_s if num_stages is None else num_stages
    if not isinstance(block_t, int) or block_t < 16 or block_t & (block_t - 1):
        raise ValueError(f"block_t must be a power of two >= 16, got {block_t!r}")
    if num_warps not in (1, 2, 4, 8, 16) or not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_warps must be 1/2/4/8/16 and num_stages >= 1, got {num_warps!r}/{num_stages!r}")

    if num_splits is None:
        sms = 132 if device.type != "cuda" else _sm_count(device.index if device.index is not None else 0)
        num_splits = choose_num_splits(b, t, sms, block_t, programs_per_sm=2 if num_warps <= 4 else 1)
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")
    # chunk = whole tiles; drop splits that would start past the end (their count depends only on T)
    tokens_per_split = triton.cdiv(triton.cdiv(t, num_splits), block_t) * block_t
    num_splits = triton.cdiv(t, tokens_per_split)
    single = num_splits == 1

    q_rope = q_rope.contiguous()
    q_latent = q_latent.contiguous()
    f32 = torch.float32
    ctx = torch.empty(b, h, m, lat, device=device, dtype=f32)
    p_sum = torch.empty(b, h, m, device=device, dtype=f32)
    lse = torch.empty(b, h, device=device, dtype=f32)
    if single:
        acc, psum, stat = ctx, p_sum, lse
    else:
        acc = torch.empty(b, num_splits, h, m, lat, device=device, dtype=f32)
        psum = torch.empty(b, num_splits, h, m, device=device, dtype=f32)
        stat = torch.empty(b, num_splits, h, device=device, dtype=f32)
    bias_arg = q_bias.contiguous() if q_bias is not None else q_latent
    if key_mask is not None:
        mask_arg = key_mask.view(torch.uint8)  # same strides as the caller's view: no recompile when T changes
        mask_strides = key_mask.stride()
    else:
        mask_arg = latent
        mask_strides = (0, 0)
    upcast = _interpreting() and latent.dtype == torch.bfloat16
    precision = "ieee" if latent.dtype == torch.float32 or upcast else "tf32"

    fit_key = (latent.dtype, lat, m, nr, key_mask is not None, block_t, num_warps, num_stages)
    tile_t, stages = _CONFIG_THAT_FITS.get(fit_key, (block_t, num_stages))
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        while True:
            try:
                _mla_decode_stage1[(b, num_splits)](
                    q_rope,
                    q_latent,
                    bias_arg,
                    latent,
                    side,
                    mask_arg,
                    acc,
                    psum,
                    stat,
                    t,
                    tokens_per_split,
                    float(scale) * _LOG2E,
                    latent.stride(0),
                    latent.stride(1),
                    side.stride(0),
                    side.stride(1),
                    *mask_strides,
                    H=h,
                    G=h // n,
                    R=r,
                    NR=nr,
                    L=lat,
                    M=m,
                    BLOCK_H=max(16, triton.next_power_of_2(h)),
                    BLOCK_T=tile_t,
                    BLOCK_NR=max(16, triton.next_power_of_2(nr)),
                    BLOCK_L=max(16, triton.next_power_of_2(lat)),
                    HAS_MASK=key_mask is not None,
                    HAS_BIAS=q_bias is not None,
                    SINGLE_SPLIT=single,
                    DOT_PRECISION=precision,
                    UPCAST_DOTS=upcast,
                    STATIC_CHUNK=tokens_per_split if _interpreting() else 0,
                    num_warps=num_warps,
                    num_stages=stages,
                )
                break
            except OutOfResources:  # raised on the host before launching: retry with fewer stages / a smaller tile
                if tile_given or (stages <= 1 and tile_t <= 16):
                    raise
                if stages > 1:
                    stages -= 1
                else:
                    tile_t //= 2  # tokens_per_split stays a multiple of the tile
        _CONFIG_THAT_FITS[fit_key] = (tile_t, stages)
        if not single:
            _mla_decode_combine[(b, h)](
                acc,
                psum,
                stat,
                ctx,
                p_sum,
                lse,
                num_splits,
                H=h,
                ML=m * lat,
                M=m,
                BLOCK_S=max(2, triton.next_power_of_2(num_splits)),
                BLOCK_ML=triton.next_power_of_2(m * lat),
                BLOCK_M=2,
                STATIC_S=num_splits if _interpreting() else 0,
                num_warps=4,
            )
    return ctx, p_sum, lse
