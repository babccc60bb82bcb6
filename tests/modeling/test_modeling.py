"""Converted models against the originals and against themselves (absorbed decode vs decompressed attention)."""

import copy

import pytest
import torch
from transformers import AutoModel, AutoModelForImageTextToText

import hf_mla_vlm
from hf_mla_vlm.conversion_scripts.convert import convert
from hf_mla_vlm.conversion_scripts.report import cache_nbytes
from hf_mla_vlm.tiny_models import TINY_ARCHS, tiny_image
from tests.utils import load_native, mixed_batch, perturb_image_branch, relative_error


HEAD_DIM = 32  # tiny models: hidden 128, 4 query heads, 2 kv heads


def _convert(native, out, **kwargs):
    result = convert(native, out, overwrite=True, progress=False, return_model=True, **kwargs)
    return result.model.eval()


@pytest.fixture(scope="module")
def tmp_module(tmp_path_factory):
    return tmp_path_factory.mktemp("modeling")


@pytest.fixture(scope="module")
def compressed(native_checkpoints, tmp_module):
    """rope_dim 8 (4 uniform pairs), kv_rank 8, image branch perturbed away from the text branch."""
    models = {}
    for arch, native in native_checkpoints.items():
        model = _convert(native, tmp_module / f"{arch}-r8k8", rope_dim=8, kv_rank=8, rope_strategy="uniform")
        perturb_image_branch(model)
        models[arch] = model
    return models


def _decompressed_copy(model):
    reference = copy.deepcopy(model)
    for attn in reference.mla_attention_modules():
        attn.use_absorbed_decode = False
    return reference


def _count_absorbed_calls(model, monkeypatch) -> list[int]:
    calls = [0]
    for attn in model.mla_attention_modules():
        original = attn._absorbed_decode

        def counted(*args, _original=original, **kwargs):
            calls[0] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(attn, "_absorbed_decode", counted)
    return calls


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_full_rank_conversion_reproduces_the_original(arch, native_checkpoints, tmp_module):
    original, processor = load_native(native_checkpoints[arch])
    converted = _convert(native_checkpoints[arch], tmp_module / f"{arch}-full", rope_dim=HEAD_DIM, kv_rank=HEAD_DIM)
    inputs = mixed_batch(processor, arch)
    with torch.no_grad():
        expected, actual = original(**inputs).logits, converted(**inputs).logits
    assert relative_error(expected, actual, inputs["attention_mask"].bool()) < 1e-4  # measured ~9e-7
    ref_tokens = original.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(ref_tokens, converted.generate(**inputs, max_new_tokens=6, do_sample=False))


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_full_kv_rank_mla_equals_the_partial_rope_stage(arch, native_checkpoints, tmp_module):
    """At kv_rank = 2*head_dim - rope_dim the latent loses nothing: MLA == stage-1 model (not the original)."""
    native = native_checkpoints[arch]
    settings = dict(rope_dim=8, kv_rank=2 * HEAD_DIM - 8, rope_strategy="uniform")
    mla = _convert(native, tmp_module / f"{arch}-fullkv", **settings)
    stage1 = _convert(native, tmp_module / f"{arch}-stage1", mla_stage="partial_rope", **settings)
    original, processor = load_native(native)
    inputs = mixed_batch(processor, arch)
    keep = inputs["attention_mask"].bool()
    with torch.no_grad():
        expected, actual, unrotated = stage1(**inputs).logits, mla(**inputs).logits, original(**inputs).logits
    assert relative_error(expected, actual, keep) < 1e-4
    assert relative_error(unrotated, expected, keep) > 1e-2  # dropping rotary pairs does change the model


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_absorbed_decode_equals_decompressed_every_step(arch, compressed, native_checkpoints, monkeypatch):
    model = compressed[arch]
    reference = _decompressed_copy(model)
    calls = _count_absorbed_calls(model, monkeypatch)
    _, processor = load_native(native_checkpoints[arch])
    inputs = mixed_batch(processor, arch)  # left padding, image + text tokens, Qwen q/k/v biases
    kwargs = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True)
    expected = reference.generate(**inputs, **kwargs)
    actual = model.generate(**inputs, **kwargs)
    assert calls[0] == 5 * model.config.text_config.num_hidden_layers  # every decode step of every layer
    assert torch.equal(expected.sequences, actual.sequences)
    for step, (a, b) in enumerate(zip(expected.logits, actual.logits)):
        assert relative_error(a, b) < 1e-5, f"step {step}"  # measured ~1e-7 in float32


