import pytest
import torch

from hf_mla_vlm.conversion_scripts.svd import (
    LowRankFactors,
    activation_aware_svd,
    activation_error,
    decoupled_vs_joint,
    weight_svd,
)


def make_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_activations(dim: int, num_tokens: int, seed: int, channel_scales: torch.Tensor | None = None):
    """`X` [d, N] with anisotropic channels (so that activation-aware and plain SVD differ)."""
    generator = make_generator(seed)
    mixing = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    x = mixing @ torch.randn(dim, num_tokens, generator=generator, dtype=torch.float64)
    if channel_scales is None:
        channel_scales = torch.logspace(-1, 1, dim, dtype=torch.float64)
    return channel_scales[:, None] * x


def product(factors: LowRankFactors) -> torch.Tensor:
    return factors.up.double() @ factors.down.double()


def residual(weight: torch.Tensor, approx: torch.Tensor, x: torch.Tensor) -> float:
    return float(((weight - approx) @ x).square().sum())


def eckart_young_optimum(weight: torch.Tensor, x: torch.Tensor, rank: int) -> float:
    """Independent optimum of `min_{rank W' <= r} ||W X - W' X||^2`: the tail energy of the singular values of W X."""
    return float(torch.linalg.svdvals(weight @ x)[rank:].square().sum())


# ---------------------------------------------------------------------------------------------------------------------
# weight_svd
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows, dim", [(24, 16), (12, 20)])
def test_weight_svd_exact_at_full_rank(rows, dim):
    weight = torch.randn(rows, dim, generator=make_generator(0), dtype=torch.float64)
    factors = weight_svd(weight, min(rows, dim))
    assert factors.down.dtype == factors.up.dtype == torch.float32
    assert factors.down.shape == (min(rows, dim), dim) and factors.up.shape == (rows, min(rows, dim))
    torch.testing.assert_close(product(factors), weight, rtol=0, atol=1e-5)
    assert factors.discarded == pytest.approx(0.0, abs=1e-20)


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_weight_svd_truncation_is_optimal_with_orthonormal_down(rank):
    weight = torch.randn(24, 16, generator=make_generator(1), dtype=torch.float64)
    factors = weight_svd(weight, rank)
    assert factors.rank == rank
    torch.testing.assert_close(
        factors.down.double() @ factors.down.double().T, torch.eye(rank, dtype=torch.float64), rtol=0, atol=1e-6
    )
    singular_values = torch.linalg.svdvals(weight)
    assert factors.discarded == pytest.approx(float(singular_values[rank:].square().sum()), rel=1e-12)
    assert float((weight - product(factors)).square().sum()) == pytest.approx(factors.discarded, rel=1e-5)


@pytest.mark.parametrize("rank", [17, 30])
def test_weight_svd_pads_with_zeros_above_available_rank(rank):
    weight = torch.randn(24, 16, generator=make_generator(2))
    factors = weight_svd(weight, rank)
    assert factors.down.shape == (rank, 16) and factors.up.shape == (24, rank)
    assert factors.rank == rank
    torch.testing.assert_close(factors.down[16:], torch.zeros(rank - 16, 16), rtol=0, atol=0)
    torch.testing.assert_close(factors.up[:, 16:], torch.zeros(24, rank - 16), rtol=0, atol=0)
    torch.testing.assert_close(factors.up @ factors.down, weight, rtol=0, atol=1e-5)


@pytest.mark.parametrize("rank", [0, -1, 2.0, True])
def test_weight_svd_rejects_bad_rank(rank):
    with pytest.raises(ValueError, match="rank"):
        weight_svd(torch.randn(4, 4), rank)


def test_weight_svd_rejects_non_finite_weight():
    weight = torch.randn(4, 4)
    weight[1, 2] = float("inf")
    with pytest.raises(ValueError, match="`weight` contains NaN or Inf"):
        weight_svd(weight, 2)


# ---------------------------------------------------------------------------------------------------------------------
# activation_aware_svd
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [1, 4, 9])
def test_activation_aware_svd_attains_the_optimum(rank):
    rows, dim, num_tokens = 20, 16, 64
    weight = torch.randn(rows, dim, generator=make_generator(3), dtype=torch.float64)
    x = random_activations(dim, num_tokens, seed=4)
    factors = activation_aware_svd(weight, x @ x.T, rank, damping=1e-14)
    assert factors.down.shape == (rank, dim) and factors.up.shape == (rows, rank)
    optimum = eckart_young_optimum(weight, x, rank)
    # `discarded` is the optimum, and the returned (float32) factors achieve it.
    assert factors.discarded == pytest.approx(optimum, rel=1e-9)
    assert residual(weight, product(factors), x) == pytest.approx(optimum, rel=1e-5)


