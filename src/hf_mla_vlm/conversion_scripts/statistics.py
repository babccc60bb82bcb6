# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""Calibration statistics of a native VLM (or of a stage-1 `partial_rope` MLA model), collected layer by layer.

The text decoder's layer-0 inputs are captured once (vision tower, projector and embeddings run on the device, then
go back). Each decoder layer is then moved to the device alone, every calibration sample is streamed through it, and
forward hooks on its attention read the attention input `x` (post `input_layernorm`) and the rotary tables. Per layer
and modality they accumulate, in float64 (on the layer's device when that is a CUDA device, else on the CPU; each
finished layer's statistics are moved to the CPU):

* `X^T X` of the image and text tokens (`cov_*`; a held-out share of the samples, drawn per kind of sample (with
  and without images), goes to `heldout_*` instead, for measuring the approximation error on tokens the
  factorisation never saw);
* `X^T X` of held-out prose (`prose`, optional): samples of another kind than the calibration (Wikipedia test-split
  paragraphs, `calibration.heldout_prose_conversations`) that only feed this matrix;
* the mean per-pair 2-norms of the pre-RoPE queries and keys (the S_2-norm scores of MHA2MLA);
* the closed-form KL sensitivity of every rotary pair (S_MKL, method.md 2.3), on a random subset of query rows.

The float64 work of a sample (covariances, MKL) runs on a second thread while the layer runs the next samples
([`statistics_pipeline`]); the pair norms and rotary inputs are computed beside the forward, on the layer's device.

On a converted (MLA) model the rotary pairs are fixed already: only the covariances are collected there, and the
pair norms / MKL fields are NaN (`settings["attention"]` records which kind of attention was measured).

Device memory therefore peaks at one decoder layer plus the activations of one sample. With `weights` (a
[`~streaming.SourceCheckpoint`] behind a model whose parameters are on the meta device, as `convert` builds it) the
model is never whole in memory either: the parts before the first decoder layer are read for the capture and released,
then each decoder layer is read, used and released (llm-compressor's sequential pipeline). The hidden states between
layers stay on the host up to a budget and go to an offload folder beyond it ([`~streaming.IntermediatesCache`]), and
with `spill_folder` each layer's `d x d` matrices are written to disk as soon as the layer is done ([`SpilledLayers`]),
so host memory no longer grows with the number of layers.
"""

import json
import math
import os
import random
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers.utils import logging

from ..configuration.configuration_mla_common import text_head_dim
from ..errors import InputError
from ..modeling.mla_attention import MLAAttention
from ..modeling.partial_rope import rotate_half
from ..utils import atomic_file, resolve_device, to_device
from .calibration import TokenCounts
from .rope_selection import mkl_pair_sensitivity, pair_norms
from .streaming import IntermediatesCache, SourceCheckpoint, SpilledTensors, release, weight_names


logger = logging.get_logger(__name__)


STATISTICS_FORMAT = "hf_mla_vlm.calibration_statistics"
_MODALITY_FIELDS = ("cov", "heldout")
_TENSOR_FIELDS = ("q_pair_norm", "k_pair_norm", "mkl")


class _StopForward(Exception):
    pass


@dataclass
class LayerStatistics:
    """Statistics of one decoder layer (all float64, CPU)."""

    cov: dict[str, torch.Tensor]  # modality -> X^T X over calibration tokens
    heldout: dict[str, torch.Tensor]  # modality -> X^T X over held-out tokens
    tokens: dict[str, int]
    heldout_tokens: dict[str, int]
    q_pair_norm: torch.Tensor  # (n_q, head_dim/2), mean over tokens
    k_pair_norm: torch.Tensor  # (n_kv, head_dim/2)
    mkl: torch.Tensor  # (n_q, head_dim/2), mean KL over sampled query rows
    prose: torch.Tensor | None = None  # X^T X over the held-out prose tokens (None: not collected)
    prose_tokens: int = 0


@dataclass
class CalibrationStatistics:
    layers: list[LayerStatistics]
    token_counts: TokenCounts
    heldout_counts: TokenCounts
    num_samples: int
    settings: dict = field(default_factory=dict)
    prose_samples: int = 0  # held-out prose samples behind `LayerStatistics.prose`

    def stacked(self, name: str) -> torch.Tensor:
        """`[num_layers, ...]` stack of a per-layer tensor field (`q_pair_norm`, `k_pair_norm`, `mkl`)."""
        if isinstance(self.layers, SpilledLayers):  # the small fields are in memory: read no covariance
            return torch.stack([getattr(layer, name) for layer in self.layers.small])
        return torch.stack([getattr(layer, name) for layer in self.layers])

    def save(self, path: str | os.PathLike) -> None:
        """Write the statistics as one safetensors file: the tensors, and the counts and settings as JSON in its
        header (no pickle). Written atomically; `.safetensors` is the suggested suffix."""
        tensors = {}
        for i, layer in enumerate(self.layers):
            for name in _TENSOR_FIELDS:
                tensors[f"layers.{i}.{name}"] = getattr(layer, name).contiguous()
            for name in _MODALITY_FIELDS:
                for modality, tensor in getattr(layer, name).items():
                    tensors[f"layers.{i}.{name}.{modality}"] = tensor.contiguous()
            if layer.prose is not None:
                tensors[f"layers.{i}.prose"] = layer.prose.contiguous()
        description = {
            "num_layers": len(self.layers),
            "tokens": [layer.tokens for layer in self.layers],
            "heldout_tokens": [layer.heldout_tokens for layer in self.layers],
            "prose_tokens": [layer.prose_tokens for layer in self.layers],
            "prose_samples": self.prose_samples,
            "token_counts": asdict(self.token_counts),
            "heldout_counts": asdict(self.heldout_counts),
            "num_samples": self.num_samples,
            "settings": self.settings,
        }
        metadata = {"format": STATISTICS_FORMAT, "version": "1", "statistics": json.dumps(description)}
        with atomic_file(path) as temporary:
            save_file(tensors, str(temporary), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CalibrationStatistics":
        """Read statistics written by [`~CalibrationStatistics.save`] (safetensors; never unpickles anything).

        Only the counts, pair norms and MKL scores are read here; each layer's `d x d` matrices (up to five float64
        `hidden x hidden` ones) stay in the file and are read when a step uses them (`layers` is a
        [`SpilledLayers`]), so host memory does not grow with the number of layers. The file must stay in place
        while the statistics are in use.

        Raises:
            `FileNotFoundError`: no file at `path`.
            `InputError`: the file is not hf-mla-vlm statistics, or is an old pickle file (`torch.save`), which is
                refused because loading it could run code.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Calibration statistics {path} not found.")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                keys = set(handle.keys())
                small = {key: handle.get_tensor(key) for key in keys if key.rsplit(".", 1)[-1] in _TENSOR_FIELDS}
        except (SafetensorError, OSError, ValueError) as error:
            with open(path, "rb") as handle:
                head = handle.read(4)
            if head.startswith((b"PK\x03\x04", b"\x80")):
                raise InputError(
                    f"{path} holds calibration statistics saved with pickle (torch.save) by an older hf-mla-vlm; "
                    "pickle files can run code when loaded and are refused. Regenerate them (convert without "
                    "statistics=, or collect_statistics(...).save(path)): they are now written as safetensors."
                ) from error
            raise InputError(f"{path} is not a calibration statistics file ({error}).") from error
        if metadata.get("format") != STATISTICS_FORMAT:
            raise InputError(
                f"{path} is a safetensors file but not hf-mla-vlm calibration statistics (its header has no "
                f"format={STATISTICS_FORMAT!r}); pass a file written by CalibrationStatistics.save."
            )
        try:
            description = json.loads(metadata["statistics"])
            layers = SpilledLayers()
            for i in range(description["num_layers"]):
                prefix = f"layers.{i}."
                missing = {f"{prefix}{name}.{m}" for name in _MODALITY_FIELDS for m in ("text", "image")} - keys
                if missing:
                    raise KeyError(sorted(missing)[0])
                layer = LayerStatistics(
                    cov={},
                    heldout={},
                    tokens=description["tokens"][i],
                    heldout_tokens=description["heldout_tokens"][i],
                    **{name: small[f"{prefix}{name}"] for name in _TENSOR_FIELDS},
                    prose_tokens=description.get("prose_tokens", [0] * (i + 1))[i],
                )
                layers.attach(layer, path, prefix, has_prose=f"{prefix}prose" in keys)  # absent in older files
            return cls(
                layers=layers,
                token_counts=TokenCounts(**description["token_counts"]),
                heldout_counts=TokenCounts(**description["heldout_counts"]),
                num_samples=description["num_samples"],
                settings=description["settings"],
                prose_samples=description.get("prose_samples", 0),
            )
        except (KeyError, TypeError, ValueError, IndexError) as error:
            raise InputError(f"{path}: incomplete calibration statistics ({error!r}); regenerate the file.") from error


class SpilledLayers(Sequence):
    """Per-layer statistics whose `d x d` matrices stay in safetensors files: one file per layer written by `spill`
    during a collection, or a saved statistics file (`CalibrationStatistics.load`, one prefix per layer). Indexing
    reads a layer's held-out prose matrix, and its covariances one at a time on access (`SpilledTensors`), so that
    only the layer a step works on costs memory. The small fields (counts, pair norms, MKL) stay in memory
    (`small`)."""

    def __init__(self):
        self.small: list[LayerStatistics] = []  # the layers without their d x d matrices
        self.files: list[tuple[Path, str]] = []  # per layer: the file holding its matrices, and their key prefix
        self.has_prose: list[bool] = []

    def spill(self, layer: LayerStatistics, path: Path) -> None:
        """Write `layer`'s matrices to `path` and keep only its small fields."""
        tensors = {f"{name}.{m}": getattr(layer, name)[m].contiguous() for name in _MODALITY_FIELDS for m in layer.cov}
        if layer.prose is not None:
            tensors["prose"] = layer.prose.contiguous()
        with atomic_file(path) as temporary:
            save_file(tensors, str(temporary))
        self.attach(layer, path, "", layer.prose is not None)

    def attach(self, layer: LayerStatistics, path: Path, prefix: str, has_prose: bool) -> None:
        """Add a layer whose matrices are in `path` under `prefix` (`<prefix>cov.text`, ..., `<prefix>prose`); only
        `layer`'s small fields are kept."""
        self.small.append(replace(layer, cov={}, heldout={}, prose=None))
        self.files.append((Path(path), prefix))
        self.has_prose.append(has_prose)

    def __len__(self) -> int:
        return len(self.small)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        path, prefix = self.files[index]
        lazy = {name: SpilledTensors(path, ("text", "image"), prefix=f"{prefix}{name}.") for name in _MODALITY_FIELDS}
        prose = SpilledTensors(path, ("prose",), prefix=prefix)["prose"] if self.has_prose[index] else None
        return replace(self.small[index], **lazy, prose=prose)


@contextmanager
def hooks_removed(*handles):
    """Remove the hook `handles` when the block ends, however it ends."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def forward_pre_hook(module: torch.nn.Module, hook):
    """Register a keyword-aware forward pre-hook for the duration of the block; always removed."""
    return hooks_removed(module.register_forward_pre_hook(hook, with_kwargs=True))


@contextmanager
def statistics_pipeline(device: torch.device, queued: int = 3):
    """Yield `run(fn, *args)`, which calls `fn(*args)` on one background thread, in submission order, with at most
    `queued` calls outstanding (the caller waits beyond that), so that a layer's statistics of the last samples are
    computed while the layer runs the next ones. The calls see the same inputs in the same order as inline calls, so
    the statistics are those of an inline run at the same thread count. With one torch thread there is nothing to
    overlap and `run` calls inline. When the layers run on the CPU too, the intra-op threads are split between the
    two sides for the block (`torch.set_num_threads`, restored after) so that they do not compete for the cores. A
    call's exception is raised in the caller, at a later `run` or when the block ends."""
    threads = torch.get_num_threads()
    if threads < 2:
        yield lambda fn, *args: fn(*args)
        return
    if device.type == "cpu":
        torch.set_num_threads(threads // 2)
    pending: list[Future] = []
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="calibration-statistics")

    def run(fn, *args):
        while len(pending) >= queued:
            pending.pop(0).result()
        pending.append(executor.submit(torch.no_grad()(fn), *args))

    try:
        yield run
        while pending:
            pending.pop(0).result()
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)


