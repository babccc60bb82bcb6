"""Low-rank initialisation of the joint key/value down-projection (MHA2MLA / MHA2MLA-VLM MD-SVD).

Per layer, `W = [W_k_nope; W_v]` (`[rows, d]`) is replaced by `W_up @ W_down` with `W_down: [r, d]` and
`W_up: [rows, r]`:

| function | objective | use |
|---|---|---|
| [`weight_svd`] | `min ||W - W'||_F` | MHA2MLA "joint" init, ablation "w/o activation-aware SVD" |
| [`activation_aware_svd`] | `min ||W X - W' X||_F` from `C = X X^T` | MD-SVD, per modality (or joint) |
| [`decoupled_vs_joint`] | `L_dec = L_text + L_image` vs `L_joint` | diagnostics; `L_dec <= L_joint` always holds |

[`low_rank_factors`] is the entry point of conversion: it picks the factorisation of each modality branch for the
`--svd` choice (`SVD_METHODS`: `weight`, `joint-act`, `md`); [`reusable_factorisations`] hands the ones it computed to
the diagnostic, so that each factorisation runs once per layer.

Everything is computed in float64 on CPU; the returned factors are float32 and the caller casts them further.

Activation-aware closed form (SVD-LLM-V2 style, with the stability fixes of the method notes): symmetrise `C`, add
`lambda * I` with `lambda = damping * tr(C) / d`, eigendecompose `C = U diag(lam) U^T`, clamp `lam`, set
`D = W U diag(sqrt(lam))` with SVD `D = P Sigma Q^T` and keep the top `r`:

    W_up = P_r Sigma_r^(1/2),    W_down = Sigma_r^(1/2) Q_r^T diag(1 / sqrt(lam)) U^T.

The optimal objective is `sum_{i > r} sigma_i(D)^2`.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from transformers.utils import logging


logger = logging.get_logger(__name__)

# Eigenvalues of the (damped) covariance are clamped to at least `_EIGENVALUE_RTOL * d * lambda_max`, which is about
# the accuracy of a float64 symmetric eigendecomposition; it keeps `1 / sqrt(lam)` finite when `damping=0`.
_EIGENVALUE_RTOL = torch.finfo(torch.float64).eps

# The `--svd` choices (the CLI types the same names to stay import-free; tests/test_cli.py holds them equal).
SVD_METHODS = ("weight", "joint-act", "md")


@dataclass
class LowRankFactors:
    """Factors of a rank-`rank` approximation `W ~= up @ down`.

    Args:
        down (`torch.Tensor`):
            `[rank, d]` float32 down-projection (`W_dkv`).
        up (`torch.Tensor`):
            `[rows, rank]` float32 up-projection (`[W_uk; W_uv]`, split by rows by the caller).
        discarded (`float`):
            Optimal objective value: the sum of the discarded squared singular values of `W` (weight SVD) or of
            `W U diag(sqrt(lam))` (activation-aware SVD, w.r.t. the damped covariance).
        rank (`int`):
            Requested rank, equal to `down.shape[0]`. When it exceeds the rank available, the trailing rows of `down`
            and columns of `up` are zero.
        exact (`tuple`, *optional*):
            The float64 `(down, up)` the float32 factors were rounded from ([`activation_aware_svd`]), so that
            [`decoupled_vs_joint`] can reuse a factorisation without recomputing or re-rounding it.
    """

    down: torch.Tensor
    up: torch.Tensor
    discarded: float
    rank: int
    exact: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def float64(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(down, up)` in float64: the exact ones when kept, else the float32 factors widened."""
        return self.exact if self.exact is not None else (self.down.double(), self.up.double())


def _as_float64(tensor: torch.Tensor, name: str, ndim: int = 2) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor, got {type(tensor).__name__}.")
    if tensor.ndim != ndim:
        raise ValueError(f"`{name}` must be a {ndim}-D tensor, got shape {tuple(tensor.shape)}.")
    tensor = tensor.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"`{name}` contains NaN or Inf values; check the checkpoint or the calibration statistics.")
    return tensor


def _check_rank(rank: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"`rank` must be a positive integer (num_kv_heads * kv_rank), got {rank!r}.")


