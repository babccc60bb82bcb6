import json

import pytest
import torch
from safetensors.torch import save_file

from hf_mla_vlm.conversion_scripts.rope_selection import (
    aggregate_gqa,
    count_pairs_per_axis,
    enforce_axis_minimum,
    load_rank_file,
    mkl_pair_sensitivity,
    mrope_axis_of_pair,
    pair_norms,
    ranks_to_pairs,
    save_rank_file,
    scores_to_ranks,
    select_fixed_pairs,
    two_norm_scores,
)


def random_official_ranks(num_layers: int, num_kv_heads: int, head_dim: int, seed: int = 0) -> torch.Tensor:
    """Synthetic rank tensor in the official format: random permutations of the pairs, duplicated."""
    generator = torch.Generator().manual_seed(seed)
    num_pairs = head_dim // 2
    compact = torch.stack(
        [torch.randperm(num_pairs, generator=generator) for _ in range(num_layers * num_kv_heads)]
    ).view(num_layers, num_kv_heads, num_pairs)
    return torch.cat([compact, compact], dim=-1).to(torch.uint8)


# ---------------------------------------------------------------------------------------------------------------------
# Fixed strategies
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "strategy, expected",
    [
        ("high", list(range(16))),
        ("low", list(range(48, 64))),
        ("uniform", list(range(0, 64, 4))),
    ],
)
def test_fixed_strategies_head_dim_128_rope_dim_32(strategy, expected):
    pairs = select_fixed_pairs(strategy, head_dim=128, rope_dim=32, num_layers=3, num_kv_heads=2)
    assert len(pairs) == 3
    assert all(len(layer) == 2 for layer in pairs)
    for layer in pairs:
        for head in layer:
            assert head == expected


def test_fixed_uniform_small():
    assert select_fixed_pairs("uniform", head_dim=16, rope_dim=4, num_layers=1, num_kv_heads=1) == [[[0, 4]]]
    assert select_fixed_pairs("uniform", head_dim=16, rope_dim=16, num_layers=1, num_kv_heads=1) == [[list(range(8))]]


def test_fixed_heads_are_independent_lists():
    pairs = select_fixed_pairs("high", head_dim=16, rope_dim=4, num_layers=2, num_kv_heads=2)
    pairs[0][0].append(99)
    assert pairs[0][1] == [0, 1]
    assert pairs[1][0] == [0, 1]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"strategy": "uniform", "head_dim": 128, "rope_dim": 24}, "divisible"),
        ({"strategy": "high", "head_dim": 128, "rope_dim": 31}, "even"),
        ({"strategy": "high", "head_dim": 128, "rope_dim": 130}, "even integer in"),
        ({"strategy": "middle", "head_dim": 128, "rope_dim": 32}, "Unknown fixed"),
        ({"strategy": "low", "head_dim": 127, "rope_dim": 32}, "head_dim"),
    ],
)
def test_fixed_strategies_reject_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        select_fixed_pairs(**kwargs, num_layers=1, num_kv_heads=1)


# ---------------------------------------------------------------------------------------------------------------------
# Rank files
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rope_dim", [16, 32, 64])
def test_official_ranks_keep_exactly_rope_dim_dims(rope_dim):
    ranks = random_official_ranks(num_layers=4, num_kv_heads=3, head_dim=128, seed=rope_dim)
    pairs = ranks_to_pairs(ranks, rope_dim)
    assert len(pairs) == 4 and all(len(layer) == 3 for layer in pairs)
    for layer_idx, layer in enumerate(pairs):
        for head_idx, kept in enumerate(layer):
            assert len(kept) == rope_dim // 2
            assert kept == sorted(kept)
            # Dims mask built like the official code: rank < rope_dim / 2 over all 128 dims.
            dim_mask = ranks[layer_idx, head_idx] < rope_dim // 2
            assert int(dim_mask.sum()) == rope_dim
            kept_dims = sorted(kept + [j + 64 for j in kept])
            assert dim_mask.nonzero().flatten().tolist() == kept_dims


