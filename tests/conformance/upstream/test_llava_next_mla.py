"""Transformers' LLaVA-NeXT model tests, run on `LlavaNextMLAModel` / `LlavaNextMLAForConditionalGeneration`."""

from hf_mla_vlm import LlavaNextMLAConfig, LlavaNextMLAForConditionalGeneration, LlavaNextMLAModel
from tests.models.llava_next import test_modeling_llava_next as upstream

from .mla_testing import MLAModelTestMixin, MLATesterMixin


class LlavaNextMLAModelTester(MLATesterMixin, upstream.LlavaNextVisionText2TextModelTester):
    mla_config_class = LlavaNextMLAConfig
    config_class = LlavaNextMLAConfig
    base_model_class = LlavaNextMLAModel
    conditional_generation_class = LlavaNextMLAForConditionalGeneration


class LlavaNextMLAConformanceTest(MLAModelTestMixin, upstream.LlavaNextForConditionalGenerationModelTest):
    model_tester_class = LlavaNextMLAModelTester
