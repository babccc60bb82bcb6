"""Converted models against the originals and against themselves (absorbed decode vs decompressed attention)."""

import copy

import pytest
import torch
from transformers import AutoModel, AutoModelForImageTextToText

import hf_mla_vlm
from hf_mla_vlm.cache_size import cache_nbytes
from hf_mla_vlm.compat import CACHE_ARG, output_cache
from hf_mla_vlm.conversion_scripts.convert import convert
from hf_mla_vlm.tiny_models import TINY_ARCHS, tiny_image, tiny_prompt
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


@pytest.fixture(scope="module")
def full_rank(native_checkpoints, tmp_module):
    """Every rotary pair kept, kv_rank = 2 * head_dim - rope_dim: the converted model must equal the original."""
    return {
        arch: _convert(native, tmp_module / f"{arch}-full", rope_dim=HEAD_DIM, kv_rank=HEAD_DIM)
        for arch, native in native_checkpoints.items()
    }


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_full_rank_conversion_reproduces_the_original(arch, full_rank, native_checkpoints):
    original, processor = load_native(native_checkpoints[arch])
    inputs = mixed_batch(processor, arch)
    with torch.no_grad():
        expected, actual = original(**inputs).logits, full_rank[arch](**inputs).logits
    assert relative_error(expected, actual, inputs["attention_mask"].bool()) < 1e-4  # measured ~9e-7


GENERATION_MODES = {
    "dynamic": {},
    "static": {"cache_implementation": "static"},
    "beam": {"num_beams": 3},
    "dynamic-unpadded": {},
}


@pytest.mark.parametrize("mode", GENERATION_MODES)
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_full_rank_generation_equals_the_original(arch, mode, full_rank, native_checkpoints):
    """Greedy tokens of the ORIGINAL model, not of another cached run of the converted one: a cache that never
    reaches the attention (Transformers 5.24 renamed its argument) keeps the prefill exact and breaks every step
    after it. The mixed batch is left-padded; "dynamic-unpadded" runs one prompt alone."""
    original, processor = load_native(native_checkpoints[arch])
    inputs = mixed_batch(processor, arch)
    if mode == "dynamic-unpadded":
        inputs = processor(images=[tiny_image(0)], text=[tiny_prompt(arch, "describe the image")], return_tensors="pt")
    kwargs = dict(max_new_tokens=8, do_sample=False, **GENERATION_MODES[mode])
    expected = original.generate(**inputs, **kwargs)
    actual = full_rank[arch].generate(**inputs, **kwargs)
    assert torch.equal(expected, actual)


