import json

import pytest
from transformers import AutoConfig

import hf_mla_vlm  # noqa: F401  (registers the model types)
from hf_mla_vlm import LlavaMLAConfig, LlavaNextMLAConfig, Qwen2_5_VLMLAConfig


TEXT = dict(
    model_type="llama", hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_hidden_layers=2
)
QWEN_TEXT = dict(
    hidden_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 6, 6]},
)


def test_defaults_are_the_identity_conversion():
    config = LlavaMLAConfig(text_config=TEXT)
    assert config.rope_dim == 32 and config.kv_rank == 32  # 2*head_dim - rope_dim
    assert config.rope_pairs == [[list(range(16))] * 2] * 2
    assert config.image_token_ids == [config.image_token_index]
    assert config.mla_latent_dim == 64 and config.mla_stage == "mla" and config.modality_split


def test_qwen_image_tokens_include_vision_start_end_and_video():
    config = Qwen2_5_VLMLAConfig(text_config=QWEN_TEXT, rope_dim=8, kv_rank=8)
    assert config.image_token_ids == [
        config.image_token_id,
        config.vision_start_token_id,
        config.vision_end_token_id,
        config.video_token_id,
    ]
    assert config.mla_head_dim == 32  # no head_dim field: hidden / heads


@pytest.mark.parametrize("cls", [LlavaMLAConfig, LlavaNextMLAConfig])
def test_round_trip_through_config_json(cls, tmp_path):
    pairs = [[[0, 3, 7, 9], [1, 2, 4, 15]], [[5, 6, 7, 8], [0, 1, 2, 3]]]
    config = cls(text_config=TEXT, rope_dim=8, kv_rank=5, rope_pairs=pairs, modality_split=False, image_token_ids=[7])
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == cls.model_type and saved["rope_pairs"] == pairs and saved["kv_rank"] == 5
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is cls
    assert (loaded.rope_pairs, loaded.kv_rank, loaded.modality_split, loaded.image_token_ids) == (pairs, 5, False, [7])


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(rope_dim=7), "rope_dim must be an even integer"),
        (dict(rope_dim=0), "rope_dim must be an even integer"),
        (dict(rope_dim=34), "rope_dim must be an even integer"),
        (dict(rope_dim=8, kv_rank=57), "kv_rank"),
        (dict(rope_dim=8, kv_rank=0), "kv_rank"),
        (dict(mla_stage="stage2"), "mla_stage must be one of"),
        (dict(rope_dim=4, rope_pairs=[[[0, 1]] * 2]), "one entry per decoder layer"),
        (dict(rope_dim=4, rope_pairs=[[[0, 1]], [[0, 1]]]), "one list per key/value head"),
        (dict(rope_dim=4, rope_pairs=[[[0, 1], [0, 16]]] * 2), "distinct pair indices"),
        (dict(rope_dim=4, rope_pairs=[[[0, 0], [0, 1]]] * 2), "distinct pair indices"),
        (dict(rope_dim=4, rope_pairs=[[[1, 0], [0, 1]]] * 2), "sorted ascending"),
        (dict(rope_dim=6, rope_pairs=[[[0, 1], [0, 1]]] * 2), "rope_dim/2 = 3"),
        (dict(image_token_ids=[-1]), "image_token_ids"),
    ],
)
def test_invalid_settings_raise_value_error(settings, message):
    with pytest.raises(ValueError, match=message):
        LlavaMLAConfig(text_config=TEXT, **settings)


def test_sliding_window_layers_are_rejected():
    text = dict(TEXT, model_type="mistral", sliding_window=16, layer_types=["sliding_attention"] * 2)
    with pytest.raises(ValueError, match="only full-attention"):
        LlavaNextMLAConfig(text_config=text)
