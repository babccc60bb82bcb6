"""The upstream test classes on the NATIVE classes, run under the same set-up (the 5.17 shims): the baseline the
MLA results are compared with. The runner selects one class per architecture."""

from tests.models.llava.test_modeling_llava import LlavaForConditionalGenerationModelTest as NativeLlavaTest
from tests.models.llava_next.test_modeling_llava_next import (
    LlavaNextForConditionalGenerationModelTest as NativeLlavaNextTest,
)
from tests.models.llava_onevision.test_modeling_llava_onevision import (
    LlavaOnevisionForConditionalGenerationModelTest as NativeLlavaOnevisionTest,
)
from tests.models.qwen2_5_vl.test_modeling_qwen2_5_vl import Qwen2_5_VLModelTest as NativeQwen2_5_VLTest
from tests.models.qwen2_vl.test_modeling_qwen2_vl import Qwen2VLModelTest as NativeQwen2VLTest


__all__ = [
    "NativeLlavaNextTest",
    "NativeLlavaOnevisionTest",
    "NativeLlavaTest",
    "NativeQwen2VLTest",
    "NativeQwen2_5_VLTest",
]
