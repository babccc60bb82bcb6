"""The architecture registry is the one table of per-architecture facts: everything else agrees with it."""

import re

import pytest

import hf_mla_vlm
from hf_mla_vlm.registry import ARCH_NAMES, ARCHITECTURES, MLA_MODEL_TYPES, ZOO_NAMES, arch_spec
from hf_mla_vlm.tiny_models import TINY_BUILDERS, build_tiny_vlm
from hf_mla_vlm.training.trainable import trainable_rules
from hf_mla_vlm.zoo.models import ZOO


def test_every_architecture_has_its_classes_a_tiny_builder_and_the_zoo_agrees():
    assert set(TINY_BUILDERS) == set(ARCH_NAMES)
    assert set(ZOO) == set(ZOO_NAMES)
    for spec in ARCHITECTURES.values():
        config_class = spec.mla_config_class
        assert config_class.model_type == spec.mla_model_type and MLA_MODEL_TYPES[spec.mla_model_type] is spec
        assert (
            spec.mla_model_class.config_class is config_class
            and spec.mla_base_model_class.config_class is config_class
        )
        assert spec.native_class.__name__ == spec.source_class
        assert config_class.image_token_attributes  # the config names where the image-branch ids come from
        for cls in (config_class, spec.mla_model_class, spec.mla_base_model_class):
            assert getattr(hf_mla_vlm, cls.__name__) is cls  # exported by the package
    with pytest.raises(ValueError, match="Unsupported model_type"):
        arch_spec("mistral")


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_the_registry_facts_hold_on_the_native_model(name):
    spec = arch_spec(name)
    model, _ = build_tiny_vlm(name)
    layers = model.get_submodule(spec.text_layers)
    assert len(layers) == model.config.text_config.num_hidden_layers
    names = [param_name for param_name, _ in model.named_parameters()]
    assert any(re.search(spec.aligner, param_name) for param_name in names)  # the aligner rule selects something
    for label, pattern in trainable_rules(spec).items():
        if label not in ("k_rope_proj", "k_nope_proj", "kv_a_proj", "kv_b_proj"):  # MLA-only names
            assert any(re.search(pattern, param_name) for param_name in names), label
    mrope = (model.config.text_config.rope_parameters or {}).get("mrope_section") is not None
    assert mrope == (spec.rope == "mrope")
