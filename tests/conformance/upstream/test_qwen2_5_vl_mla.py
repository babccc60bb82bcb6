"""Transformers' Qwen2.5-VL model tests, run on `Qwen2_5_VLMLAModel` / `Qwen2_5_VLMLAForConditionalGeneration`."""

from hf_mla_vlm import Qwen2_5_VLMLAConfig, Qwen2_5_VLMLAForConditionalGeneration, Qwen2_5_VLMLAModel
from tests.models.qwen2_5_vl import test_modeling_qwen2_5_vl as upstream
from tests.test_configuration_common import ConfigTester

from .mla_testing import MLAModelTestMixin, MLATesterMixin


class Qwen2_5_VLMLAModelTester(MLATesterMixin, upstream.Qwen2_5_VLVisionText2TextModelTester):
    mla_config_class = Qwen2_5_VLMLAConfig


class Qwen2_5_VLMLAConformanceTest(MLAModelTestMixin, upstream.Qwen2_5_VLModelTest):
    all_model_classes = (Qwen2_5_VLMLAModel, Qwen2_5_VLMLAForConditionalGeneration)

    def setUp(self):
        self.model_tester = Qwen2_5_VLMLAModelTester(self)
        self.config_tester = ConfigTester(self, config_class=Qwen2_5_VLMLAConfig, has_text_modality=False)
