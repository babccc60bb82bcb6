"""Selection of the rotary frequency pairs that keep RoPE after the MHA -> MLA conversion (partial RoPE).

Layout conventions (HF `rotate_half`):

- pair `j`: dims `j` and `j + head_dim // 2` of a head, rotated together; `j = 0` is the highest frequency.
- `rope_dim`: kept rotary dims per head, i.e. `2 *` the number of kept pairs.
- kept pairs: `list[list[list[int]]]` indexed `[layer][kv_head]`, each list sorted ascending, `rope_dim // 2` long.
- rank tensor: `[num_layers, num_kv_heads, head_dim]` integer tensor (official `.pth` format). Every row is a
  permutation of `0 .. head_dim/2 - 1`, duplicated so that `rank[j] == rank[j + head_dim/2]`; rank 0 is the most
  important pair. The compact form `[num_layers, num_kv_heads, head_dim/2]` (one entry per pair) is accepted too.

Strategies:

- fixed: `"high"` (pairs `[0, r)`), `"low"` (pairs `[head_dim/2 - r, head_dim/2)`) and `"uniform"` (every
  `(head_dim/2) / r`-th pair starting at 0), see [`select_fixed_pairs`].
- S_2-norm (MHA2MLA): score `||q_j|| * ||k_j||` from pre-RoPE pair norms averaged over tokens, summed over the query
  heads of each kv group, see [`pair_norms`] and [`two_norm_scores`].
- S_MKL (MHA2MLA-VLM): KL divergence between the original attention distribution and the one obtained with pair `j`
  zeroed in both queries and keys, computed in closed form, see [`mkl_pair_sensitivity`] and [`aggregate_gqa`].
- Scores of any strategy become a rank tensor with [`scores_to_ranks`] and kept pairs with [`ranks_to_pairs`];
  [`enforce_axis_minimum`] adds per-axis quotas for Qwen2.5-VL's M-RoPE.
- [`select_rope_pairs`] is the entry point the conversion calls: a fixed strategy, a rank file, or calibration
  statistics (through [`rope_scores`]).

This file is longer than the package's usual ~400 lines on purpose: it is the one owner of the partial-RoPE
selection (every strategy, the rank-file format and the M-RoPE axis quotas), which the method treats as one piece.
"""

import json
import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers.utils import logging

from ..configuration.configuration_mla_common import text_head_dim


if TYPE_CHECKING:
    from .statistics import CalibrationStatistics


logger = logging.get_logger(__name__)

FIXED_STRATEGIES = ("high", "low", "uniform")
CALIBRATED_STRATEGIES = ("2-norm", "mkl")
MRopeAxis = Literal["t", "h", "w"]
MROPE_AXES: tuple[MRopeAxis, MRopeAxis, MRopeAxis] = ("t", "h", "w")

# Largest number of float64 elements of one `[pairs, heads, rows, keys]` block materialised by
# `mkl_pair_sensitivity` (2**23 elements = 64 MiB; peak memory is a small multiple of it).
_MKL_MAX_CHUNK_ELEMENTS = 2**23
# Target number of float64 terms of one `[pairs, heads, rows, keys]` block of `_mkl_blocks` (1 MiB: a block's passes
# stay in cache).
_MKL_BLOCK_ELEMENTS = 2**17
# The same on an accelerator (128 MiB): large enough that a block's kernels are not launch-bound.
_MKL_DEVICE_BLOCK_ELEMENTS = 2**24


def _check_head_geometry(head_dim: int, rope_dim: int) -> int:
    """Validates `head_dim` / `rope_dim` and returns the number of kept pairs."""
    if head_dim <= 0 or head_dim % 2 != 0:
        raise ValueError(f"`head_dim` must be a positive even integer, got {head_dim}.")
    if rope_dim < 0 or rope_dim % 2 != 0 or rope_dim > head_dim:
        raise ValueError(
            f"`rope_dim` must be an even integer in [0, head_dim={head_dim}] (both dims of a rotary pair are kept "
            f"together), got {rope_dim}."
        )
    return rope_dim // 2


def select_fixed_pairs(
    strategy: Literal["high", "low", "uniform"],
    head_dim: int,
    rope_dim: int,
    num_layers: int,
    num_kv_heads: int,
) -> list[list[list[int]]]:
    """Kept rotary pairs of a fixed (data-free) partial-RoPE strategy.

    All layers and heads get the same set. With `r = rope_dim // 2` kept pairs and `P = head_dim // 2` pairs:

    - `"high"`: pairs `[0, r)`, the highest frequencies.
    - `"low"`: pairs `[P - r, P)`, the lowest frequencies.
    - `"uniform"`: pairs `0, s, 2s, ..., (r - 1) s` with `s = P / r`. Like the official code, `P` must be divisible
      by `r` (no rounding is done); e.g. `head_dim=128, rope_dim=32` gives `0, 4, ..., 60`.

    Args:
        strategy (`Literal["high", "low", "uniform"]`):
            Which fixed strategy to use.
        head_dim (`int`):
            Attention head dimension (even).
        rope_dim (`int`):
            Rotary dims kept per head (even, at most `head_dim`).
        num_layers (`int`):
            Number of decoder layers.
        num_kv_heads (`int`):
            Number of key/value heads per layer.

    Returns:
        `list[list[list[int]]]`: kept pair indices indexed `[layer][kv_head]`, sorted ascending.
    """
    num_kept = _check_head_geometry(head_dim, rope_dim)
    num_pairs = head_dim // 2
    if num_layers <= 0 or num_kv_heads <= 0:
        raise ValueError(
            f"`num_layers` and `num_kv_heads` must be positive, got num_layers={num_layers}, "
            f"num_kv_heads={num_kv_heads}."
        )
    if strategy == "high":
        kept = list(range(num_kept))
    elif strategy == "low":
        kept = list(range(num_pairs - num_kept, num_pairs))
    elif strategy == "uniform":
        if num_kept == 0:
            kept = []
        elif num_pairs % num_kept != 0:
            raise ValueError(
                f"The 'uniform' strategy needs head_dim/2={num_pairs} to be divisible by rope_dim/2={num_kept}; "
                f"choose a rope_dim such that {num_pairs} % (rope_dim/2) == 0 (e.g. "
                f"{[2 * n for n in range(1, num_pairs + 1) if num_pairs % n == 0]})."
            )
        else:
            step = num_pairs // num_kept
            kept = list(range(0, num_pairs, step))
    else:
        raise ValueError(f"Unknown fixed partial-RoPE strategy {strategy!r}; use one of 'high', 'low', 'uniform'.")
    return [[list(kept) for _ in range(num_kv_heads)] for _ in range(num_layers)]


