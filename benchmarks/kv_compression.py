"""KV-cache compression at measured bytes per token: MLA (bf16 / int8 / fp8 / int4 latent) against the original model
with Transformers' quantized caches (quanto, HQQ; int4 / int2) and with token pruning (TOVA, SnapKV, H2O-style
observed attention, KNorm) at the same byte budgets.

Every method is scored with one two-phase protocol, so that what attention sees through the compressed cache decides
the scores:

1. the *context* is run into the method's cache: for VQA the prompt up to the last image token (system turn and
   image), for text the first half of every Wikipedia window;
2. the *continuation* then attends to that cache: for VQA the question, the instruction and the generation prompt,
   followed by greedy decoding of the answer; for text the second half of the window, whose next-token predictions
   (all but the first, which the context pass makes) give the perplexity and the KL to the original model.

Methods:

* `mla` rows: the converted model with its latent cache, the latent unquantized (`bf16`) or quantized on write
  (`MLAQuantizedCache`: int8 / fp8 / int4), so the context and the continuation attend to the dequantized rows.
* `quanto` / `hqq` rows: the original model with a cache of Transformers' `QuantoQuantizedLayer` /
  `HQQQuantizedLayer` quantizers (per-token groups of 64 channels = one kv head, scale and zero point, no
  full-precision residual window). Unlike Transformers' `QuantizedCache`, which hands the prompt's full-precision
  keys and values to attention, `PromptQuantizedLayer` quantizes every update before attention, prompt included
  (each update quantized once, in groups that never span tokens: no re-quantization drift).
* pruning rows (`tova`, `snapkv`, `h2o`, `knorm`): the original model's context cache pruned once, after the context
  pass, to `keep = budget` of the context tokens per layer and kv head (the continuation is never pruned). kvpress
  0.5.5 cannot hook Transformers 5.24 (its hooks read `past_key_values` and `cache_position` from the attention
  kwargs; 5.24 passes `cache` and has no `cache_position`), so the four scoring rules are implemented here, after
  kvpress's `TOVAPress`, `SnapKVPress` (window 16, kernel 5), `ObservedAttentionPress` and `KnormPress`, on the
  post-RoPE queries and keys that a registered attention function (`kv_press_scoring`) sees during the context pass.

Bytes per token and layer are measured from the tensors a cache holds after a real VQA context pass in bfloat16 (the
deployment dtype; the quality runs use `--dtype`, default float32, as bfloat16 matmuls are slow on CPUs): scales,
zero points, packing padding and the MLA rope keys and modality flag counted; pruning rows count the kept tokens'
keys and values over the context tokens.

Run on the zoo (builds the original offline, converts it with the project's API at `--settings`; GPU recommended),
on a converted pair (e.g. a recovered checkpoint), or ``--tiny`` for a tiny random pair built offline (a smoke run:
its numbers are meaningless)::

    PYTHONPATH=src python benchmarks/kv_compression.py --zoo llava --out-dir benchmarks/results
    PYTHONPATH=src python benchmarks/kv_compression.py --reference ./llava --mla ./llava-mla --out-dir DIR
    PYTHONPATH=src python benchmarks/kv_compression.py --tiny --out-dir /tmp/kv --vqa-samples 8
    PYTHONPATH=src python benchmarks/kv_compression.py --merge DIR/kv_compression_*.json --out-dir benchmarks/results
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface, DynamicCache
from transformers.cache_utils import Cache, HQQQuantizedLayer, QuantoQuantizedLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

import hf_mla_vlm  # noqa: F401  (registers the MLA classes)
from hf_mla_vlm.cache_size import cache_nbytes
from hf_mla_vlm.compat import CACHE_ARG, output_cache
from hf_mla_vlm.evaluation import load_model_and_processor, load_texts, vqa_image_size
from hf_mla_vlm.evaluation.kv_cache import KV_CACHE_DTYPES
from hf_mla_vlm.evaluation.perplexity import token_stream
from hf_mla_vlm.modeling.quantized_cache import MLAQuantizedCache
from hf_mla_vlm.utils import as_tokenizer, environment
from hf_mla_vlm.zoo.vqa_data import QTYPES, generate_split, per_type_accuracy, score_answer


QUANT_BACKENDS = ("quanto", "hqq")
QUANT_BITS = (4, 2)
PRESSES = ("tova", "snapkv", "h2o", "knorm")
SNAPKV_WINDOW, SNAPKV_KERNEL = 16, 5
SCORING_ATTENTION = "kv_press_scoring"


# --------------------------------------------------------------------------------------------------------------------
# Quantized caches of the original model that quantize the prompt too


def _tensor_nbytes(obj) -> int:
    """Bytes of a tensor, a quanto QTensor (its inner tensors, recursively) or an HQQ `(packed, meta)` pair."""
    if isinstance(obj, tuple):  # HQQ: packed uint8 rows + meta with scale and zero
        packed, meta = obj
        return _tensor_nbytes(packed) + sum(_tensor_nbytes(meta[k]) for k in ("scale", "zero"))
    if hasattr(obj, "__tensor_flatten__"):
        names, _ = obj.__tensor_flatten__()
        return sum(_tensor_nbytes(getattr(obj, name)) for name in names)
    return obj.numel() * obj.element_size()


class _PromptQuantizedMixin:
    """Quantizes every update before attention (the prompt too) in per-token groups and returns the dequantized
    states; the quantized chunks (rows padded to the packing unit, padding counted) are what the layer holds."""

    pack_rows = 4  # int2 packs 4 rows per byte along the row axis (int4: 2); padding to 4 covers both

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._chunks: list[tuple] = []
        self.cumulative_length += key_states.shape[-2]
        self._chunks.append((self._quantize_rows(key_states), self._quantize_rows(value_states)))
        keys = torch.cat([self._dequantize_rows(k) for k, _ in self._chunks], dim=-2)
        values = torch.cat([self._dequantize_rows(v) for _, v in self._chunks], dim=-2)
        return keys, values

    def _quantize_rows(self, states: torch.Tensor):
        rows = states.reshape(-1, states.shape[-1])
        self.q_group_size = math.gcd(self.q_group_size, rows.shape[-1])  # a head narrower than the group: one group
        pad = -rows.shape[0] % self.pack_rows
        if pad:
            rows = torch.cat([rows, rows.new_zeros(pad, rows.shape[-1])])
        return self._quantize(rows.contiguous(), axis=self.axis_key), states.shape

    def _dequantize_rows(self, chunk) -> torch.Tensor:
        qtensor, shape = chunk
        rows = self._dequantize(qtensor)
        return rows[: math.prod(shape[:-1])].reshape(shape).to(self.keys.dtype)

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def nbytes(self) -> int:
        return sum(_tensor_nbytes(k[0]) + _tensor_nbytes(v[0]) for k, v in getattr(self, "_chunks", []))


class PromptQuantoLayer(_PromptQuantizedMixin, QuantoQuantizedLayer):
    """quanto int4 / int2, per-token groups (`axis 0`: contiguous groups of `q_group_size` channels)."""


class PromptHQQLayer(_PromptQuantizedMixin, HQQQuantizedLayer):
    """HQQ int4 / int2, per-token groups (`axis 1`: contiguous groups of `q_group_size` channels)."""


class PromptQuantizedCache(Cache):
    """The original model's cache, quantized on write with the quanto or HQQ quantizer (see the module docstring)."""

    def __init__(self, backend: str, num_layers: int, nbits: int, group_size: int):
        layer_class, axis = (PromptQuantoLayer, 0) if backend == "quanto" else (PromptHQQLayer, 1)
        layers = [
            layer_class(nbits=nbits, axis_key=axis, axis_value=axis, q_group_size=group_size, residual_length=0)
            for _ in range(num_layers)
        ]
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