@pytest.mark.parametrize("seed", [5, 6])
def test_competitors_never_beat_activation_aware_svd(seed):
    rows, dim, num_tokens, rank = 20, 16, 64, 5
    generator = make_generator(seed)
    weight = torch.randn(rows, dim, generator=generator, dtype=torch.float64)
    x = random_activations(dim, num_tokens, seed=seed + 100)
    factors = activation_aware_svd(weight, x @ x.T, rank, damping=1e-14)
    optimum = factors.discarded

    # The plain weight SVD ignores the activations and is clearly worse on this anisotropic X.
    plain = residual(weight, product(weight_svd(weight, rank)), x)
    assert plain > 1.05 * optimum

    competitors = []
    for _ in range(50):  # random rank-r matrices
        competitors.append(
            torch.randn(rows, rank, generator=generator, dtype=torch.float64)
            @ torch.randn(rank, dim, generator=generator, dtype=torch.float64)
        )
    for scale in (1e-1, 1e-2, 1e-3):  # rank-r perturbations of the optimum
        for _ in range(20):
            up = factors.up.double() + scale * torch.randn(rows, rank, generator=generator, dtype=torch.float64)
            down = factors.down.double() + scale * torch.randn(rank, dim, generator=generator, dtype=torch.float64)
            competitors.append(up @ down)
    for approx in competitors:
        assert residual(weight, approx, x) >= optimum * (1 - 1e-9)


@pytest.mark.parametrize("rank", [5, 8, 20, 30])
def test_activation_aware_svd_exact_at_or_above_weight_rank(rank):
    rows, dim, weight_rank = 24, 16, 5
    generator = make_generator(7)
    weight = torch.randn(rows, weight_rank, generator=generator, dtype=torch.float64) @ torch.randn(
        weight_rank, dim, generator=generator, dtype=torch.float64
    )
    x = random_activations(dim, 48, seed=8)
    factors = activation_aware_svd(weight, x @ x.T, rank)
    assert factors.down.shape == (rank, dim) and factors.up.shape == (rows, rank)
    torch.testing.assert_close(product(factors) @ x, weight @ x, rtol=0, atol=1e-4 * float((weight @ x).abs().max()))
    assert factors.discarded == pytest.approx(0.0, abs=1e-8 * float((weight @ x).square().sum()))
    if rank > dim:
        assert not factors.down[dim:].any() and not factors.up[:, dim:].any()


@pytest.mark.parametrize("damping", [1e-8, 1e-4])
def test_discarded_is_the_damped_objective(damping):
    rows, dim, rank = 12, 10, 3
    weight = torch.randn(rows, dim, generator=make_generator(9), dtype=torch.float64)
    x = random_activations(dim, 40, seed=10)
    covariance = x @ x.T
    factors = activation_aware_svd(weight, covariance, rank, damping=damping)
    error = weight - product(factors)
    ridge = damping * float(torch.trace(covariance)) / dim
    # discarded = ||E X||^2 + lambda ||E||^2: the objective for C + lambda I.
    damped = residual(weight, product(factors), x) + ridge * float(error.square().sum())
    assert factors.discarded == pytest.approx(damped, rel=1e-5)
    # Damping makes the undamped loss slightly worse than the true optimum, never better.
    assert residual(weight, product(factors), x) >= eckart_young_optimum(weight, x, rank) * (1 - 1e-9)


def test_activation_aware_svd_is_invariant_to_covariance_scale():
    weight = torch.randn(12, 10, generator=make_generator(11), dtype=torch.float64)
    x = random_activations(10, 40, seed=12)
    reference = product(activation_aware_svd(weight, x @ x.T, 4))
    scaled = product(activation_aware_svd(weight, (x @ x.T) / 40.0 * 1e-3, 4))
    torch.testing.assert_close(scaled, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("massive_scale", [1e3, 1e4])
@pytest.mark.parametrize("damping", [0.0, 1e-8, 1e-6])
def test_activation_aware_svd_ill_conditioned_covariance(massive_scale, damping):
    """A few massive-activation channels and some dead channels: cond(C) is infinite."""
    rows, dim, num_tokens, rank = 24, 32, 400, 6
    generator = make_generator(13)
    weight = torch.randn(rows, dim, generator=generator, dtype=torch.float64)
    x = torch.randn(dim, num_tokens, generator=generator, dtype=torch.float64)
    x[:2] *= massive_scale
    x[-3:] = 0.0
    covariance = x @ x.T
    factors = activation_aware_svd(weight, covariance.float(), rank, damping=damping)
    assert torch.isfinite(factors.down).all() and torch.isfinite(factors.up).all()
    # Dead channels have no activations to fit: their weights must not blow up.
    assert float(factors.down.abs().max()) < 10.0
    optimum = eckart_young_optimum(weight, x, rank)
    # Measured: err / optimum <= 1.04 (scale 1e4, damping 1e-6), 1.0002 for damping <= 1e-8.
    assert residual(weight, product(factors), x) <= 1.05 * optimum
    rel = activation_error(weight, product(factors), covariance)
    assert rel <= 1.03 * (optimum / float((weight @ x).square().sum())) ** 0.5


def test_activation_aware_svd_input_errors():
    weight = torch.randn(6, 4)
    covariance = torch.eye(4)
    with pytest.raises(ValueError, match="no calibration tokens"):
        activation_aware_svd(weight, torch.zeros(4, 4), 2)
    bad = covariance.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="`covariance` contains NaN or Inf"):
        activation_aware_svd(weight, bad, 2)
    bad_weight = weight.clone()
    bad_weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="`weight` contains NaN or Inf"):
        activation_aware_svd(bad_weight, covariance, 2)
    with pytest.raises(ValueError, match=r"\[d, d\]"):
        activation_aware_svd(weight, torch.eye(5), 2)
    with pytest.raises(ValueError, match="damping"):
        activation_aware_svd(weight, covariance, 2, damping=-1.0)
    with pytest.raises(ValueError, match="rank"):
        activation_aware_svd(weight, covariance, 0)


