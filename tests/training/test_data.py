"""Training batches: the collator's M-RoPE positions computed on the CPU (CPU, tiny random models)."""

import pickle

import pytest
import torch
from transformers import AutoConfig

import hf_mla_vlm  # noqa: F401  (registers the MLA classes)
from hf_mla_vlm.conversion_scripts.convert import convert
from hf_mla_vlm.training.checkpoint import load_model
from hf_mla_vlm.training.data import ChatCollator, RopeIndex, TextWindow, rope_index
from hf_mla_vlm.zoo.vqa_data import generate_split
from tests.utils import load_native


def _items(n_conversations: int, text_len: int = 40) -> list:
    """A text window longer than the conversations, then image conversations of different lengths."""
    convs = [s.to_conversation() for s in generate_split("train", n_conversations, seed=5, image_size=56)]
    return [TextWindow(tuple(range(7, 7 + text_len))), *convs]


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen2_vl"])
def qwen_pair(request, native_checkpoints, tmp_path_factory):
    """(native, converted) tiny Qwen-VL checkpoints of one architecture."""
    native = native_checkpoints[request.param]
    mla = tmp_path_factory.mktemp("rope_index") / f"{request.param}-mla"
    convert(native, mla, rope_dim=8, kv_rank=4, rope_strategy="uniform", progress=False)
    return native, mla


def test_collated_positions_are_the_ones_the_model_computes(qwen_pair):
    """Logits with the collator's `position_ids` equal those of a forward that computes them itself (the native
    model and the converted one), on a batch of a text row and right-padded image rows."""
    for path in qwen_pair:
        model = load_model(path).eval() if path == qwen_pair[1] else load_native(path)[0]
        _, processor = load_native(qwen_pair[0])
        items = _items(3)
        plain = ChatCollator(processor)(items)
        with_positions = ChatCollator(processor, position_ids=rope_index(model.config))(items)
        positions = with_positions.pop("position_ids")
        assert positions.shape == (3, *plain["input_ids"].shape) and positions.device.type == "cpu"
        assert sorted(with_positions) == sorted(plain)
        assert not torch.equal(positions[1], positions[0])  # image rows: their height / width axes differ
        inputs = {k: v for k, v in plain.items() if k != "labels"}
        with torch.no_grad():
            expected = model(**inputs).logits
            got = model(**inputs, position_ids=positions).logits
            one_d = model(**inputs, position_ids=positions[0].expand(3, -1, -1)).logits
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        assert not torch.allclose(one_d, expected)  # the check sees a wrong position


def test_rope_index_is_for_mrope_models_and_skips_batches_without_images(native_checkpoints):
    assert rope_index(AutoConfig.from_pretrained(native_checkpoints["llava"])) is None
    index = rope_index(AutoConfig.from_pretrained(native_checkpoints["qwen2_5_vl"]))
    assert isinstance(index, RopeIndex)
    assert all(p.device.type == "meta" for p in index.model.parameters())  # weightless
    _, processor = load_native(native_checkpoints["qwen2_5_vl"])
    text_only = ChatCollator(processor, position_ids=index)([TextWindow(tuple(range(7, 30)))])
    assert "position_ids" not in text_only  # the model's plain positions


def test_the_collator_with_positions_pickles_for_dataloader_workers(qwen_pair):
    """Spawned / forkserver workers receive the collator pickled: small (the config, no weights; a converted model's
    classes do not pickle by name) and the same batches, for the native and the converted config."""
    _, processor = load_native(qwen_pair[0])
    items = _items(2)
    for path in qwen_pair:
        collator = ChatCollator.for_model(processor, AutoConfig.from_pretrained(path))
        index_bytes = pickle.dumps(collator.position_ids)
        assert len(index_bytes) < 100_000, len(index_bytes)
        expected = collator(items)
        got = pickle.loads(pickle.dumps(collator))(items)
        assert sorted(got) == sorted(expected) and "position_ids" in got
        assert all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.parametrize("arch", ["llava_next", "llava_onevision"])
def test_image_sizes_as_host_lists_give_the_same_logits(arch, native_checkpoints, tmp_path):
    """`ChatCollator.for_model` returns the registry's `host_inputs` (LLaVA-NeXT's `image_sizes`) as lists; the
    native and the converted model give the same logits as with the processor's tensor (on this Transformers)."""
    native = native_checkpoints[arch]
    mla = tmp_path / f"{arch}-mla"
    convert(native, mla, rope_dim=8, kv_rank=4, rope_strategy="uniform", progress=False)
    _, processor = load_native(native)
    items = _items(3)
    tensors = ChatCollator(processor)(items)
    for path in (native, mla):
        model = load_model(path).eval()
        listed = ChatCollator.for_model(processor, model.config)(items)
        assert listed["image_sizes"] == tensors["image_sizes"].tolist()
        assert all(torch.equal(listed[k], v) for k, v in tensors.items() if k != "image_sizes")
        with torch.no_grad():
            expected = model(**{k: v for k, v in tensors.items() if k != "labels"}).logits
            got = model(**{k: v for k, v in listed.items() if k != "labels"}).logits
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
