"""The converted classes with the tools around Transformers: peft, tensor-parallel plans, output recording, and no
deprecation warnings from our own calls."""

import copy
import logging
import subprocess
import sys
import warnings

import pytest
import torch
from transformers.utils import logging as hf_logging

from hf_mla_vlm import PEFT_TARGET_MODULES
from hf_mla_vlm.compat import CACHE_ARG, TESTED_TRANSFORMERS, output_cache, warn_if_untested
from hf_mla_vlm.conversion_scripts.convert import convert
from hf_mla_vlm.demo import compare_models
from tests.utils import load_native, mixed_batch


peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def converted(native_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("ecosystem")
    return {
        arch: convert(native, root / arch, rope_dim=8, kv_rank=8, progress=False, return_model=True).model.eval()
        for arch, native in native_checkpoints.items()
    }


def test_peft_lora_on_the_documented_targets(converted, native_checkpoints):
    model = converted["llava_next"]
    _, processor = load_native(native_checkpoints["llava_next"])
    config = peft.LoraConfig(r=4, target_modules=list(PEFT_TARGET_MODULES), exclude_modules=r".*vision.*")
    lora = peft.get_peft_model(model, config)
    adapted = {name.rsplit(".", 2)[-2] for name, _ in lora.named_modules() if name.endswith(".lora_A")}
    assert adapted == {"q_proj", "k_rope_proj", "text", "image", "o_proj"}
    per_layer = [
        name for name, _ in lora.named_modules() if ".layers.0.self_attn." in name and name.endswith("lora_A")
    ]
    assert len(per_layer) == len(PEFT_TARGET_MODULES)  # every branch of both latent projections
    assert not any("vision" in name for name, _ in lora.named_modules() if name.endswith("lora_A"))
    inputs = mixed_batch(processor, "llava_next")
    lora.train()
    out = lora(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    grads = [p.grad for name, p in lora.named_parameters() if "lora_B" in name and "kv_a_proj.image" in name]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    with pytest.raises(ValueError, match="ModuleDict"):  # the container names are refused by peft, loudly
        peft.get_peft_model(converted["llava"], peft.LoraConfig(r=4, target_modules=["kv_a_proj"]))


def test_tensor_parallel_plan_leaves_the_latent_attention_replicated(converted):
    for model in converted.values():
        plan = model.tp_plan
        assert plan and not any(".self_attn." in key for key in plan), plan  # no k_proj / v_proj left over
        assert any(key.endswith("mlp.down_proj") for key in plan)
        names = {name for name, _ in model.named_modules()}
        for key in plan:  # every entry names a real module
            pattern = key.replace(".*.", ".0.")
            assert pattern in names, key


def test_output_attentions_in_eager_mode(converted, native_checkpoints):
    model = converted["qwen2_5_vl"]
    _, processor = load_native(native_checkpoints["qwen2_5_vl"])
    inputs = mixed_batch(processor, "qwen2_5_vl")
    model.set_attn_implementation("eager")
    try:
        out = model.generate(**inputs, max_new_tokens=3, output_attentions=True, return_dict_in_generate=True)
    finally:
        model.set_attn_implementation("sdpa")
    layers = model.config.text_config.num_hidden_layers
    prompt = inputs["input_ids"].shape[1]
    assert [len(step) for step in out.attentions] == [layers] * 3
    assert [step[0].shape[-2:] for step in out.attentions] == [(prompt, prompt), (1, prompt + 1), (1, prompt + 2)]
    probabilities = out.attentions[1][0].sum(-1)  # the decode step's weights are real softmax rows
    torch.testing.assert_close(probabilities, torch.ones_like(probabilities))


def test_no_deprecation_warnings_from_our_calls(converted, native_checkpoints, caplog, monkeypatch):
    """Transformers 5.24 deprecates `past_key_values=` (a FutureWarning from the argument, a log line from the
    output attribute); neither our calls nor our modules may trigger either."""
    original, processor = load_native(native_checkpoints["llava"])
    inputs = mixed_batch(processor, "llava")
    model = converted["llava"]
    if hasattr(logging.Logger, "warning_once"):
        logging.Logger.warning_once.cache_clear()  # "once" per process: make earlier tests' messages count again
    hf_logging.enable_propagation()
    try:
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
            warnings.simplefilter("always")
            compare_models(original, model, inputs, max_new_tokens=3)
            out = model(**inputs, use_cache=True)
            model(input_ids=inputs["input_ids"][:, -1:], **{CACHE_ARG: output_cache(out)})
    finally:
        hf_logging.disable_propagation()
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "past_key_values" in m or "deprecated" in m], messages


def test_untested_transformers_versions_warn():
    assert not warn_if_untested(f"{TESTED_TRANSFORMERS[0]}.0")
    assert not warn_if_untested(f"{TESTED_TRANSFORMERS[-1]}.3")
    with pytest.warns(UserWarning, match="tested with Transformers"):
        assert warn_if_untested("5.99.0.dev0")


def test_compiled_forward_keeps_no_tensor_on_the_modules(converted, native_checkpoints):
    """A tensor created inside a compiled region and kept on a module belongs to that region's CUDA graph under
    `mode="reduce-overhead"` and is overwritten by the next replay (found on the GPU machine): under compilation the
    attention builds its rope index as a graph constant instead of caching it."""
    model = copy.deepcopy(converted["llava"])
    _, processor = load_native(native_checkpoints["llava"])
    inputs = mixed_batch(processor, "llava")
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(model, backend="eager")(**inputs).logits
        eager = model(**inputs).logits
    torch.testing.assert_close(compiled, eager)
    assert all(attn._rope_index is not None for attn in model.mla_attention_modules())  # cached by the eager call
    fresh = copy.deepcopy(converted["llava"])
    for attn in fresh.mla_attention_modules():
        attn._rope_index = None  # as built, before any eager call
    with torch.no_grad():
        torch.compile(fresh, backend="eager")(**inputs)
    assert all(attn._rope_index is None for attn in fresh.mla_attention_modules())


def test_decode_with_gradients_takes_the_differentiable_path(converted, native_checkpoints, monkeypatch):
    """A registered decode kernel is forward-only (the Triton kernel on CUDA): a cached single-token step with
    gradients enabled must not use it, or the gradients of the attention would be silently zero."""
    from hf_mla_vlm.modeling import mla_attention

    calls = []

    def forward_only_kernel(*args):
        calls.append(1)
        with torch.no_grad():
            return mla_attention.mla_decode_reference(*args)

    monkeypatch.setitem(mla_attention.DECODE_KERNELS, "cpu", forward_only_kernel)
    model = copy.deepcopy(converted["llava"]).train()
    _, processor = load_native(native_checkpoints["llava"])
    inputs = mixed_batch(processor, "llava")
    with torch.no_grad():
        cache = output_cache(model(**inputs, use_cache=True))
    step = {"input_ids": inputs["input_ids"][:, -1:], CACHE_ARG: cache}
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(inputs["attention_mask"][:, :1])], dim=1)
    model(**step, attention_mask=mask).logits.sum().backward()
    grad = model.mla_attention_modules()[0].q_proj.weight.grad
    assert not calls and grad is not None and grad.abs().sum() > 0
    with torch.no_grad():  # inference still takes the registered kernel
        cache = output_cache(model.eval()(**inputs, use_cache=True))
        model(input_ids=inputs["input_ids"][:, -1:], attention_mask=mask, **{CACHE_ARG: cache})
    assert calls


@pytest.mark.parametrize("arch", ["llava", "qwen2_5_vl"])
def test_a_converted_model_pickles_here_and_in_a_fresh_process(arch, native_checkpoints, tmp_path):
    """`torch.save(model)` / multiprocessing pickle a model by its classes' names: the MLA text model classes are
    built at import time, and a process that has not built one yet gets it by name from `modeling_mla_common`.
    (A model of its own: after an `output_attentions` forward, Transformers 5.17 leaves unpicklable hooks on it.)"""
    model = convert(native_checkpoints[arch], tmp_path / "mla", rope_dim=8, kv_rank=8, progress=False,
                    return_model=True).model.eval()  # fmt: skip
    _, processor = load_native(native_checkpoints[arch])
    inputs = mixed_batch(processor, arch)
    path = tmp_path / "model.pt"
    torch.save(model, path)
    with torch.no_grad():
        expected = model(**inputs).logits
        got = torch.load(path, weights_only=False)(**inputs).logits
    assert torch.equal(got, expected)
    script = f"import torch; m = torch.load({str(path)!r}, weights_only=False)\n"
    script += "print(type(m.model.language_model).__name__)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == type(model.model.language_model).__name__
