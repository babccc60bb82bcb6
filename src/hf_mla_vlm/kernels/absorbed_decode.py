"""Triton split-K decode kernel for converted (absorbed) MLA attention with modality-specific branches.

One program handles a block of ``BLOCK_H`` query heads (all of them for the converted 7B/8B models) of one sequence
over one contiguous chunk of cached tokens: every latent tile ``(BLOCK_T, L)`` is read once and shared by those heads
(MQA over the latent). The program holds
one query row per (branch, head), ``M * BLOCK_H`` rows: row ``m * BLOCK_H + h`` is head ``h``'s absorbed query of
branch ``m``. Each row runs its own online softmax over the tokens of its branch (the other branch's tokens get
``-inf``), so the latent scores of all rows are a single tensor-core dot with the tile and the probabilities a
single dot back; the per-kv-head rope keys are one ``(rows, N*R)`` block-diagonal query (a row holds ``q_rope[h]``
in the columns of its kv group ``h // G``, zeros elsewhere) against the ``(BLOCK_T, N*R)`` rope tile. The two
branches of a head are two softmax segments, merged with the log-sum-exp rule like the split-K chunks.

Stage 1 (``_mla_decode_stage1``): grid ``(head blocks, B, num_splits)``. A program takes ``BLOCK_H`` heads: all of
them unless the accumulator would exceed ``MAX_ACCUMULATOR_ELEMENTS`` (``choose_block_h``); the head block is the
fastest grid axis, so the programs reading one latent chunk run side by side and share it through L2. Base-2 online
softmax with fp32 accumulation. With one split it merges the branches and writes the final outputs; otherwise it
writes un-normalised per-branch partial accumulators and running maxima (a branch without keys in the chunk leaves its
row unwritten), and stage 2 (``_mla_decode_combine``, grid ``(B, H, latent column blocks)``) merges chunks and
branches, several splits at a time (``choose_combine_tile``).

Stage 1 by branch (``_mla_decode_stage1_by_branch``, ``by_branch=True``; opt-in until timed on a GPU): with two
branches, the fused stage 1 runs both branches' queries (``2 * BLOCK_H`` rows) over every tile and masks half of the
scores. This one first reads the chunk's modality flags to find each branch's token range, then runs each branch's
``BLOCK_H`` query rows over that range only. Images sit in the cache as long runs, so most tiles go through one
branch's dots: half the tensor-core work per tile and half the accumulator (the one-branch tile configuration).
It always writes per-branch partial rows, which the combine merges (also with one split).

Quantized latent (``latent_format``, the rows of ``latent_cache.LatentQuantization``: int8, fp8 e4m3 or int4 values
with fp16 group scales and zero points): the kernel reads the stored bytes and dequantizes each tile in registers as it
loads it (the scales of a tile's rows are gathered per element, from the same cache lines), so a quantized cache is
never copied or dequantized in memory; the rope keys and the flag (side rows) stay in the compute dtype.

Everything the launcher decides depends on shapes only (``B``, ``T``, the SM count), never on tensor values, so
it does not synchronise with the host and can be captured in a CUDA graph. ``T`` is a run-time kernel argument
(no recompilation per length). Masked and out-of-range cache rows are never loaded (the loads zero-fill them) and
their scores are ``-inf``, so NaN or inf stored in unused cache rows cannot leak.

Performance notes (H100, Triton 3.6; ``benchmarks/results/decode_kernel_h100.md``): the fp32 accumulator
(``M * BLOCK_H x L``) and the absorbed queries live in registers, so at most two 4-warp programs (``M * L <= 512``)
or one 8-warp program (wider) fit on an SM; ``choose_num_splits`` sizes the grid to whole waves of those. Side rows
of ``N*R + 1`` elements start on 2-byte boundaries, which Triton can only load with scalar synchronous loads outside
its pipeline; the model's cache pads them to 16-byte units and the kernel writes their offsets as multiples of the
constant ``SIDE_ALIGN``, so Triton can prove the alignment (1.17-1.24x faster at the Qwen2.5-VL-7B shapes). Tried
and dropped (measured slower): one row per head with two accumulators selected per token, skipping the absent
branch's dots per tile with run-time branches, zeroing masked rows with ``tl.where`` after position-masked loads,
a combine that loads all chunks at once (at batch 16, where the combine is 4-6 us of a call). At batch 1 the
one-split-per-iteration combine took 20-38 us of a 32k-token call (127 splits, H200,
``decode_kernel_h200.md``); reading 32 splits per iteration over 64-column blocks cut that to 10-11 us but made
it 2-4x slower at batch 16-64 (``decode_kernel_h200_combine.md``), so ``choose_combine_tile`` keeps whole rows
there.

Shapes (see :mod:`hf_mla_vlm.kernels.reference` for the maths):

==============  =====================  =============================================================
tensor          shape                  notes
==============  =====================  =============================================================
``q_rope``      ``(B, H, R)``          same dtype as ``q_latent`` (made contiguous: small)
``q_latent``    ``(B, H, M, L)``       cast to the cache dtype for the dots; any (B, H) strides, (M, L) packed
``q_bias``      ``(B, H, M)`` or None  any float dtype; any (B, H) strides, last dim contiguous
``latent``      ``(B, T, L)``          ``LatentCacheLayout.views`` of the cached rows; last dim contiguous;
                                       quantized: ``(B, T, K)`` uint8 rows
``side``        ``(B, T, N*R + 1)``    ``values[:, 0, :, :N*R + 1]``; last dim contiguous; rows on 16-byte boundaries
                                       (the model pads them) are loaded with vectorised asynchronous copies
``key_mask``    ``(B, T)`` bool/None   any strides
``ctx``         ``(B, H, M, L)``       float32 output
``p_sum``       ``(B, H, M)``          float32 output
``lse``         ``(B, H)``             float32 output (natural log)
==============  =====================  =============================================================

Longer than the package's usual ~400 lines: the two Triton kernels (split pass and combine), the launch-config
heuristics and the launcher with its input validation are one contract, documented together above.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from ..modeling.latent_cache import parse_latent_format
from .reference import mla_decode_reference, validate_decode_inputs


__all__ = ["choose_block_h", "choose_combine_tile", "choose_num_splits", "mla_decode_triton"]

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


@triton.jit
def _latent_bases(
    latent_ptr,
    scale_ptr,
    pid_b,
    stride_c_b,
    stride_sc_b,
    offs_l,
    L: tl.constexpr,
    QUANT: tl.constexpr,
    GROUP: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    SCALE_OFF: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """Pointers of sequence ``pid_b``'s latent row 0: ``(1, BLOCK_L)`` values and, quantized, the scales ``(1,
    BLOCK_G)`` (or per element, ``BLOCK_G = 0``), with the groups' mask (``offs_l``'s mask where unused)."""
    if QUANT == 3:
        c_base = latent_ptr + pid_b * stride_c_b + (offs_l % (L // 2))[None, :]  # byte of each int4 element
    else:
        c_base = latent_ptr + pid_b * stride_c_b + offs_l[None, :]
    sc_base = c_base
    g_ok = offs_l < L
    if QUANT > 0:
        if BLOCK_G > 0:  # one scale per (token, group), broadcast over the group's elements in registers
            offs_g = tl.arange(0, BLOCK_G)
            g_ok = offs_g < NUM_GROUPS
            sc_base = scale_ptr + pid_b * stride_sc_b + SCALE_OFF + offs_g[None, :]
        else:  # a group size that is not a power of two: the scale of every element gathered
            sc_base = scale_ptr + pid_b * stride_sc_b + SCALE_OFF + (offs_l // GROUP)[None, :]
    return c_base, sc_base, g_ok


@triton.jit
def _side_base(side_ptr, pid_b, stride_s_b, stride_s_t, SIDE_ALIGN: tl.constexpr):
    """Sequence ``pid_b``'s side rows and their stride."""
    if SIDE_ALIGN > 1:
        # the cache pads side rows to whole 16-byte units: written as multiples of the constant SIDE_ALIGN, Triton
        # can prove the rope-key rows aligned and loads them with vectorised asynchronous (pipelined) copies
        return side_ptr + (pid_b * (stride_s_b // SIDE_ALIGN)) * SIDE_ALIGN, (stride_s_t // SIDE_ALIGN) * SIDE_ALIGN
    return side_ptr + pid_b * stride_s_b, stride_s_t


@triton.jit
def _latent_tile(
    c_base,
    sc_base,
    offs_t,
    valid,
    l_ok,
    g_ok,
    stride_c_t,
    stride_sc_t,
    L: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_L: tl.constexpr,
    QUANT: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """The ``(BLOCK_T, BLOCK_L)`` latent tile of tokens ``offs_t``, dequantized (float32) when ``QUANT``; rows that
    are not ``valid`` are never read (zeros)."""
    # masked and out-of-range rows are never read (the loads zero-fill them), so whatever is stored there (NaN
    # included) cannot reach a dot; the scores of those keys are set to -inf by the callers
    c_mask = valid[:, None] & l_ok[None, :]
    if QUANT == 0:
        c = tl.load(c_base + offs_t[:, None] * stride_c_t, mask=c_mask, other=0.0)
    else:
        # dequantized once per tile, shared by every query row of the program
        if QUANT == 2:
            raw = tl.load(c_base + offs_t[:, None] * stride_c_t, mask=c_mask, other=0.0)
        else:
            raw = tl.load(c_base + offs_t[:, None] * stride_c_t, mask=c_mask, other=0)
        if QUANT == 3:
            offs_l = tl.arange(0, BLOCK_L)
            raw = tl.where(offs_l[None, :] < L // 2, raw & 15, raw >> 4)
        sc_ptrs = sc_base + offs_t[:, None] * stride_sc_t
        if BLOCK_G > 0:
            g_mask = valid[:, None] & g_ok[None, :]
            sc = tl.load(sc_ptrs, mask=g_mask, other=0.0).to(tl.float32)
            c = tl.reshape(raw.to(tl.float32), (BLOCK_T, BLOCK_G, BLOCK_L // BLOCK_G)) * sc[:, :, None]
            if QUANT == 3:
                c += tl.load(sc_ptrs + NUM_GROUPS, mask=g_mask, other=0.0).to(tl.float32)[:, :, None]
            c = tl.reshape(c, (BLOCK_T, BLOCK_L))
        else:
            c = raw.to(tl.float32) * tl.load(sc_ptrs, mask=c_mask, other=0.0).to(tl.float32)
            if QUANT == 3:
                c += tl.load(sc_ptrs + NUM_GROUPS, mask=c_mask, other=0.0).to(tl.float32)
    return c


@triton.jit
def _tile_scores(qr, ql, kr, c, qk_scale, DOT_PRECISION: tl.constexpr):
    """Base-2 scores of the query rows against a tile: rope part (``qr . kr``) plus latent part (``ql . c``)."""
    scores = tl.dot(qr, tl.trans(kr), input_precision=DOT_PRECISION)
    return tl.dot(ql, tl.trans(c), scores, input_precision=DOT_PRECISION) * qk_scale


@triton.jit
def _online_update(scores, c, m_i, l_i, acc, DOT_PRECISION: tl.constexpr):
    """One online-softmax step over a tile whose excluded keys score ``-inf``: the new running maxima, sums and
    accumulator (rows without a key so far stay at ``-inf`` / 0)."""
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(scores - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


# Triton specialises integer arguments on divisibility by 16: the batch strides of a growing DynamicCache (side rows
# of N*R + 1 elements, the key mask) would flip that property as T grows and recompile the kernel mid-generation
@triton.jit(do_not_specialize=["T", "tokens_per_split", "stride_sc_b", "stride_s_b", "stride_km_b"])
def _mla_decode_stage1(
    q_rope_ptr,
    q_lat_ptr,
    q_bias_ptr,
    latent_ptr,
    scale_ptr,
    side_ptr,
    mask_ptr,
    acc_ptr,
    psum_ptr,
    stat_ptr,
    T,
    tokens_per_split,
    qk_scale,
    stride_q_b,
    stride_q_h,
    stride_qb_b,
    stride_qb_h,
    stride_c_b,
    stride_c_t,
    stride_sc_b,
    stride_sc_t,
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
    SIDE_ALIGN: tl.constexpr,
    QUANT: tl.constexpr,
    GROUP: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    SCALE_OFF: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """Like ``_mla_decode_stage1``, with one query row per (branch, head): row ``m * BLOCK_H + h``.

    Each row runs its own online softmax over the tokens of its branch only (the other branch's tokens are masked
    with ``-inf``), so the scores of all ``M * H`` rows are one dot with the latent tile and the probabilities one
    dot back; the branches of a head are merged with the log-sum-exp rule at the end (here with one split,
    otherwise in the combine kernel, which then gets per-branch maxima ``stat`` ``(B, S, H, M)``).

    Quantized latent (``QUANT`` 1 int8, 2 fp8 e4m3, 3 int4; 0 = none): ``latent_ptr`` points at the values of the
    rows (int8 / fp8 / uint8 view) and ``scale_ptr`` at the same rows as fp16 (strides in fp16 elements), whose
    scales start at element ``SCALE_OFF`` (then, for int4, ``NUM_GROUPS`` zero points). Each tile is dequantized as
    it is loaded (element ``l`` uses the parameters of group ``l // GROUP``; an int4 element ``l`` is the low nibble
    of byte ``l`` or, from ``L / 2`` on, the high nibble of byte ``l - L / 2``), then goes through the same dots.
    With a power-of-two ``GROUP`` the parameters are loaded once per (token, group), a ``(BLOCK_T, BLOCK_G)`` tile
    broadcast over the ``(BLOCK_T, BLOCK_G, GROUP)`` view of the values (``BLOCK_G = BLOCK_L / GROUP``; 0 = the
    parameters of every element gathered, for other group sizes).
    """
    pid_hb = tl.program_id(0)  # head block: the fastest grid axis, so programs that share a latent chunk run together
    pid_b = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2)
    n_splits = tl.num_programs(2)
    if UPCAST_DOTS:
        cdtype = tl.float32
    else:
        cdtype = side_ptr.dtype.element_ty  # the compute dtype (the latent's, when it is not quantized)
    BLOCK_R: tl.constexpr = M * BLOCK_H

    offs_r = tl.arange(0, BLOCK_R)
    h_r = pid_hb * BLOCK_H + offs_r % BLOCK_H  # global head of each row
    m_r = offs_r // BLOCK_H
    offs_l = tl.arange(0, BLOCK_L)
    offs_c = tl.arange(0, BLOCK_NR)
    offs_tt = tl.arange(0, BLOCK_T)
    r_ok = h_r < H
    l_ok = offs_l < L
    c_ok = offs_c < NR

    qr_mask = r_ok[:, None] & c_ok[None, :] & ((offs_c // R)[None, :] == (h_r // G)[:, None])
    qr = tl.load(q_rope_ptr + pid_b * (H * R) + h_r[:, None] * R + (offs_c % R)[None, :], mask=qr_mask, other=0.0)
    qr = qr.to(cdtype)
    ql_ptrs = q_lat_ptr + pid_b * stride_q_b + h_r[:, None] * stride_q_h + m_r[:, None] * L + offs_l[None, :]
    ql = tl.load(ql_ptrs, mask=r_ok[:, None] & l_ok[None, :], other=0.0).to(cdtype)
    if HAS_BIAS:
        qb_ptrs = q_bias_ptr + pid_b * stride_qb_b + h_r * stride_qb_h + m_r
        bias = tl.load(qb_ptrs, mask=r_ok, other=0.0).to(tl.float32) * qk_scale

    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_L], dtype=tl.float32)

    t_start = pid_s * tokens_per_split
    t_end = tl.minimum(t_start + tokens_per_split, T)
    c_base, sc_base, g_ok = _latent_bases(latent_ptr, scale_ptr, pid_b, stride_c_b, stride_sc_b, offs_l, L, QUANT,
                                          GROUP, NUM_GROUPS, SCALE_OFF, BLOCK_G)  # fmt: skip
    s_base, stride_s_t = _side_base(side_ptr, pid_b, stride_s_b, stride_s_t, SIDE_ALIGN)
    for t0 in range(0, STATIC_CHUNK if STATIC_CHUNK > 0 else tokens_per_split, BLOCK_T):
        offs_t = t_start + t0 + offs_tt
        t_ok = offs_t < t_end
        if HAS_MASK:
            km = tl.load(mask_ptr + pid_b * stride_km_b + offs_t * stride_km_t, mask=t_ok, other=0)
            valid = t_ok & (km != 0)
        else:
            valid = t_ok
        c = _latent_tile(c_base, sc_base, offs_t, valid, l_ok, g_ok, stride_c_t, stride_sc_t, L, BLOCK_T, BLOCK_L,
                         QUANT, NUM_GROUPS, BLOCK_G)  # fmt: skip
        kr = tl.load(
            s_base + offs_t[:, None] * stride_s_t + offs_c[None, :], mask=valid[:, None] & c_ok[None, :], other=0.0
        )
        c = c.to(cdtype)
        scores = _tile_scores(qr, ql, kr.to(cdtype), c, qk_scale, DOT_PRECISION)
        if HAS_BIAS:
            scores += bias[:, None]
        if M == 2:
            flag = tl.load(s_base + offs_t * stride_s_t + NR, mask=valid, other=0.0)
            is_img = (flag.to(tl.float32) > 0.5).to(tl.int32)
            keep = valid[None, :] & (is_img[None, :] == m_r[:, None])
        else:
            keep = valid[None, :]
        scores = tl.where(keep, scores, float("-inf"))
        m_i, l_i, acc = _online_update(scores, c, m_i, l_i, acc, DOT_PRECISION)

    row = pid_b * n_splits + pid_s  # row of the (B, S) output grid
    out_row = (row * H + h_r) * M + m_r  # (b, s, h, m) row of acc / psum / stat
    rl_mask = r_ok[:, None] & l_ok[None, :]
    if SINGLE_SPLIT:
        # merge the M rows of each head: weights w = 2^(m_branch - m_head), denominator sum_m w * l
        m2 = tl.reshape(m_i, (M, BLOCK_H))
        g = tl.max(m2, axis=0)
        g_ref = tl.where(g == float("-inf"), 0.0, g)
        w2 = tl.where(m2 == float("-inf"), 0.0, tl.exp2(m2 - g_ref[None, :]))
        denom = tl.sum(tl.reshape(l_i, (M, BLOCK_H)) * w2, axis=0)
        has_key = denom > 0.0
        inv = tl.where(has_key, 1.0 / tl.where(has_key, denom, 1.0), 0.0)
        f = tl.reshape(w2 * inv[None, :], (BLOCK_R,))
        tl.store(acc_ptr + out_row[:, None] * L + offs_l[None, :], acc * f[:, None], mask=rl_mask)
        tl.store(psum_ptr + out_row, l_i * f, mask=r_ok)
        offs_h = pid_hb * BLOCK_H + tl.arange(0, BLOCK_H)
        lse = tl.where(has_key, (g_ref + tl.log2(tl.where(has_key, denom, 1.0))) * 0.6931471805599453, float("-inf"))
        tl.store(stat_ptr + row * H + offs_h, lse, mask=offs_h < H)
    else:
        # a branch without keys in this chunk (images come in long runs) leaves its accumulator row unwritten: the
        # combine kernel never reads it (its weight is 0)
        has_row = r_ok & (m_i > float("-inf"))
        tl.store(acc_ptr + out_row[:, None] * L + offs_l[None, :], acc, mask=has_row[:, None] & l_ok[None, :])
        tl.store(psum_ptr + out_row, l_i, mask=r_ok)
        tl.store(stat_ptr + out_row, m_i, mask=r_ok)


@triton.jit(do_not_specialize=["T", "tokens_per_split", "stride_sc_b", "stride_s_b", "stride_km_b"])
def _mla_decode_stage1_by_branch(
    q_rope_ptr,
    q_lat_ptr,
    q_bias_ptr,
    latent_ptr,
    scale_ptr,
    side_ptr,
    mask_ptr,
    acc_ptr,
    psum_ptr,
    stat_ptr,
    T,
    tokens_per_split,
    qk_scale,
    stride_q_b,
    stride_q_h,
    stride_qb_b,
    stride_qb_h,
    stride_c_b,
    stride_c_t,
    stride_sc_b,
    stride_sc_t,
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
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
    STATIC_CHUNK: tl.constexpr,
    SIDE_ALIGN: tl.constexpr,
    QUANT: tl.constexpr,
    GROUP: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    SCALE_OFF: tl.constexpr,
    BLOCK_G: tl.constexpr,
    FLAG_BLOCK: tl.constexpr,
):
    """``_mla_decode_stage1`` for two branches, one branch at a time: ``BLOCK_H`` query rows (one per head).

    A prologue reads the modality flags of the chunk's valid tokens and finds, per branch, the range from its first
    to its last token; then each branch's loop runs over its own range only, with that branch's absorbed queries
    (tokens of the other branch inside the range get ``-inf``). Images sit in the cache as long runs, so a chunk
    is mostly one range per branch and every latent tile goes through the dots of one branch instead of both:
    half the tensor-core work and half the accumulator of the fused kernel, for one extra read of the flags. Always
    writes per-branch partial rows (``stat`` = base-2 maxima, ``-inf`` for a branch without keys in the chunk,
    whose accumulator row is left unwritten) for ``_mla_decode_combine``, also with one split.
    """
    pid_hb = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2)
    n_splits = tl.num_programs(2)
    if UPCAST_DOTS:
        cdtype = tl.float32
    else:
        cdtype = side_ptr.dtype.element_ty

    h_r = pid_hb * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_l = tl.arange(0, BLOCK_L)
    offs_c = tl.arange(0, BLOCK_NR)
    offs_tt = tl.arange(0, BLOCK_T)
    r_ok = h_r < H
    l_ok = offs_l < L
    c_ok = offs_c < NR
    qr_mask = r_ok[:, None] & c_ok[None, :] & ((offs_c // R)[None, :] == (h_r // G)[:, None])
    qr = tl.load(q_rope_ptr + pid_b * (H * R) + h_r[:, None] * R + (offs_c % R)[None, :], mask=qr_mask, other=0.0)
    qr = qr.to(cdtype)

    t_start = pid_s * tokens_per_split
    t_end = tl.minimum(t_start + tokens_per_split, T)
    c_base, sc_base, g_ok = _latent_bases(latent_ptr, scale_ptr, pid_b, stride_c_b, stride_sc_b, offs_l, L, QUANT,
                                          GROUP, NUM_GROUPS, SCALE_OFF, BLOCK_G)  # fmt: skip
    s_base, stride_s_t = _side_base(side_ptr, pid_b, stride_s_b, stride_s_t, SIDE_ALIGN)

    # the range [lo, hi) of each branch's valid tokens in the chunk (lo >= hi: no token of that branch)
    lo_text, hi_text, lo_image, hi_image = t_end, t_start, t_end, t_start
    for f0 in range(0, STATIC_CHUNK if STATIC_CHUNK > 0 else tokens_per_split, FLAG_BLOCK):
        offs_f = t_start + f0 + tl.arange(0, FLAG_BLOCK)
        ok = offs_f < t_end
        if HAS_MASK:
            ok = ok & (tl.load(mask_ptr + pid_b * stride_km_b + offs_f * stride_km_t, mask=ok, other=0) != 0)
        image = tl.load(s_base + offs_f * stride_s_t + NR, mask=ok, other=0.0).to(tl.float32) > 0.5
        text = ok & ~image
        image = ok & image
        lo_text = tl.minimum(lo_text, tl.min(tl.where(text, offs_f, t_end), axis=0))
        hi_text = tl.maximum(hi_text, tl.max(tl.where(text, offs_f + 1, t_start), axis=0))
        lo_image = tl.minimum(lo_image, tl.min(tl.where(image, offs_f, t_end), axis=0))
        hi_image = tl.maximum(hi_image, tl.max(tl.where(image, offs_f + 1, t_start), axis=0))

    row = pid_b * n_splits + pid_s
    for m in tl.static_range(M):
        if m == 0:
            lo, hi = lo_text, hi_text
        else:
            lo, hi = lo_image, hi_image
        ql_ptrs = q_lat_ptr + pid_b * stride_q_b + h_r[:, None] * stride_q_h + m * L + offs_l[None, :]
        ql = tl.load(ql_ptrs, mask=r_ok[:, None] & l_ok[None, :], other=0.0).to(cdtype)
        if HAS_BIAS:
            bias = tl.load(q_bias_ptr + pid_b * stride_qb_b + h_r * stride_qb_h + m, mask=r_ok, other=0.0)
            bias = bias.to(tl.float32) * qk_scale
        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_L], dtype=tl.float32)
        # (the interpreter walks the whole chunk from lo; the tiles past hi are empty)
        for t0 in range(0, STATIC_CHUNK if STATIC_CHUNK > 0 else hi - lo, BLOCK_T):
            offs_t = lo + t0 + offs_tt
            valid = offs_t < hi
            if HAS_MASK:
                km = tl.load(mask_ptr + pid_b * stride_km_b + offs_t * stride_km_t, mask=valid, other=0)
                valid = valid & (km != 0)
            c = _latent_tile(c_base, sc_base, offs_t, valid, l_ok, g_ok, stride_c_t, stride_sc_t, L, BLOCK_T,
                             BLOCK_L, QUANT, NUM_GROUPS, BLOCK_G)  # fmt: skip
            kr = tl.load(
                s_base + offs_t[:, None] * stride_s_t + offs_c[None, :], mask=valid[:, None] & c_ok[None, :], other=0.0
            )
            image = tl.load(s_base + offs_t * stride_s_t + NR, mask=valid, other=0.0).to(tl.float32) > 0.5
            if m == 0:
                keep = valid & ~image
            else:
                keep = valid & image
            c = c.to(cdtype)
            scores = _tile_scores(qr, ql, kr.to(cdtype), c, qk_scale, DOT_PRECISION)
            if HAS_BIAS:
                scores += bias[:, None]
            scores = tl.where(keep[None, :], scores, float("-inf"))
            m_i, l_i, acc = _online_update(scores, c, m_i, l_i, acc, DOT_PRECISION)
        out_row = (row * H + h_r) * M + m  # (b, s, h, m) row of acc / psum / stat
        has_row = r_ok & (m_i > float("-inf"))
        tl.store(acc_ptr + out_row[:, None] * L + offs_l[None, :], acc, mask=has_row[:, None] & l_ok[None, :])
        tl.store(psum_ptr + out_row, l_i, mask=r_ok)
        tl.store(stat_ptr + out_row, m_i, mask=r_ok)


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
    L: tl.constexpr,
    M: tl.constexpr,
    CHUNK_S: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_M: tl.constexpr,
    STATIC_S: tl.constexpr,
):
    """Merge the ``S`` x ``M`` partial rows of head ``program_id(1)`` of sequence ``program_id(0)``, for the latent
    columns of block ``program_id(2)``: inputs ``acc`` ``(B, S, H, M, L)``, ``psum`` and ``stat`` ``(B, S, H, M)``
    (base-2 running max per branch). The splits are read ``CHUNK_S`` at a time as one ``(CHUNK_S, M, BLOCK_L)`` tile,
    so the loads of a chunk are in flight together (one split per iteration made the combine latency-bound: 20-38 us
    of a 32k-token call at batch 1 with 127 splits, H200). Column block 0 also writes ``p_sum`` and ``lse``."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1)
    pid_l = tl.program_id(2)
    offs_s = tl.arange(0, CHUNK_S)
    offs_m = tl.arange(0, BLOCK_M)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    m_ok = offs_m < M
    l_ok = offs_l < L
    base = (pid_b * S * H + pid_h) * M  # (b, s=0, h, m=0)
    g_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    # the loop bounds stay inline, as in stage 1: Triton 3.6's interpreter fails on a constexpr-or-runtime bound
    # held in a variable
    for s0 in range(0, STATIC_S if STATIC_S > 0 else S, CHUNK_S):
        sm_ok = ((s0 + offs_s) < S)[:, None] & m_ok[None, :]
        maxes = tl.load(stat_ptr + base + (s0 + offs_s)[:, None] * (H * M) + offs_m[None, :], mask=sm_ok,
                        other=float("-inf"))  # fmt: skip
        g_max = tl.maximum(g_max, tl.max(maxes, axis=0))
    g = tl.max(g_max, axis=0)
    g_ref = tl.where(g == float("-inf"), 0.0, g)
    acc = tl.zeros([BLOCK_M, BLOCK_L], dtype=tl.float32)
    ps = tl.zeros([BLOCK_M], dtype=tl.float32)
    for s0 in range(0, STATIC_S if STATIC_S > 0 else S, CHUNK_S):
        r = base + (s0 + offs_s)[:, None] * (H * M) + offs_m[None, :]  # (CHUNK_S, BLOCK_M) rows
        sm_ok = ((s0 + offs_s) < S)[:, None] & m_ok[None, :]
        m_s = tl.load(stat_ptr + r, mask=sm_ok, other=float("-inf"))
        w = tl.where(m_s == float("-inf"), 0.0, tl.exp2(m_s - g_ref))
        used = sm_ok & (w > 0.0)  # rows stage 1 left unwritten have weight 0 and are never read
        a = tl.load(acc_ptr + r[:, :, None] * L + offs_l[None, None, :], mask=used[:, :, None] & l_ok[None, None, :],
                    other=0.0)  # fmt: skip
        acc += tl.sum(a * w[:, :, None], axis=0)
        pv = tl.load(psum_ptr + r, mask=sm_ok, other=0.0)
        ps += tl.sum(tl.where(used, pv * w, 0.0), axis=0)
    denom = tl.sum(ps, axis=0)
    has_key = denom > 0.0
    inv = tl.where(has_key, 1.0 / tl.where(has_key, denom, 1.0), 0.0)
    out = (pid_b * H + pid_h) * M + offs_m
    tl.store(ctx_ptr + out[:, None] * L + offs_l[None, :], acc * inv, mask=m_ok[:, None] & l_ok[None, :])
    first = pid_l == 0
    tl.store(p_sum_ptr + out, ps * inv, mask=m_ok & first)
    lse = tl.where(has_key, (g_ref + tl.log2(tl.where(has_key, denom, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(lse_ptr + pid_b * H + pid_h, lse, mask=first)


_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")  # Triton reads it once, at import, too
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_QUANT_CODES = {"int8": 1, "fp8": 2, "int4": 3}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(x: int) -> int:
    """Smallest power of two >= x (x >= 1); plain Python, unlike triton.next_power_of_2 (slow on the host)."""
    return 1 << (x - 1).bit_length()


def _row_alignment(side: torch.Tensor) -> int:
    """Elements per 16 bytes if every row of ``side`` starts on a 16-byte boundary (the model's padded cache),
    else 1."""
    per_16b = 16 // side.element_size()
    aligned = side.stride(0) % per_16b == 0 and side.stride(1) % per_16b == 0 and side.data_ptr() % 16 == 0
    return per_16b if aligned else 1


@functools.lru_cache(maxsize=16)
def _cuda_sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    """The device's SM count (an H100 / H200's 132 for the interpreter on the CPU)."""
    return _cuda_sm_count(device.index if device.index is not None else 0) if device.type == "cuda" else 132


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
    # plain integer maths: this runs on every decode step (triton.cdiv is a slow constexpr function on the host)
    max_splits = max(1, min(-(-num_tokens // max(min_tokens_per_split, block_t)), 256))
    best, best_eff = 1, -1.0
    for splits in range(1, max_splits + 1):
        programs = batch * splits
        waves = -(-programs // slots)
        if waves > max_waves and splits > 1:
            break
        eff = programs / (slots * waves)
        if eff > best_eff + 0.05:
            best, best_eff = splits, eff
    return best


def _default_config(
    lat: int, m: int, elem_size: int, has_mask: bool, aligned: bool, block_h: int
) -> tuple[int, int, int]:
    """``(BLOCK_T, num_warps, num_stages)`` for a program of ``m * block_h`` query rows.

    Two branches (the converted models; tuned on an H100, Triton 3.6): up to 512 accumulator columns per head
    (``M * L``, e.g. two branches of 256) a 4-warp program with 32-token tiles lets two programs share an SM, which
    hides latency better than one 8-warp program; wider accumulators need 8 warps. With side rows on 16-byte
    boundaries (``aligned``: the model's padded cache) the rope-key loads are asynchronous and fewer pipeline stages /
    smaller tiles win; unaligned rows are loaded synchronously.

    One branch (FlashInfer's 512 + 64 shape, 16-128 heads; swept on an H200, Triton 3.6,
    ``benchmarks/results/decode_kernel_h200.md``): 64-token tiles, 4 warps up to 16K accumulator elements per program
    and 8 warps above (64 heads per program). If a configuration does not fit, the launcher retries it with fewer
    stages / a smaller tile.
    """
    block_l = max(16, _pow2(lat))
    if elem_size >= 4:
        return 16, (4 if m * block_l <= 256 else 8), 2
    if m == 1:
        return 64, (4 if block_h * block_l <= 16384 else 8), 2
    if m * block_l <= 512:
        return (32, 4, 2) if aligned or has_mask else (32, 4, 3)
    return (32, 8, 3) if aligned else (64, 8, 2)


# The combine's tile: (splits read at once) x (2 branch rows) x (latent columns per program) <= COMBINE_TILE_ELEMENTS.
COMBINE_TILE_ELEMENTS = 4096
COMBINE_BLOCK_L = 64  # latent columns per program when the (B, H) rows alone would leave SMs idle
COMBINE_CHUNK_S = COMBINE_TILE_ELEMENTS // (2 * COMBINE_BLOCK_L)  # splits per iteration with 64-column blocks


def choose_combine_tile(rows: int, latent: int, num_splits: int, sm_count: int) -> tuple[int, int]:
    """``(splits per iteration, latent columns per program)`` of the combine for ``rows`` = B * H merged rows.

    When the rows fill two waves of the SMs, a program merges whole rows (one column block: the maxima over the
    splits are not re-read per block). Otherwise the rows are cut into ``COMBINE_BLOCK_L``-column blocks so that
    batch 1 still spreads over the SMs. Why (64-column blocks at every batch: fast at batch 1, slow at batch 16-64):
    ``benchmarks/results/decode_kernel_h200_combine.md``; this choice itself is not timed yet."""
    full = max(16, _pow2(latent))
    block_l = full if rows >= 2 * sm_count else min(COMBINE_BLOCK_L, full)
    return max(2, min(_pow2(num_splits), COMBINE_TILE_ELEMENTS // (2 * block_l))), block_l


# Accumulator elements (query rows x latent columns) one program holds at most; more heads are split across programs.
MAX_ACCUMULATOR_ELEMENTS = 32768


def choose_block_h(num_heads: int, num_branches: int, block_l: int) -> int:
    """Query heads per program: all of them while the fp32 accumulator (``M * BLOCK_H`` rows x ``BLOCK_L``) stays
    within ``MAX_ACCUMULATOR_ELEMENTS``, else the largest power of two that fits (at least 16 rows, the smallest
    tensor-core tile). Programs of one chunk with different head blocks read the same latent tiles, mostly from L2."""
    fits = max(1, MAX_ACCUMULATOR_ELEMENTS // (num_branches * block_l))
    return max(_pow2(-(-16 // num_branches)), min(_pow2(num_heads), 1 << (fits.bit_length() - 1)))


# (cache dtype, L, M, N*R, has_mask, side alignment, BLOCK_T, num_warps, num_stages, BLOCK_H) -> (BLOCK_T, stages)
_CONFIG_THAT_FITS: dict[tuple, tuple[int, int]] = {}
_NO_FIT: set[tuple] = set()  # configurations that fit at no tile size: served by the torch reference
FLAG_BLOCK = 256  # modality flags read per step of the per-branch kernel's prologue


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
    latent_format: str | None = None,
    *,
    block_t: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    block_h: int | None = None,
    by_branch: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Absorbed MLA decode with the Triton split-K kernel: the arguments, shapes and returns of
    :func:`~hf_mla_vlm.kernels.reference.mla_decode_reference` (its table is the one contract), plus ``num_splits``
    (the split-K factor; None = from B, T and the SM count). The cache views must be contiguous in their last dim
    (``LatentCacheLayout.views`` of the padded rows: strided, no copy); a quantized ``latent_format`` is read and
    dequantized inside the kernel, never as a dequantized copy.

    The (small) query tensors are made contiguous; the cache views are read in place. ``block_t``, ``num_warps``,
    ``num_stages`` and ``block_h`` (query heads per program, a power of two) override the tile configuration (for
    tuning). ``by_branch`` (two branches only; not yet timed on a GPU, so off by default): stage 1 runs each
    branch's queries over that branch's range of the chunk (``_mla_decode_stage1_by_branch``) instead of both
    branches' queries over every tile, with the one-branch tile configuration.

    Raises:
        ValueError: bad shapes/dtypes/devices, a CPU tensor without ``TRITON_INTERPRET=1``, a cache view whose last
            dim is not contiguous, or a bad ``num_splits``/tile override.
    """
    b, h, n, r, lat, t, m = validate_decode_inputs(
        q_rope, q_latent, q_bias, latent, side, key_mask, num_kv_heads, latent_format
    )
    device = latent.device
    if device.type != "cuda" and not _INTERPRETING:
        raise ValueError(
            f"mla_decode_triton needs CUDA tensors (got {device}); use mla_decode_reference on CPU, or set "
            "TRITON_INTERPRET=1 before importing triton to run the kernel in the Triton interpreter"
        )
    if side.dtype not in _SUPPORTED_DTYPES or q_latent.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"cache and queries must be float16, bfloat16 or float32, got {side.dtype}/{q_latent.dtype}")
    if latent.stride(-1) != 1 or side.stride(-1) != 1:
        raise ValueError(
            "latent and side must be contiguous in their last dim (pass LatentCacheLayout.views of the cache), got "
            f"strides {latent.stride()} and {side.stride()}"
        )
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite float (1/sqrt(head_dim)), got {scale!r}")

    nr = n * r
    side_align = _row_alignment(side)
    block_l = max(16, _pow2(lat))
    by_branch = bool(by_branch) and m == 2
    rows = 1 if by_branch else m  # query rows per head in a program
    block_h = choose_block_h(h, rows, block_l) if block_h is None else block_h
    if not isinstance(block_h, int) or block_h < 1 or block_h & (block_h - 1) or rows * block_h < 16:
        raise ValueError(
            f"block_h must be a power of two with {'' if rows == 1 else f'{rows} * '}block_h >= 16, got {block_h!r}"
        )
    block_h = min(block_h, max(16 // rows, _pow2(h)))
    head_blocks = _cdiv(h, block_h)
    has_mask = key_mask is not None
    cfg_t, cfg_w, cfg_s = _default_config(lat, rows, side.element_size(), has_mask, side_align > 1, block_h)
    tile_given = block_t is not None or num_stages is not None
    block_t = cfg_t if block_t is None else block_t
    num_warps = cfg_w if num_warps is None else num_warps
    num_stages = cfg_s if num_stages is None else num_stages
    if not isinstance(block_t, int) or block_t < 16 or block_t & (block_t - 1):
        raise ValueError(f"block_t must be a power of two >= 16, got {block_t!r}")
    if num_warps not in (1, 2, 4, 8, 16) or not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_warps must be 1/2/4/8/16 and num_stages >= 1, got {num_warps!r}/{num_stages!r}")

    sms = _sm_count(device)
    if num_splits is None:
        num_splits = choose_num_splits(b * head_blocks, t, sms, block_t, programs_per_sm=2 if num_warps <= 4 else 1)
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")
    # chunk = whole tiles; drop splits that would start past the end (their count depends only on T)
    tokens_per_split = _cdiv(_cdiv(t, num_splits), block_t) * block_t
    num_splits = _cdiv(t, tokens_per_split)
    single = num_splits == 1 and not by_branch  # the per-branch stage 1 always leaves the merge to the combine

    q_rope = q_rope.contiguous()
    if q_latent.stride(3) != 1 or q_latent.stride(2) != lat:  # (B, H) strides are free, (M, L) must be packed
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
        stat = torch.empty(b, num_splits, h, m, device=device, dtype=f32)
    if q_bias is not None and q_bias.stride(2) != 1:
        q_bias = q_bias.contiguous()
    bias_arg = q_bias if q_bias is not None else q_latent
    if key_mask is not None:
        mask_arg = key_mask.view(torch.uint8)  # same strides as the caller's view: no recompile when T changes
        mask_strides = key_mask.stride()
    else:
        mask_arg = latent
        mask_strides = (0, 0)
    upcast = _INTERPRETING and side.dtype == torch.bfloat16
    precision = "ieee" if side.dtype == torch.float32 or upcast else "tf32"
    if latent_format is None:
        quant, group, num_groups, scale_off, block_g = 0, 1, 1, 0, 0
        latent_arg, scale_arg, scale_strides = latent, latent, (0, 0)
    else:
        fmt = parse_latent_format(latent_format, lat)
        quant, group, num_groups = _QUANT_CODES[fmt.dtype], fmt.group_size, fmt.num_groups
        scale_off = fmt.scale_offset // 2  # in fp16 elements
        block_g = block_l // group if group & (group - 1) == 0 else 0
        # two views of the same rows: the values (int8 / fp8 / packed uint8) and the fp16 scales and zero points
        latent_arg = latent.view({"int8": torch.int8, "fp8": torch.float8_e4m3fn, "int4": torch.uint8}[fmt.dtype])
        scale_arg = latent.view(torch.float16)
        scale_strides = (scale_arg.stride(0), scale_arg.stride(1))

    fit_key = (side.dtype, lat, m, nr, has_mask, side_align, block_t, num_warps, num_stages, block_h, latent_format,
               by_branch)  # fmt: skip
    if fit_key in _NO_FIT:
        return mla_decode_reference(q_rope, q_latent, q_bias, latent, side, key_mask, scale, n, latent_format)
    tile_t, stages = _CONFIG_THAT_FITS.get(fit_key, (block_t, num_stages))
    switch = device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device()
    with torch.cuda.device(device) if switch else contextlib.nullcontext():
        while True:
            try:
                args = (q_rope, q_latent, bias_arg, latent_arg, scale_arg, side, mask_arg, acc, psum, stat, t,
                        tokens_per_split, float(scale) * _LOG2E, q_latent.stride(0), q_latent.stride(1),
                        bias_arg.stride(0), bias_arg.stride(1), latent.stride(0), latent.stride(1), *scale_strides,
                        side.stride(0), side.stride(1), *mask_strides)  # fmt: skip
                constants = dict(
                    H=h,
                    G=h // n,
                    R=r,
                    NR=nr,
                    L=lat,
                    M=m,
                    BLOCK_H=block_h,
                    BLOCK_T=tile_t,
                    BLOCK_NR=max(16, _pow2(nr)),
                    BLOCK_L=block_l,
                    HAS_MASK=has_mask,
                    HAS_BIAS=q_bias is not None,
                    DOT_PRECISION=precision,
                    UPCAST_DOTS=upcast,
                    STATIC_CHUNK=tokens_per_split if _INTERPRETING else 0,
                    SIDE_ALIGN=side_align,
                    QUANT=quant,
                    GROUP=group,
                    NUM_GROUPS=num_groups,
                    SCALE_OFF=scale_off,
                    BLOCK_G=block_g,
                    num_warps=num_warps,
                    num_stages=stages,
                )
                if by_branch:
                    _mla_decode_stage1_by_branch[(head_blocks, b, num_splits)](*args, **constants,
                                                                               FLAG_BLOCK=FLAG_BLOCK)  # fmt: skip
                else:
                    _mla_decode_stage1[(head_blocks, b, num_splits)](*args, **constants, SINGLE_SPLIT=single)
                break
            except OutOfResources:  # raised on the host before launching: retry with fewer stages / a smaller tile
                if tile_given:
                    raise
                if stages <= 1 and tile_t <= 16:  # e.g. float32 caches with M * L > 512: no tile fits in smem
                    _NO_FIT.add(fit_key)
                    warnings.warn(
                        f"the Triton MLA decode kernel does not fit in shared memory for a {side.dtype} cache with "
                        f"M={m}, L={lat}; using the torch reference for these shapes",
                        stacklevel=2,
                    )
                    return mla_decode_reference(
                        q_rope, q_latent, q_bias, latent, side, key_mask, scale, n, latent_format
                    )
                if stages > 1:
                    stages -= 1
                else:
                    tile_t //= 2  # tokens_per_split stays a multiple of the tile
        _CONFIG_THAT_FITS[fit_key] = (tile_t, stages)
        if not single:
            chunk_s, combine_l = choose_combine_tile(b * h, lat, num_splits, sms)
            _mla_decode_combine[(b, h, _cdiv(lat, combine_l))](
                acc,
                psum,
                stat,
                ctx,
                p_sum,
                lse,
                num_splits,
                H=h,
                L=lat,
                M=m,
                CHUNK_S=chunk_s,
                BLOCK_L=combine_l,
                BLOCK_M=2,
                STATIC_S=num_splits if _INTERPRETING else 0,
                num_warps=4,
            )
    return ctx, p_sum, lse