def _ranks_to_compact(ranks: torch.Tensor, head_dim: int | None = None) -> torch.Tensor:
    """Validates a rank tensor and returns it in compact `[L, n_kv, head_dim/2]` int64 form."""
    if not isinstance(ranks, torch.Tensor):
        raise ValueError(f"Ranks must be a torch.Tensor, got {type(ranks).__name__}.")
    if ranks.dtype.is_floating_point or ranks.dtype.is_complex or ranks.dtype == torch.bool:
        raise ValueError(
            f"Ranks must have an integer dtype (the official files are uint8), got {ranks.dtype}; cast scores to "
            "ranks with `scores_to_ranks` first."
        )
    if ranks.ndim != 3:
        raise ValueError(
            f"Ranks must have shape [num_layers, num_kv_heads, head_dim] or [num_layers, num_kv_heads, head_dim/2], "
            f"got shape {tuple(ranks.shape)}."
        )
    num_layers, num_kv_heads, width = ranks.shape
    if num_layers == 0 or num_kv_heads == 0 or width == 0:
        raise ValueError(f"Ranks must not be empty, got shape {tuple(ranks.shape)}.")
    ranks = ranks.detach().to(device="cpu", dtype=torch.int64)

    # A compact row is a permutation of 0..width-1, a duplicated (official) row only holds values < width/2: the two
    # cases are told apart by the row maximum.
    duplicated = width % 2 == 0 and bool((ranks < width // 2).all())
    if head_dim is not None:
        if width not in (head_dim, head_dim // 2):
            raise ValueError(
                f"Ranks last dimension {width} matches neither head_dim={head_dim} (official duplicated format) nor "
                f"head_dim/2={head_dim // 2} (compact format)."
            )
        if width == head_dim and not duplicated:
            raise ValueError(
                f"Ranks of width head_dim={head_dim} must hold values in [0, {head_dim // 2}) (one rank per rotary "
                f"pair, duplicated over both halves), got values up to {int(ranks.max())}."
            )
        if width == head_dim // 2:
            duplicated = False
    if duplicated:
        first, second = ranks[..., : width // 2], ranks[..., width // 2 :]
        mismatch = first != second
        if bool(mismatch.any()):
            layer, head, pair = (int(i) for i in mismatch.nonzero()[0])
            raise ValueError(
                f"Ranks are not pair-symmetric: rank[{layer}, {head}, {pair}]={int(first[layer, head, pair])} but "
                f"rank[{layer}, {head}, {pair + width // 2}]={int(second[layer, head, pair])}. Both dims of a rotary "
                "pair (j and j + head_dim/2) must share one rank so that partial RoPE keeps whole pairs."
            )
        compact = first
    else:
        compact = ranks
    num_pairs = compact.shape[-1]
    expected = torch.arange(num_pairs).expand_as(compact)
    is_permutation = (compact.sort(dim=-1).values == expected).all(dim=-1)
    if not bool(is_permutation.all()):
        layer, head = (int(i) for i in (~is_permutation).nonzero()[0])
        raise ValueError(
            f"Ranks row (layer {layer}, kv head {head}) is not a permutation of 0..{num_pairs - 1}: every rotary pair "
            "needs a distinct rank (0 = most important)."
        )
    return compact


def ranks_to_pairs(ranks: torch.Tensor, rope_dim: int, *, head_dim: int | None = None) -> list[list[list[int]]]:
    """Kept rotary pairs from a rank tensor: pair `j` is kept iff `rank[j] < rope_dim / 2`.

    Args:
        ranks (`torch.Tensor`):
            Integer tensor of shape `[num_layers, num_kv_heads, head_dim]` (official format: each row a permutation
            of `0 .. head_dim/2 - 1` duplicated so that `rank[j] == rank[j + head_dim/2]`) or of shape
            `[num_layers, num_kv_heads, head_dim/2]` (compact form, one rank per pair). Rank 0 is the most important.
        rope_dim (`int`):
            Rotary dims kept per head (even); every head keeps `rope_dim // 2` pairs.
        head_dim (`int`, *optional*):
            Expected head dimension. Without it, the format is inferred from the values (a duplicated row only holds
            values `< width / 2`); give it to reject files made for another model.

    Returns:
        `list[list[list[int]]]`: kept pair indices indexed `[layer][kv_head]`, sorted ascending.

    Raises:
        `ValueError`: if the dtype is not integer, a row is not a permutation, or the two halves of a duplicated row
        disagree (not pair-symmetric), or `rope_dim` does not fit.
    """
    compact = _ranks_to_compact(ranks, head_dim=head_dim)
    num_pairs = compact.shape[-1]
    num_kept = _check_head_geometry(2 * num_pairs, rope_dim)
    keep = compact < num_kept
    return [
        [torch.nonzero(keep[layer, head]).flatten().tolist() for head in range(keep.shape[1])]
        for layer in range(keep.shape[0])
    ]


def scores_to_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Converts per-pair importance scores to a rank tensor in the official duplicated format.

    `rank = argsort(argsort(-scores))` over the pairs of each (layer, kv head), with ties broken in favour of the lower
    pair index (stable sort), then duplicated over both halves of the head.

    Args:
        scores (`torch.Tensor`):
            Floating tensor of shape `[num_layers, num_kv_heads, head_dim/2]`; larger means more important.

    Returns:
        `torch.Tensor`: `uint8` tensor of shape `[num_layers, num_kv_heads, head_dim]`; rank 0 is the most important.
    """
    if scores.ndim != 3:
        raise ValueError(
            f"`scores` must have shape [num_layers, num_kv_heads, head_dim/2], got shape {tuple(scores.shape)}."
        )
    if not scores.dtype.is_floating_point:
        scores = scores.to(torch.float64)
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("`scores` contains NaN or Inf values; check the calibration statistics.")
    num_pairs = scores.shape[-1]
    if num_pairs == 0 or num_pairs > 256:
        raise ValueError(
            f"The number of rotary pairs must be in [1, 256] to be stored as uint8 ranks, got {num_pairs}."
        )
    order = torch.argsort(-scores.detach().cpu(), dim=-1, stable=True)
    ranks = torch.argsort(order, dim=-1)
    return torch.cat([ranks, ranks], dim=-1).to(torch.uint8)


def _check_rank_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in (".pth", ".pt", ".safetensors", ".json"):
        raise ValueError(
            f"Unknown rank file suffix {path.suffix!r} for {str(path)!r}; use '.pth'/'.pt' (torch), '.safetensors' "
            "(key 'ranks') or '.json' ({'ranks': nested lists})."
        )
    return suffix


def load_rank_file(path: str | os.PathLike) -> torch.Tensor:
    """Loads and validates a partial-RoPE rank file.

    Supported formats:

    - `.pth` / `.pt`: loaded with `torch.load(..., weights_only=True)`; either a bare integer tensor (the official
      MHA2MLA-VLM format, `uint8 [num_layers, num_kv_heads, head_dim]`) or a dict holding a `"ranks"` tensor or exactly
      one tensor.
    - `.safetensors`: the tensor under key `"ranks"`.
    - `.json`: an object `{"ranks": nested lists}` (optional `"dtype"` and `"metadata"` entries).

    The content is validated like in [`ranks_to_pairs`] (integer, permutation per row, pair-symmetric).

    Args:
        path (`str` or `os.PathLike`):
            Path of the rank file.

    Returns:
        `torch.Tensor`: the rank tensor as stored (CPU), in the official or the compact layout.
    """
    path = Path(path)
    suffix = _check_rank_suffix(path)
    if not path.is_file():
        raise FileNotFoundError(f"Rank file {str(path)!r} does not exist.")

    if suffix in (".pth", ".pt"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError) as error:
            raise ValueError(
                f"Could not read rank file {str(path)!r} with torch.load(weights_only=True): {error}"
            ) from error
        if isinstance(obj, dict):
            if isinstance(obj.get("ranks"), torch.Tensor):
                obj = obj["ranks"]
            else:
                tensors = [value for value in obj.values() if isinstance(value, torch.Tensor)]
                if len(tensors) != 1:
                    raise ValueError(
                        f"Rank file {str(path)!r} holds a dict with {len(tensors)} tensors and no 'ranks' key; store "
                        "a bare tensor or a dict with a single tensor."
                    )
                obj = tensors[0]
        if not isinstance(obj, torch.Tensor):
            raise ValueError(f"Rank file {str(path)!r} holds a {type(obj).__name__}, expected a tensor.")
        ranks = obj
    elif suffix == ".safetensors":
        try:
            tensors = load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as error:
            raise ValueError(f"Could not read rank file {str(path)!r} as safetensors: {error}") from error
        if "ranks" not in tensors:
            raise ValueError(f"Rank file {str(path)!r} has no 'ranks' tensor (found keys {sorted(tensors)}).")
        ranks = tensors["ranks"]
    else:
        try:
            with open(path, encoding="utf-8") as handle:
                obj = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"Could not parse rank file {str(path)!r} as JSON: {error}") from error
        if not isinstance(obj, dict) or "ranks" not in obj:
            raise ValueError(f"Rank file {str(path)!r} must be a JSON object with a 'ranks' entry (nested lists).")
        dtype_name = obj.get("dtype", "uint8")
        dtype = getattr(torch, dtype_name, None) if isinstance(dtype_name, str) else None
        if not isinstance(dtype, torch.dtype) or dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
            raise ValueError(f"Rank file {str(path)!r} has an invalid integer 'dtype' entry {dtype_name!r}.")
        try:
            ranks = torch.tensor(obj["ranks"], dtype=torch.int64)
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(
                f"Rank file {str(path)!r}: 'ranks' must be a rectangular nested list of integers ({error})."
            ) from error
        if ranks.numel() and (int(ranks.min()) < torch.iinfo(dtype).min or int(ranks.max()) > torch.iinfo(dtype).max):
            raise ValueError(f"Rank file {str(path)!r}: 'ranks' values do not fit its dtype {dtype_name!r}.")
        ranks = ranks.to(dtype)

    try:
        _ranks_to_compact(ranks)
    except ValueError as error:
        raise ValueError(f"Invalid rank file {str(path)!r}: {error}") from error
    return ranks


def save_rank_file(ranks: torch.Tensor, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Saves a rank tensor; the format follows the suffix of `path` (see [`load_rank_file`]).

    `.pth`/`.pt` without metadata writes a bare tensor (the official format); with metadata it writes
    `{"ranks": tensor, "metadata": metadata}`.

    Args:
        ranks (`torch.Tensor`):
            Valid integer rank tensor (official or compact layout).
        path (`str` or `os.PathLike`):
            Destination path, with suffix `.pth`, `.pt`, `.safetensors` or `.json`.
        metadata (`dict[str, str]`, *optional*):
            Free-form provenance (model id, strategy, calibration set, ...).
    """
    path = Path(path)
    suffix = _check_rank_suffix(path)
    _ranks_to_compact(ranks)
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("`metadata` must map strings to strings.")
    ranks = ranks.detach().cpu().contiguous()
    if suffix in (".pth", ".pt"):
        torch.save(ranks if metadata is None else {"ranks": ranks, "metadata": dict(metadata)}, path)
    elif suffix == ".safetensors":
        save_file({"ranks": ranks}, path, metadata=metadata)
    else:
        payload: dict[str, object] = {"ranks": ranks.tolist(), "dtype": str(ranks.dtype).removeprefix("torch.")}
        if metadata is not None:
            payload["metadata"] = dict(metadata)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(payload, handle)


def pair_norms(x: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """Per-token 2-norm of every rotary pair of every head.

    Args:
        x (`torch.Tensor`):
            Projection outputs of shape `[..., T, num_heads * head_dim]` (pre-RoPE `q_proj` or `k_proj` output).
        num_heads (`int`):
            Number of heads in the last dimension.
        head_dim (`int`):
            Head dimension (even).

    Returns:
        `torch.Tensor`: `[..., T, num_heads, head_dim/2]` with entry `j` equal to `sqrt(x_j^2 + x_{j+head_dim/2}^2)`,
        in float32 (float64 if `x` is float64).
    """
    _check_head_geometry(head_dim, 0)
    if x.shape[-1] != num_heads * head_dim:
        raise ValueError(
            f"Last dimension of `x` ({x.shape[-1]}) must equal num_heads * head_dim = {num_heads} * {head_dim}."
        )
    if x.dtype != torch.float64:
        x = x.float()
    x = x.unflatten(-1, (num_heads, 2, head_dim // 2))
    return torch.hypot(x[..., 0, :], x[..., 1, :])  # elementwise: much faster than vector_norm over a dim of 2


def two_norm_scores(q_pair_norm_mean: torch.Tensor, k_pair_norm_mean: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """S_2-norm scores (MHA2MLA): `||q_j|| * ||k_j||`, summed over the query heads of each kv group.

    Query head `i` belongs to kv group `i // (num_q_heads // num_kv_heads)`.

    Args:
        q_pair_norm_mean (`torch.Tensor`):
            `[num_layers, num_q_heads, head_dim/2]`, mean over calibration tokens of the pre-RoPE query pair norms.
        k_pair_norm_mean (`torch.Tensor`):
            `[num_layers, num_kv_heads, head_dim/2]`, same for the keys.
        num_kv_heads (`int`):
            Number of key/value heads.

    Returns:
        `torch.Tensor`: float64 scores `[num_layers, num_kv_heads, head_dim/2]` (larger = more important).
    """
    if q_pair_norm_mean.ndim != 3 or k_pair_norm_mean.ndim != 3:
        raise ValueError(
            "`q_pair_norm_mean` and `k_pair_norm_mean` must be 3-D ([num_layers, heads, head_dim/2]), got shapes "
            f"{tuple(q_pair_norm_mean.shape)} and {tuple(k_pair_norm_mean.shape)}."
        )
    num_layers, num_q_heads, num_pairs = q_pair_norm_mean.shape
    if tuple(k_pair_norm_mean.shape) != (num_layers, num_kv_heads, num_pairs):
        raise ValueError(
            f"`k_pair_norm_mean` must have shape {(num_layers, num_kv_heads, num_pairs)} to match the queries and "
            f"num_kv_heads={num_kv_heads}, got {tuple(k_pair_norm_mean.shape)}."
        )
    q_norms = q_pair_norm_mean.to(torch.float64)
    k_norms = k_pair_norm_mean.to(torch.float64)
    per_q_head = q_norms * k_norms.repeat_interleave(_group_size(num_q_heads, num_kv_heads), dim=1)
    return aggregate_gqa(per_q_head, num_kv_heads)


def _group_size(num_q_heads: int, num_kv_heads: int) -> int:
    if num_kv_heads <= 0 or num_q_heads <= 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"The number of query heads ({num_q_heads}) must be a positive multiple of the number of kv heads "
            f"({num_kv_heads})."
        )
    return num_q_heads // num_kv_heads


def aggregate_gqa(per_q_head: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Sums per-query-head statistics over each kv group (`[..., n_q, P] -> [..., n_kv, P]`).

    Query head `i` belongs to kv group `i // (n_q // n_kv)`, as in HF `repeat_kv`.

    Args:
        per_q_head (`torch.Tensor`):
            Tensor of shape `[..., num_q_heads, P]`.
        num_kv_heads (`int`):
            Number of key/value heads.

    Returns:
        `torch.Tensor`: tensor of shape `[..., num_kv_heads, P]`.
    """
    if per_q_head.ndim < 2:
        raise ValueError(f"`per_q_head` must have shape [..., num_q_heads, P], got {tuple(per_q_head.shape)}.")
    group = _group_size(per_q_head.shape[-2], num_kv_heads)
    return per_q_head.unflatten(-2, (num_kv_heads, group)).sum(dim=-2)


@torch.no_grad()
def mkl_pair_sensitivity(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    *,
    causal: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    query_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """S_MKL sensitivity of every rotary pair: mean KL between the attention with and without that pair.

    With logits `S = scale * q k^T` (causal and key-padding masked) and the rank-2 contribution of pair `j`
    `C_j = scale * q[:, :, [j, j + hd/2]] k[:, :, [j, j + hd/2]]^T`, the KL between the original distribution `P_t` of
    query row `t` and the one with pair `j` zeroed in both queries and keys is, in closed form,

        KL(P_t || P_t^(-j)) = sum_s P_ts C_j,ts + LSE_s(S_t - C_j,t) - LSE_s(S_t).

    It is evaluated in float64 as `log sum_s exp(log P_ts + E_P[C_j] - C_j,ts)` (the same sum, with `E_P[C_j]` moved
    inside the exponent, which is then one rank-3 matmul plus `log P`), on the inputs' device, in blocks of query rows
    and pairs of about `_MKL_BLOCK_ELEMENTS` (2**17) terms on the CPU and `_MKL_DEVICE_BLOCK_ELEMENTS` (2**24) on an
    accelerator; a block of causal rows only reads the keys they see, and the query heads of a kv group share their
    keys (cost `O(hd/2 * n_q * T_q * T)`, memory bounded for long sequences). Should a term overflow, the sample is
    recomputed by the reference form `E_P[C_j] + logsumexp(log P_t - C_j,t)` (blocks of at most 2**23 elements),
    which the tests compare it with.

    Zeroing a pair before or after the rotation is the same, so post-RoPE inputs can be used directly.

    Args:
        q (`torch.Tensor`):
            Post-RoPE queries of one sample, `[num_q_heads, T, head_dim]`.
        k (`torch.Tensor`):
            Post-RoPE keys of the same sample, `[num_kv_heads, T, head_dim]`. Query head `i` attends to kv head
            `i // (num_q_heads // num_kv_heads)`.
        scale (`float`):
            Softmax scale (`head_dim ** -0.5` for the supported models).
        causal (`bool`, *optional*, defaults to `True`):
            Whether query `t` only sees keys `s <= t`.
        key_padding_mask (`torch.Tensor`, *optional*):
            Boolean `[T]`, `True` for valid (non-padding) tokens.
        query_index (`torch.Tensor`, *optional*):
            1-D integer tensor of the query rows to average over (sub-sampling). Defaults to all valid rows that see
            at least one key. Every given row must be valid and see at least one key.

    Returns:
        `torch.Tensor`: float64 tensor `[num_q_heads, head_dim/2]` on `q`'s device, the KL per query head and pair
        averaged over the selected rows. Aggregate over kv groups with [`aggregate_gqa`].
    """
    if q.ndim != 3 or k.ndim != 3:
        raise ValueError(
            f"`q` must be [num_q_heads, T, head_dim] and `k` [num_kv_heads, T, head_dim] (one sample), got shapes "
            f"{tuple(q.shape)} and {tuple(k.shape)}."
        )
    num_q_heads, seq_len, head_dim = q.shape
    num_kv_heads = k.shape[0]
    if k.shape[1:] != q.shape[1:]:
        raise ValueError(f"`q` {tuple(q.shape)} and `k` {tuple(k.shape)} must share T and head_dim.")
    group = _group_size(num_q_heads, num_kv_heads)
    _check_head_geometry(head_dim, 0)
    if seq_len == 0:
        raise ValueError("Empty sequence: `q` and `k` have T=0.")

    device = q.device  # computed where the inputs are: the calibration's device (CUDA) or the CPU
    q = q.detach().to(dtype=torch.float64)
    k = k.detach().to(device=device, dtype=torch.float64)
    if not bool(torch.isfinite(q).all()) or not bool(torch.isfinite(k).all()):
        raise ValueError("`q` or `k` contains NaN or Inf values.")

    visible = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device)
    if causal:
        visible = torch.tril(visible)
    valid_rows = torch.ones(seq_len, dtype=torch.bool, device=device)
    if key_padding_mask is not None:
        if key_padding_mask.shape != (seq_len,) or key_padding_mask.dtype != torch.bool:
            raise ValueError(
                f"`key_padding_mask` must be a bool tensor of shape [{seq_len}], got {key_padding_mask.dtype} "
                f"{tuple(key_padding_mask.shape)}."
            )
        key_padding_mask = key_padding_mask.to(device)
        visible = visible & key_padding_mask[None, :]
        valid_rows = key_padding_mask.clone()
    valid_rows &= visible.any(dim=-1)

    if query_index is None:
        rows = valid_rows.nonzero().flatten()
    else:
        if query_index.ndim != 1 or query_index.dtype.is_floating_point or query_index.dtype == torch.bool:
            raise ValueError("`query_index` must be a 1-D integer tensor of query positions.")
        rows = query_index.to(device=device, dtype=torch.int64)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= seq_len):
            raise ValueError(f"`query_index` values must lie in [0, {seq_len}).")
        if not bool(valid_rows[rows].all()):
            raise ValueError(
                "`query_index` selects padding positions or rows without any visible key; drop them (the default "
                "selects all valid rows)."
            )
    if rows.numel() == 0:
        raise ValueError("No query rows to evaluate: every position is padding or `query_index` is empty.")

    kl_sum = _mkl_blocks(q, k, scale, visible, rows, group)
    if kl_sum is None:
        logger.debug("S_MKL: a term overflows float64 on this sample; using the logsumexp form.")
        kl_sum = _mkl_reference(q, k, scale, visible, rows, group)
    return kl_sum / rows.numel()


def _mkl_reference(
    q: torch.Tensor, k: torch.Tensor, scale: float, visible: torch.Tensor, rows: torch.Tensor, group: int
) -> torch.Tensor:
    """Reference S_MKL core (float64, validated inputs): the `[n_q, P]` sum over `rows` of the per-row KL, as
    `E_P[C_j] + logsumexp(log P_t - C_j,t)` in blocks of pairs and rows of at most `_MKL_MAX_CHUNK_ELEMENTS`."""
    num_q_heads, seq_len, head_dim = q.shape
    num_pairs = head_dim // 2
    num_rows = rows.numel()
    row_chunk = max(1, min(num_rows, _MKL_MAX_CHUNK_ELEMENTS // (num_q_heads * seq_len)))
    pair_chunk = max(1, min(num_pairs, _MKL_MAX_CHUNK_ELEMENTS // (num_q_heads * row_chunk * seq_len)))

    logger.debug(
        f"S_MKL: {num_rows} query rows x {seq_len} keys, blocks of {row_chunk} rows x {pair_chunk}/{num_pairs} pairs."
    )
    k_per_q_head = k.repeat_interleave(group, dim=0)  # [n_q, T, hd]
    kl_sum = torch.zeros(num_q_heads, num_pairs, dtype=torch.float64, device=q.device)
    for row_start in range(0, num_rows, row_chunk):
        row_ids = rows[row_start : row_start + row_chunk]
        q_rows = q[:, row_ids]  # [n_q, R, hd]
        logits = scale * (q_rows @ k_per_q_head.transpose(-1, -2))  # [n_q, R, T]
        logits = logits.masked_fill(~visible[row_ids], float("-inf"))
        log_probs = torch.log_softmax(logits, dim=-1)
        probs = log_probs.exp()
        # E_P[C_j] for all pairs at once: scale * sum_{d in pair j} q_d * (P @ k)_d.
        expected = scale * q_rows * (probs @ k_per_q_head)  # [n_q, R, hd]
        expected = expected[..., :num_pairs] + expected[..., num_pairs:]  # [n_q, R, P]
        for pair_start in range(0, num_pairs, pair_chunk):
            pair_ids = torch.arange(pair_start, min(pair_start + pair_chunk, num_pairs), device=q.device)
            dims = torch.stack([pair_ids, pair_ids + num_pairs], dim=-1)  # [J, 2]
            q_pair = q_rows[..., dims]  # [n_q, R, J, 2]
            k_pair = k_per_q_head[..., dims]  # [n_q, T, J, 2]
            contrib = scale * torch.einsum("hrjc,htjc->jhrt", q_pair, k_pair)  # [J, n_q, R, T]
            log_ratio = torch.logsumexp(log_probs.unsqueeze(0) - contrib, dim=-1)  # [J, n_q, R]
            kl = expected[..., pair_ids].permute(2, 0, 1) + log_ratio  # [J, n_q, R]
            kl_sum[:, pair_ids] += kl.clamp_min(0.0).sum(dim=-1).transpose(0, 1)
    return kl_sum


def _mkl_blocks(
    q: torch.Tensor, k: torch.Tensor, scale: float, visible: torch.Tensor, rows: torch.Tensor, group: int
) -> torch.Tensor | None:
    """S_MKL core (float64, validated inputs): the `[n_q, P]` sum over `rows` of the per-row KL, or None when a term
    overflows.

    The reference's `E_P[C_j] + logsumexp(log P_t - C_j,t)` is evaluated as `log sum_s exp(x_ts)` with `x_ts = log
    P_ts + E_P[C_j] - C_j,ts`: the same sum with `E_P[C_j]` moved into the exponent and no max shift (`x` is small,
    the terms sum to about 1; a sample where one overflows goes to the reference). Per block, `x` starts as `log P +
    E_P[C_j]`, one batched matmul of inner size 2 per (pair, kv head), shared by the query heads of the kv group,
    subtracts `C_j` in place, then one `exp` and one sum over the keys. The keys are first centred over the visible
    ones (a per-row shift of the logits and of every `C_j`, which changes neither `P` nor the KL but keeps `x` free
    of a key bias). Rows go in blocks of about `_MKL_BLOCK_ELEMENTS` terms, each block reading only the keys its
    rows see (the causal triangle, not the square)."""
    num_q_heads, _, head_dim = q.shape
    num_kv_heads, num_pairs, num_rows = k.shape[0], head_dim // 2, rows.numel()
    rows = rows.sort().values
    seen = visible[rows]  # [R, T]
    k = k - k[:, seen.any(dim=0)].mean(dim=1, keepdim=True)
    # Layout [n_kv, R * group, ...]: a block of rows is a contiguous run of (row, query head) matrix rows.
    q_rows = q[:, rows].view(num_kv_heads, group, num_rows, head_dim).transpose(1, 2)
    q_rows = q_rows.reshape(num_kv_heads, num_rows * group, head_dim)
    logits = scale * (q_rows @ k.transpose(-1, -2))  # [n_kv, R * group, T]
    log_probs = torch.log_softmax(logits.masked_fill(~seen.repeat_interleave(group, dim=0), float("-inf")), dim=-1)
    expected = scale * q_rows * (log_probs.exp() @ k)  # [n_kv, R * group, hd]
    expected = (expected[..., :num_pairs] + expected[..., num_pairs:]).permute(2, 0, 1).contiguous()  # E_P[C_j]
    q_pairs = q_rows.unflatten(-1, (2, num_pairs)).permute(3, 0, 1, 2).contiguous()  # [P, n_kv, R * group, 2]
    k_pairs = k.unflatten(-1, (2, num_pairs)).permute(3, 0, 2, 1).contiguous()  # [P, n_kv, 2, T]

    key_ends = (seen.cumsum(dim=-1).argmax(dim=-1) + 1).tolist()  # per row: keys up to its last visible one
    totals = torch.empty(num_pairs, num_kv_heads, num_rows * group, dtype=q.dtype, device=q.device)
    block_elements = _MKL_BLOCK_ELEMENTS if q.device.type == "cpu" else _MKL_DEVICE_BLOCK_ELEMENTS
    start = 0
    while start < num_rows:
        pair_chunk = max(1, min(num_pairs, block_elements // (num_q_heads * key_ends[start])))
        stop = start + 1  # key_ends grows with the (sorted) rows
        budget = block_elements // (pair_chunk * num_q_heads)
        while stop < num_rows and (stop + 1 - start) * key_ends[stop] <= budget:
            stop += 1
        keys, block = max(key_ends[start:stop]), slice(group * start, group * stop)
        for pair_start in range(0, num_pairs, pair_chunk):
            pairs = slice(pair_start, pair_start + pair_chunk)
            terms = torch.add(expected[pairs, :, block, None], log_probs[:, block, :keys])  # [J, n_kv, rows, S]
            terms.flatten(0, 1).baddbmm_(  # log P + E_P[C_j] - C_j
                q_pairs[pairs, :, block].flatten(0, 1), k_pairs[pairs, ..., :keys].flatten(0, 1), alpha=-scale
            )
            totals[pairs, :, block] = terms.exp_().sum(dim=-1)
        start = stop
    if not bool(torch.isfinite(totals).all()):
        return None
    kl = totals.log_().clamp_min_(0.0).view(num_pairs, num_kv_heads, num_rows, group).transpose(2, 3)
    return kl.reshape(num_pairs, num_q_heads, num_rows).sum(dim=-1).T


def _check_mrope_section(mrope_section: list[int]) -> list[int]:
    if len(mrope_section) != len(MROPE_AXES) or any(int(n) < 0 for n in mrope_section):
        raise ValueError(
            f"`mrope_section` must list the number of rotary pairs of the t, h and w axes (e.g. [16, 24, 24]), got "
            f"{mrope_section}."
        )
    return [int(n) for n in mrope_section]


def mrope_axis_of_pair(pair: int, mrope_section: list[int]) -> MRopeAxis:
    """M-RoPE axis whose position drives rotary pair `pair` (Qwen2.5-VL).

    With `mrope_section=[16, 24, 24]`, pairs `[0, 16)` use the temporal, `[16, 40)` the height and `[40, 64)` the
    width position.

    Args:
        pair (`int`):
            Pair index in `[0, sum(mrope_section))`.
        mrope_section (`list[int]`):
            Number of pairs per axis `[t, h, w]` (the config's `rope_parameters["mrope_section"]`).

    Returns:
        `Literal["t", "h", "w"]`: the axis.
    """
    sections = _check_mrope_section(mrope_section)
    if not 0 <= pair < sum(sections):
        raise ValueError(f"Pair index {pair} is outside [0, {sum(sections)}) for mrope_section={mrope_section}.")
    end = 0
    for axis, size in zip(MROPE_AXES, sections):
        end += size
        if pair < end:
            return axis
    raise AssertionError("unreachable")  # pragma: no cover


def count_pairs_per_axis(pairs: list[list[list[int]]], mrope_section: list[int]) -> dict[str, int]:
    """Counts kept pairs per M-RoPE axis over all layers and kv heads.

    Args:
        pairs (`list[list[list[int]]]`):
            Kept pairs indexed `[layer][kv_head]`.
        mrope_section (`list[int]`):
            Number of pairs per axis `[t, h, w]`.

    Returns:
        `dict[str, int]`: `{"t": ..., "h": ..., "w": ...}`.
    """
    counts = dict.fromkeys(MROPE_AXES, 0)
    for layer in pairs:
        for head in layer:
            for pair in head:
                counts[mrope_axis_of_pair(pair, mrope_section)] += 1
    return counts


def check_axis_minimum(mrope_section: list[int], rope_dim: int, min_per_axis: dict[str, int]) -> dict[str, int]:
    """Validates per-axis minima of kept M-RoPE pairs against the axis sizes and `rope_dim` (before any calibration).

    Args:
        mrope_section (`list[int]`):
            Number of pairs per axis `[t, h, w]`.
        rope_dim (`int`):
            Rotary dims kept per head (even); `rope_dim // 2` pairs are kept.
        min_per_axis (`dict[str, int]`):
            Minimum kept pairs per axis, keys among `"t"`, `"h"`, `"w"` (missing keys mean 0).

    Returns:
        `dict[str, int]`: the minimum of every axis.
    """
    sections = _check_mrope_section(mrope_section)
    num_kept = _check_head_geometry(2 * sum(sections), rope_dim)
    unknown = set(min_per_axis) - set(MROPE_AXES)
    if unknown:
        raise ValueError(f"Unknown M-RoPE axes {sorted(unknown)} in `min_per_axis`; use 't', 'h' and 'w'.")
    minima = {axis: int(min_per_axis.get(axis, 0)) for axis in MROPE_AXES}
    for axis, size in zip(MROPE_AXES, sections):
        if minima[axis] < 0 or minima[axis] > size:
            raise ValueError(f"min_per_axis[{axis!r}]={minima[axis]} must lie in [0, {size}] (the axis size).")
    if sum(minima.values()) > num_kept:
        raise ValueError(
            f"The per-axis minima {minima} sum to {sum(minima.values())}, more than the {num_kept} pairs kept with "
            f"rope_dim={rope_dim}; lower the minima or raise rope_dim."
        )
    return minima


def enforce_axis_minimum(
    scores: torch.Tensor, rope_dim: int, mrope_section: list[int], min_per_axis: dict[str, int]
) -> list[list[list[int]]]:
    """Top-scoring pairs per (layer, kv head) with a guaranteed minimum number of pairs from each M-RoPE axis.

    For every head, the `min_per_axis[axis]` best pairs of each axis are taken first; the remaining
    `rope_dim/2 - sum(minima)` slots are filled with the best of the other pairs by score. Ties are broken in favour
    of the lower pair index. With all minima 0 this equals `ranks_to_pairs(scores_to_ranks(scores), rope_dim)`.

    Args:
        scores (`torch.Tensor`):
            `[num_layers, num_kv_heads, head_dim/2]` importance scores (larger = more important).
        rope_dim (`int`):
            Rotary dims kept per head (even).
        mrope_section (`list[int]`):
            Number of pairs per axis `[t, h, w]`; must sum to `head_dim/2`.
        min_per_axis (`dict[str, int]`):
            Minimum kept pairs per axis, keys among `"t"`, `"h"`, `"w"` (missing keys mean 0).

    Returns:
        `list[list[list[int]]]`: kept pair indices indexed `[layer][kv_head]`, sorted ascending.
    """
    sections = _check_mrope_section(mrope_section)
    if scores.ndim != 3:
        raise ValueError(f"`scores` must be [num_layers, num_kv_heads, head_dim/2], got {tuple(scores.shape)}.")
    num_pairs = scores.shape[-1]
    if sum(sections) != num_pairs:
        raise ValueError(
            f"`mrope_section` {mrope_section} covers {sum(sections)} pairs but the scores have {num_pairs} "
            "(head_dim/2)."
        )
    num_kept = _check_head_geometry(2 * num_pairs, rope_dim)
    minima = check_axis_minimum(sections, rope_dim, min_per_axis)

    scores = scores.detach().cpu().to(torch.float64)
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("`scores` contains NaN or Inf values.")
    # Pairs in order of decreasing score, ties by lower index.
    order = torch.argsort(-scores, dim=-1, stable=True).tolist()
    axis_of = [mrope_axis_of_pair(pair, sections) for pair in range(num_pairs)]
    result: list[list[list[int]]] = []
    for layer_order in order:
        layer_pairs = []
        for head_order in layer_order:
            kept: list[int] = []
            taken = dict.fromkeys(MROPE_AXES, 0)
            for pair in head_order:
                axis = axis_of[pair]
                if taken[axis] < minima[axis]:
                    kept.append(pair)
                    taken[axis] += 1
            for pair in head_order:
                if len(kept) == num_kept:
                    break
                if pair not in kept:
                    kept.append(pair)
            layer_pairs.append(sorted(kept))
        result.append(layer_pairs)
    return result


def rope_scores(stats: "CalibrationStatistics", strategy: str, num_kv_heads: int) -> torch.Tensor:
    """`[layers, kv_heads, head_dim/2]` importance of every rotary pair (larger = keep) from calibration statistics."""
    if strategy == "2-norm":
        return two_norm_scores(stats.stacked("q_pair_norm"), stats.stacked("k_pair_norm"), num_kv_heads)
    if strategy == "mkl":
        return aggregate_gqa(stats.stacked("mkl"), num_kv_heads)
    raise ValueError(f"rope strategy {strategy!r} does not use calibration statistics.")


def select_rope_pairs(
    config,
    rope_dim: int,
    rope_strategy: str,
    rope_ranks: str | os.PathLike | None = None,
    stats: "CalibrationStatistics | None" = None,
    rope_min_per_axis: dict[str, int] | None = None,
) -> tuple[list[list[list[int]]], str, torch.Tensor | None]:
    """Kept rotary pairs per layer and kv head, from a fixed strategy, a rank file or calibration statistics.

    Returns the pairs, a label of where they came from, and the ranks when they were computed here."""
    text = config.text_config
    head_dim = text_head_dim(text)
    if rope_ranks is not None:
        ranks = load_rank_file(rope_ranks)
        expected = (text.num_hidden_layers, text.num_key_value_heads)
        if tuple(ranks.shape[:2]) != expected:
            raise ValueError(
                f"Rank file {rope_ranks} has shape {tuple(ranks.shape)}; this model needs [layers, kv_heads, ...] = "
                f"{expected}."
            )
        return ranks_to_pairs(ranks, rope_dim, head_dim=head_dim), f"ranks:{Path(rope_ranks).name}", None
    if rope_strategy in FIXED_STRATEGIES:
        pairs = select_fixed_pairs(rope_strategy, head_dim, rope_dim, text.num_hidden_layers, text.num_key_value_heads)
        return pairs, rope_strategy, None
    if rope_strategy not in CALIBRATED_STRATEGIES:
        raise ValueError(
            f"rope_strategy must be one of {FIXED_STRATEGIES + CALIBRATED_STRATEGIES}, got {rope_strategy!r}."
        )
    if stats is None:
        raise ValueError(f"rope_strategy={rope_strategy!r} needs calibration statistics.")
    scores = rope_scores(stats, rope_strategy, text.num_key_value_heads)
    if rope_min_per_axis:
        section = (getattr(text, "rope_parameters", None) or {}).get("mrope_section")
        if section is None:
            raise ValueError("rope_min_per_axis applies to M-RoPE models (Qwen2.5-VL) only.")
        pairs = enforce_axis_minimum(scores, rope_dim, list(section), rope_min_per_axis)
        return pairs, f"{rope_strategy}+axis-min{rope_min_per_axis}", None  # not expressible as a rank file
    ranks = scores_to_ranks(scores)
    return ranks_to_pairs(ranks, rope_dim, head_dim=head_dim), rope_strategy, ranks


__all__ = [
    "CALIBRATED_STRATEGIES",
    "FIXED_STRATEGIES",
    "MROPE_AXES",
    "aggregate_gqa",
    "check_axis_minimum",
    "count_pairs_per_axis",
    "enforce_axis_minimum",
    "load_rank_file",
    "mkl_pair_sensitivity",
    "mrope_axis_of_pair",
    "pair_norms",
    "ranks_to_pairs",
    "rope_scores",
    "save_rank_file",
    "scores_to_ranks",
    "select_fixed_pairs",
    "select_rope_pairs",
    "two_norm_scores",
]
