# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""MLA settings shared by every converted architecture.

The settings live on the *top-level* config of each architecture (``llava_mla``, ``llava_next_mla``,
``qwen2_5_vl_mla``) so that ``text_config`` stays the native Llama / Mistral / Qwen2 / Qwen2.5-VL text config.
Everything needed to rebuild the converted attention from ``config.json`` alone is stored here as plain JSON types.

This file is part of the remote-code bundle: it imports only ``transformers`` and the standard library.
"""

from dataclasses import dataclass
from typing import ClassVar


MLA_STAGES = ("partial_rope", "mla")


def text_head_dim(text_config) -> int:
    """Head dimension of a text config (Qwen2.5-VL text configs have no ``head_dim`` field)."""
    head_dim = getattr(text_config, "head_dim", None)
    return head_dim if head_dim else text_config.hidden_size // text_config.num_attention_heads


@dataclass(kw_only=True, repr=False)
class MLAConfigMixin:
    r"""
    MLA settings added to a vision-language config. Mixed into ``LlavaConfig``, ``LlavaNextConfig`` and
    ``Qwen2_5_VLConfig``; every field is a plain JSON type.

    Args:
        rope_dim (`int`, *optional*):
            Rotary dimensions kept per attention head (twice the number of kept frequency pairs). Must be even,
            between 2 and `head_dim`. Defaults to `head_dim` (every pair kept).
        kv_rank (`int`, *optional*):
            Latent width per key/value head; the cached latent of a token has `num_key_value_heads * kv_rank`
            elements. Defaults to `2 * head_dim - rope_dim`, the rank of `[W_k_nope; W_v]` (no compression).
        rope_pairs (`list[list[list[int]]]`, *optional*):
            Kept rotary frequency pairs, `rope_pairs[layer][kv_head]` = sorted pair indices `j` in
            `[0, head_dim / 2)` (pair `j` = dims `j` and `j + head_dim / 2`, `j = 0` is the highest frequency).
            Each list holds `rope_dim / 2` pairs. Query heads use the set of their key/value group. Defaults to the
            `rope_dim / 2` highest-frequency pairs everywhere.
        image_token_ids (`list[int]`, *optional*):
            Token ids routed through the image branch of the modality-split projections. Defaults to the
            architecture's image tokens (LLaVA: `image_token_index`; Qwen2.5-VL: image pad, vision start/end and
            video pad).
        modality_split (`bool`, *optional*, defaults to `True`):
            Whether image and text tokens use separate down/up projections (MHA2MLA-VLM's modality decoupling).
            When `False`, every token uses the `text` branch.
        mla_stage (`str`, *optional*, defaults to `"mla"`):
            `"partial_rope"`: stage-1 form (partial RoPE, no latent; K/V cached in full).
            `"mla"`: latent form; the cache holds only the latent, the kept rotary key dims and a modality flag.
    """

    rope_dim: int | None = None
    kv_rank: int | None = None
    rope_pairs: list | None = None
    image_token_ids: list | None = None
    modality_split: bool = True
    mla_stage: str = "mla"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._resolve_mla_defaults()
        self.validate_mla()

    # Config attributes holding the token ids of the image branch, per architecture (set by each config class).
    image_token_attributes: ClassVar[tuple[str, ...]] = ()

    def default_image_token_ids(self) -> list[int]:
        """Token ids of the image branch for this architecture: the values of `image_token_attributes`."""
        return [int(getattr(self, name)) for name in self.image_token_attributes if getattr(self, name) is not None]

    # --- derived sizes (read by the attention module) ---
    @property
    def mla_head_dim(self) -> int:
        return text_head_dim(self.text_config)

    @property
    def mla_latent_dim(self) -> int:
        """Width of the cached latent per token per layer (`num_key_value_heads * kv_rank`)."""
        return self.text_config.num_key_value_heads * self.kv_rank

    def _resolve_mla_defaults(self) -> None:
        head_dim = self.mla_head_dim
        if self.rope_dim is None:
            self.rope_dim = head_dim
        if self.kv_rank is None and isinstance(self.rope_dim, int):
            self.kv_rank = 2 * head_dim - self.rope_dim
        if self.rope_pairs is None and isinstance(self.rope_dim, int) and self.rope_dim % 2 == 0:
            keep = list(range(self.rope_dim // 2))
            self.rope_pairs = [
                [list(keep) for _ in range(self.text_config.num_key_value_heads)]
                for _ in range(self.text_config.num_hidden_layers)
            ]
        if self.image_token_ids is None:
            self.image_token_ids = self.default_image_token_ids()

    def validate_mla(self) -> None:
        """Raise `ValueError` with an actionable message when the MLA settings are inconsistent."""
        text = self.text_config
        head_dim = self.mla_head_dim
        n_layers, n_kv = text.num_hidden_layers, text.num_key_value_heads
        if self.mla_stage not in MLA_STAGES:
            raise ValueError(f"mla_stage must be one of {MLA_STAGES}, got {self.mla_stage!r}.")
        if not isinstance(self.rope_dim, int) or self.rope_dim % 2 or not 2 <= self.rope_dim <= head_dim:
            raise ValueError(
                f"rope_dim must be an even integer between 2 and head_dim={head_dim} (it counts rotary dims, two per "
                f"kept frequency pair), got {self.rope_dim!r}."
            )
        max_rank = 2 * head_dim - self.rope_dim
        if not isinstance(self.kv_rank, int) or not 1 <= self.kv_rank <= max_rank:
            raise ValueError(
                f"kv_rank (latent width per kv head) must be an integer between 1 and 2*head_dim - rope_dim = "
                f"{max_rank} (beyond that the latent is larger than the keys and values it replaces), "
                f"got {self.kv_rank!r}."
            )
        pairs = self.rope_pairs
        if not isinstance(pairs, list) or len(pairs) != n_layers:
            raise ValueError(
                f"rope_pairs must be a list with one entry per decoder layer ({n_layers}), got "
                f"{type(pairs).__name__} of length {len(pairs) if isinstance(pairs, list) else 'n/a'}."
            )
        n_keep = self.rope_dim // 2
        for layer, per_head in enumerate(pairs):
            if not isinstance(per_head, list) or len(per_head) != n_kv:
                raise ValueError(f"rope_pairs[{layer}] must hold one list per key/value head ({n_kv}).")
            for head, kept in enumerate(per_head):
                if (
                    not isinstance(kept, list)
                    or len(kept) != n_keep
                    or len(set(kept)) != n_keep
                    or any(not isinstance(j, int) or not 0 <= j < head_dim // 2 for j in kept)
                ):
                    raise ValueError(
                        f"rope_pairs[{layer}][{head}] must hold rope_dim/2 = {n_keep} distinct pair indices in "
                        f"[0, {head_dim // 2}), got {kept!r}. Re-run the conversion or fix the rank file."
                    )
                if kept != sorted(kept):
                    raise ValueError(f"rope_pairs[{layer}][{head}] must be sorted ascending, got {kept!r}.")
        ids = self.image_token_ids
        if not isinstance(ids, list) or any(not isinstance(i, int) or i < 0 for i in ids):
            raise ValueError(f"image_token_ids must be a list of non-negative token ids, got {ids!r}.")
        if getattr(text, "layer_types", None) and any(t != "full_attention" for t in text.layer_types):
            raise ValueError(
                "MLA conversion supports only full-attention decoder layers; this text config has layer_types="
                f"{sorted(set(text.layer_types))}. Disable sliding-window attention (use_sliding_window=False)."
            )
