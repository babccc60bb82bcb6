"""What every MLA conformance class adds to the upstream test class it subclasses.

Runs inside a copy of Transformers' test tree (see ../README.md): `tests.*` are the upstream modules there. The
setting comes from `MLA_CONFORMANCE_SETTING`: `full` (every rotary pair kept, no latent compression) or
`compressed` (half the rotary dims, latent of half a head per kv head).
"""

import copy
import os

from hf_mla_vlm.modeling.latent_cache import side_row_width


SETTING = os.environ.get("MLA_CONFORMANCE_SETTING", "full")


def mla_config(config_class, native_config):
    """The MLA config of `config_class` built from the upstream tester's tiny native config, at `SETTING`."""
    fields = copy.deepcopy(native_config).to_dict()
    for key in ("model_type", "rope_dim", "kv_rank", "rope_pairs", "image_token_ids", "auto_map", "architectures"):
        fields.pop(key, None)
    if SETTING == "compressed":
        text = native_config.get_text_config()
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        fields.update(rope_dim=head_dim // 2, kv_rank=head_dim // 2)
    elif SETTING != "full":
        raise ValueError(f"MLA_CONFORMANCE_SETTING must be 'full' or 'compressed', got {SETTING!r}.")
    return config_class(**fields)


class MLATesterMixin:
    """In front of an upstream model tester: its configs become MLA configs."""

    mla_config_class: type

    def get_config(self):
        return mla_config(self.mla_config_class, super().get_config())


class MLAModelTestMixin:
    """In front of an upstream `...ModelTest`: the overrides that MLA needs, each with its reason."""

    def _get_attention_shape(self, batch_size, seq_length, config):
        # Override (MLA cache layout): the keys slot holds the latent (one "head", N * kv_rank wide), the values
        # slot the post-RoPE kept key dims + the modality flag, padded to 16-byte rows; never per-head K/V.
        model_config = self.model_tester.get_config()
        text = model_config.get_text_config()
        latent = text.num_key_value_heads * model_config.kv_rank
        side = side_row_width(text.num_key_value_heads, model_config.rope_dim)
        if seq_length is None:
            return (batch_size, 1, latent), (batch_size, 1, side)
        return (batch_size, 1, seq_length, latent), (batch_size, 1, seq_length, side)