def test_absorbed_decode_uses_each_cached_tokens_modality(compressed, native_checkpoints):
    """Flipping the cached modality flags changes the absorbed result: the flag really selects the branch."""
    model = compressed["llava_next"]
    _, processor = load_native(native_checkpoints["llava_next"])
    inputs = mixed_batch(processor, "llava_next")
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        step = dict(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(step["input_ids"])], dim=1)
        base = model(**step, attention_mask=mask).logits
        flag = (
            model.mla_attention_modules()[0].num_key_value_heads * model.config.rope_dim
        )  # column after the rope keys
        for layer in out.past_key_values.layers:
            layer.values[..., flag] = 1.0 - layer.values[..., flag]
            layer.keys, layer.values = layer.keys[..., :-1, :], layer.values[..., :-1, :]  # drop the decoded token
        flipped = model(**step, attention_mask=mask).logits
    assert relative_error(base, flipped) > 1e-3


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_static_cache_beam_search_and_sampling(arch, compressed, native_checkpoints):
    model = compressed[arch]
    reference = _decompressed_copy(model)
    _, processor = load_native(native_checkpoints[arch])
    inputs = mixed_batch(processor, arch)
    dynamic = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    static = model.generate(**inputs, max_new_tokens=5, do_sample=False, cache_implementation="static")
    assert torch.equal(dynamic, static)
    beams = dict(max_new_tokens=5, num_beams=3, do_sample=False)
    assert torch.equal(reference.generate(**inputs, **beams), model.generate(**inputs, **beams))
    sampled = []
    for candidate in (reference, model):
        torch.manual_seed(123)
        sampled.append(candidate.generate(**inputs, max_new_tokens=5, do_sample=True, top_k=20))
    assert torch.equal(*sampled)


def test_cache_holds_only_the_latent_rope_keys_and_a_flag(compressed, native_checkpoints):
    """rope_dim 8, kv_rank 8, head_dim 32, 2 kv heads: latent 2*8 + side row (2*8 rope keys + flag, padded to a
    multiple of 8) 24 = 40 elements instead of 2*2*32 = 128."""
    arch = "llava_next"
    original, processor = load_native(native_checkpoints[arch])
    model = compressed[arch]
    inputs = mixed_batch(processor, arch)
    with torch.no_grad():
        ref_cache = original(**inputs, use_cache=True).past_key_values
        cache = model(**inputs, use_cache=True).past_key_values
    batch, seq = inputs["input_ids"].shape
    for layer in cache.layers:
        assert layer.keys.shape == (batch, 1, seq, 2 * 8)  # latent: n_kv * kv_rank
        assert layer.values.shape == (batch, 1, seq, 24)  # post-RoPE kept key dims + modality flag + 7 padding
        assert (layer.values[..., 2 * 8 + 1 :] == 0).all()
    ratio = cache_nbytes(ref_cache) / cache_nbytes(cache)
    assert ratio == pytest.approx(128 / 40)
    assert cache_nbytes(cache) == 40 * 4 * batch * seq * model.config.text_config.num_hidden_layers