# ---------------------------------------------------------------------------------------------------------------------
# activation_error
# ---------------------------------------------------------------------------------------------------------------------


def test_activation_error_matches_explicit_activations():
    generator = make_generator(14)
    weight = torch.randn(8, 6, generator=generator, dtype=torch.float64)
    approx = weight + 0.1 * torch.randn(8, 6, generator=generator, dtype=torch.float64)
    x = random_activations(6, 30, seed=15)
    expected = (torch.linalg.matrix_norm((weight - approx) @ x) / torch.linalg.matrix_norm(weight @ x)).item()
    assert activation_error(weight, approx, x @ x.T) == pytest.approx(expected, rel=1e-10)
    assert activation_error(weight, weight, x @ x.T) == 0.0
    with pytest.raises(ValueError, match="undefined"):
        activation_error(weight, approx, torch.zeros(6, 6))
    with pytest.raises(ValueError, match="shape"):
        activation_error(weight, approx[:4], x @ x.T)


# ---------------------------------------------------------------------------------------------------------------------
# decoupled_vs_joint
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [16, 17, 18])
@pytest.mark.parametrize("rank", [2, 5])
def test_decoupled_loss_is_at_most_joint_loss(seed, rank):
    rows, dim = 20, 16
    weight = torch.randn(rows, dim, generator=make_generator(seed), dtype=torch.float64)
    # The modalities live in different channels, with different token counts.
    x_text = random_activations(dim, 80, seed=seed + 1, channel_scales=torch.logspace(1, -1, dim, dtype=torch.float64))
    x_image = random_activations(
        dim, 50, seed=seed + 2, channel_scales=torch.logspace(-1, 1, dim, dtype=torch.float64)
    )
    result = decoupled_vs_joint(weight, x_text @ x_text.T, x_image @ x_image.T, rank, damping=1e-14)
    assert set(result) == {"loss_decoupled", "loss_joint", "ratio"}
    # Independent optima from the explicit activations.
    expected_decoupled = eckart_young_optimum(weight, x_text, rank) + eckart_young_optimum(weight, x_image, rank)
    expected_joint = eckart_young_optimum(weight, torch.cat([x_text, x_image], dim=1), rank)
    assert result["loss_decoupled"] == pytest.approx(expected_decoupled, rel=1e-8)
    assert result["loss_joint"] == pytest.approx(expected_joint, rel=1e-8)
    assert result["loss_decoupled"] <= result["loss_joint"]
    assert result["ratio"] == pytest.approx(result["loss_decoupled"] / result["loss_joint"])
    assert result["ratio"] < 0.99


def test_decoupled_equals_joint_for_identical_covariances():
    weight = torch.randn(20, 16, generator=make_generator(19), dtype=torch.float64)
    x = random_activations(16, 60, seed=20)
    covariance = x @ x.T
    result = decoupled_vs_joint(weight, covariance, covariance, 4)
    assert result["ratio"] == pytest.approx(1.0, abs=1e-9)
    assert result["loss_decoupled"] == pytest.approx(result["loss_joint"], rel=1e-9)


def test_decoupled_vs_joint_rejects_empty_modality():
    weight = torch.randn(6, 4)
    with pytest.raises(ValueError, match="no calibration tokens"):
        decoupled_vs_joint(weight, torch.eye(4), torch.zeros(4, 4), 2)


@pytest.mark.parametrize("given", [("text", "image"), ("joint",), ("text", "image", "joint")])
def test_decoupled_vs_joint_reuses_given_factorisations(given, monkeypatch):
    weight = torch.randn(20, 16, generator=make_generator(21), dtype=torch.float64)
    x_text, x_image = random_activations(16, 60, seed=22), random_activations(16, 40, seed=23)
    cov_text, cov_image = x_text @ x_text.T, x_image @ x_image.T
    fits = {"text": cov_text, "image": cov_image, "joint": cov_text + cov_image}
    factors = {key: activation_aware_svd(weight, fits[key], 4) for key in given}
    expected = decoupled_vs_joint(weight, cov_text, cov_image, 4)
    calls = []
    real_eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda a: calls.append(a) or real_eigh(a))
    result = decoupled_vs_joint(weight, cov_text, cov_image, 4, factors=factors)
    assert len(calls) == 3 - len(given)  # only the missing ones are computed
    for key in expected:
        assert result[key] == pytest.approx(expected[key], rel=1e-12)
