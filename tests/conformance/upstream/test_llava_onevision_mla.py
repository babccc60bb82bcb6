"""Transformers' LLaVA-OneVision model tests, run on `LlavaOnevisionMLAModel` /
`LlavaOnevisionMLAForConditionalGeneration`."""

from hf_mla_vlm import LlavaOnevisionMLAConfig, LlavaOnevisionMLAForConditionalGeneration, LlavaOnevisionMLAModel
from tests.models.llava_onevision import test_modeling_llava_onevision as upstream
from tests.test_configuration_common import ConfigTester

from .mla_testing import MLAModelTestMixin, MLATesterMixin


class LlavaOnevisionMLAModelTester(MLATesterMixin, upstream.LlavaOnevisionVisionText2TextModelTester):
    mla_config_class = LlavaOnevisionMLAConfig


class LlavaOnevisionMLAConformanceTest(MLAModelTestMixin, upstream.LlavaOnevisionForConditionalGenerationModelTest):
    all_model_classes = (LlavaOnevisionMLAModel, LlavaOnevisionMLAForConditionalGeneration)
    pipeline_model_mapping = {
        "image-text-to-text": LlavaOnevisionMLAForConditionalGeneration,
        "any-to-any": LlavaOnevisionMLAForConditionalGeneration,
    }

    def setUp(self):
        self.model_tester = LlavaOnevisionMLAModelTester(self)
        self.config_tester = ConfigTester(
            self,
            config_class=LlavaOnevisionMLAConfig,
            has_text_modality=False,
            common_properties=["image_token_index", "video_token_index", "vision_feature_layer"],
        )
