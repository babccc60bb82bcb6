"""Transformers' LLaVA model tests, run on `LlavaMLAModel` / `LlavaMLAForConditionalGeneration`."""

from hf_mla_vlm import LlavaMLAConfig, LlavaMLAForConditionalGeneration, LlavaMLAModel
from tests.models.llava import test_modeling_llava as upstream
from tests.test_configuration_common import ConfigTester

from .mla_testing import MLAModelTestMixin, MLATesterMixin


class LlavaMLAModelTester(MLATesterMixin, upstream.LlavaVisionText2TextModelTester):
    mla_config_class = LlavaMLAConfig


class LlavaMLAConformanceTest(MLAModelTestMixin, upstream.LlavaForConditionalGenerationModelTest):
    all_model_classes = (LlavaMLAModel, LlavaMLAForConditionalGeneration)
    pipeline_model_mapping = {
        "image-text-to-text": LlavaMLAForConditionalGeneration,
        "any-to-any": LlavaMLAForConditionalGeneration,
    }

    def setUp(self):
        self.model_tester = LlavaMLAModelTester(self)
        self.config_tester = ConfigTester(
            self,
            config_class=LlavaMLAConfig,
            has_text_modality=False,
            common_properties=["image_token_index", "vision_feature_layer", "image_seq_length"],
        )
