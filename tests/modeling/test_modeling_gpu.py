"""The converted models on CUDA (run on the GPU machine; skipped on CPU CI)."""

import copy

import pytest
import torch

from hf_mla_vlm.conversion_scripts.convert import convert
from hf_mla_vlm.tiny_models import TINY_ARCHS
from tests.utils import load_native, mixed_batch, perturb_image_branch, relative_error


pytestmark = pytest.mark.gpu


def _to_cuda(inputs: dict, dtype: torch.dtype) -> dict:
    return {k: v.to("cuda", dtype=dtype) if v.is_floating_point() else v.to("cuda") for k, v in inputs.items()}


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_cuda_absorbed_decode_matches_decompressed(arch, dtype, tol, native_checkpoints, tmp_path):
    model = convert(
        native_checkpoints[arch], tmp_path / "m", rope_dim=8, kv_rank=8, rope_strategy="uniform", progress=False,
        return_model=True,
    ).model  # fmt: skip
    perturb_image_branch(model)
    model = model.to("cuda", dtype=dtype).eval()
    reference = copy.deepcopy(model)
    for attn in reference.mla_attention_modules():
        attn.use_absorbed_decode = False
    _, processor = load_native(native_checkpoints[arch])
    inputs = _to_cuda(mixed_batch(processor, arch), dtype)
    kwargs = dict(max_new_tokens=2, do_sample=False, return_dict_in_generate=True, output_logits=True)
    # logits[1] is the first absorbed decode step; the prefill (logits[0]) is identical in both models
    step = model.generate(**inputs, **kwargs).logits[1]
    ref_step = reference.generate(**inputs, **kwargs).logits[1]
    assert relative_error(ref_step.float(), step.float()) < tol


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_cuda_full_rank_and_static_cache(arch, native_checkpoints, tmp_path):
    original, processor = load_native(native_checkpoints[arch])
    model = convert(
        native_checkpoints[arch], tmp_path / "m", rope_dim=32, kv_rank=32, progress=False, return_model=True
    )
    model, original = model.model.cuda().eval(), original.cuda()
    inputs = _to_cuda(mixed_batch(processor, arch), torch.float32)
    with torch.no_grad():
        expected, actual = original(**inputs).logits, model(**inputs).logits
    assert relative_error(expected, actual, inputs["attention_mask"].bool()) < 1e-4
    dynamic = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    static = model.generate(**inputs, max_new_tokens=5, do_sample=False, cache_implementation="static")
    assert torch.equal(dynamic, static)
    assert torch.equal(original.generate(**inputs, max_new_tokens=5, do_sample=False), dynamic)