# --------------------------------------------------------------------------------------------------------------------
# Token pruning: the kvpress rules, scored on what the attention sees during the context pass


class PressScores:
    """Per layer, `(batch, kv_heads, tokens)` scores of every press; filled by the `kv_press_scoring` attention."""

    active: PressScores | None = None

    def __init__(self):
        self.scores: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)

    def add(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        batch, q_heads, length, _ = query.shape
        kv_heads = key.shape[1]
        group = q_heads // kv_heads
        keys = key.repeat_interleave(group, dim=1).float()
        logits = query.float() @ keys.transpose(-1, -2) * scaling
        causal = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()
        attn = logits.masked_fill(~causal, float("-inf")).softmax(-1)  # (B, Hq, T, T)
        grouped = attn.view(batch, kv_heads, group, length, length)
        # H2O-style observed attention (kvpress ObservedAttentionPress): attention received, over the queries that
        # can see the token
        observed = grouped.sum(3) / torch.arange(length, 0, -1, device=query.device)
        self.scores["h2o"][layer_idx] = observed.mean(2)
        # TOVA: the last query's attention averaged over all heads; the last token always kept
        tova = attn[:, :, -1].mean(1, keepdim=True).expand(batch, kv_heads, length).clone()
        tova[..., -1] = float("inf")
        self.scores["tova"][layer_idx] = tova
        # SnapKV: the last `window` queries' attention, pooled over `kernel` tokens; the window always kept
        window = min(SNAPKV_WINDOW, max(1, length // 4))
        snap = grouped[:, :, :, -window:, :].mean(3).mean(2)
        snap = F.avg_pool1d(snap, SNAPKV_KERNEL, stride=1, padding=SNAPKV_KERNEL // 2, count_include_pad=False)
        snap[..., -window:] = float("inf")
        self.scores["snapkv"][layer_idx] = snap
        # KNorm: the keys of smallest L2 norm kept
        self.scores["knorm"][layer_idx] = -key.float().norm(dim=-1)


def _scoring_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    if PressScores.active is not None and query.shape[2] == key.shape[2]:  # the context pass (no earlier cache)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        PressScores.active.add(module.layer_idx, query, key, scale)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


AttentionInterface.register(SCORING_ATTENTION, _scoring_attention)
AttentionMaskInterface.register(SCORING_ATTENTION, sdpa_mask)


@contextmanager
def scoring_presses(model):
    """Run the original model's language-model attention through `kv_press_scoring` and collect press scores."""
    text_config = model.config.get_text_config(decoder=True)
    previous = text_config._attn_implementation
    text_config._attn_implementation = SCORING_ATTENTION
    PressScores.active = scores = PressScores()
    try:
        yield scores
    finally:
        PressScores.active = None
        text_config._attn_implementation = previous


def pruned_cache(cache: DynamicCache, layer_scores: dict[int, torch.Tensor], keep: float) -> DynamicCache:
    """A copy of `cache` keeping the `keep` share (at least one) of the top-scored tokens per layer and kv head."""
    pruned = copy.copy(cache)
    pruned.layers = []
    for idx, layer in enumerate(cache.layers):
        length = layer.keys.shape[-2]
        count = max(1, math.floor(keep * length + 1e-9))  # never above the budget
        index = layer_scores[idx].topk(count, dim=-1).indices.sort(dim=-1).values  # (B, H, count)
        new = copy.copy(layer)
        new.keys = layer.keys.gather(2, index[..., None].expand(-1, -1, -1, layer.keys.shape[-1]))
        new.values = layer.values.gather(2, index[..., None].expand(-1, -1, -1, layer.values.shape[-1]))
        pruned.layers.append(new)
    return pruned


# --------------------------------------------------------------------------------------------------------------------
# The two-phase protocol


def _num_layers(model) -> int:
    return model.config.get_text_config(decoder=True).num_hidden_layers


def make_cache(model, method: dict) -> Cache | None:
    """A fresh cache for `method` (None: the model's default cache, built by its forward)."""
    if method["family"] == "mla" and method["kv"] != "bf16":
        return MLAQuantizedCache(config=model.config, dtype=method["kv"])
    if method["family"] in QUANT_BACKENDS:
        return PromptQuantizedCache(method["family"], _num_layers(model), method["bits"], method["group_size"])
    return None


def held_bytes(cache) -> int:
    return cache.nbytes() if isinstance(cache, PromptQuantizedCache) else cache_nbytes(cache)


def full_positions(model, batch: dict) -> torch.Tensor:
    """Position ids of the whole prompt: `(B, T)`, or `(3, B, T)` M-RoPE ids for Qwen2.5-VL."""
    ids = batch["input_ids"]
    get_rope_index = getattr(getattr(model, "model", None), "get_rope_index", None)
    if get_rope_index is not None and "image_grid_thw" in batch:
        kwargs = {k: batch[k] for k in ("image_grid_thw", "mm_token_type_ids", "attention_mask") if k in batch}
        return get_rope_index(ids, **kwargs)[0]
    return torch.arange(ids.shape[1]).expand(ids.shape[0], -1)


def _slice_positions(positions: torch.Tensor, start: int, stop: int | None) -> torch.Tensor:
    return positions[..., start:stop]


@torch.no_grad()
def run_context(model, batch: dict, ctx_len: int, positions: torch.Tensor, cache: Cache | None):
    """The context pass; returns the filled cache."""
    inputs = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    out = model(
        input_ids=batch["input_ids"][:, :ctx_len],
        position_ids=_slice_positions(positions, 0, ctx_len),
        use_cache=True,
        logits_to_keep=1,
        **({CACHE_ARG: cache} if cache is not None else {}),
        **inputs,
    )
    return cache if cache is not None else output_cache(out)


@torch.no_grad()
def run_continuation(model, ids: torch.Tensor, positions: torch.Tensor, cache: Cache) -> torch.Tensor:
    """Logits of `ids` attending to `cache` (which grows by them)."""
    return model(input_ids=ids, position_ids=positions, use_cache=True, **{CACHE_ARG: cache}).logits.float()


@torch.no_grad()
def greedy_answer(model, batch, ctx_len, positions, cache, max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Question pass + greedy decoding; returns the generated ids and the first answer token's log-probabilities."""
    logits = run_continuation(
        model, batch["input_ids"][:, ctx_len:], _slice_positions(positions, ctx_len, None), cache
    )
    first_logp = logits[:, -1].log_softmax(-1)
    tokens = [first_logp.argmax(-1, keepdim=True)]
    last = positions[..., -1:]
    for step in range(1, max_new_tokens):
        logits = run_continuation(model, tokens[-1], last + step, cache)
        tokens.append(logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(tokens, dim=1), first_logp


class Workload:
    """The VQA groups (equal context and prompt lengths, so no padding) and the text windows, built once."""

    def __init__(self, processor, samples, texts, seq_len: int, max_sequences: int, batch_size: int, config):
        self.samples = samples
        tokenizer = as_tokenizer(processor)
        marks = {
            getattr(config, name, None) for name in ("image_token_id", "image_token_index", "vision_end_token_id")
        }
        marks.discard(None)
        groups: dict[tuple[int, int], list[tuple[int, dict]]] = defaultdict(list)
        for i, sample in enumerate(samples):
            text = processor.apply_chat_template(
                sample.messages(with_answer=False), tokenize=False, add_generation_prompt=True
            )
            encoded = processor(text=[text], images=[sample.image], return_tensors="pt")
            ids = encoded["input_ids"][0].tolist()
            ctx_len = max(j for j, token in enumerate(ids) if token in marks) + 1
            groups[(ctx_len, len(ids))].append((i, text))
        self.vqa_groups = []
        for (ctx_len, _), members in sorted(groups.items()):
            for start in range(0, len(members), batch_size):
                chunk = members[start : start + batch_size]
                index = [i for i, _ in chunk]
                batch = processor(
                    text=[t for _, t in chunk], images=[samples[i].image for i in index], return_tensors="pt"
                )
                self.vqa_groups.append((index, ctx_len, dict(batch)))
        ids = token_stream(tokenizer, texts, max_tokens=seq_len * max_sequences) if texts else []
        windows = min(max_sequences, len(ids) // seq_len)
        self.windows = torch.tensor(ids[: windows * seq_len]).view(windows, seq_len) if windows else None
        self.tokenizer = tokenizer


def _cast(batch: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}


def _context_caches(model, methods: list[dict], batch: dict, ctx_len: int, positions: torch.Tensor) -> list:
    """The context pass, once: one cache per method (pruning methods share one scored pass, then prune copies)."""
    if methods[0].get("press") is None:
        return [run_context(model, batch, ctx_len, positions, make_cache(model, methods[0]))]
    with scoring_presses(model) as scores:
        cache = run_context(model, batch, ctx_len, positions, None)
    return [pruned_cache(cache, scores.scores[m["press"]], m["keep"]) for m in methods]


def score_methods(model, methods: list[dict], work: Workload, args, reference: dict | None) -> list[dict]:
    """VQA (per type), continuation perplexity and KL to the original (`reference`, None for the original itself),
    for one method, or for several pruning methods sharing their context pass."""
    dtype = model.dtype
    n = len(methods)
    correct = [[False] * len(work.samples) for _ in range(n)]
    vqa_kl: list[list[torch.Tensor]] = [[] for _ in range(n)]
    first_logps: dict[int, torch.Tensor] = {}
    for index, ctx_len, batch in work.vqa_groups:
        batch = _cast(batch, dtype)
        positions = full_positions(model, batch)
        for m, cache in enumerate(_context_caches(model, methods, batch, ctx_len, positions)):
            tokens, first_logp = greedy_answer(model, batch, ctx_len, positions, cache, args.max_new_tokens)
            for i, text in zip(index, work.tokenizer.batch_decode(tokens, skip_special_tokens=True)):
                correct[m][i] = score_answer(text, work.samples[i].answer)
            if reference is None:
                first_logps.update({i: first_logp[j] for j, i in enumerate(index)})
            else:
                ref = torch.stack([reference["vqa_logp"][i] for i in index])
                vqa_kl[m].append(F.kl_div(first_logp, ref, reduction="none", log_target=True).sum(-1))
    results = []
    for m in range(n):
        vqa = per_type_accuracy(work.samples, correct[m])
        results.append({"vqa": vqa["accuracy"], "vqa_per_type": vqa["per_type"], "vqa_correct": correct[m],
                        "vqa_kl": torch.cat(vqa_kl[m]).clamp_min(0).mean().item() if vqa_kl[m] else 0.0,
                        "ppl": None, "ppl_tokens": 0, "kl": None})  # fmt: skip
    if reference is None:
        results[0]["vqa_logp"] = first_logps
    if work.windows is None:
        return results
    half = work.windows.shape[1] // 2
    nll, kl, text_logps = [0.0] * n, [0.0] * n, []
    count = 0
    for w in range(work.windows.shape[0]):
        ids = work.windows[w : w + 1]
        positions = torch.arange(ids.shape[1])[None]
        targets = ids[0, half + 1 :]
        count += targets.numel()
        for m, cache in enumerate(_context_caches(model, methods, {"input_ids": ids}, half, positions)):
            logp = run_continuation(model, ids[:, half:], positions[:, half:], cache)[0, :-1].log_softmax(-1)
            nll[m] += -logp.gather(-1, targets[:, None]).sum().item()
            if reference is None:
                text_logps.append(logp.to(torch.bfloat16))
            else:
                ref = reference["text_logp"][w].float()
                kl[m] += F.kl_div(logp, ref, reduction="none", log_target=True).sum(-1).clamp_min(0).sum().item()
    for m in range(n):
        results[m].update(ppl=math.exp(nll[m] / count), ppl_tokens=count, kl=kl[m] / count)
    if reference is None:
        results[0]["text_logp"] = text_logps
    return results


@torch.no_grad()
def measured_bytes_per_token(model, method: dict, work: Workload) -> float:
    """Bytes per token and layer held after a VQA context pass in bfloat16 (pruning: after pruning)."""
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    index, ctx_len, batch = work.vqa_groups[0]
    batch = _cast({k: v[:1] for k, v in batch.items()} if "image_grid_thw" not in batch else batch, torch.bfloat16)
    positions = full_positions(bf16, batch)
    if method.get("press") is None:
        cache = run_context(bf16, batch, ctx_len, positions, make_cache(bf16, method))
    else:
        with scoring_presses(bf16) as scores:
            cache = run_context(bf16, batch, ctx_len, positions, None)
        cache = pruned_cache(cache, scores.scores[method["press"]], method["keep"])
    batch_size = batch["input_ids"].shape[0]
    return held_bytes(cache) / (batch_size * ctx_len * _num_layers(bf16))


# --------------------------------------------------------------------------------------------------------------------
# Models and methods


def parse_settings(text: str) -> list[tuple[int, int, str]]:
    """`"16:8:mkl,32:32:high"` -> `[(rope_dim, kv_rank, rope_strategy), ...]`."""
    settings = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        rope_dim, kv_rank, strategy = item.split(":")
        settings.append((int(rope_dim), int(kv_rank), strategy))
    return settings


def zoo_models(name: str, settings, calibration: int, seed: int):
    """The zoo original and its MLA conversions (MD-SVD, `settings`), converted in memory as `zoo_quality.py`."""
    from hf_mla_vlm.conversations import encode_conversations
    from hf_mla_vlm.conversion_scripts.convert import build_mla_config, convert_model
    from hf_mla_vlm.conversion_scripts.rope_selection import select_rope_pairs
    from hf_mla_vlm.conversion_scripts.statistics import collect_statistics
    from hf_mla_vlm.registry import arch_spec
    from hf_mla_vlm.zoo.models import build_zoo_model, calibration_conversations

    source, processor = build_zoo_model(name)
    arch = arch_spec(source.config.model_type)
    defaults = build_mla_config(source.config, arch)
    encoded = list(encode_conversations(processor, calibration_conversations(name, calibration, seed)))
    stats = collect_statistics(source, encoded, defaults.image_token_ids, device="cpu", progress=False)
    converted = {}
    for rope_dim, kv_rank, strategy in settings:
        pairs, _, _ = select_rope_pairs(source.config, rope_dim, strategy, stats=stats)
        config = build_mla_config(source.config, arch, rope_dim=rope_dim, kv_rank=kv_rank, rope_pairs=pairs)
        model, _ = convert_model(source, config, arch, svd="md", stats=stats, progress=False)
        converted[f"rope {rope_dim}, kv {kv_rank}, {strategy}, md"] = model.eval()
    return source.eval(), processor, converted


def methods_for(mla_models: dict, args) -> tuple[list[dict], list[dict]]:
    """MLA and quantized-cache methods (pruning methods follow from their measured budgets)."""
    mla = [{"family": "mla", "setting": label, "kv": kv} for label in mla_models for kv in args.kv_cache]
    quant = [
        {"family": backend, "setting": "original", "kv": f"int{bits}", "bits": bits, "group_size": args.group_size}
        for backend in args.quant_backends
        for bits in args.quant_bits
    ]
    return mla, quant


def evaluate_all(reference_model, processor, mla_models: dict, args, on_rows=None) -> dict:
    image_size = args.image_size or vqa_image_size(processor)
    samples = generate_split("test", args.vqa_samples, seed=args.seed, image_size=image_size)
    texts, text_label = load_texts(args.text_file) if args.text_file else (None, None)
    work = Workload(
        processor, samples, texts, args.seq_len, args.max_sequences, args.batch_size, reference_model.config
    )
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    reference_model.to(dtype)
    for model in mla_models.values():
        model.to(dtype)
    meta = {
        "reference": args.reference_label, "mla": list(mla_models), "recovery": args.recovery,
        "dtype": args.dtype, "text": text_label,
        "seq_len": args.seq_len, "windows": 0 if work.windows is None else work.windows.shape[0],
        "vqa_samples": len(samples), "vqa_seed": args.seed, "image_size": image_size,
        "max_new_tokens": args.max_new_tokens, "group_size": args.group_size, "tiny": args.tiny,
        "device": "cpu", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "PYTHONPATH=src python " + " ".join(sys.argv), "environment": environment(),
    }  # fmt: skip
    rows = []

    def record(model, methods, reference):
        t = time.perf_counter()
        for method, scores in zip(methods, score_methods(model, methods, work, args, reference)):
            row = {**method, "bytes_per_token": measured_bytes_per_token(model, method, work)}
            row.update({k: v for k, v in scores.items() if not k.endswith("_logp")})
            row["ratio_to_original"] = row["bytes_per_token"] / rows[0]["bytes_per_token"] if rows else 1.0
            row["seconds"] = round((time.perf_counter() - t) / len(methods), 1)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "vqa_correct"}), flush=True)
        if on_rows is not None:  # the rows so far, in case the run is cut short
            on_rows({"meta": {**meta, "complete": False}, "rows": rows})
        return scores

    reference = record(reference_model, [{"family": "original", "setting": "original", "kv": "bf16"}], None)
    mla_methods, quant_methods = methods_for(mla_models, args)
    for method in mla_methods:
        record(mla_models[method["setting"]], [method], reference)
    for method in quant_methods:
        record(reference_model, [method], reference)
    budgets = sorted({math.floor(1000 * r["ratio_to_original"]) / 1000 for r in rows if r["family"] == "mla"})
    if args.prune_budgets:
        budgets = sorted({*budgets, *args.prune_budgets}) if args.prune_budgets != [0] else []
    pruning = [{"family": "pruning", "setting": "original", "kv": f"keep {keep:.3f}", "press": press, "keep": keep}
               for keep in budgets for press in args.presses]  # fmt: skip
    if pruning:
        record(reference_model, pruning, reference)
    return {"meta": {**meta, "complete": True}, "rows": rows}


# --------------------------------------------------------------------------------------------------------------------
# Report


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _label(row: dict) -> str:
    if row["family"] == "mla":
        return f"MLA ({row['setting']})"
    if row["family"] == "pruning":
        return f"original + {row['press']}"
    return "original" if row["family"] == "original" else f"original + {row['family']}"


def _flips(a: dict, b: dict) -> int:
    return sum(x != y for x, y in zip(a["vqa_correct"], b["vqa_correct"]))


def comparison_lines(rows: list[dict]) -> list[str]:
    """The issue's checks: quantized latents vs the bf16 latent; MLA vs the best baseline at <= its bytes."""
    lines = ["| MLA row | bytes | VQA | ppl | best baseline at <= bytes, by VQA | its VQA / ppl | verdict |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    baselines = [r for r in rows if r["family"] not in ("mla", "original")]
    checks = []
    for row in (r for r in rows if r["family"] == "mla"):
        bf16 = next(r for r in rows if r["family"] == "mla" and r["setting"] == row["setting"] and r["kv"] == "bf16")
        if row["kv"] != "bf16":
            dv = 100 * (row["vqa"] - bf16["vqa"])
            dp = None if row["ppl"] is None else 100 * (row["ppl"] / bf16["ppl"] - 1)
            bar = 1.0 if row["kv"] == "int4" else 0.2
            ok = abs(dv) <= bar and (row["kv"] == "int4" or dp is None or abs(dp) <= 0.5)
            checks.append(
                f"- {row['setting']}, {row['kv']} vs bf16 latent: VQA {dv:+.1f} points ({_flips(row, bf16)} answers "
                f"changed), ppl {_fmt(dp, '+.2f')}% -> {'within' if ok else 'OUTSIDE'} the bar (VQA {bar} points"
                + ("" if row["kv"] == "int4" else ", ppl 0.5%")
                + ")"
            )
        fits = [b for b in baselines if b["bytes_per_token"] <= row["bytes_per_token"] * 1.001]
        if not fits:
            lines.append(f"| {row['setting']}, {row['kv']} | {row['bytes_per_token']:.1f} | {100 * row['vqa']:.1f} | "
                         f"{_fmt(row['ppl'], '.2f')} | none | - | no baseline at this budget |")  # fmt: skip
            continue
        best = max(fits, key=lambda b: (b["vqa"], -(b["ppl"] or 0)))
        best_ppl = min((b for b in fits if b["ppl"] is not None), key=lambda b: b["ppl"], default=None)
        wins_vqa = row["vqa"] >= best["vqa"]
        wins_ppl = best_ppl is None or row["ppl"] is None or row["ppl"] <= best_ppl["ppl"]
        verdict = (
            "MLA at least as good"
            if wins_vqa and wins_ppl
            else ("MLA worse on " + " and ".join(n for n, w in (("VQA", wins_vqa), ("perplexity", wins_ppl)) if not w))
        )
        lines.append(
            f"| {row['setting']}, {row['kv']} | {row['bytes_per_token']:.1f} | {100 * row['vqa']:.1f} | "
            f"{_fmt(row['ppl'], '.2f')} | {_label(best)} {best['kv']} | {100 * best['vqa']:.1f} / "
            f"{_fmt(best['ppl'], '.2f')} (best ppl: {_label(best_ppl)} {best_ppl['kv']}, {best_ppl['ppl']:.2f}) | "
            f"{verdict} |"
            if best_ppl is not None
            else f"| {row['setting']}, {row['kv']} | {row['bytes_per_token']:.1f} | {100 * row['vqa']:.1f} | - | "
            f"{_label(best)} {best['kv']} | {100 * best['vqa']:.1f} / - | {verdict} |"
        )
    return checks + [""] + lines


def results_markdown(data: dict) -> str:
    meta, rows = data["meta"], data["rows"]
    n = meta["vqa_samples"]
    types = [t for t in QTYPES if any(t in r["vqa_per_type"] for r in rows)]
    head = ("| method | KV | bytes / token / layer | / original | VQA % (± s.e.) | " + " | ".join(types)
            + " | ppl | KL text | KL answer |\n" + "|---" * (8 + len(types)) + "|\n")  # fmt: skip
    lines = []
    for row in rows:
        se = 100 * math.sqrt(max(row["vqa"] * (1 - row["vqa"]), 1e-12) / n)
        lines.append(
            f"| {_label(row)} | {row['kv']} | {row['bytes_per_token']:.1f} | {row['ratio_to_original']:.3f} | "
            f"{100 * row['vqa']:.1f} ± {se:.1f} | "
            + " | ".join(
                _fmt(None if row["vqa_per_type"].get(t) is None else 100 * row["vqa_per_type"][t], ".1f")
                for t in types
            )  # fmt: skip
            + f" | {_fmt(row['ppl'], '.3f')} | {_fmt(row['kl'], '.2e')} | {row['vqa_kl']:.2e} |"
        )
    warning = "\n**Tiny random models: a smoke run, the numbers are meaningless.**\n" if meta["tiny"] else ""
    if not meta.get("complete", True):
        warning += "\n**Partial run: the rows measured before the run was stopped.**\n"
    env = meta["environment"]
    return (
        f"# KV-cache compression at equal bytes per token: {meta['reference']}\n{warning}\n"
        f"{meta['date']}, {meta['device']}, torch {env.get('torch')}, transformers {env.get('transformers')}, compute "
        f"dtype {meta['dtype']}. Regenerate: `{meta['command']}`\n\n"
        f"MLA conversions: {', '.join(meta['mla'])} ({meta['recovery']}). {n} VQA test samples (seed "
        f"{meta['vqa_seed']}, scenes of {meta['image_size']} px; s.e. = binomial standard error of one row; rows "
        f"share the samples, so differences between rows are paired), greedy answers of {meta['max_new_tokens']} "
        "tokens. "
        f"Perplexity and KL on {meta['windows']} windows of {meta['seq_len']} tokens of {meta['text']}: the second "
        "half of each window attends to the first half through the compressed cache. KL text: next-token KL to the "
        "original on those positions; KL answer: KL of the first answer token to the original on the VQA samples.\n\n"
        "Protocol and byte accounting: see the docstring of `benchmarks/kv_compression.py`. Bytes are measured from "
        "the tensors a cache holds after a VQA context pass in bfloat16; quantized caches count scales and zero "
        f"points (group {meta['group_size']}, no full-precision residual window: the prompt is quantized before "
        "attention); pruning keeps `keep` of the context tokens per layer and kv head (the question and answer are "
        "not pruned); kvpress could not hook Transformers 5.24, so its four rules are reimplemented. Pruning's bytes "
        "are those of the pruned context: the continuation's own tokens (the question; the second half of a text "
        "window) stay unpruned, an advantage over MLA and the quantized caches, which compress every token (over a "
        "whole text window a pruned cache holds (keep + 1) / 2 of the original's bytes). Quantized caches: "
        "quanto with Transformers' default axis 0, HQQ with axis 1 (its contiguous groups; Transformers' HQQ default "
        "axis 0 would group strided elements): per-token groups for keys and values alike, not KIVI's per-channel "
        "keys.\n\n" + head + "\n".join(lines) + "\n\n## Checks\n\n" + "\n".join(comparison_lines(rows)) + "\n"
    )


# --------------------------------------------------------------------------------------------------------------------
# CLI


def merge(paths: list[str], out_dir: str) -> None:
    """One page for several runs (one per zoo model): `kv_compression.json` holds the runs, the page their tables."""
    runs = [json.loads(Path(path).read_text()) for path in paths]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_compression.json").write_text(json.dumps({"runs": runs}, indent=2, default=str))
    pages = [results_markdown(run).replace("\n## Checks", "\n### Checks").replace("# KV-cache", "## KV-cache", 1)
             for run in runs]  # fmt: skip
    title = (
        "# KV-cache compression at equal bytes per token (zoo models)\n\nOne section per run (each gives its "
        f"command); joined with `PYTHONPATH=src python {' '.join(sys.argv)}`.\n\n"
    )
    (out / "kv_compression.md").write_text(title + "\n".join(pages))
    print(f"wrote {out / 'kv_compression'}.json and .md")


def _tiny_pair(workdir: Path) -> tuple[Path, Path, Path]:
    from hf_mla_vlm.conversion_scripts.convert import convert
    from hf_mla_vlm.tiny_models import WORDS, save_tiny_vlm

    native = save_tiny_vlm("llava_next", workdir / "native")
    mla = convert(native, workdir / "mla", rope_dim=8, kv_rank=16, progress=False).output_dir
    generator = torch.Generator().manual_seed(0)
    words = [WORDS[i] for i in torch.randint(2, len(WORDS), (2000,), generator=generator).tolist()]
    text = workdir / "text.txt"
    text.write_text(" ".join(words))
    return native, mla, text


def _csv(text: str, cast=str) -> list:
    return [cast(item.strip()) for item in text.split(",") if item.strip()]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_argument_group("models (one of --zoo, --reference with --mla, --tiny)")
    source.add_argument("--zoo", choices=["llava", "llava_next", "qwen2_5_vl"], help="zoo model to build and convert")
    source.add_argument("--settings", default="16:8:mkl,32:32:high",
                        help="zoo conversions, rope_dim:kv_rank:rope_strategy, comma-separated (MD-SVD)")  # fmt: skip
    source.add_argument("--calibration", type=int, default=64, help="zoo calibration conversations")
    source.add_argument("--reference", help="the original checkpoint (with --mla)")
    source.add_argument("--mla", action="append", default=[], help="a converted (e.g. recovered) checkpoint; repeat")
    source.add_argument("--recovery", help="how the --mla checkpoints were made, for the page (e.g. the recovery run)")
    source.add_argument("--tiny", action="store_true", help="a tiny random pair built offline (smoke run)")
    p.add_argument("--kv-cache", default=",".join(KV_CACHE_DTYPES), help="MLA latent formats, comma-separated")
    p.add_argument("--quant-backends", default=",".join(QUANT_BACKENDS), help="quantized caches of the original")
    p.add_argument("--quant-bits", default="4,2", help="their bit widths")
    p.add_argument("--group-size", type=int, default=64, help="quantized-cache group (channels of one token)")
    p.add_argument("--presses", default=",".join(PRESSES), help="pruning rules")
    p.add_argument("--prune-budgets", default="", help="extra keep fractions (default: the MLA rows' ratios; 0: none)")
    p.add_argument("--text-file", default="wikipedia", help="perplexity text ('wikipedia', 'wikipedia:SPLIT', a file)")
    p.add_argument("--seq-len", type=int, default=512, help="window length (half context, half scored)")
    p.add_argument("--max-sequences", type=int, default=4, help="number of windows")
    p.add_argument("--vqa-samples", type=int, default=200, help="VQA test samples (the same for every row)")
    p.add_argument("--batch-size", type=int, default=32, help="VQA samples per forward (equal lengths only)")
    p.add_argument("--max-new-tokens", type=int, default=5, help="greedy answer length (first word scored)")
    p.add_argument("--image-size", type=int, default=None, help="scene size (default: the processor's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype of the quality runs (bytes are always measured in bfloat16)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="VQA split and calibration seed")
    p.add_argument("--out-dir", default=None, help="write kv_compression[_<tag>].json/.md here")
    p.add_argument("--merge", nargs="+", default=None, help="join these runs' JSON files into --out-dir's page")
    p.add_argument("--tag", default=None, help="file name suffix: kv_compression_<tag>")
    args = p.parse_args(argv)
    if args.merge:
        merge(args.merge, args.out_dir or "benchmarks/results")
        return
    args.kv_cache = _csv(args.kv_cache)
    args.quant_backends = _csv(args.quant_backends)
    args.quant_bits = _csv(args.quant_bits, int)
    args.presses = _csv(args.presses)
    args.prune_budgets = _csv(args.prune_budgets, float)
    choices = (
        ("--kv-cache", args.kv_cache, KV_CACHE_DTYPES),
        ("--quant-backends", args.quant_backends, QUANT_BACKENDS),
        ("--quant-bits", args.quant_bits, QUANT_BITS),
        ("--presses", args.presses, PRESSES),
    )
    for name, values, allowed in choices:
        if any(v not in allowed for v in values):
            p.error(f"{name}: choose from {','.join(map(str, allowed))}")
    if sum(bool(x) for x in (args.zoo, args.reference, args.tiny)) != 1 or bool(args.reference) != bool(args.mla):
        p.error("pass one of --zoo NAME, --reference DIR with --mla DIR, or --tiny")
    if args.recovery and not args.reference:
        p.error("--recovery describes the --mla checkpoints of --reference")
    torch.manual_seed(args.seed)
    stem = "kv_compression" + (f"_{args.tag}" if args.tag else "")

    def write(data: dict) -> None:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps(data, indent=2, default=str))
        (out / f"{stem}.md").write_text(results_markdown(data))

    with tempfile.TemporaryDirectory() as workdir:
        if args.zoo:
            reference, processor, mla_models = zoo_models(args.zoo, parse_settings(args.settings), args.calibration,
                                                          args.seed)  # fmt: skip
            args.reference_label = f"zoo {args.zoo}"
            args.recovery = "converted in memory, no recovery fine-tuning"
        else:
            if args.tiny:
                native, mla, text = _tiny_pair(Path(workdir))
                args.reference, args.mla = str(native), [str(mla)]
                args.text_file = str(text)
                args.image_size = args.image_size or 32
            reference, processor = load_model_and_processor(args.reference, device="cpu")
            mla_models = {path: load_model_and_processor(path, device="cpu")[0] for path in args.mla}
            args.reference_label = "tiny random llava_next" if args.tiny else str(args.reference)
            args.recovery = args.recovery or "checkpoints as given"
        data = evaluate_all(reference, processor, mla_models, args, on_rows=write if args.out_dir else None)
    if args.out_dir:
        write(data)
        print(f"wrote {Path(args.out_dir) / stem}.json and .md")


if __name__ == "__main__":
    main()
