"""BatchedVisionAttention (zoo/batched_attention.py) computes the vision attention of Transformers' Qwen2.5-VL and
Qwen2-VL, chunk by chunk equal, in one call: equal-length chunks as a batch, unequal ones under a block-diagonal
mask."""

import pytest
import torch

from hf_mla_vlm.registry import ARCHITECTURES
from hf_mla_vlm.tiny_models import tiny_image
from hf_mla_vlm.zoo.batched_attention import BatchedVisionAttention, batch_vision_attention
from tests.utils import load_native, relative_error


QWEN = [name for name, spec in ARCHITECTURES.items() if spec.vision_attention]


@pytest.fixture(scope="module", params=QWEN)
def qwen(request, native_checkpoints):
    return load_native(native_checkpoints[request.param])


def _tower(model, processor, sizes):
    images = [tiny_image(i, size) for i, size in enumerate(sizes)]
    inputs = processor.image_processor(images=images, return_tensors="pt")
    pixels = inputs["pixel_values"].requires_grad_(True)
    out = model.model.visual(pixels, grid_thw=inputs["image_grid_thw"])
    out = out.pooler_output if hasattr(out, "pooler_output") else out
    out.square().sum().backward()
    grads = {name: p.grad.clone() for name, p in model.model.visual.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), pixels.grad, grads


@pytest.mark.parametrize("sizes", [[(56, 56)] * 3, [(56, 56), (40, 60), (84, 28)]], ids=["equal", "unequal"])
def test_batched_vision_attention_equals_the_chunked_one(qwen, sizes, monkeypatch):
    model, processor = qwen
    model.train()  # dropout is 0 in the config: train mode changes nothing but is where the swap is used
    expected, expected_input_grad, expected_grads = _tower(model, processor, sizes)
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(k.get("attn_mask") is None) or original(*a, **k))  # fmt: skip
    before = dict(model.named_parameters())
    native = type(model.model.visual.blocks[0].attn)
    with batch_vision_attention(model) as swapped:
        assert swapped == model.config.vision_config.depth
        for block in model.model.visual.blocks:  # the architecture's own class underneath
            assert isinstance(block.attn, BatchedVisionAttention) and isinstance(block.attn, native)
        assert dict(model.named_parameters()) == before  # the same parameters under the same names
        actual, input_grad, grads = _tower(model, processor, sizes)
    assert len(calls) == model.config.vision_config.depth  # one call per block
    assert all(calls) == (len(set(sizes)) == 1)  # equal images have equal windows: a batch, no mask
    assert relative_error(expected, actual) < 1e-5
    assert relative_error(expected_input_grad, input_grad) < 1e-5
    assert grads.keys() == expected_grads.keys()
    for name in grads:
        assert relative_error(expected_grads[name], grads[name]) < 1e-5, name
    assert not any(isinstance(m, BatchedVisionAttention) for m in model.modules())  # the originals are back
    assert dict(model.named_parameters()) == before


def test_the_registry_names_qwens_vision_attention_classes():
    assert QWEN == ["qwen2_vl", "qwen2_5_vl"]
    for name in QWEN:
        native = ARCHITECTURES[name].vision_attention_class
        assert native.__module__ == f"transformers.models.{name}.modeling_{name}" and "Attention" in native.__name__


def test_models_without_a_qwen_tower_are_left_alone(native_checkpoints):
    model, _ = load_native(native_checkpoints["llava"])
    with batch_vision_attention(model) as swapped:
        assert swapped == 0
