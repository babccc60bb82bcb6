"""Transformers' Qwen2-VL model tests, run on `Qwen2VLMLAModel` / `Qwen2VLMLAForConditionalGeneration`."""

from hf_mla_vlm import Qwen2VLMLAConfig, Qwen2VLMLAForConditionalGeneration, Qwen2VLMLAModel
from tests.models.qwen2_vl import test_modeling_qwen2_vl as upstream
from tests.test_configuration_common import ConfigTester

from .mla_testing import MLAModelTestMixin, MLATesterMixin


class Qwen2VLMLAModelTester(MLATesterMixin, upstream.Qwen2VLVisionText2TextModelTester):
    mla_config_class = Qwen2VLMLAConfig


class Qwen2VLMLAConformanceTest(MLAModelTestMixin, upstream.Qwen2VLModelTest):
    all_model_classes = (Qwen2VLMLAModel, Qwen2VLMLAForConditionalGeneration)
    pipeline_model_mapping = {
        "image-text-to-text": Qwen2VLMLAForConditionalGeneration,
        "any-to-any": Qwen2VLMLAForConditionalGeneration,
    }

    def setUp(self):
        self.model_tester = Qwen2VLMLAModelTester(self)
        self.config_tester = ConfigTester(self, config_class=Qwen2VLMLAConfig, has_text_modality=False)