def test_ranks_to_pairs_keeps_lowest_ranks():
    compact = torch.tensor([[[3, 0, 2, 1]]])
    official = torch.cat([compact, compact], dim=-1).to(torch.uint8)
    assert ranks_to_pairs(official, 4) == [[[1, 3]]]
    assert ranks_to_pairs(compact, 4) == [[[1, 3]]]
    assert ranks_to_pairs(official, 2) == [[[1]]]
    assert ranks_to_pairs(official, 8, head_dim=8) == [[[0, 1, 2, 3]]]
    assert ranks_to_pairs(compact, 0) == [[[]]]


def test_ranks_compact_and_official_forms_agree():
    ranks = random_official_ranks(2, 2, 32, seed=1)
    assert ranks_to_pairs(ranks, 8) == ranks_to_pairs(ranks[..., :16].to(torch.int64), 8)
    assert ranks_to_pairs(ranks, 8, head_dim=32) == ranks_to_pairs(ranks[..., :16], 8, head_dim=32)


def test_non_symmetric_ranks_raise():
    ranks = random_official_ranks(2, 2, 16, seed=2)
    # Swap two entries in the second half only: each half stays a permutation, but pairs no longer share a rank.
    bad = ranks.clone()
    bad[1, 0, 8], bad[1, 0, 9] = ranks[1, 0, 9], ranks[1, 0, 8]
    with pytest.raises(ValueError, match="pair-symmetric"):
        ranks_to_pairs(bad, 4)


@pytest.mark.parametrize(
    "ranks, match",
    [
        (torch.tensor([[[0.0, 1.0, 0.0, 1.0]]]), "integer dtype"),
        (torch.tensor([[[0, 0, 0, 0]]]), "not a permutation"),
        (torch.tensor([[[0, 2, 1, 3, 5]]]), "not a permutation"),
        (torch.tensor([[0, 1, 0, 1]]), "shape"),
    ],
)
def test_invalid_ranks_raise(ranks, match):
    with pytest.raises(ValueError, match=match):
        ranks_to_pairs(ranks, 2)


def test_ranks_head_dim_mismatch_and_rope_dim_too_large_raise():
    ranks = random_official_ranks(1, 1, 16)
    with pytest.raises(ValueError, match="matches neither"):
        ranks_to_pairs(ranks, 4, head_dim=64)
    with pytest.raises(ValueError, match="rope_dim"):
        ranks_to_pairs(ranks, 18)
    # A permutation of 0..15 is not a valid official row for head_dim=16.
    compact16 = torch.randperm(16, generator=torch.Generator().manual_seed(0)).view(1, 1, 16)
    with pytest.raises(ValueError, match="values in"):
        ranks_to_pairs(compact16, 4, head_dim=16)


def test_scores_to_ranks_round_trip_selects_top_scores():
    generator = torch.Generator().manual_seed(3)
    scores = torch.randn(3, 2, 32, generator=generator, dtype=torch.float64)
    ranks = scores_to_ranks(scores)
    assert ranks.dtype == torch.uint8
    assert ranks.shape == (3, 2, 64)
    torch.testing.assert_close(ranks[..., :32], ranks[..., 32:])
    for rope_dim in (2, 16, 40):
        pairs = ranks_to_pairs(ranks, rope_dim)
        top = scores.topk(rope_dim // 2, dim=-1).indices.sort(dim=-1).values
        assert pairs == top.tolist()
    # Rank 0 is the argmax.
    torch.testing.assert_close(ranks[..., :32].argmin(dim=-1), scores.argmax(dim=-1))


def test_scores_to_ranks_ties_prefer_lower_index():
    scores = torch.tensor([[[1.0, 2.0, 2.0, 0.5, 2.0]]])
    ranks = scores_to_ranks(scores)
    assert ranks[0, 0, :5].tolist() == [3, 0, 1, 4, 2]


def test_scores_to_ranks_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        scores_to_ranks(torch.tensor([[[1.0, float("nan")]]]))


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".safetensors", ".json"])
@pytest.mark.parametrize("metadata", [None, {"strategy": "mkl", "model": "tiny"}])
def test_rank_file_round_trip(tmp_path, suffix, metadata):
    ranks = random_official_ranks(3, 2, 32, seed=4)
    path = tmp_path / f"ranks{suffix}"
    save_rank_file(ranks, path, metadata=metadata)
    loaded = load_rank_file(str(path))
    assert loaded.dtype == torch.uint8
    torch.testing.assert_close(loaded, ranks, rtol=0, atol=0)
    assert ranks_to_pairs(loaded, 8) == ranks_to_pairs(ranks, 8)


