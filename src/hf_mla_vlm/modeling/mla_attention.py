# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
r"""Multi-Head Latent Attention converted from a GQA/MHA decoder layer (MHA2MLA-VLM), with a latent-only KV cache.

Symbols: those of `latent_cache.py` (H, N, G, D, R, P, V = D, L, M), plus `d` the hidden size and `m` a token's
modality (`text` or `image`). Qwen2.5-VL-7B at rope_dim 32, kv_rank 64: H = 28, N = 4, D = 128, R = 32, P = 96,
L = 256.

Weights (`stage="mla"`):

    q_proj        [H*D, d] (+bias)   rows permuted so each head reads [q_rope (R) | q_nope (P)]
    k_rope_proj   [N*R, d] (+bias)   the kept rows of the original k_proj
    kv_a_proj[m]  [L, d]             down-projection W_dkv^m (no bias)
    kv_b_proj[m]  [N*(P+D), L] (+b)  up-projection, per kv head [W_uk^m (P rows) | W_uv^m (D rows)]
    o_proj        unchanged

In the `partial_rope` stage (stage 1 of the recovery) `kv_a_proj/kv_b_proj` are replaced by the full-rank
`k_nope_proj [N*P, d]` and `v_proj [N*D, d]`, and the cache holds ordinary keys and values.

Cache (`stage="mla"`): per token and layer only the latent `c = W_dkv^m x` and a side row of post-RoPE rope keys
and the modality flag, in the layout that `latent_cache.LatentCacheLayout` owns (`self.cache_layout` packs the new
rows and reads the cached ones). A quantized latent cache (`quantized_cache.MLAQuantizedCache`) stores the latent as
quantized rows as it is written: the prefill decompresses the dequantized rows and the decode kernel reads the bytes,
so both attend to what the cache holds. Partial RoPE (kept dims, rotation) is `partial_rope.py`.

Prefill (many query tokens) decompresses: `[k_nope | v] = W_b^{m_t} c_t + b^{m_t}` for every cached token,
`K = [k_rope | k_nope]`, then standard causal GQA attention through the attention interface (SDPA by default).
Without a cache (`use_cache=False`: training, scoring) the new tokens' latents are decompressed directly, with the
values the cache rows would hold.

Decode (one query token) is absorbed and reads only the cache:

    s_t = scale * (q_rope . k_rope_t + (W_uk^{m_t,g}^T q_nope) . c_t + q_nope . b_k^{m_t,g})
    o   = sum_m W_uv^{m,g} (sum_{t in m} p_t c_t) + b_v^{m,g} sum_{t in m} p_t

which equals the decompressed attention exactly (up to rounding).
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..kernels.reference import mla_decode_reference
from .latent_cache import LatentCacheLayout
from .partial_rope import apply_partial_rope, rope_index


MODALITIES = ("text", "image")

# The `nn.Linear` layers of an MLA attention, as peft's `target_modules` (suffix match). peft adapts linear layers,
# not the per-modality `ModuleDict` containers, so `"kv_a_proj"` alone is refused ("Target module ModuleDict is not
# supported"): name the branches. Add `exclude_modules=r".*vision.*"` to leave the vision tower's `q_proj` alone.
PEFT_TARGET_MODULES = (
    "q_proj",
    "k_rope_proj",
    *(f"{proj}.{branch}" for proj in ("kv_a_proj", "kv_b_proj") for branch in MODALITIES),
    "o_proj",
)

# Absorbed-decode kernels by device type, with the contract of `mla_decode_reference`. The plain-torch reference
# serves every device; `import hf_mla_vlm` registers its Triton kernel for "cuda" when Triton is available (the
# remote-code bundle ships without it and stays on the reference). Registered kernels run without autograd: a decode
# step that needs gradients takes the reference.
DECODE_KERNELS: dict[str, Callable] = {}


def register_decode_kernel(device_type: str, kernel: Callable) -> None:
    """Use `kernel` for absorbed single-token decode on `device_type` (e.g. "cuda")."""
    DECODE_KERNELS[device_type] = kernel


class MLAAttention(nn.Module):
    """Text attention of a converted VLM decoder layer (see the module docstring for the maths).

    Args:
        config: the top-level MLA config (`LlavaMLAConfig`, `Qwen2_5_VLMLAConfig`, ...).
        layer_idx: index of the decoder layer; selects `config.rope_pairs[layer_idx]`.
        qkv_bias, o_bias: whether the q/k/v and the o projections have biases: those of the native attention this
            one replaces (`modeling_mla_common.with_mla_attention` reads them off it).
    """

    def __init__(self, config, layer_idx: int, *, qkv_bias: bool, o_bias: bool):
        super().__init__()
        text = config.text_config
        self.config = text  # the attention interface reads `self.config._attn_implementation`
        self.layer_idx = layer_idx
        self.stage = config.mla_stage
        self.num_heads = text.num_attention_heads
        self.num_key_value_heads = text.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.head_dim = config.mla_head_dim
        self.rope_dim = config.rope_dim
        self.nope_dim = self.head_dim - self.rope_dim
        self.kv_rank = config.kv_rank
        self.latent_dim = config.mla_latent_dim
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = getattr(text, "attention_dropout", 0.0)
        self.is_causal = True
        self.branches = MODALITIES if config.modality_split else MODALITIES[:1]
        # Absorbed single-token decode; tests switch it off to compare against the decompressed path.
        self.use_absorbed_decode = True

        hidden, n_kv = text.hidden_size, self.num_key_value_heads
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_rope_proj = nn.Linear(hidden, n_kv * self.rope_dim, bias=qkv_bias)
        if self.stage == "partial_rope":
            self.k_nope_proj = nn.Linear(hidden, n_kv * self.nope_dim, bias=qkv_bias)
            self.v_proj = nn.Linear(hidden, n_kv * self.head_dim, bias=qkv_bias)
        else:
            up = n_kv * (self.nope_dim + self.head_dim)
            self.kv_a_proj = nn.ModuleDict({m: nn.Linear(hidden, self.latent_dim, bias=False) for m in self.branches})
            self.kv_b_proj = nn.ModuleDict({m: nn.Linear(self.latent_dim, up, bias=qkv_bias) for m in self.branches})
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=o_bias)

        # Which cos/sin entries each kv head keeps: derived from the config, never saved. A plain attribute rather
        # than a buffer, so meta-device initialisation in `from_pretrained` cannot leave it unset.
        self._rope_pairs = config.rope_pairs[layer_idx]
        self._rope_index = None
        self.cache_layout = LatentCacheLayout(self.num_key_value_heads, self.rope_dim, self.latent_dim)
        self._quantized_layouts: dict = {}  # LatentQuantization -> layout, see `_layout_for`
        self._decode_key, self._decode_cache = None, None  # see `_cached_decode_weights`

    def rope_index(self, device: torch.device) -> torch.Tensor:
        """`(N, R)` indices into the per-position `cos`/`sin` of the dims each kv head keeps."""
        if torch.compiler.is_compiling():  # a graph constant: a tensor kept on the module would belong to a CUDA graph
            return rope_index(self._rope_pairs, self.head_dim, device)
        if self._rope_index is None or self._rope_index.device != device:
            self._rope_index = rope_index(self._rope_pairs, self.head_dim, device)
        return self._rope_index

    # ------------------------------------------------------------------------------------------------------------
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        cache=None,
        image_token_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Transformers 5.24 passes the cache as `cache=`, 5.17-5.23 as `past_key_values=`.
        past_key_values = cache if cache is not None else past_key_values
        bsz, q_len, _ = hidden_states.shape
        n_kv, groups = self.num_key_value_heads, self.num_key_value_groups

        query = self.q_proj(hidden_states).view(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        q_rope, q_nope = query.split([self.rope_dim, self.nope_dim], dim=-1)
        k_rope = self.k_rope_proj(hidden_states).view(bsz, q_len, n_kv, self.rope_dim).transpose(1, 2)

        cos, sin = position_embeddings  # (B, S, D); Qwen2.5-VL's M-RoPE arrives already recomposed per pair
        rope_index = self.rope_index(cos.device)
        cos_k = cos[..., rope_index].transpose(1, 2)  # (B, N, S, R)
        sin_k = sin[..., rope_index].transpose(1, 2)
        # the query heads of a kv group share its rotary dims: rotate them as (B, N, G, S, R) against (B, N, 1, S, R)
        q_rope = apply_partial_rope(
            q_rope.view(bsz, n_kv, groups, q_len, self.rope_dim), cos_k.unsqueeze(2), sin_k.unsqueeze(2)
        ).view(bsz, self.num_heads, q_len, self.rope_dim)
        k_rope = apply_partial_rope(k_rope, cos_k, sin_k)

        if self.stage == "partial_rope":
            k_nope = self.k_nope_proj(hidden_states).view(bsz, q_len, n_kv, self.nope_dim).transpose(1, 2)
            value = self.v_proj(hidden_states).view(bsz, q_len, n_kv, self.head_dim).transpose(1, 2)
            key = torch.cat([k_rope, k_nope], dim=-1)
            if past_key_values is not None:
                key, value = past_key_values.update(key, value, self.layer_idx)
            query = torch.cat([q_rope, q_nope], dim=-1)
            return self._attend(query, key, value, attention_mask, bsz, q_len, **kwargs)

        is_image = self._image_mask(image_token_mask, bsz, q_len, hidden_states.device)
        latent = self._down_project(hidden_states, is_image)
        if past_key_values is None:
            # no cache (training, scoring): attend to this call's rows as the cache would hold them, without packing
            # them into cache rows and reading them back (the same values, a dozen fewer operators per layer)
            k_nope, value = self._up_project(latent, is_image)
            queries, keys = (q_rope, q_nope), (k_rope.to(latent.dtype), k_nope)
            return self._attend_parts(queries, keys, value, attention_mask, bsz, q_len, **kwargs)
        layout = self.cache_layout
        keys, values = layout.pack(latent, k_rope, is_image)
        keys, values = past_key_values.update(keys, values, self.layer_idx)
        layout = self._layout_for(past_key_values)  # a quantized latent cache returns the stored rows
        latent, side = layout.views(keys, values)  # (B, T, L) (quantized: (B, T, K) uint8 rows), (B, T, N*R + 1)
        kv_len = latent.shape[1]

        if (
            q_len == 1
            and self.use_absorbed_decode
            and (attention_mask is None or isinstance(attention_mask, torch.Tensor))
            and not kwargs.get("output_attentions", getattr(self.config, "output_attentions", False))
        ):  # attention weights, when asked for, come from the decompressed path
            key_mask = self._decode_key_mask(attention_mask, past_key_values, bsz, kv_len, latent.device)
            out = self._absorbed_decode(q_rope, q_nope, side, latent, key_mask, layout.quantization)
            return self.o_proj(out.reshape(bsz, 1, -1)), None

        # prefill attends to what the cache holds: a quantized latent is dequantized here, the new tokens' included
        k_nope, value = self._up_project(layout.latent_values(latent, side.dtype), layout.image_flags(side))
        queries, keys = (q_rope, q_nope), (layout.rope_keys(side), k_nope)
        return self._attend_parts(queries, keys, value, attention_mask, bsz, q_len, **kwargs)

    def _layout_for(self, past_key_values) -> LatentCacheLayout:
        """`self.cache_layout` with the latent format of this layer's cache (`MLAQuantizedCache` and friends expose
        `latent_quantization` on their layers; every other cache holds the latent unquantized)."""
        layers = getattr(past_key_values, "layers", None)
        layer = layers[self.layer_idx] if layers is not None and self.layer_idx < len(layers) else None
        quantization = getattr(layer, "latent_quantization", None)
        if quantization is None:
            return self.cache_layout
        if quantization not in self._quantized_layouts:
            self._quantized_layouts[quantization] = self.cache_layout.quantized(quantization)
        return self._quantized_layouts[quantization]

    # ------------------------------------------------------------------------------------------------------------
    def _attend(self, query, key, value, attention_mask, bsz, q_len, **kwargs):
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention)
        out, weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        return self.o_proj(out.reshape(bsz, q_len, -1).contiguous()), weights

    def _attend_parts(self, queries, keys, value, attention_mask, bsz, q_len, **kwargs):
        """`_attend` of queries and keys given as their (rope, no-rope) parts, joined per head."""
        return self._attend(torch.cat(queries, -1), torch.cat(keys, -1), value, attention_mask, bsz, q_len, **kwargs)

    def _image_mask(self, image_token_mask, bsz, q_len, device) -> torch.Tensor:
        if image_token_mask is None or len(self.branches) == 1:
            return torch.zeros(bsz, q_len, dtype=torch.bool, device=device)
        if image_token_mask.shape != (bsz, q_len):
            raise ValueError(
                f"image_token_mask must have shape (batch, seq_len) = {(bsz, q_len)}, "
                f"got {tuple(image_token_mask.shape)}."
            )
        return image_token_mask.to(device=device, dtype=torch.bool)

    def _down_project(self, hidden_states: torch.Tensor, is_image: torch.Tensor) -> torch.Tensor:
        latent = self.kv_a_proj["text"](hidden_states)
        if len(self.branches) == 2:
            latent = torch.where(is_image.unsqueeze(-1), self.kv_a_proj["image"](hidden_states), latent)
        return latent

    def _up_project(self, latent: torch.Tensor, is_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decompress cached latents `(B, T, L)` into `k_nope (B, N, T, P)` and `v (B, N, T, D)`."""
        kv = self.kv_b_proj["text"](latent)
        if len(self.branches) == 2:
            kv = torch.where(is_image.unsqueeze(-1), self.kv_b_proj["image"](latent), kv)
        kv = kv.view(*latent.shape[:2], self.num_key_value_heads, self.nope_dim + self.head_dim).transpose(1, 2)
        k_nope, value = kv.split([self.nope_dim, self.head_dim], dim=-1)
        return k_nope, value

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Up-projections of every branch stacked for the decode kernel: `W_uk (M, N*P, L)`, `W_uv (M, N*D, L)` and
        biases `b_k (M, N*P)`, `b_v (M, N*D)` (branch 0 = text, 1 = image)."""
        branches, n_kv, latent = len(self.branches), self.num_key_value_heads, self.latent_dim
        weight = torch.stack([self.kv_b_proj[b].weight for b in self.branches])
        weight = weight.view(branches, n_kv, self.nope_dim + self.head_dim, latent)
        w_uk, w_uv = weight.split([self.nope_dim, self.head_dim], dim=2)
        w_uk, w_uv = w_uk.reshape(branches, -1, latent), w_uv.reshape(branches, -1, latent)
        if self.kv_b_proj["text"].bias is None:
            return w_uk, w_uv, None, None
        bias = torch.stack([self.kv_b_proj[b].bias for b in self.branches]).view(branches, n_kv, -1)
        b_k, b_v = bias.split([self.nope_dim, self.head_dim], dim=2)
        return w_uk, w_uv, b_k.reshape(branches, -1), b_v.reshape(branches, -1)

    def decode_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The up-projections in the layout of the absorbed decode, per kv head `n`:

        * `w_k (N, P, M*L [+ M])`: `[W_uk^{0,n}^T | W_uk^{1,n}^T | b_k^{0,n} b_k^{1,n}]`, so one batched matmul of
          the no-rope queries gives the absorbed queries of every branch and their key-bias scores;
        * `w_v (N, M*L, D)` (float32, like the kernel's output) and `b_v (N, M, D)` (float32) or None.
        """
        w_uk, w_uv, b_k, b_v = self.absorbed_weights()
        m, n, lat = len(self.branches), self.num_key_value_heads, self.latent_dim
        p, d = self.nope_dim, self.head_dim
        w_k = w_uk.view(m, n, p, lat).permute(1, 2, 0, 3).reshape(n, p, m * lat)
        if b_k is not None:
            w_k = torch.cat([w_k, b_k.view(m, n, p).permute(1, 2, 0)], dim=-1)
        w_v = w_uv.view(m, n, d, lat).permute(1, 0, 3, 2).reshape(n, m * lat, d).float().contiguous()
        b_v = None if b_v is None else b_v.view(m, n, d).transpose(0, 1).float().contiguous()
        return w_k.contiguous(), w_v, b_v

    def _cached_decode_weights(self):
        """`decode_weights()`, rebuilt only when a `kv_b_proj` parameter changed (in place or replaced): decode
        steps reuse the rearranged tensors instead of rebuilding them for every token."""
        if torch.compiler.is_compiling() or torch.is_grad_enabled():
            return self.decode_weights()  # traced into the graph / keeps gradients
        params = [p for b in self.branches for p in self.kv_b_proj[b].parameters()]
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        if self._decode_key != key:
            with torch.no_grad():
                self._decode_cache = self.decode_weights()
            self._decode_key = key
        return self._decode_cache

    def _decode_key_mask(self, attention_mask, past_key_values, bsz, kv_len, device) -> torch.Tensor | None:
        """Boolean `(B, T)` mask over the cached keys for one query token (True = attend), or None (all valid)."""
        if attention_mask is None:
            # No padding; a static cache still returns its unfilled rows, hide them by length (no host sync).
            seen = past_key_values.get_seq_length(self.layer_idx)
            if isinstance(seen, int) and seen >= kv_len:
                return None
            return (torch.arange(kv_len, device=device) < seen).view(1, kv_len).expand(bsz, kv_len)
        if attention_mask.dim() == 2:  # (B, T) padding mask, 1 = keep
            return attention_mask[:, :kv_len].bool()
        mask = attention_mask[:, 0, -1, :kv_len]  # (B, 1, q, T) -> the last query row
        if mask.dtype == torch.bool:
            return mask
        return mask > torch.finfo(mask.dtype).min / 2  # additive float mask (eager)

    def _absorbed_decode(self, q_rope, q_nope, side, latent, key_mask, quantization=None) -> torch.Tensor:
        """Absorbed attention for one query token, reading only the cache. Shapes: q_* (B, H, 1, .), side
        (B, T, N*R + 1) (a view of the padded rows), latent (B, T, L) or, with a `quantization`, its quantized rows
        (B, T, K) uint8 (the kernel dequantizes them as it reads them), key_mask (B, T) or None. Returns (B, H, D)
        before `o_proj`.

        Eager decode is bound by host time, so the up-projections are two batched matmuls over the kv heads (see
        `decode_weights`) and the kernel reads the absorbed queries and biases as views of the first one."""
        w_k, w_v, b_v = self._cached_decode_weights()
        bsz, heads = q_nope.shape[:2]
        n, groups = self.num_key_value_heads, self.num_key_value_groups
        branches, lat = len(self.branches), self.latent_dim
        q_grouped = q_nope[:, :, 0].reshape(bsz, n, groups, -1).transpose(0, 1).reshape(n, bsz * groups, -1)
        absorbed = torch.bmm(q_grouped.to(w_k.dtype), w_k)  # (N, B*G, M*L [+ M])
        absorbed = absorbed.view(n, bsz, groups, -1).transpose(0, 1).reshape(bsz, heads, -1)
        q_latent = absorbed[..., : branches * lat].view(bsz, heads, branches, lat)
        q_bias = absorbed[..., branches * lat :] if absorbed.shape[-1] > branches * lat else None
        kernel = DECODE_KERNELS.get(latent.device.type, mla_decode_reference)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q_rope, absorbed, latent, side)):
            kernel = mla_decode_reference  # the registered kernels are forward-only; the reference is differentiable
        # the format only when quantized: kernels registered without the argument keep serving unquantized caches
        extra = {} if quantization is None else {"latent_format": quantization.spec}
        context, p_sum, _ = kernel(
            q_rope[:, :, 0].to(side.dtype),
            q_latent.to(side.dtype),
            q_bias,
            latent,
            side,
            key_mask,
            self.scaling,
            n,
            **extra,
        )
        context = context.view(bsz, n, groups, branches * lat).transpose(0, 1).reshape(n, bsz * groups, -1)
        if b_v is None:
            out = torch.bmm(context, w_v)
        else:
            p_sum = p_sum.view(bsz, n, groups, branches).transpose(0, 1).reshape(n, bsz * groups, branches)
            out = torch.baddbmm(torch.bmm(p_sum, b_v), context, w_v)
        return out.view(n, bsz, groups, -1).transpose(0, 1).reshape(bsz, heads, -1).to(q_nope.dtype)


def eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain softmax attention with GQA (the `eager` backend); `query (B, H, S, D)`, `key/value (B, N, T, D)`."""
    key = key.repeat_interleave(module.num_key_value_groups, dim=1)
    value = value.repeat_interleave(module.num_key_value_groups, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        mask = attention_mask[:, :, :, : key.shape[-2]]
        weights = (
            weights.masked_fill(~mask, torch.finfo(weights.dtype).min) if mask.dtype == torch.bool else weights + mask
        )
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


__all__ = ["PEFT_TARGET_MODULES", "MLAAttention"]