@pytest.mark.parametrize("arch", ["llava", "llava_next"])
def test_multi_turn_second_image_after_generated_text(arch, compressed, native_checkpoints):
    model = compressed[arch]
    _, processor = load_native(native_checkpoints[arch])
    first = processor(
        images=[tiny_image(0)], text=["USER: <image> describe the image ASSISTANT:"], return_tensors="pt"
    )
    out = model.generate(**first, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    second = processor(
        images=[tiny_image(2, (30, 50))], text=["USER: <image> what is this ? ASSISTANT:"], return_tensors="pt"
    )
    full_ids = torch.cat([out.sequences, second["input_ids"]], dim=1)
    new_ids = full_ids[:, out.past_key_values.get_seq_length() :]  # the last generated token is not cached yet
    extra = {"image_sizes": torch.cat([first["image_sizes"], second["image_sizes"]])} if arch == "llava_next" else {}
    pixels = torch.cat([first["pixel_values"], second["pixel_values"]])
    with torch.no_grad():
        cached = model(
            input_ids=new_ids,
            pixel_values=second["pixel_values"],
            past_key_values=out.past_key_values,
            attention_mask=torch.ones_like(full_ids),
            **({"image_sizes": second["image_sizes"]} if arch == "llava_next" else {}),
        ).logits
        fresh = model(input_ids=full_ids, pixel_values=pixels, **extra).logits[:, -new_ids.shape[1] :]
    assert relative_error(fresh, cached) < 1e-5


def test_inputs_embeds_need_an_image_token_mask(compressed, native_checkpoints):
    model = compressed["llava"]
    _, processor = load_native(native_checkpoints["llava"])
    inputs = processor(text=["USER: what is this ? ASSISTANT:"], return_tensors="pt")
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    with pytest.raises(ValueError, match="image_token_mask"):
        model(inputs_embeds=embeds)
    mask = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    with torch.no_grad():
        from_ids = model(input_ids=inputs["input_ids"]).logits
        from_embeds = model(inputs_embeds=embeds, image_token_mask=mask).logits
    torch.testing.assert_close(from_ids, from_embeds)
    with pytest.raises(ValueError, match="image_token_mask"):
        model(inputs_embeds=embeds, image_token_mask=mask[:, :-1])


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_attention_backends_agree(arch, compressed, native_checkpoints):
    model = compressed[arch]
    _, processor = load_native(native_checkpoints[arch])
    inputs = mixed_batch(processor, arch)
    logits = {}
    for backend in ("eager", "sdpa"):
        model.set_attn_implementation(backend)
        with torch.no_grad():
            logits[backend] = model(**inputs).logits
    model.set_attn_implementation("sdpa")
    assert relative_error(logits["eager"], logits["sdpa"], inputs["attention_mask"].bool()) < 1e-5


def test_models_are_registered_with_the_auto_classes(tmp_module, native_checkpoints):
    out = tmp_module / "auto"
    _convert(native_checkpoints["qwen2_5_vl"], out, rope_dim=8, kv_rank=8)
    for auto in (AutoModelForImageTextToText, AutoModel):
        assert type(auto.from_pretrained(out)) is hf_mla_vlm.Qwen2_5_VLMLAForConditionalGeneration


def test_absorbed_weights_follow_in_place_weight_updates(compressed, native_checkpoints):
    model = copy.deepcopy(compressed["llava"])
    _, processor = load_native(native_checkpoints["llava"])
    inputs = mixed_batch(processor, "llava")
    kwargs = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True)
    before = model.generate(**inputs, **kwargs)  # fills the absorbed-weight cache
    perturb_image_branch(model, std=0.2, seed=5)
    with torch.no_grad():
        for attn in model.mla_attention_modules():
            attn.kv_b_proj["text"].weight.mul_(1.5)
    after = model.generate(**inputs, **kwargs)
    expected = _decompressed_copy(model).generate(**inputs, **kwargs)
    assert relative_error(expected.logits[1], after.logits[1]) < 1e-5
    assert relative_error(before.logits[1], after.logits[1]) > 1e-3
