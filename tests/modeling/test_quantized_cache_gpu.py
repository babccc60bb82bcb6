"""Quantized latent caches on CUDA (the Triton kernel reads the quantized rows); run on the GPU machine:
``PYTHONPATH=src python -m pytest tests/modeling/test_quantized_cache_gpu.py -m gpu``. Skipped on CPU."""

import copy

import pytest
import torch

from hf_mla_vlm import MLAQuantizedCache, MLAStaticQuantizedCache
from hf_mla_vlm.compat import CACHE_ARG
from hf_mla_vlm.conversion_scripts.convert import convert
from tests.utils import load_native, mixed_batch, perturb_image_branch, relative_error


pytestmark = pytest.mark.gpu


def _to_cuda(inputs: dict, dtype: torch.dtype) -> dict:
    return {k: v.to("cuda", dtype=dtype) if v.is_floating_point() else v.to("cuda") for k, v in inputs.items()}


@pytest.fixture(scope="module")
def model_and_inputs(native_checkpoints, tmp_path_factory):
    arch = "qwen2_5_vl"
    out = tmp_path_factory.mktemp("quantized_gpu") / arch
    model = convert(native_checkpoints[arch], out, rope_dim=8, kv_rank=8, progress=False, return_model=True).model
    perturb_image_branch(model)
    model = model.to("cuda", dtype=torch.bfloat16).eval()
    _, processor = load_native(native_checkpoints[arch])
    return model, _to_cuda(mixed_batch(processor, arch), torch.bfloat16)


@pytest.mark.parametrize("dtype", ["int8", "fp8", "int4"])
def test_cuda_kernel_on_quantized_rows_matches_the_decompressed_path(dtype, model_and_inputs):
    """The first absorbed decode step (Triton kernel dequantizing the stored rows) == the decompressed step over the
    dequantized rows, in bf16 tolerance; the prefill logits are identical."""
    from hf_mla_vlm.modeling.mla_attention import DECODE_KERNELS

    assert "cuda" in DECODE_KERNELS, "the Triton kernel is not registered"
    model, inputs = model_and_inputs
    reference = copy.deepcopy(model)
    for attn in reference.mla_attention_modules():
        attn.use_absorbed_decode = False
    kwargs = dict(max_new_tokens=2, do_sample=False, return_dict_in_generate=True, output_logits=True)
    out = model.generate(**inputs, **kwargs, **{CACHE_ARG: MLAQuantizedCache(config=model.config, dtype=dtype)})
    ref = reference.generate(**inputs, **kwargs, **{CACHE_ARG: MLAQuantizedCache(config=model.config, dtype=dtype)})
    torch.testing.assert_close(out.logits[0], ref.logits[0])
    assert relative_error(ref.logits[1].float(), out.logits[1].float()) < 3e-2


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_cuda_static_quantized_cache_under_cuda_graphs(dtype, model_and_inputs):
    """generate with the static quantized cache auto-compiles its decode steps on CUDA (torch.compile
    "reduce-overhead": CUDA graphs, the decode kernel as a custom op); its logits are those of the same cache with
    compilation disabled, step by step while the tokens agree. Compiled code may round a value to the neighbouring
    quantization step (a reciprocal instead of a division), which can flip a near-tie of the tiny random model, so
    the comparison stops after the first differing token (the prefill is eager: at least one compiled step counts)."""
    model, inputs = model_and_inputs
    max_len = inputs["input_ids"].shape[1] + 6
    kwargs = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True)
    eager = model.generate(
        **inputs, **kwargs, disable_compile=True,
        **{CACHE_ARG: MLAStaticQuantizedCache(config=model.config, max_cache_len=max_len, dtype=dtype)},
    )  # fmt: skip
    torch._dynamo.reset()
    compiled = model.generate(
        **inputs, **kwargs,
        **{CACHE_ARG: MLAStaticQuantizedCache(config=model.config, max_cache_len=max_len, dtype=dtype)},
    )  # fmt: skip
    prompt = inputs["input_ids"].shape[1]
    assert len(eager.logits) == len(compiled.logits) == 6
    for step, (want, got) in enumerate(zip(eager.logits, compiled.logits)):
        assert relative_error(want.float(), got.float()) < 3e-2, f"step {step}"
        if not torch.equal(eager.sequences[:, prompt + step], compiled.sequences[:, prompt + step]):
            break