def test_official_pth_is_a_bare_tensor_loadable_with_weights_only(tmp_path):
    ranks = random_official_ranks(2, 2, 16, seed=5)
    path = tmp_path / "official-ranks.pth"
    save_rank_file(ranks, path)
    raw = torch.load(path, weights_only=True)
    assert isinstance(raw, torch.Tensor)
    torch.testing.assert_close(raw, ranks, rtol=0, atol=0)


def test_pth_dict_with_single_tensor_is_accepted(tmp_path):
    ranks = random_official_ranks(2, 2, 16, seed=6)
    path = tmp_path / "dict.pth"
    torch.save({"layer_ranks": ranks, "note": "x"}, path)
    torch.testing.assert_close(load_rank_file(path), ranks, rtol=0, atol=0)
    torch.save({"a": ranks, "b": ranks}, path)
    with pytest.raises(ValueError, match="2 tensors"):
        load_rank_file(path)


def test_pth_with_pickled_object_is_refused(tmp_path):
    path = tmp_path / "unsafe.pth"
    torch.save({"ranks": random_official_ranks(1, 1, 8), "obj": object()}, path)
    with pytest.raises(ValueError, match="weights_only"):
        load_rank_file(path)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".json"])
def test_corrupt_rank_file_raises_clear_error(tmp_path, suffix):
    path = tmp_path / f"corrupt{suffix}"
    path.write_bytes(b"\x00\x01garbage\xff" * 7)
    with pytest.raises(ValueError, match="Could not (read|parse) rank file"):
        load_rank_file(path)


def test_rank_file_errors(tmp_path):
    with pytest.raises(ValueError, match="Unknown rank file suffix"):
        load_rank_file(tmp_path / "ranks.npy")
    with pytest.raises(FileNotFoundError):
        load_rank_file(tmp_path / "missing.pth")

    path = tmp_path / "other.safetensors"
    save_file({"weights": random_official_ranks(1, 1, 8)}, path)
    with pytest.raises(ValueError, match="no 'ranks' tensor"):
        load_rank_file(path)

    path = tmp_path / "other.json"
    path.write_text(json.dumps({"rank": [[[0, 0]]]}))
    with pytest.raises(ValueError, match="'ranks' entry"):
        load_rank_file(path)

    path = tmp_path / "bad-content.json"
    path.write_text(json.dumps({"ranks": [[[0, 1, 1, 0]]]}))
    with pytest.raises(ValueError, match="pair-symmetric"):
        load_rank_file(path)

    path = tmp_path / "ragged.json"
    path.write_text(json.dumps({"ranks": [[[0, 0], [1]]]}))
    with pytest.raises(ValueError, match="rectangular"):
        load_rank_file(path)

    with pytest.raises(ValueError, match="not a permutation"):
        save_rank_file(torch.zeros(1, 1, 4, dtype=torch.uint8), tmp_path / "zeros.pth")


# ---------------------------------------------------------------------------------------------------------------------
# S_2-norm
# ---------------------------------------------------------------------------------------------------------------------


