"""Quantized latent caches (quantized_cache.py) on converted tiny models: memory, accuracy, prefill semantics,
static variant and generate integration (run on Transformers 5.17 and 5.24)."""

import copy

import pytest
import torch
from transformers import DynamicCache, StaticCache

from hf_mla_vlm import MLAQuantizedCache, MLAStaticQuantizedCache
from hf_mla_vlm.cache_size import cache_nbytes
from hf_mla_vlm.compat import CACHE_ARG, output_cache
from hf_mla_vlm.conversion_scripts.convert import convert
from hf_mla_vlm.modeling.latent_cache import LATENT_DTYPES, LatentQuantization
from hf_mla_vlm.modeling.quantized_cache import MLAQuantizedLayer
from tests.utils import load_native, mixed_batch, perturb_image_branch, relative_error


ARCHS = ("llava_next", "qwen2_5_vl")  # Llama-style and Qwen-style (q/k/v and up-projection biases, M-RoPE)
HEAD_DIM = 32
GREEDY = dict(do_sample=False, return_dict_in_generate=True, output_logits=True)


def _convert(native, out, **kwargs):
    return convert(native, out, overwrite=True, progress=False, return_model=True, **kwargs).model.eval()


@pytest.fixture(scope="module")
def models(native_checkpoints, tmp_path_factory):
    """Per arch: the full-rank conversion (equal to the original; latent 2 * 32 = 64, group 64) and a compressed
    one (latent 2 * 8 = 16, image branch perturbed)."""
    root = tmp_path_factory.mktemp("quantized_cache")
    out = {}
    for arch in ARCHS:
        full = _convert(native_checkpoints[arch], root / f"{arch}-full", rope_dim=HEAD_DIM, kv_rank=HEAD_DIM)
        small = _convert(native_checkpoints[arch], root / f"{arch}-r8k8", rope_dim=8, kv_rank=8)
        perturb_image_branch(small)
        out[arch] = {"full": full, "small": small}
    return out


@pytest.fixture(scope="module")
def batches(native_checkpoints):
    return {arch: mixed_batch(load_native(native_checkpoints[arch])[1], arch) for arch in ARCHS}


def _generate(model, inputs, cache=None, **kwargs):
    extra = {} if cache is None else {CACHE_ARG: cache}
    return model.generate(**inputs, max_new_tokens=5, **GREEDY, **extra, **kwargs)


def _agreeing_steps(a, b) -> int:
    """Steps whose logits were computed from the same prefix in both runs (up to and including the first step
    where the chosen tokens differ)."""
    prompt = a.sequences.shape[1] - len(a.logits)
    same = (a.sequences[:, prompt:] == b.sequences[:, prompt:]).all(0).tolist()
    return same.index(False) + 1 if False in same else len(same)


