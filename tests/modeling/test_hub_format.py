"""Saved folders are Hub repos: flat remote code, auto_map, safetensors; they load where hf_mla_vlm is absent."""

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForImageTextToText

from hf_mla_vlm.conversion_scripts.convert import convert
from hf_mla_vlm.tiny_models import TINY_ARCHS
from tests.utils import load_native, mixed_batch, relative_error


# Extra Python paths holding another transformers version (e.g. 5.17 installed with `pip --target`), separated by
# os.pathsep. CI sets it so the remote-code checkpoints are loaded by the oldest supported version too.
EXTRA_TRANSFORMERS = [p for p in os.environ.get("HF_MLA_VLM_EXTRA_TRANSFORMERS", "").split(os.pathsep) if p]

LOAD_WITHOUT_PACKAGE = textwrap.dedent(
    """
    import json, sys
    sys.modules["hf_mla_vlm"] = None  # importing the package now fails: it is "not installed"
    import torch, transformers
    from transformers import AutoModel, AutoModelForImageTextToText
    folder, inputs_file, resave = sys.argv[1], sys.argv[2], sys.argv[3]
    inputs = torch.load(inputs_file)
    result = {"transformers": transformers.__version__}
    for auto in (AutoModel, AutoModelForImageTextToText):
        model = auto.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
        with torch.no_grad():
            out = model(**inputs)
        output = out.logits if auto is AutoModelForImageTextToText else out.last_hidden_state
        torch.save(output, f"{inputs_file}.{auto.__name__}.pt")
        result[auto.__name__] = f"{type(model).__module__}.{type(model).__name__}"
    model.save_pretrained(resave)  # saving from remote code writes the bundle again
    print(json.dumps(result))
    """
)


def _python_envs() -> list[tuple[str, dict]]:
    envs = [("default", {})]
    envs += [(f"extra:{path}", {"PYTHONPATH": path}) for path in EXTRA_TRANSFORMERS]
    return envs


@pytest.fixture(scope="module")
def saved(native_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    folders = {}
    for arch in TINY_ARCHS:
        result = convert(native_checkpoints[arch], root / arch, rope_dim=8, kv_rank=8, progress=False)
        folders[arch] = result.output_dir
    return folders


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_folder_layout_and_remote_code_is_flat(arch, saved):
    folder = saved[arch]
    config = json.loads((folder / "config.json").read_text())
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForImageTextToText"}
    for target in config["auto_map"].values():
        assert (folder / f"{target.split('.')[0]}.py").is_file()
    assert (folder / "model.safetensors").is_file() and (folder / "README.md").is_file()
    assert (folder / "tokenizer.json").is_file() and (folder / "processor_config.json").is_file()
    report = json.loads((folder / "mla_conversion_report.json").read_text())
    assert (
        report["settings"]["rope_dim"] == 8 and report["kv_cache"]["converted"] == 2 * 8 + 24
    )  # latent + padded side row
    code = sorted(folder.glob("*.py"))
    assert {p.name for p in code} >= {"mla_attention.py", "modeling_mla_common.py", "configuration_mla_common.py"}
    for path in code:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and "." not in (node.module or ""), f"{path.name}: non-flat import"
                assert (folder / f"{node.module}.py").is_file(), f"{path.name} imports missing {node.module}"
            elif isinstance(node, (ast.Import, ast.ImportFrom)) and node.col_offset == 0:
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                for name in names:
                    top = name.split(".")[0]
                    assert top in {"torch", "transformers"} or top in sys.stdlib_module_names, f"{path.name}: {name}"


@pytest.mark.parametrize("env_name, env", _python_envs())
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_loads_with_trust_remote_code_without_the_package(arch, env_name, env, saved, native_checkpoints, tmp_path):
    folder = saved[arch]
    _, processor = load_native(native_checkpoints[arch])
    inputs = dict(mixed_batch(processor, arch))
    inputs_file = tmp_path / "inputs.pt"
    torch.save(inputs, inputs_file)
    with torch.no_grad():
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
        expected = {"AutoModelForImageTextToText": model(**inputs).logits}
        expected["AutoModel"] = (
            AutoModel.from_pretrained(folder, dtype=torch.float32).eval()(**inputs).last_hidden_state
        )
    run_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), **env}
    resave = tmp_path / "resaved"
    done = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_PACKAGE, str(folder), str(inputs_file), str(resave)],
        env=run_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for auto, suffix in (("AutoModel", "MLAModel"), ("AutoModelForImageTextToText", "MLAForConditionalGeneration")):
        assert result[auto].startswith("transformers_modules."), result  # really the remote code
        assert result[auto].endswith(suffix), result  # the base model for AutoModel, as natively
        actual = torch.load(f"{inputs_file}.{auto}.pt")
        assert relative_error(expected[auto], actual, inputs["attention_mask"].bool()) < 1e-6
    assert {p.name for p in resave.glob("*.py")} == {p.name for p in folder.glob("*.py")}


def test_large_models_are_sharded_and_reload(saved, tmp_path):
    model = AutoModelForImageTextToText.from_pretrained(saved["llava"], dtype=torch.float32)
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.float32)
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert (tmp_path / "modeling_llava_mla.py").is_file()


def test_weight_names_on_disk_are_the_in_memory_names(saved):
    from safetensors import safe_open

    with safe_open(Path(saved["llava_next"]) / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.language_model.layers.0.self_attn.kv_a_proj.image.weight" in keys
    assert not any(".k_proj." in k or ".v_proj." in k for k in keys if "language_model" in k)
