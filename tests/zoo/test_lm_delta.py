import copy

import pytest
import torch
from safetensors.torch import load_file

from hf_mla_vlm.tiny_models import build_tiny_vlm
from hf_mla_vlm.zoo.lm_delta import (
    LM_DELTA_TARGETS,
    LowRankDelta,
    add_lm_deltas,
    deltas_disabled,
    is_delta_key,
    lm_delta_state,
    load_lm_deltas,
    merge_lm_delta,
)
from hf_mla_vlm.zoo.models import ZOO, load_vision_weights, save_vision_weights, vision_state_dict


IDS = torch.tensor([[3, 17, 42, 9, 100, 5, 77]])


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LowRankDelta):
                module.lora_B.copy_(0.05 * torch.randn(module.lora_B.shape, generator=generator))


@pytest.mark.parametrize("arch", ["llava", "qwen2_5_vl"])
def test_delta_starts_at_the_original_and_merges_to_what_it_computes(arch):
    original, _ = build_tiny_vlm(arch)
    wrapped = copy.deepcopy(original)
    deltas = add_lm_deltas(wrapped, rank=3)
    layers = original.config.text_config.num_hidden_layers
    assert len(deltas) == layers * len(LM_DELTA_TARGETS)
    with torch.no_grad():
        reference = original(input_ids=IDS).logits
        torch.testing.assert_close(wrapped(input_ids=IDS).logits, reference, rtol=0, atol=0)  # B starts at zero
        _randomise(wrapped)
        adapted = wrapped(input_ids=IDS).logits
        assert (adapted - reference).abs().max() > 1e-3  # the delta changes the model
        with deltas_disabled(wrapped):
            torch.testing.assert_close(wrapped(input_ids=IDS).logits, reference, rtol=0, atol=0)
        assert all(d.enabled for d in deltas)  # switched back on after the block

    state = lm_delta_state(wrapped)
    assert state and all(is_delta_key(k) for k in state) and len(state) == 2 * len(deltas)
    merged = copy.deepcopy(original)
    assert merge_lm_delta(merged, state) == len(deltas)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=IDS).logits, adapted, rtol=1e-4, atol=1e-4)
    vision_before = vision_state_dict(original)
    assert all(torch.equal(vision_before[k], v) for k, v in vision_state_dict(merged).items())  # LM only


def test_merge_and_load_refuse_mismatched_factors():
    original, _ = build_tiny_vlm("llava")
    wrapped = copy.deepcopy(original)
    add_lm_deltas(wrapped, rank=2)
    _randomise(wrapped)
    state = lm_delta_state(wrapped)
    key = next(k for k in state if k.endswith(".lora_A"))

    unpaired = dict(state)
    del unpaired[key.replace(".lora_A", ".lora_B")]
    merged = copy.deepcopy(original)
    with pytest.raises(ValueError, match="without their pair"):
        merge_lm_delta(merged, unpaired)
    wrong = {**state, key: torch.zeros(2, 7)}
    with pytest.raises(ValueError, match="do not fit"):
        merge_lm_delta(merged, wrong)
    foreign = {**state, "model.language_model.layers.99.self_attn.q_proj.lora_A": state[key]}
    foreign["model.language_model.layers.99.self_attn.q_proj.lora_B"] = state[key.replace("lora_A", "lora_B")]
    with pytest.raises(ValueError, match="does not have"):
        merge_lm_delta(merged, foreign)
    after = dict(merged.state_dict())
    assert all(torch.equal(after[k], v) for k, v in original.state_dict().items())  # a refused delta changes nothing

    other_rank = copy.deepcopy(original)
    add_lm_deltas(other_rank, rank=4)
    with pytest.raises(ValueError, match="rank 2"):
        load_lm_deltas(other_rank, state)
    load_lm_deltas(wrapped, state)  # the same rank loads


def test_weights_file_round_trips_vision_and_delta(tmp_path):
    original, _ = build_tiny_vlm("llava")
    wrapped = copy.deepcopy(original)
    add_lm_deltas(wrapped, rank=2)
    _randomise(wrapped, seed=3)
    path = save_vision_weights(wrapped, ZOO["llava"], tmp_path / "w.safetensors", {}, lm_delta=lm_delta_state(wrapped))
    stored = load_file(str(path))
    assert {k for k in stored if is_delta_key(k)} == set(lm_delta_state(wrapped))
    assert all(v.dtype == torch.float16 for v in stored.values())

    target = copy.deepcopy(original)
    delta = load_vision_weights(target, path)
    assert set(delta) == set(lm_delta_state(wrapped))
    merge_lm_delta(target, delta)
    with torch.no_grad():
        torch.testing.assert_close(target(input_ids=IDS).logits, wrapped(input_ids=IDS).logits, rtol=2e-3, atol=2e-3)