@torch.no_grad()
def capture_layer_inputs(model, text_layers, samples: Iterable[dict], device) -> list[tuple[torch.Tensor, dict]]:
    """Run every sample up to the first text decoder layer and keep its inputs (on CPU)."""
    captured = []

    def grab(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        keep = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "cache", "past_key_values", "use_cache")}
        captured.append((hidden.cpu(), to_device(keep, "cpu")))
        raise _StopForward

    with forward_pre_hook(text_layers[0], grab):
        for sample in samples:
            try:
                model(**to_device(sample, device), use_cache=False)
            except _StopForward:
                pass
    return captured


def attention_kind(attention: torch.nn.Module) -> str:
    """`native` for an original attention, else the `mla_stage` of a converted [`MLAAttention`]."""
    return attention.stage if isinstance(attention, MLAAttention) else "native"


def _apply_full_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


class _LayerAccumulator:
    """One decoder layer's statistics, added sample by sample in float64 on `device` (the layer's device when that
    is a CUDA device, else the CPU; `result` hands them back on the CPU): `rotary_terms` runs in the caller, `add`
    on the statistics thread (`statistics_pipeline`)."""

    def __init__(self, layer_idx: int, hidden: int, n_q: int, n_kv: int, head_dim: int, scaling: float, *,
                 with_prose: bool, device: torch.device | str = "cpu"):  # fmt: skip
        self.device = torch.device(device)
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=self.device)  # noqa: E731
        self.layer_idx, self.n_q, self.n_kv, self.head_dim, self.scaling = layer_idx, n_q, n_kv, head_dim, scaling
        self.cov = {m: zeros(hidden, hidden) for m in ("text", "image")}
        self.held = {m: zeros(hidden, hidden) for m in ("text", "image")}
        self.tokens, self.held_tokens = {"text": 0, "image": 0}, {"text": 0, "image": 0}
        self.prose, self.prose_tokens = (zeros(hidden, hidden) if with_prose else None), 0
        self.q_norm, self.k_norm, self.norm_tokens = zeros(n_q, head_dim // 2), zeros(n_kv, head_dim // 2), 0
        self.mkl, self.mkl_rows = zeros(n_q, head_dim // 2), 0

    def rotary_terms(self, q, k, rope, valid: torch.Tensor, rng: random.Random, num_rows: int):
        """Add a calibration sample's pre-RoPE pair norms (`q`, `k`: the projections' outputs) and return what its
        MKL term needs: the post-RoPE `q`, `k` on the statistics device and `num_rows` query rows drawn with `rng`."""
        wide = torch.promote_types(q.dtype, torch.float32)  # float32 or the model's wider dtype (float64 tests)
        q = q.view(1, -1, self.n_q, self.head_dim).transpose(1, 2).to(wide)  # (1, H, T, D)
        k = k.view(1, -1, self.n_kv, self.head_dim).transpose(1, 2).to(wide)
        keep = valid.to(q.device)
        for total, x, heads in ((self.q_norm, q, self.n_q), (self.k_norm, k, self.n_kv)):
            total += (
                pair_norms(x[0].transpose(0, 1)[keep].flatten(1), heads, self.head_dim)
                .double()
                .sum(0)
                .to(total.device)
            )
        self.norm_tokens += int(keep.sum())
        cos, sin = rope
        cos, sin = cos.to(wide), sin.to(wide)
        q_rot, k_rot = _apply_full_rope(q, cos, sin), _apply_full_rope(k, cos, sin)
        rows = keep.nonzero().flatten().tolist()
        rows = sorted(rng.sample(rows, min(len(rows), num_rows)))
        return q_rot[0].to(self.device), k_rot[0].to(self.device), torch.tensor(rows, device=self.device)

    def add(self, i: int, x: torch.Tensor, valid: torch.Tensor, is_image: torch.Tensor, role: str, rotary) -> None:
        """Add sample `i`'s attention input `x` (`(1, T, d)`) to the covariances of its `role` (`calibration`,
        `heldout` or `prose`) and its MKL term (`rotary_terms`, or None)."""
        if not torch.isfinite(x).all():  # checked before the (finiteness-preserving) widening
            raise ValueError(f"Layer {self.layer_idx}: non-finite attention inputs on calibration sample {i}.")
        x = x[0].to(self.device, torch.float64)  # (T, d)
        valid, is_image = valid.to(self.device), is_image.to(self.device)
        if role == "prose":
            xp = x[valid & ~is_image]
            self.prose += xp.T @ xp
            self.prose_tokens += xp.shape[0]
            return
        target, target_tokens = (self.held, self.held_tokens) if role == "heldout" else (self.cov, self.tokens)
        for modality, select in (("text", valid & ~is_image), ("image", valid & is_image)):
            xm = x[select]
            target[modality] += xm.T @ xm
            target_tokens[modality] += xm.shape[0]
        if rotary is not None:
            q_rot, k_rot, rows = rotary
            sens = mkl_pair_sensitivity(q_rot, k_rot, self.scaling, key_padding_mask=valid, query_index=rows)
            self.mkl += sens * rows.numel()
            self.mkl_rows += rows.numel()

    def result(self) -> LayerStatistics:
        matrices = [*self.cov.items(), *self.held.items()] + (
            [("prose", self.prose)] if self.prose is not None else []
        )
        for name, tensor in matrices:
            if not torch.isfinite(tensor).all():
                raise ValueError(f"Layer {self.layer_idx}: non-finite {name} covariance; check the model and data.")
        mean = lambda total, count: total / count if count else torch.full_like(total, math.nan)  # noqa: E731
        cpu = lambda tensor: None if tensor is None else tensor.cpu()  # noqa: E731
        return LayerStatistics(
            cov={m: cpu(t) for m, t in self.cov.items()},
            heldout={m: cpu(t) for m, t in self.held.items()},
            tokens=self.tokens,
            heldout_tokens=self.held_tokens,
            q_pair_norm=cpu(mean(self.q_norm, self.norm_tokens)),
            k_pair_norm=cpu(mean(self.k_norm, self.norm_tokens)),
            mkl=cpu(mean(self.mkl, self.mkl_rows)),
            prose=cpu(self.prose),
            prose_tokens=self.prose_tokens,
        )


@torch.no_grad()
def collect_statistics(
    model,
    samples: list[dict],
    image_token_ids: list[int],
    *,
    text_layers_path: str = "model.language_model.layers",
    device: torch.device | str | None = None,
    heldout_fraction: float = 0.125,
    mkl_queries_per_sample: int = 128,
    seed: int = 0,
    progress: bool = True,
    heldout_prose: list[dict] | None = None,
    weights: SourceCheckpoint | None = None,
    spill_folder: str | os.PathLike | None = None,
    host_budget: int | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> CalibrationStatistics:
    """Collect the per-layer statistics of a VLM on encoded calibration samples.

    The covariances of the attention inputs are collected for any model; the rotary statistics (pair norms, MKL)
    only for a native one, whose rotary pairs are still to be selected (a converted attention has them fixed and has
    no `k_proj`); on a converted model those fields are NaN.

    Args:
        model: the native `...ForConditionalGeneration` model, or a converted one (e.g. a stage-1 `partial_rope`
            model, for stage 2's MD-SVD); any device, layers are moved one at a time.
        samples: batch-1 processor outputs (`encode_conversations`).
        image_token_ids: token ids of the image modality.
        text_layers_path: attribute path of the text decoder layers.
        device: where each layer runs (default: CUDA if available, else CPU).
        heldout_fraction: share of the samples kept out of the covariances (for the error report), drawn separately
            among the samples with and without image tokens, so that a mixed calibration keeps both kinds.
        mkl_queries_per_sample: query rows per sample for the MKL sensitivity (bounds its `O(P * T_q * T)` cost).
        seed: sampling seed (held-out split, query rows).
        progress: show progress bars.
        heldout_prose: batch-1 processor outputs of text the calibration does not contain (e.g. Wikipedia test-split
            prose): they only feed `LayerStatistics.prose`, the report's second held-out measurement.
        weights: the source's weights, when `model`'s parameters are on the meta device (`streaming.empty_model`):
            every part is read in float32 when it runs and released after (the LM head is never read).
        spill_folder: write each layer's `d x d` matrices there once the layer is done (the result's `layers` is a
            [`SpilledLayers`] reading them back on access); None keeps them in memory.
        host_budget: bytes of hidden states kept on the host between layers (None: no bound); the rest goes to
            `offload_folder` (`streaming.IntermediatesCache`).
        offload_folder: where hidden states beyond `host_budget` go.
    """
    device = resolve_device(device)
    # float64 statistics beside the layer on a CUDA device (its FP64 units, no per-sample copy to the host; the MKL
    # sums over T x T keys per sample dominated the host's share), else on the CPU (MPS has no float64)
    statistics_device = device if device.type == "cuda" else torch.device("cpu")
    text_layers = model.get_submodule(text_layers_path)
    text = model.config.text_config
    n_q, n_kv = text.num_attention_heads, text.num_key_value_heads
    head_dim = text_head_dim(text)
    hidden = text.hidden_size
    rng = random.Random(seed)
    image_ids = torch.tensor(image_token_ids)
    with_images = [i for i, sample in enumerate(samples) if torch.isin(sample["input_ids"], image_ids).any()]
    heldout_ids = set()
    for group in (with_images, sorted(set(range(len(samples))) - set(with_images))):
        if len(group) > 1:
            count = min(len(group) - 1, max(1, math.floor(len(group) * heldout_fraction)))
            heldout_ids |= set(rng.sample(group, count))
    prose = list(heldout_prose or [])
    prose_ids = set(range(len(samples), len(samples) + len(prose)))
    samples = list(samples) + prose

    counts, heldout_counts = TokenCounts(), TokenCounts()
    image_masks, valid_masks = [], []
    for i, sample in enumerate(samples):
        ids, attention = sample["input_ids"], sample.get("attention_mask")
        if i not in prose_ids:
            (heldout_counts if i in heldout_ids else counts).add(ids, image_token_ids, attention)
        image_masks.append(torch.isin(ids[0], torch.tensor(image_token_ids, dtype=ids.dtype)))
        valid_masks.append(attention[0].bool() if attention is not None else torch.ones_like(ids[0], dtype=torch.bool))

    # Everything but the text decoder layers goes to the device for the capture, then back (or is read, then
    # released).
    names = weight_names(model)[0] if weights is not None else []
    in_layers = [[n for n in names if n.startswith(f"{text_layers_path}.{i}.")] for i in range(len(text_layers))]
    capture_names = [n for n in names if not n.startswith((f"{text_layers_path}.", "lm_head."))]
    original_device = device if weights is not None else next(model.parameters()).device
    if weights is not None:
        weights.load_into(model, capture_names, torch.float32, device)
    if device != original_device or weights is not None:
        _move_non_layers(model, text_layers, device)
    captured = capture_layer_inputs(model, text_layers, samples, device)
    if device != original_device:
        _move_non_layers(model, text_layers, original_device)
    if weights is not None:
        release(model, capture_names)
        _move_non_layers(model, text_layers, "cpu")
    kind = attention_kind(text_layers[0].self_attn)
    hidden_cache = IntermediatesCache(host_budget, offload_folder)
    inputs = []
    for i, (hidden_states, kwargs) in enumerate(captured):
        hidden_cache.put(i, hidden_states)
        inputs.append(kwargs)
    del captured

    stats = SpilledLayers() if spill_folder is not None else []
    roles = [
        "prose" if i in prose_ids else "heldout" if i in heldout_ids else "calibration" for i in range(len(samples))
    ]
    for layer_idx, layer in enumerate(tqdm(text_layers, desc="Calibration statistics (layers)", disable=not progress)):
        if weights is not None:
            weights.load_into(model, in_layers[layer_idx], torch.float32, device)
        else:
            layer.to(device)
        attn = layer.self_attn
        accumulator = _LayerAccumulator(layer_idx, hidden, n_q, n_kv, head_dim, attn.scaling, with_prose=bool(prose),
                                        device=statistics_device)  # fmt: skip
        seen = {}

        def read_attention_input(module, args, kwargs, seen=seen):
            seen["x"] = kwargs.get("hidden_states", args[0] if args else None)
            seen["rope"] = kwargs.get("position_embeddings")

        def read_output(name, seen=seen):
            def hook(module, args, output):
                seen[name] = output

            return hook

        # The pre-RoPE queries and keys the layer computes anyway (a native attention only).
        projections = {"q": attn.q_proj, "k": attn.k_proj} if kind == "native" else {}
        handles = [proj.register_forward_hook(read_output(name)) for name, proj in projections.items()]
        with forward_pre_hook(attn, read_attention_input), hooks_removed(*handles), statistics_pipeline(device) as run:
            for i, kwargs in enumerate(inputs):
                out = layer(hidden_cache.get(i).to(device), **to_device(kwargs, device))
                hidden_cache.put(i, out[0] if isinstance(out, tuple) else out)
                rotary = None
                if kind == "native" and roles[i] == "calibration":
                    rotary = accumulator.rotary_terms(seen["q"], seen["k"], seen["rope"], valid_masks[i], rng,
                                                      mkl_queries_per_sample)  # fmt: skip
                run(accumulator.add, i, seen["x"], valid_masks[i], image_masks[i], roles[i], rotary)
        if weights is not None:
            release(model, in_layers[layer_idx])
        else:
            layer.to(original_device)
        layer_stats = accumulator.result()
        if spill_folder is not None:
            stats.spill(layer_stats, Path(spill_folder) / f"layer-{layer_idx:05d}.safetensors")
        else:
            stats.append(layer_stats)
        del layer_stats, accumulator
    hidden_cache.clear()
    return CalibrationStatistics(
        layers=stats,
        token_counts=counts,
        heldout_counts=heldout_counts,
        num_samples=len(samples) - len(prose),
        prose_samples=len(prose),
        settings={
            "heldout_fraction": heldout_fraction,
            "mkl_queries_per_sample": mkl_queries_per_sample,
            "seed": seed,
            "attention": kind,
        },
    )


def _move_non_layers(model, text_layers, device) -> None:
    layer_params = {id(p) for p in text_layers.parameters()} | {id(b) for b in text_layers.buffers()}
    for module in model.modules():
        for param in list(module.parameters(recurse=False)):
            if id(param) not in layer_params and not param.is_meta:  # meta: not read (the LM head of a lazy model)
                param.data = param.data.to(device)
        for name, buffer in list(module.named_buffers(recurse=False)):
            if id(buffer) not in layer_params:
                module._buffers[name] = buffer.to(device)


__all__ = [
    "CalibrationStatistics",
    "LayerStatistics",
    "SpilledLayers",
    "attention_kind",
    "capture_layer_inputs",
    "collect_statistics",
]