def _fake_quantized(model, dtype: str):
    """A copy of `model` whose down-projections return dequantize(quantize(latent)): what a quantized cache holds,
    computed without any quantized cache."""
    fake = copy.deepcopy(model)
    for attn in fake.mla_attention_modules():
        fmt = LatentQuantization.create(dtype, attn.latent_dim)
        original = attn._down_project

        def down(hidden, is_image, _original=original, _fmt=fmt):
            latent = _original(hidden, is_image)
            return _fmt.dequantize(_fmt.quantize(latent), latent.dtype)

        attn._down_project = down
    return fake


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("static", [False, True])
def test_without_quantization_generation_is_unchanged(arch, static, models, batches):
    """dtype=None: exactly the tokens and logits of the default (dynamic / static) cache."""
    model, inputs = models[arch]["small"], batches[arch]
    if static:
        expected = _generate(model, inputs, StaticCache(config=model.config, max_cache_len=96))
        actual = _generate(model, inputs, MLAStaticQuantizedCache(config=model.config, max_cache_len=96, dtype=None))
    else:
        expected = _generate(model, inputs)
        actual = _generate(model, inputs, MLAQuantizedCache(config=model.config, dtype=None))
    assert torch.equal(expected.sequences, actual.sequences)
    for a, b in zip(expected.logits, actual.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype,tolerance", [("int8", 0.03), ("fp8", 0.1)])
def test_full_rank_quantized_latent_generates_close_to_the_unquantized_latent(arch, dtype, tolerance, models, batches):
    """Full-rank conversion (= the original model): an int8 / fp8 latent moves the logits by a relative error
    of the order of the latent's rounding (~0.4% int8, ~3% fp8 e4m3 per element), not more."""
    model, inputs = models[arch]["full"], batches[arch]
    expected = _generate(model, inputs)
    actual = _generate(model, inputs, MLAQuantizedCache(config=model.config, dtype=dtype))
    steps = _agreeing_steps(expected, actual)
    errors = [relative_error(a, b) for a, b in zip(expected.logits[:steps], actual.logits[:steps])]
    assert max(errors) < tolerance, errors
    assert min(errors) > 1e-4, errors  # the latent really is quantized


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", LATENT_DTYPES)
def test_attention_reads_the_quantized_latent_at_prefill_and_decode(arch, dtype, models, batches, monkeypatch):
    """A quantized cache == a model whose latent is dequantize(quantize(latent)) with an ordinary cache, from the
    prefill logits on (Transformers' QuantizedCache would give the unquantized prefill logits). Absorbed decode (the
    kernel reading the quantized rows) == decompressed decode (dequantized rows)."""
    model, inputs = models[arch]["small"], batches[arch]
    fake = _generate(_fake_quantized(model, dtype), inputs)
    plain = _generate(model, inputs)
    calls = [0]
    for attn in model.mla_attention_modules():
        original = attn._absorbed_decode

        def counted(*args, _original=original, **kwargs):
            calls[0] += 1
            assert args[3].dtype == torch.uint8  # the quantized rows themselves reach the decode kernel
            return _original(*args, **kwargs)

        monkeypatch.setattr(attn, "_absorbed_decode", counted)
    actual = _generate(model, inputs, MLAQuantizedCache(config=model.config, dtype=dtype))
    assert calls[0] == 4 * model.config.text_config.num_hidden_layers
    assert relative_error(plain.logits[0], actual.logits[0]) > 1e-4  # the prefill sees the quantization
    assert torch.equal(fake.sequences, actual.sequences)
    for step, (a, b) in enumerate(zip(fake.logits, actual.logits)):
        assert relative_error(a, b) < 1e-5, f"step {step}"
    # The two decode paths sum in different orders: in float32 they differ by ~1e-5 after five steps of this
    # random model, which a tolerance cannot tell from a small bug. In float64 (the dequantized latent is still
    # computed in float32) they differ by < 5e-7.
    monkeypatch.undo()  # copies without the counting wrappers (they are bound to this model's modules)
    absorbed = copy.deepcopy(model).double()
    decompressed = copy.deepcopy(absorbed)
    for attn in decompressed.mla_attention_modules():
        attn.use_absorbed_decode = False
    inputs = {key: value.double() if value.is_floating_point() else value for key, value in inputs.items()}
    actual = _generate(absorbed, inputs, MLAQuantizedCache(config=model.config, dtype=dtype))
    reference = _generate(decompressed, inputs, MLAQuantizedCache(config=model.config, dtype=dtype))
    assert torch.equal(reference.sequences, actual.sequences)
    for step, (a, b) in enumerate(zip(reference.logits, actual.logits)):
        assert relative_error(a, b) < 1e-5, f"step {step}"


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("dtype", LATENT_DTYPES)
def test_cache_memory_is_the_layouts_bytes_per_token(dtype, static, models, batches):
    """Bytes held by the cache tensors == tokens x layers x `LatentCacheLayout.bytes_per_token` (scales, padding
    and the compute-dtype side row counted)."""
    model, inputs = models["llava_next"]["small"], batches["llava_next"]
    batch, seq = inputs["input_ids"].shape
    max_len = seq + 7
    cache = (
        MLAStaticQuantizedCache(config=model.config, max_cache_len=max_len, dtype=dtype)
        if static
        else MLAQuantizedCache(config=model.config, dtype=dtype)
    )
    with torch.no_grad():
        model(**inputs, **{CACHE_ARG: cache}, use_cache=True)
    attn = model.mla_attention_modules()[0]
    layout = attn.cache_layout.quantized(cache.latent_quantization)
    tokens = max_len if static else seq
    per_token = layout.bytes_per_token(torch.float32)
    assert cache_nbytes(cache) == per_token * batch * tokens * model.config.text_config.num_hidden_layers
    assert cache.layers[0].keys.dtype == torch.uint8
    assert cache.layers[0].keys.shape[-1] == cache.latent_quantization.row_bytes
    unquantized = output_cache(model(**inputs, use_cache=True))
    assert cache_nbytes(unquantized) == attn.cache_layout.bytes_per_token(torch.float32) * batch * seq * len(
        unquantized.layers
    )
    if not static:
        assert cache_nbytes(cache) < cache_nbytes(unquantized)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_static_variant_and_generate_cache_config(arch, dtype, models, batches):
    """The static cache (passed in, or built by generate from cache_implementation="static" + cache_config) gives
    the dynamic quantized cache's tokens; `cache_config={"dtype": ...}` alone builds the dynamic one."""
    model, inputs = models[arch]["small"], batches[arch]
    dynamic = _generate(model, inputs, MLAQuantizedCache(config=model.config, dtype=dtype))
    static = _generate(model, inputs, MLAStaticQuantizedCache(config=model.config, max_cache_len=96, dtype=dtype))
    built_static = _generate(model, inputs, cache_implementation="static", cache_config={"dtype": dtype})
    built_dynamic = _generate(model, inputs, cache_config={"dtype": dtype})
    for run in (static, built_static, built_dynamic):
        assert torch.equal(dynamic.sequences, run.sequences)
        for a, b in zip(dynamic.logits, run.logits):
            # float rounding differences between the static and dynamic attention (padded key length) can flip a
            # quantized latent value in a later layer: a few 1e-5
            assert relative_error(a, b) < 1e-4
    assert isinstance(output_cache(built_static), MLAStaticQuantizedCache)
    assert isinstance(output_cache(built_dynamic), MLAQuantizedCache)
    assert output_cache(built_static).latent_quantization.dtype == dtype


def test_beam_search_and_text_config(models, batches):
    """Beam reordering works on the quantized rows; a cache built from the text config learns the latent width at
    the first update."""
    model, inputs = models["llava_next"]["small"], batches["llava_next"]
    beams = dict(max_new_tokens=4, num_beams=3, do_sample=False)
    expected = _fake_quantized(model, "int8").generate(**inputs, **beams)
    cache = MLAQuantizedCache(config=model.config.text_config, dtype="int8")
    assert cache.latent_quantization is None
    actual = model.generate(**inputs, **beams, **{CACHE_ARG: cache})
    assert torch.equal(expected, actual)
    assert cache.latent_quantization == LatentQuantization.create("int8", model.config.mla_latent_dim)


def test_bad_arguments_are_refused(models):
    config = models["llava_next"]["small"].config
    with pytest.raises(ValueError, match="must be one of"):
        MLAQuantizedCache(config=config, dtype="int2")
    with pytest.raises(ValueError, match="divisor"):
        MLAQuantizedCache(config=config, dtype="int8", group_size=5)
    with pytest.raises(ValueError, match="max_cache_len"):
        MLAStaticQuantizedCache(config=config, dtype="int8")
    with pytest.raises(ValueError, match="config"):
        MLAQuantizedCache(dtype="int8")
    with pytest.raises(ValueError, match="group_size is only used"):
        MLAQuantizedLayer(dtype=None, group_size=16)
    model = models["llava_next"]["small"]
    with pytest.raises(ValueError, match="unknown cache_config keys"):
        model.generate(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=2, cache_config={"dtype": "int8", "x": 1})


def test_plain_dynamic_cache_is_untouched(models, batches):
    """A model given a plain DynamicCache keeps storing the latent in the compute dtype."""
    model, inputs = models["llava_next"]["small"], batches["llava_next"]
    cache = DynamicCache()
    with torch.no_grad():
        model(**inputs, **{CACHE_ARG: cache}, use_cache=True)
    assert cache.layers[0].keys.dtype == torch.float32


def test_compiled_decode_with_the_static_quantized_cache(models, batches):
    """A decode step through `torch.compile` (dynamo tracing the quantization, the quantized writes into the static
    buffers and the kernel call on the quantized rows) gives the eager step's logits."""
    model, inputs = models["llava_next"]["small"], batches["llava_next"]
    batch, seq = inputs["input_ids"].shape
    logits = []
    for compiled in (False, True):
        cache = MLAStaticQuantizedCache(config=model.config, max_cache_len=seq + 4, dtype="int4")
        with torch.no_grad():
            out = model(**inputs, **{CACHE_ARG: cache}, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], dim=1)
            mask = torch.cat([mask, torch.zeros(batch, 3, dtype=mask.dtype)], dim=1)  # static width
            position = inputs["attention_mask"].sum(-1, keepdim=True)
            torch._dynamo.reset()
            forward = torch.compile(model, backend="eager") if compiled else model
            step = forward(input_ids=token, attention_mask=mask, position_ids=position, **{CACHE_ARG: cache})
        logits.append(step.logits)
        assert int(cache.get_seq_length()) == seq + 1
    torch.testing.assert_close(logits[1], logits[0])