def _check_covariance(weight: torch.Tensor, covariance: torch.Tensor) -> torch.Tensor:
    """Returns the symmetrised float64 covariance after shape checks."""
    dim = weight.shape[1]
    if tuple(covariance.shape) != (dim, dim):
        raise ValueError(
            f"`covariance` must be [d, d] = [{dim}, {dim}] to match `weight` {tuple(weight.shape)}, got "
            f"{tuple(covariance.shape)}."
        )
    return 0.5 * (covariance + covariance.T)


def _pad_factors(down: torch.Tensor, up: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pads `down` rows / `up` columns up to `rank`."""
    missing = rank - down.shape[0]
    if missing > 0:
        logger.debug(f"Requested rank {rank} exceeds the available rank {down.shape[0]}; padding with zeros.")
        down = torch.cat([down, down.new_zeros(missing, down.shape[1])], dim=0)
        up = torch.cat([up, up.new_zeros(up.shape[0], missing)], dim=1)
    return down, up


@torch.no_grad()
def _weight_svd_float64(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    u, sigma, vh = torch.linalg.svd(weight, full_matrices=False)
    keep = min(rank, sigma.numel())
    down = vh[:keep]
    up = u[:, :keep] * sigma[:keep]
    down, up = _pad_factors(down, up, rank)
    return down, up, float(sigma[keep:].square().sum())


@torch.no_grad()
def weight_svd(weight: torch.Tensor, rank: int) -> LowRankFactors:
    """Plain truncated SVD `W ~= (U_r Sigma_r) V_r^T` (MHA2MLA joint init).

    Args:
        weight (`torch.Tensor`):
            `[rows, d]` weight, e.g. `[W_k_nope; W_v]` of one layer.
        rank (`int`):
            Target rank `r >= 1`. Ranks above `min(rows, d)` are zero-padded so that the shapes are always
            `[r, d]` / `[rows, r]` and `up @ down == W`.

    Returns:
        [`LowRankFactors`]: `down = V_r^T` (orthonormal rows), `up = U_r Sigma_r`, `discarded = sum_{i > r} sigma_i^2`
        (equal to `||W - up @ down||_F^2`).
    """
    _check_rank(rank)
    weight = _as_float64(weight, "weight")
    down, up, discarded = _weight_svd_float64(weight, rank)
    return LowRankFactors(down=down.float(), up=up.float(), discarded=discarded, rank=rank)


@torch.no_grad()
def _activation_aware_svd_float64(
    weight: torch.Tensor, covariance: torch.Tensor, rank: int, damping: float
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Float64 core of [`activation_aware_svd`] on validated float64 inputs."""
    if damping < 0:
        raise ValueError(f"`damping` must be >= 0, got {damping}.")
    dim = weight.shape[1]
    covariance = _check_covariance(weight, covariance)
    trace = float(torch.trace(covariance))
    if trace <= 0.0:
        raise ValueError(
            "The covariance has zero trace: no calibration tokens for this modality. Add calibration samples that "
            "contain this modality or initialise its branch with `weight_svd`."
        )
    damped = covariance + (damping * trace / dim) * torch.eye(dim, dtype=torch.float64)
    eigenvalues, eigenvectors = torch.linalg.eigh(damped)
    floor = _EIGENVALUE_RTOL * dim * float(eigenvalues.max())
    eigenvalues = eigenvalues.clamp_min(floor)
    sqrt_eigenvalues = eigenvalues.sqrt()

    # D = W S with S = U diag(sqrt(lam)) a square root of the damped covariance.
    p, sigma, qh = torch.linalg.svd((weight @ eigenvectors) * sqrt_eigenvalues, full_matrices=False)
    keep = min(rank, sigma.numel())
    sqrt_sigma = sigma[:keep].sqrt()
    up = p[:, :keep] * sqrt_sigma
    # S^{-1} = diag(1 / sqrt(lam)) U^T: no explicit inverse.
    down = ((sqrt_sigma[:, None] * qh[:keep]) / sqrt_eigenvalues) @ eigenvectors.T
    down, up = _pad_factors(down, up, rank)
    return down, up, float(sigma[keep:].square().sum())


def activation_aware_svd(
    weight: torch.Tensor, covariance: torch.Tensor, rank: int, *, damping: float = 1e-6
) -> LowRankFactors:
    """Activation-aware truncated SVD: `min_{rank W' <= r} ||W X - W' X||_F^2` given `C = X X^T`.

    The result depends on `C` only up to a positive factor, so token-count normalisation does not matter. The
    covariance is symmetrised and damped with `lambda * I`, `lambda = damping * tr(C) / d`, which keeps the factors
    finite for rank-deficient or ill-conditioned `C` (massive-activation channels, dead channels).

    Args:
        weight (`torch.Tensor`):
            `[rows, d]` weight, e.g. `[W_k_nope; W_v]` of one layer of the stage-1 model.
        covariance (`torch.Tensor`):
            `[d, d]` uncentred input second moment `X X^T` of the layer's `kv_proj` inputs for one modality.
        rank (`int`):
            Target rank `r >= 1`; larger than available ranks are zero-padded like in [`weight_svd`].
        damping (`float`, *optional*, defaults to `1e-6`):
            Relative ridge `alpha >= 0`; raise it (1e-4 ... 1e-3) for modalities with few tokens.

    Returns:
        [`LowRankFactors`]: `up = P_r Sigma_r^(1/2)`, `down = Sigma_r^(1/2) Q_r^T diag(1/sqrt(lam)) U^T` and
        `discarded = sum_{i > r} sigma_i(D)^2`, the optimal `||(W - up @ down) X||_F^2` w.r.t. the damped covariance.

    Raises:
        `ValueError`: on NaN/Inf inputs, shape mismatch, `rank < 1`, or a zero covariance (no calibration tokens).
    """
    _check_rank(rank)
    weight = _as_float64(weight, "weight")
    covariance = _as_float64(covariance, "covariance")
    down, up, discarded = _activation_aware_svd_float64(weight, covariance, rank, damping)
    return LowRankFactors(down=down.float(), up=up.float(), discarded=discarded, rank=rank, exact=(down, up))


def _activation_loss(error: torch.Tensor, covariance: torch.Tensor) -> float:
    """`tr(E C E^T)` = `||E X||_F^2`, clamped at 0 against rounding."""
    return max(float(((error @ covariance) * error).sum()), 0.0)


@torch.no_grad()
def activation_error(weight: torch.Tensor, approx: torch.Tensor, covariance: torch.Tensor) -> float:
    """Relative activation error `||(W - W') X||_F / ||W X||_F`, computed from `C = X X^T`.

    Args:
        weight (`torch.Tensor`):
            `[rows, d]` original weight `W`.
        approx (`torch.Tensor`):
            `[rows, d]` approximation `W'` (e.g. `factors.up @ factors.down`).
        covariance (`torch.Tensor`):
            `[d, d]` input second moment, preferably of held-out tokens. No damping is applied.

    Returns:
        `float`: `sqrt(tr(E C E^T) / tr(W C W^T))` with `E = W - W'`.
    """
    weight = _as_float64(weight, "weight")
    approx = _as_float64(approx, "approx")
    covariance = _check_covariance(weight, _as_float64(covariance, "covariance"))
    if approx.shape != weight.shape:
        raise ValueError(f"`approx` {tuple(approx.shape)} must have the shape of `weight` {tuple(weight.shape)}.")
    reference = _activation_loss(weight, covariance)
    if reference <= 0.0:
        raise ValueError("||W X|| is zero (empty covariance or W X = 0): the relative error is undefined.")
    return (_activation_loss(weight - approx, covariance) / reference) ** 0.5


@torch.no_grad()
def decoupled_vs_joint(
    weight: torch.Tensor,
    cov_text: torch.Tensor,
    cov_image: torch.Tensor,
    rank: int,
    damping: float = 1e-6,
    *,
    factors: Mapping[str, LowRankFactors] | None = None,
) -> dict[str, float]:
    """Compares modality-decoupled activation-aware SVD with one joint solution (MHA2MLA-VLM Theorem 2.1).

    `L_dec = L_text + L_image` uses a separate minimiser per modality, each evaluated on its own (undamped)
    covariance; `L_joint` is the loss of the minimiser of `cov_text + cov_image`, summed over both modalities.
    `L_dec <= L_joint` holds (up to the damping) when both covariances are unnormalised token sums or share one
    normalisation; with per-modality token-mean covariances the joint problem weights the modalities equally instead.

    Args:
        weight (`torch.Tensor`):
            `[rows, d]` weight.
        cov_text (`torch.Tensor`):
            `[d, d]` second moment of the text tokens.
        cov_image (`torch.Tensor`):
            `[d, d]` second moment of the image tokens.
        rank (`int`):
            Target rank.
        damping (`float`, *optional*, defaults to `1e-6`):
            Relative damping passed to each activation-aware SVD.
        factors (`Mapping[str, LowRankFactors]`, *optional*):
            Minimisers computed already, with this `rank` and `damping` ([`activation_aware_svd`] of `cov_text`,
            `cov_image` and `cov_text + cov_image`), under the keys `"text"`, `"image"` and `"joint"`; each one
            given is reused instead of being computed again (conversion passes the factors it builds).

    Returns:
        `dict[str, float]`: `{"loss_decoupled": L_dec, "loss_joint": L_joint, "ratio": L_dec / L_joint}` (ratio 1.0
        when `L_joint == 0`).
    """
    _check_rank(rank)
    weight = _as_float64(weight, "weight")
    cov_text = _check_covariance(weight, _as_float64(cov_text, "cov_text"))
    cov_image = _check_covariance(weight, _as_float64(cov_image, "cov_image"))

    factors = factors or {}

    def solution(key: str, fit_covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if key in factors:
            return factors[key].float64()
        down, up, _ = _activation_aware_svd_float64(weight, fit_covariance, rank, damping)
        return down, up

    def loss(key: str, covariance: torch.Tensor) -> float:
        down, up = solution(key, covariance)
        return _activation_loss(weight - up @ down, covariance)

    loss_decoupled = loss("text", cov_text) + loss("image", cov_image)
    down, up = solution("joint", cov_text + cov_image)
    error = weight - up @ down
    loss_joint = _activation_loss(error, cov_text) + _activation_loss(error, cov_image)
    ratio = loss_decoupled / loss_joint if loss_joint > 0.0 else 1.0
    return {"loss_decoupled": loss_decoupled, "loss_joint": loss_joint, "ratio": ratio}


def low_rank_factors(
    weight: torch.Tensor, rank: int, svd: str, layer_stats=None, damping: float = 1e-6
) -> dict[str, LowRankFactors]:
    """Factors of `[W_k_nope; W_v]` per modality branch: `weight` SVD, one joint activation-aware SVD
    (`joint-act`), or one activation-aware SVD per modality (`md`, MHA2MLA-VLM's modality decoupling)."""
    if svd == "weight":
        factors = weight_svd(weight, rank)
        return {"text": factors, "image": factors}
    if layer_stats is None:
        raise ValueError(f"svd={svd!r} needs calibration statistics.")
    if svd == "joint-act":
        factors = activation_aware_svd(
            weight, layer_stats.cov["text"] + layer_stats.cov["image"], rank, damping=damping
        )
        return {"text": factors, "image": factors}
    if svd == "md":
        return {m: activation_aware_svd(weight, layer_stats.cov[m], rank, damping=damping) for m in ("text", "image")}
    raise ValueError(f"svd must be one of {', '.join(SVD_METHODS)}; got {svd!r}.")


def reusable_factorisations(factors: dict[str, LowRankFactors], svd: str | None) -> dict[str, LowRankFactors]:
    """The factorisations the decoupled-vs-joint diagnostic can reuse: the per-modality ones of `md`, the joint one
    of `joint-act` (none of `weight`)."""
    if svd == "md":
        return {"text": factors["text"], "image": factors["image"]}
    if svd == "joint-act":
        return {"joint": factors["text"]}
    return {}


__all__ = [
    "SVD_METHODS",
    "LowRankFactors",
    "activation_aware_svd",
    "activation_error",
    "decoupled_vs_joint",
    "low_rank_factors",
    "reusable_factorisations",
    "weight_svd",
]
