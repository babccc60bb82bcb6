"""`import hf_mla_vlm` registers the MLA classes with the Auto classes without importing torch or transformers itself:
the registration runs once transformers (or a model module of the package) is imported, whatever the order."""

import os
import subprocess
import sys

import pytest

from hf_mla_vlm.conversion_scripts.convert import convert


def _run(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


REGISTERED = """
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText
import hf_mla_vlm
from hf_mla_vlm.registry import ARCHITECTURES
for spec in ARCHITECTURES.values():
    config = AutoConfig.for_model(spec.mla_model_type)
    assert type(config) is spec.mla_config_class, spec.name
    assert AutoModel._model_mapping[spec.mla_config_class] is spec.mla_base_model_class, spec.name
    assert AutoModelForImageTextToText._model_mapping[spec.mla_config_class] is spec.mla_model_class, spec.name
print("registered")
"""


@pytest.mark.parametrize(
    "first",
    [
        "import transformers; import hf_mla_vlm",  # at once
        "import hf_mla_vlm.modeling.modeling_qwen2_5_vl_mla",  # a model module, which imports transformers itself
        "import hf_mla_vlm, peft",  # another library that imports transformers (and is half-initialised meanwhile)
    ],
)
def test_the_auto_classes_know_the_mla_classes_whatever_the_import_order(first):
    assert _run(f"{first}\n{REGISTERED}").strip().endswith("registered")


def test_import_defers_the_registration_until_transformers_is_imported(native_checkpoints, tmp_path):
    out = convert(native_checkpoints["llava"], tmp_path / "mla", rope_dim=8, kv_rank=8, progress=False).output_dir
    code = f"""
import sys
import hf_mla_vlm
assert not {{"torch", "transformers"}} & set(sys.modules), sorted({{"torch", "transformers"}} & set(sys.modules))
{REGISTERED}
model = AutoModelForImageTextToText.from_pretrained({str(out)!r})  # no trust_remote_code: the package's classes
assert type(model) is hf_mla_vlm.LlavaMLAForConditionalGeneration, type(model)
print("native")
"""
    assert _run(code).split() == ["registered", "native"]