LOAD_REMOTE_AND_GENERATE = """
import importlib, json, sys
sys.modules["hf_mla_vlm"] = None  # the package is "not installed"
import torch
from transformers import AutoModelForImageTextToText
folder, inputs_file, arg = sys.argv[1], sys.argv[2], sys.argv[3]
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
bundle = importlib.import_module(type(model).__module__.rsplit(".", 1)[0] + ".quantized_cache")
inputs = torch.load(inputs_file)
cache = bundle.MLAQuantizedCache(config=model.config, dtype="int8")
a = model.generate(**inputs, max_new_tokens=4, do_sample=False, **{arg: cache})
b = model.generate(**inputs, max_new_tokens=4, do_sample=False, cache_implementation="static",
                   cache_config={"dtype": "int8"})
print(json.dumps({"dynamic": a.tolist(), "static": b.tolist(), "module": type(cache).__module__}))
"""


def test_quantized_cache_from_the_remote_code_bundle(models, batches, tmp_path):
    """The cache classes ship in the checkpoint (quantized_cache.py) and work where hf_mla_vlm is not installed."""
    import json
    import os
    import subprocess
    import sys

    model, inputs = models["llava_next"]["small"], batches["llava_next"]
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    assert (folder / "quantized_cache.py").is_file()
    inputs_file = tmp_path / "inputs.pt"
    torch.save(dict(inputs), inputs_file)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    done = subprocess.run(
        [sys.executable, "-c", LOAD_REMOTE_AND_GENERATE, str(folder), str(inputs_file), CACHE_ARG],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["module"].startswith("transformers_modules.")
    expected = model.generate(**inputs, max_new_tokens=4, do_sample=False, **{CACHE_ARG: MLAQuantizedCache(
        config=model.config, dtype="int8")})  # fmt: skip
    assert result["dynamic"] == expected.tolist() == result["static"]


def test_a_native_model_is_refused(native_checkpoints, batches):
    native, _ = load_native(native_checkpoints["llava_next"])
    cache = MLAQuantizedCache(config=native.config, dtype="int8")
    with pytest.raises(ValueError, match="has no latent to quantize"), torch.no_grad():
        native(**batches["llava_next"], **{CACHE_ARG: cache}, use_cache=True)