@pytest.mark.parametrize("stage", ["mla", "partial_rope"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_a_cached_forward_fills_the_cache(arch, stage, native_checkpoints, tmp_module):
    """Guard: `use_cache=True` must leave one cached row per input token in every layer, through the argument name
    of the installed Transformers (`cache=` from 5.24, `past_key_values=` before), and generation must go on
    from it."""
    model = _convert(
        native_checkpoints[arch], tmp_module / f"{arch}-guard-{stage}", rope_dim=8, kv_rank=8, mla_stage=stage
    )
    _, processor = load_native(native_checkpoints[arch])
    inputs = processor(images=[tiny_image(0)], text=[tiny_prompt(arch, "describe the image")], return_tensors="pt")
    seq_len = inputs["input_ids"].shape[1]
    with torch.no_grad():
        cache = output_cache(model(**inputs, use_cache=True))
    assert cache is not None
    assert [cache.get_seq_length(i) for i in range(len(cache.layers))] == [seq_len] * len(cache.layers)
    assert all(layer.keys.abs().sum() > 0 for layer in cache.layers)
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert output_cache(out).get_seq_length() == seq_len + 2  # the last generated token is not cached


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_cached_generation_equals_uncached_forwards(arch, cache_implementation, compressed, native_checkpoints):
    """A compressed model has no original to equal: its cached greedy decode is checked against uncached forwards
    over the generated sequence (every generated token is the argmax of the uncached logits before it)."""
    model = compressed[arch]
    _, processor = load_native(native_checkpoints[arch])
    inputs = mixed_batch(processor, arch)
    out = model.generate(
        **inputs,
        max_new_tokens=6,
        do_sample=False,
        cache_implementation=cache_implementation,
        return_dict_in_generate=True,
        output_logits=True,
    )
    prompt_len = inputs["input_ids"].shape[1]
    generated = torch.ones_like(out.sequences[:, prompt_len:])
    mask = torch.cat([inputs["attention_mask"], generated], dim=1)
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    if "mm_token_type_ids" in extra:  # Qwen2.5-VL: generated tokens are text
        extra["mm_token_type_ids"] = torch.cat([extra["mm_token_type_ids"], 0 * generated], dim=1)
    with torch.no_grad():
        logits = model(input_ids=out.sequences, attention_mask=mask, **extra).logits
    for step, cached in enumerate(out.logits):
        assert relative_error(logits[:, prompt_len - 1 + step], cached) < 1e-5, f"step {step}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_a_forward_without_a_cache_equals_one_that_fills_it(arch, dtype, compressed, native_checkpoints):
    """`use_cache=False` (training, scoring) attends to the new rows directly instead of packing them into cache
    rows and reading them back: the same logits, bit for bit, with the image branch perturbed (both modalities)."""
    model = copy.deepcopy(compressed[arch]).to(dtype)
    _, processor = load_native(native_checkpoints[arch])
    inputs = mixed_batch(processor, arch)
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        cached = model(**inputs, use_cache=True)
        uncached = model(**inputs, use_cache=False)
    assert cached.past_key_values is not None and uncached.past_key_values is None
    assert torch.equal(uncached.logits, cached.logits)


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
        step = {"input_ids": out.logits[:, -1:].argmax(-1), CACHE_ARG: output_cache(out)}
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(step["input_ids"])], dim=1)
        base = model(**step, attention_mask=mask).logits
        flag = (
            model.mla_attention_modules()[0].num_key_value_heads * model.config.rope_dim
        )  # column after the rope keys
        for layer in output_cache(out).layers:
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
        ref_cache = output_cache(original(**inputs, use_cache=True))
        cache = output_cache(model(**inputs, use_cache=True))
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
    new_ids = full_ids[:, output_cache(out).get_seq_length() :]  # the last generated token is not cached yet
    extra = {"image_sizes": torch.cat([first["image_sizes"], second["image_sizes"]])} if arch == "llava_next" else {}
    pixels = torch.cat([first["pixel_values"], second["pixel_values"]])
    with torch.no_grad():
        cached = model(
            input_ids=new_ids,
            pixel_values=second["pixel_values"],
            **{CACHE_ARG: output_cache(out)},
            attention_mask=torch.ones_like(full_ids),
            **({"image_sizes": second["image_sizes"]} if arch == "llava_next" else {}),
        ).logits
        fresh = model(input_ids=full_ids, pixel_values=pixels, **extra).logits[:, -new_ids.shape[1] :]
    assert relative_error(fresh, cached) < 1e-5


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_inputs_embeds_route_image_tokens_like_input_ids(arch, compressed, full_rank, native_checkpoints):
    """With `inputs_embeds` only, image tokens are found by their token embedding (as the native placeholder mask
    does): the routing equals the one from `input_ids`, and at full rank the outputs and `generate(input_ids=...,
    inputs_embeds=...)` equal the original's. A mask of the wrong shape is refused."""
    original, processor = load_native(native_checkpoints[arch])
    inputs = mixed_batch(processor, arch)
    ids = inputs.pop("input_ids")
    model = compressed[arch]
    expected = model.image_token_mask(ids)
    embeds = model.get_input_embeddings()(ids)
    assert expected.any() and torch.equal(model.image_token_mask(None, embeds), expected)
    with pytest.raises(ValueError, match="image_token_mask"):
        model(inputs_embeds=embeds, **inputs, image_token_mask=expected[:, :-1])
    greedy = dict(**inputs, max_new_tokens=3, do_sample=False)
    with_mask = model.generate(input_ids=ids, image_token_mask=expected, **greedy)  # the prompt's mask
    assert torch.equal(with_mask, model.generate(input_ids=ids, **greedy))

    embeds = original.get_input_embeddings()(ids)
    with torch.no_grad():
        reference = original(inputs_embeds=embeds, **inputs).logits
        actual = full_rank[arch](inputs_embeds=embeds, **inputs).logits
    assert relative_error(reference, actual, inputs["attention_mask"].bool()) < 1e-4
    kwargs = dict(input_ids=ids, inputs_embeds=embeds, **inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(original.generate(**kwargs), full_rank[arch].generate(**kwargs))


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
    assert type(AutoModelForImageTextToText.from_pretrained(out)) is hf_mla_vlm.Qwen2_5_VLMLAForConditionalGeneration
    base = AutoModel.from_pretrained(out)  # the base model, as `AutoModel` gives `Qwen2_5_VLModel` natively
    assert type(base) is hf_mla_vlm.Qwen2_5_VLMLAModel
    assert all(isinstance(attn, hf_mla_vlm.MLAAttention) for attn in base.mla_attention_modules())


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
