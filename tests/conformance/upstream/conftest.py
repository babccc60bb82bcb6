"""Set-up of the MLA conformance run inside a copy of Transformers' test tree (see ../README.md).

* Transformers 5.17 lacks five names that the 5.24 test tree imports, and 5.25 dropped one
  (`preserve_module_forwards`); they are added here with their 5.24 meaning, so that the same upstream tests run on
  every version (tests that fail on the native classes of a version are excluded by the runner, not here).
* The upstream mixins choose labels by looking model class names up in `MODEL_FOR_*_MAPPING_NAMES`: the MLA classes
  are listed beside their native counterparts.
"""

import contextlib
import importlib
import sys
import types
import unittest

import transformers.processing_utils as processing_utils
import transformers.testing_utils as testing_utils
from transformers.models.auto import modeling_auto

import hf_mla_vlm  # noqa: F401  (registers the MLA classes with the Auto classes)


if not hasattr(testing_utils, "require_flex_attention"):
    from transformers.utils import is_torch_flex_attn_available

    def require_flex_attention(test_case):
        return unittest.skipUnless(is_torch_flex_attn_available(), "test requires FlexAttention")(test_case)

    testing_utils.require_flex_attention = require_flex_attention
if not hasattr(testing_utils, "SINGLE_PROCESS_DEVICES"):
    testing_utils.SINGLE_PROCESS_DEVICES = {"tpu"}
if not hasattr(testing_utils, "preserve_module_forwards"):  # 5.25 dropped it; one accelerator-only test uses it

    @contextlib.contextmanager
    def preserve_module_forwards(model):
        """Undo `kernelize` on exit: restore (or drop) the `forward` it puts in kernelizable modules' `__dict__`."""
        modules = []
        for _, owner in model.named_modules():
            modules.extend(getattr(owner, "_kernel_funcs", {}).values())
            if hasattr(type(owner), "kernel_layer_name"):  # a module that wraps one kernel function
                modules.append(owner)
        missing = object()
        saved = {module: module.__dict__.get("forward", missing) for module in modules}
        try:
            yield
        finally:
            for module, forward in saved.items():
                if forward is missing:
                    module.__dict__.pop("forward", None)
                else:
                    module.__dict__["forward"] = forward

    testing_utils.preserve_module_forwards = preserve_module_forwards
if not hasattr(processing_utils, "OmniModalProcessorMixin"):  # imported by test_processing_common only
    processing_utils.OmniModalProcessingKwargs = processing_utils.ProcessingKwargs
    processing_utils.OmniModalProcessorMixin = type("OmniModalProcessorMixin", (), {})
try:
    importlib.import_module("transformers.distributed.parallel_utils")
except ImportError:
    from transformers.distributed.tensor_parallel import _get_parameter_tp_plan

    parallel_utils = types.ModuleType("transformers.distributed.parallel_utils")
    parallel_utils._get_parameter_plan = _get_parameter_tp_plan
    sys.modules["transformers.distributed.parallel_utils"] = parallel_utils


MLA_MODEL_TYPES = {
    native: f"{native}_mla" for native in ("llava", "llava_next", "qwen2_5_vl", "qwen2_vl", "llava_onevision")
}
MLA_CLASS_NAMES = {
    f"{native}{suffix}": f"{native}MLA{suffix}"
    for native in ("Llava", "LlavaNext", "Qwen2_5_VL", "Qwen2VL", "LlavaOnevision")
    for suffix in ("Model", "ForConditionalGeneration")
}
for _name, _mapping in vars(modeling_auto).items():
    if _name.startswith("MODEL_") and _name.endswith("_MAPPING_NAMES") and isinstance(_mapping, dict):
        for _native_type, _mla_type in MLA_MODEL_TYPES.items():
            if _mapping.get(_native_type) in MLA_CLASS_NAMES:
                _mapping.setdefault(_mla_type, MLA_CLASS_NAMES[_mapping[_native_type]])