def test_pair_norms_matches_rotate_half_pairing():
    generator = torch.Generator().manual_seed(7)
    num_heads, head_dim = 3, 8
    x = torch.randn(2, 5, num_heads * head_dim, generator=generator)
    norms = pair_norms(x, num_heads, head_dim)
    assert norms.shape == (2, 5, num_heads, head_dim // 2)
    heads = x.view(2, 5, num_heads, head_dim)
    for j in range(head_dim // 2):
        expected = torch.sqrt(heads[..., j] ** 2 + heads[..., j + head_dim // 2] ** 2)
        torch.testing.assert_close(norms[..., j], expected)
    with pytest.raises(ValueError, match="num_heads"):
        pair_norms(x, 4, head_dim)


def test_two_norm_scores_gqa_sum():
    generator = torch.Generator().manual_seed(8)
    num_layers, num_q_heads, num_kv_heads, num_pairs = 2, 6, 2, 4
    q_norm = torch.rand(num_layers, num_q_heads, num_pairs, generator=generator)
    k_norm = torch.rand(num_layers, num_kv_heads, num_pairs, generator=generator)
    scores = two_norm_scores(q_norm, k_norm, num_kv_heads)
    assert scores.shape == (num_layers, num_kv_heads, num_pairs)
    group = num_q_heads // num_kv_heads
    for layer in range(num_layers):
        for kv_head in range(num_kv_heads):
            expected = sum(
                q_norm[layer, i].double() * k_norm[layer, kv_head].double()
                for i in range(kv_head * group, (kv_head + 1) * group)
            )
            torch.testing.assert_close(scores[layer, kv_head], expected)


def test_two_norm_scores_mha_is_a_product_and_rejects_bad_groups():
    q_norm = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    k_norm = torch.tensor([[[10.0, 1.0], [1.0, 10.0]]])
    torch.testing.assert_close(two_norm_scores(q_norm, k_norm, 2), torch.tensor([[[10.0, 2.0], [3.0, 40.0]]]).double())
    with pytest.raises(ValueError, match="multiple"):
        two_norm_scores(torch.rand(1, 3, 2), torch.rand(1, 2, 2), 2)
    with pytest.raises(ValueError, match="k_pair_norm_mean"):
        two_norm_scores(torch.rand(1, 4, 2), torch.rand(1, 2, 3), 2)


def test_aggregate_gqa_groups_consecutive_heads():
    per_q_head = torch.arange(2 * 6 * 3, dtype=torch.float64).view(2, 6, 3)
    aggregated = aggregate_gqa(per_q_head, 3)
    expected = per_q_head.view(2, 3, 2, 3).sum(dim=2)
    torch.testing.assert_close(aggregated, expected)
    torch.testing.assert_close(aggregated[0, 1], per_q_head[0, 2] + per_q_head[0, 3])


# ---------------------------------------------------------------------------------------------------------------------
# S_MKL
# ---------------------------------------------------------------------------------------------------------------------


def brute_force_mkl(q, k, scale, visible, rows):
    """Explicit softmax of S and of S - C_j, KL summed, for every q head, pair and selected row."""
    num_q_heads, _, head_dim = q.shape
    group = num_q_heads // k.shape[0]
    num_pairs = head_dim // 2
    out = torch.zeros(num_q_heads, num_pairs, dtype=torch.float64)
    for head in range(num_q_heads):
        qh, kh = q[head], k[head // group]
        logits = (scale * qh @ kh.T).masked_fill(~visible, float("-inf"))
        for j in range(num_pairs):
            keep = torch.ones(head_dim, dtype=torch.bool)
            keep[[j, j + num_pairs]] = False
            logits_masked = (scale * (qh * keep) @ (kh * keep).T).masked_fill(~visible, float("-inf"))
            total = 0.0
            for t in rows:
                p = torch.softmax(logits[t], dim=-1)
                p_masked = torch.softmax(logits_masked[t], dim=-1)
                support = p > 0
                total += float((p[support] * (p[support].log() - p_masked[support].log())).sum())
            out[head, j] = total / len(rows)
    return out


@pytest.mark.parametrize(
    "num_q_heads, num_kv_heads, causal, padding, subsample",
    [
        (2, 2, True, False, False),
        (4, 2, True, False, False),
        (4, 2, False, False, False),
        (4, 2, True, True, False),
        (4, 2, True, True, True),
        (4, 1, False, True, True),
    ],
)
def test_mkl_closed_form_matches_brute_force(num_q_heads, num_kv_heads, causal, padding, subsample):
    generator = torch.Generator().manual_seed(9)
    seq_len, head_dim = 7, 8
    # Large-ish logits so that the attention is far from uniform and pairs matter differently.
    q = 2.0 * torch.randn(num_q_heads, seq_len, head_dim, generator=generator, dtype=torch.float64)
    k = 2.0 * torch.randn(num_kv_heads, seq_len, head_dim, generator=generator, dtype=torch.float64)
    scale = head_dim**-0.5

    key_padding_mask = None
    visible = torch.ones(seq_len, seq_len, dtype=torch.bool)
    if causal:
        visible = visible.tril()
    valid_rows = list(range(seq_len))
    if padding:
        # Left padding (positions 0-1) plus one padded position in the middle.
        key_padding_mask = torch.tensor([False, False, True, True, False, True, True])
        visible = visible & key_padding_mask[None, :]
        valid_rows = [t for t in range(seq_len) if key_padding_mask[t]]
    query_index = None
    rows = valid_rows
    if subsample:
        rows = valid_rows[1::2]
        query_index = torch.tensor(rows)

    closed = mkl_pair_sensitivity(
        q, k, scale, causal=causal, key_padding_mask=key_padding_mask, query_index=query_index
    )
    expected = brute_force_mkl(q, k, scale, visible, rows)
    assert closed.dtype == torch.float64
    assert closed.shape == (num_q_heads, head_dim // 2)
    assert float(expected.max()) > 1e-3  # non-trivial KL values
    torch.testing.assert_close(closed, expected, rtol=1e-10, atol=1e-10)


def test_mkl_chunked_matches_unchunked(monkeypatch):
    import hf_mla_vlm.conversion_scripts.rope_selection as rope_selection

    generator = torch.Generator().manual_seed(10)
    q = torch.randn(4, 33, 16, generator=generator)
    k = torch.randn(2, 33, 16, generator=generator)
    reference = mkl_pair_sensitivity(q, k, 0.25)
    # Force one row and one pair per block, in both the blocked path and the reference.
    monkeypatch.setattr(rope_selection, "_MKL_MAX_CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(rope_selection, "_MKL_BLOCK_ELEMENTS", 1)
    chunked = mkl_pair_sensitivity(q, k, 0.25)
    torch.testing.assert_close(chunked, reference, rtol=1e-12, atol=1e-14)


def _reference_mkl(q, k, scale, *, causal=True, key_padding_mask=None, query_index=None):
    """The float64 `E_P[C_j] + logsumexp(log P - C_j)` form (`_mkl_reference`) on the same inputs."""
    import hf_mla_vlm.conversion_scripts.rope_selection as rope_selection

    seq_len = q.shape[1]
    visible = torch.ones(seq_len, seq_len, dtype=torch.bool)
    if causal:
        visible = visible.tril()
    valid = torch.ones(seq_len, dtype=torch.bool) if key_padding_mask is None else key_padding_mask
    visible = visible & valid[None, :]
    rows = (valid & visible.any(-1)).nonzero().flatten() if query_index is None else query_index
    group = q.shape[0] // k.shape[0]
    return rope_selection._mkl_reference(q.double(), k.double(), scale, visible, rows, group) / rows.numel()


@pytest.mark.parametrize(
    "num_q_heads, num_kv_heads, seq_len, causal, padding, subsample, key_bias",
    [
        (9, 3, 117, True, False, True, 0.0),  # the zoo model's heads, one calibration sample
        (4, 1, 60, True, True, True, 0.0),
        (2, 2, 45, False, True, False, 0.0),
        (6, 2, 80, True, False, False, 20.0),  # keys with a large common bias (centred away)
        (4, 2, 300, True, False, True, 0.0),  # several row blocks with growing key ranges
    ],
)
def test_mkl_blocks_match_the_logsumexp_reference(
    num_q_heads, num_kv_heads, seq_len, causal, padding, subsample, key_bias
):
    """The blocked float64 form equals the reference up to float64 rounding. Both are float64; they differ only in
    where `E_P[C_j]` is added (inside the exponent or after a logsumexp) and in the key centring, so the per-(head,
    pair) means agree to ~1e-12 relative (the reference's own cancellation `E_P[C] + LSE(log P - C)` costs about
    1e-16 * |logits| absolute; rtol 1e-9 / atol 1e-12 leave a wide margin and still catch any real mistake, whose
    error would be of the size of the KL itself)."""
    generator = torch.Generator().manual_seed(seq_len)
    head_dim = 16
    q = 1.5 * torch.randn(num_q_heads, seq_len, head_dim, generator=generator)
    k = 1.5 * torch.randn(num_kv_heads, seq_len, head_dim, generator=generator) + key_bias
    q[:, :, 3] *= 6.0  # one dominant pair, as massive q/k channels give
    k[:, :, 3 + head_dim // 2] *= 6.0
    q[:, :, [5, 5 + head_dim // 2]] *= 1e-3  # and one nearly idle pair (KL ~1e-8)
    mask = None
    if padding:
        mask = torch.rand(seq_len, generator=generator) > 0.2
        mask[:2] = False  # left padding
    valid = (torch.ones(seq_len, dtype=torch.bool) if mask is None else mask).nonzero().flatten()
    index = valid[torch.randperm(valid.numel(), generator=generator)[: valid.numel() // 2]] if subsample else None
    kwargs = dict(causal=causal, key_padding_mask=mask, query_index=index)
    blocked = mkl_pair_sensitivity(q, k, head_dim**-0.5, **kwargs)
    reference = _reference_mkl(q, k, head_dim**-0.5, **kwargs)
    assert float(reference.min()) < 1e-3 < float(reference.max())  # tiny and large KLs both present
    torch.testing.assert_close(blocked, reference, rtol=1e-9, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("block_elements", [None, 2**12])  # the device's blocks, and many small ones
def test_mkl_on_cuda_equals_the_host_blocks(monkeypatch, block_elements):
    """On CUDA the float64 blocks are `_MKL_DEVICE_BLOCK_ELEMENTS` terms; the result equals the CPU blocks' (an
    anyres-length sample with padding and a subsample of query rows) up to float64 rounding."""
    import hf_mla_vlm.conversion_scripts.rope_selection as rope_selection

    if block_elements is not None:
        monkeypatch.setattr(rope_selection, "_MKL_DEVICE_BLOCK_ELEMENTS", block_elements)
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(8, 2900, 64, generator=generator)
    k = torch.randn(2, 2900, 64, generator=generator)
    mask = torch.rand(2900, generator=generator) > 0.1
    index = mask.nonzero().flatten()[::23]
    kwargs = dict(key_padding_mask=mask, query_index=index)
    host = mkl_pair_sensitivity(q, k, 0.125, **kwargs)
    device = mkl_pair_sensitivity(q.cuda(), k.cuda(), 0.125, **{n: v.cuda() for n, v in kwargs.items()})
    assert device.device.type == "cuda"
    torch.testing.assert_close(device.cpu(), host, rtol=1e-9, atol=1e-12)


def test_mkl_falls_back_to_the_reference_when_a_term_overflows(monkeypatch):
    import hf_mla_vlm.conversion_scripts.rope_selection as rope_selection

    generator = torch.Generator().manual_seed(15)
    q = torch.randn(2, 20, 8, generator=generator, dtype=torch.float64)
    k = torch.randn(1, 20, 8, generator=generator, dtype=torch.float64)
    # Logits spread over thousands: dropping a pair moves the attention to keys whose term exp(log P + E_P[C] - C)
    # overflows float64, which the reference's max-shifted logsumexp handles.
    q, k = 100.0 * q, 100.0 * k
    reference = _reference_mkl(q, k, 0.25)
    calls, original = [], rope_selection._mkl_reference
    monkeypatch.setattr(rope_selection, "_mkl_reference", lambda *args: calls.append(1) or original(*args))
    kl = mkl_pair_sensitivity(q, k, 0.25)
    assert calls and torch.isfinite(kl).all()
    torch.testing.assert_close(kl, reference, rtol=0, atol=0)


def test_mkl_identifies_the_only_informative_pair():
    generator = torch.Generator().manual_seed(11)
    seq_len, head_dim = 12, 8
    q = torch.zeros(1, seq_len, head_dim, dtype=torch.float64)
    k = torch.zeros(1, seq_len, head_dim, dtype=torch.float64)
    # Only pair 2 (dims 2 and 6) carries signal; other pairs give exactly zero logits.
    q[..., [2, 6]] = 3.0 * torch.randn(1, seq_len, 2, generator=generator, dtype=torch.float64)
    k[..., [2, 6]] = 3.0 * torch.randn(1, seq_len, 2, generator=generator, dtype=torch.float64)
    kl = mkl_pair_sensitivity(q, k, 1.0)
    assert float(kl[0, 2]) > 1e-2
    torch.testing.assert_close(kl[0, [0, 1, 3]], torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-14)


def test_mkl_rejects_bad_input():
    q = torch.randn(4, 5, 8)
    k = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="multiple"):
        mkl_pair_sensitivity(torch.randn(3, 5, 8), k, 1.0)
    with pytest.raises(ValueError, match="padding"):
        mkl_pair_sensitivity(
            q, k, 1.0, key_padding_mask=torch.tensor([False, True, True, True, True]), query_index=torch.tensor([0])
        )
    with pytest.raises(ValueError, match="No query rows"):
        mkl_pair_sensitivity(q, k, 1.0, key_padding_mask=torch.zeros(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask"):
        mkl_pair_sensitivity(q, k, 1.0, key_padding_mask=torch.ones(5))
    with pytest.raises(ValueError, match="NaN"):
        mkl_pair_sensitivity(q.clone().fill_(float("nan")), k, 1.0)


# ---------------------------------------------------------------------------------------------------------------------
# M-RoPE
# ---------------------------------------------------------------------------------------------------------------------

QWEN_SECTION = [16, 24, 24]


@pytest.mark.parametrize("pair, axis", [(0, "t"), (15, "t"), (16, "h"), (39, "h"), (40, "w"), (63, "w")])
def test_mrope_axis_of_pair(pair, axis):
    assert mrope_axis_of_pair(pair, QWEN_SECTION) == axis


def test_mrope_axis_of_pair_out_of_range():
    with pytest.raises(ValueError, match="outside"):
        mrope_axis_of_pair(64, QWEN_SECTION)
    with pytest.raises(ValueError, match="mrope_section"):
        mrope_axis_of_pair(0, [16, 48])


@pytest.mark.parametrize(
    "strategy, expected",
    [
        ("high", {"t": 16, "h": 0, "w": 0}),
        ("low", {"t": 0, "h": 0, "w": 16}),
        ("uniform", {"t": 4, "h": 6, "w": 6}),
    ],
)
def test_count_pairs_per_axis_fixed_strategies(strategy, expected):
    num_layers, num_kv_heads = 2, 4
    pairs = select_fixed_pairs(strategy, 128, 32, num_layers, num_kv_heads)
    counts = count_pairs_per_axis(pairs, QWEN_SECTION)
    assert counts == {axis: n * num_layers * num_kv_heads for axis, n in expected.items()}


def test_enforce_axis_minimum_without_minima_follows_scores():
    generator = torch.Generator().manual_seed(12)
    scores = torch.randn(2, 3, 64, generator=generator)
    pairs = enforce_axis_minimum(scores, 32, QWEN_SECTION, {})
    assert pairs == ranks_to_pairs(scores_to_ranks(scores), 32)


def test_enforce_axis_minimum_guarantees_quota():
    generator = torch.Generator().manual_seed(13)
    num_layers, num_kv_heads = 2, 3
    # Scores strongly favour the temporal axis (like the released Qwen ranks), with width pairs worst.
    scores = torch.rand(num_layers, num_kv_heads, 64, generator=generator)
    scores[..., :16] += 10.0
    scores[..., 40:] -= 10.0
    minima = {"h": 3, "w": 4}
    pairs = enforce_axis_minimum(scores, 32, QWEN_SECTION, minima)
    for layer in range(num_layers):
        for head in range(num_kv_heads):
            kept = pairs[layer][head]
            assert len(kept) == 16 and kept == sorted(kept)
            axes = [mrope_axis_of_pair(j, QWEN_SECTION) for j in kept]
            assert axes.count("w") == 4 and axes.count("h") == 3  # quotas hit exactly (scores favour t)
            s = scores[layer, head]
            # The w quota holds the 4 best width pairs, h the 3 best height pairs.
            assert [j for j in kept if j >= 40] == sorted((40 + s[40:].topk(4).indices).tolist())
            assert [j for j in kept if 16 <= j < 40] == sorted((16 + s[16:40].topk(3).indices).tolist())
            # The remaining 9 slots are the best 9 temporal pairs.
            assert [j for j in kept if j < 16] == sorted(s[:16].topk(9).indices.tolist())
    counts = count_pairs_per_axis(pairs, QWEN_SECTION)
    assert counts == {"t": 9 * 6, "h": 3 * 6, "w": 4 * 6}


def test_enforce_axis_minimum_does_not_cap_an_axis():
    scores = torch.zeros(1, 1, 64)
    scores[..., 40:48] = 5.0  # the 8 best pairs are width pairs
    # Two temporal pairs are forced in (ties -> lowest indices), the other 6 slots follow the scores.
    assert enforce_axis_minimum(scores, 16, QWEN_SECTION, {"t": 2}) == [[[0, 1, 40, 41, 42, 43, 44, 45]]]


@pytest.mark.parametrize(
    "rope_dim, minima, match",
    [
        (8, {"t": 2, "h": 2, "w": 1}, "sum to 5"),
        (32, {"t": 17}, r"\[0, 16\]"),
        (32, {"x": 1}, "Unknown M-RoPE axes"),
        (32, {"w": -1}, r"\[0, 24\]"),
    ],
)
def test_enforce_axis_minimum_rejects_bad_minima(rope_dim, minima, match):
    with pytest.raises(ValueError, match=match):
        enforce_axis_minimum(torch.zeros(1, 1, 64), rope_dim, QWEN_SECTION, minima)


def test_enforce_axis_minimum_section_must_cover_pairs():
    with pytest.raises(ValueError, match="covers 64 pairs"):
        enforce_axis_minimum(torch.zeros(1, 1, 32), 8, QWEN_SECTION, {})


def test_mkl_blocks_are_memory_bounded(monkeypatch):
    import hf_mla_vlm.conversion_scripts.rope_selection as rope_selection

    budget = 2**14
    monkeypatch.setattr(rope_selection, "_MKL_BLOCK_ELEMENTS", budget)
    largest = []
    original_baddbmm = torch.Tensor.baddbmm_

    def recording_baddbmm(terms, *args, **kwargs):  # the block's terms, updated in place
        largest.append(terms.numel())
        return original_baddbmm(terms, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "baddbmm_", recording_baddbmm)
    generator = torch.Generator().manual_seed(14)
    seq_len = 512
    q = torch.randn(2, seq_len, 16, generator=generator)
    k = torch.randn(1, seq_len, 16, generator=generator)
    kl = mkl_pair_sensitivity(q, k, 0.25)
    assert torch.isfinite(kl).all()
    # A full [pairs, heads, T, T] block would hold 8 * 2 * 512 * 512 = 4.2M elements.
    assert largest and max(largest) <= budget
