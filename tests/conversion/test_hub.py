"""Checking converted folders (`conversion_scripts/checks.py`), verifying them, and pushing them (`hub.py`) to a local
stand-in of the Hub HTTP API (`tests/fixtures/fake_hub.py`; never the network)."""

import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi
from safetensors.torch import load_file, save_file

from hf_mla_vlm.conversion_scripts import checks, hub
from hf_mla_vlm.conversion_scripts.convert import convert
from hf_mla_vlm.conversion_scripts.report import model_card
from hf_mla_vlm.tiny_models import TINY_ARCHS
from tests.fixtures.fake_hub import TOKEN, FakeHub, http_client, loopback_only, running_fake_hub


REPO = "tiny-user/tiny-llava-next-mla"
LAYER = "model.language_model.layers"


# --- converted folders ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def converted(native_checkpoints, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("converted")
    return {
        arch: convert(native_checkpoints[arch], root / arch, rope_dim=8, kv_rank=8, progress=False).output_dir
        for arch in TINY_ARCHS
    }


@pytest.fixture
def folder(converted, tmp_path) -> Path:
    """A private copy of the converted tiny LLaVA-NeXT, free to corrupt."""
    return Path(shutil.copytree(converted["llava_next"], tmp_path / "llava-next-mla"))


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def _rewrite_weights(folder: Path, edit: Callable[[dict], None]) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def _truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


# --- check_checkpoint_folder ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_a_converted_folder_passes(arch, converted):
    assert checks.check_checkpoint_folder(converted[arch]) == []
    checks.assert_checkpoint_folder(converted[arch])


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_the_weight_schema_is_the_attention_module(arch, converted):
    """The schema the check reads is what a loaded model's attention holds (biases where the native had them)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(converted[arch])
    schema = checks.attention_weight_schema(model.config)
    for layer in model.get_decoder().layers:
        held = {name: tuple(p.shape) for name, p in layer.self_attn.named_parameters()}
        assert {name for name, (_, required) in schema.items() if required} <= held.keys()
        assert held == {name: schema[name][0] for name in held}


def test_partial_rope_stage_and_sharded_weights_pass(native_checkpoints, converted, tmp_path):
    stage1 = convert(
        native_checkpoints["llava"],
        tmp_path / "stage1",
        rope_dim=8,
        kv_rank=8,
        mla_stage="partial_rope",
        progress=False,
    ).output_dir
    assert checks.check_checkpoint_folder(stage1) == []  # its v_proj is legitimate
    from transformers import AutoModelForImageTextToText

    sharded = tmp_path / "sharded"
    AutoModelForImageTextToText.from_pretrained(converted["qwen2_5_vl"]).save_pretrained(
        sharded, max_shard_size="200KB"
    )
    for name in ("README.md", "mla_conversion_report.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(converted["qwen2_5_vl"] / name, sharded / name)
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    assert checks.check_checkpoint_folder(sharded) == []
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    assert checks.check_checkpoint_folder(sharded) == [
        f"Weight shard '{shard.name}' listed in model.safetensors.index.json is missing."
    ]


CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing_auto_map_entry": (
        lambda f: _edit_json(f / "config.json", lambda c: c["auto_map"].pop("AutoModelForImageTextToText")),
        "auto_map has no AutoModelForImageTextToText entry.",
    ),
    "deleted_modeling_file": (
        lambda f: (f / "modeling_llava_next_mla.py").unlink(),
        "auto_map AutoModel, AutoModelForImageTextToText needs modeling_llava_next_mla.py, which is not in the "
        "folder.",
    ),
    "deleted_sibling_module": (
        lambda f: (f / "mla_attention.py").unlink(),
        ": imports .mla_attention, but mla_attention.py is not in the folder.",
    ),
    "imports_the_package": (
        lambda f: _append(f / "mla_attention.py", "\nimport hf_mla_vlm\n"),
        "imports hf_mla_vlm; remote code must run where hf_mla_vlm is not installed.",
    ),
    "imports_the_package_lazily": (
        lambda f: _append(f / "mla_attention.py", "\n\ndef helper():\n    from hf_mla_vlm.kernels import reference\n"),
        "imports hf_mla_vlm.kernels; remote code must run where hf_mla_vlm is not installed.",
    ),
    "non_flat_import": (
        lambda f: _append(f / "modeling_mla_common.py", "\nfrom .modeling.mla_attention import MLAAttention\n"),
        "`from .modeling.mla_attention import ...` is not a flat relative import",
    ),
    "parent_relative_import": (
        lambda f: _append(f / "modeling_mla_common.py", "\nfrom ..configuration import x\n"),
        "`from ..configuration import ...` is not a flat relative import",
    ),
    "third_party_import": (
        lambda f: _append(f / "mla_attention.py", "\nimport numpy as np\n"),
        "imports numpy at module level; remote code may import only torch, transformers and the standard library.",
    ),
    "syntax_error": (
        lambda f: _append(f / "mla_attention.py", "\ndef broken(:\n"),
        "mla_attention.py does not parse as Python",
    ),
    "truncated_safetensors": (
        lambda f: _truncate(f / "model.safetensors", -1000),
        "model.safetensors is not a readable safetensors file (Error while deserializing header",
    ),
    "truncated_safetensors_header": (
        lambda f: _truncate(f / "model.safetensors", 20),
        "model.safetensors is not a readable safetensors file (Error while deserializing header",
    ),
    "missing_layer_weight": (
        lambda f: _rewrite_weights(f, lambda t: t.pop(f"{LAYER}.1.self_attn.kv_a_proj.text.weight")),
        f"Missing MLA attention weights (1) in text layers [1] (mla_stage='mla'): "
        f"{LAYER}.1.self_attn.kv_a_proj.text.weight.",
    ),
    "leftover_native_weights": (
        lambda f: _rewrite_weights(
            f,
            lambda t: t.update(
                {f"{LAYER}.0.self_attn.k_proj.weight": t[f"{LAYER}.0.self_attn.q_proj.weight"].clone()}
            ),
        ),
        "Leftover attention weights the MLA layer does not have (native, not converted): "
        f"{LAYER}.0.self_attn.k_proj.weight.",
    ),
    "weights_of_an_extra_layer": (
        lambda f: _rewrite_weights(
            f,
            lambda t: t.update(
                {f"{LAYER}.2.self_attn.q_proj.weight": t[f"{LAYER}.0.self_attn.q_proj.weight"].clone()}
            ),
        ),
        "Weights for text layers [2] but text_config.num_hidden_layers = 2.",
    ),
    "invalid_rope_dim": (
        lambda f: _edit_json(f / "config.json", lambda c: c.update(rope_dim=7)),
        "config.json does not validate as an MLA config: rope_dim must be an even integer",
    ),
    "config_disagrees_with_weights": (  # kv_rank 4 is valid, but the weights were converted at kv_rank 8
        lambda f: _edit_json(f / "config.json", lambda c: c.update(kv_rank=4)),
        "Attention weights do not match config.json (rope_dim=8, kv_rank=4): "
        f"{LAYER}.0.self_attn.kv_a_proj.image.weight is [16, 128], expected [8, 128]",
    ),
    "native_model_type": (
        lambda f: _edit_json(f / "config.json", lambda c: c.update(model_type="llava_next")),
        "config.json has model_type 'llava_next'; a converted checkpoint has one of",
    ),
    "config_not_json": (
        lambda f: (f / "config.json").write_text("{not json"),
        "config.json does not parse as JSON",
    ),
    "no_weights": (
        lambda f: (f / "model.safetensors").rename(f / "pytorch_model.bin"),
        "No weights: neither model.safetensors nor model.safetensors.index.json is in the folder (found "
        "['pytorch_model.bin']",
    ),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_each_corruption_is_reported(name, folder):
    corrupt, expected = CORRUPTIONS[name]
    corrupt(folder)
    problems = checks.check_checkpoint_folder(folder)
    matching = [p for p in problems if expected in p]
    assert matching, f"{expected!r} not in {problems}"
    if name != "native_model_type":  # a native model_type also has a config the package cannot validate
        assert len(problems) == 1, problems  # the specific problem, not a cascade
    with pytest.raises(ValueError, match="is not a valid converted checkpoint folder") as raised:
        checks.assert_checkpoint_folder(folder)
    assert expected in str(raised.value)


def test_not_a_folder(tmp_path):
    assert checks.check_checkpoint_folder(tmp_path / "nowhere") == [f"{tmp_path / 'nowhere'} is not a folder."]


# --- model card -----------------------------------------------------------------------------------------------------
def _report(folder: Path) -> dict:
    return json.loads((folder / "mla_conversion_report.json").read_text())


def test_a_complete_card_is_kept(folder):
    before = (folder / "README.md").read_text()
    assert hub.card_problems(before, _report(folder)) == []
    assert hub.prepare_model_card(folder) is False
    assert (folder / "README.md").read_text() == before and not (folder / ".README.md.before-push").exists()


@pytest.mark.parametrize(
    "card, problem",
    [
        ("# my model\n", "no YAML front matter with Hub metadata"),
        ("---\nlibrary_name: transformers\ntags: [mla]\n---\n", "metadata pipeline_tag is None"),
        ("---\nlibrary_name: transformers\npipeline_tag: image-text-to-text\ntags: [mla]\n---\n", "'hf-mla-vlm'"),
        (None, "the measured number '| 320 |' is missing"),  # the generated card minus its KV table
    ],
)
def test_an_incomplete_card_is_regenerated(folder, card, problem):
    original = (folder / "README.md").read_text()
    if card is None:
        card = "\n".join(line for line in original.splitlines() if "bytes" not in line and "cache" not in line)
    (folder / "README.md").write_text(card)
    assert any(problem in p for p in hub.card_problems(card, _report(folder))), hub.card_problems(
        card, _report(folder)
    )
    assert hub.prepare_model_card(folder) is True
    assert (folder / "README.md").read_text() == original == model_card(_report(folder))
    assert (folder / ".README.md.before-push").read_text() == card


def test_the_card_carries_the_evaluation_of_the_report(folder):
    evaluation = {"logit_relative_error": 0.0123456789, "perplexity": {"text": 12.5, "native": 12.25}}
    _edit_json(folder / "mla_conversion_report.json", lambda r: r.update(evaluation=evaluation))
    assert "the measured number '| logit_relative_error | 0.0123457 |' is missing" in hub.card_problems(
        (folder / "README.md").read_text(), _report(folder)
    )
    assert hub.prepare_model_card(folder) is True
    card = (folder / "README.md").read_text()
    assert "## Evaluation (measured)" in card and "| perplexity.native | 12.25 |" in card
    assert card.startswith("---\nlibrary_name: transformers") and "68.75%" in card and "84.38%" in card
    assert hub.card_problems(card, _report(folder)) == []


def test_a_card_without_report_is_refused(folder):
    (folder / "mla_conversion_report.json").unlink()
    with pytest.raises(ValueError, match="needs its measured KV-cache numbers"):
        hub.prepare_model_card(folder)


# --- the local Hub stand-in (tests/fixtures/fake_hub.py) -----------------------------------------------------------
@pytest.fixture(params=["lfs", "regular"])
def fake_hub(request) -> Iterator[FakeHub]:
    """A running stand-in: `lfs` sends binary files through git-LFS, `regular` through the default pipeline."""
    with running_fake_hub(lfs=request.param == "lfs") as fake:
        yield fake


def _api(fake: FakeHub) -> HfApi:
    return HfApi(endpoint=fake.base_url, token=TOKEN)


def _expected_files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and not p.name.endswith(".incomplete")
    }


def _folder_bytes(folder: Path) -> dict[str, str]:
    """sha256 of every file of `folder`, hidden ones included."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# --- push_to_hub ----------------------------------------------------------------------------------------------------
def test_push_uploads_a_fine_tuned_folder_with_its_card(fake_hub, folder, tmp_path):
    """A `finetune` output keeps the conversion report, so it verifies and pushes like a conversion; its card says
    how it was fine-tuned."""
    from hf_mla_vlm.training.finetune import finetune
    from hf_mla_vlm.zoo.vqa_data import generate_split

    conversations = [sample.to_conversation() for sample in generate_split("train", 2, seed=3, image_size=56)]
    tuned = finetune(folder, conversations, tmp_path / "tuned", stage=2, max_steps=1, per_device_train_batch_size=2)
    hub.push_to_hub(tuned.output_dir, REPO, api=_api(fake_hub))

    [commit] = fake_hub.commits
    assert commit.files.keys() == _expected_files(tuned.output_dir).keys() >= {"finetune_report.json", "README.md"}
    card = commit.files["README.md"].decode()
    assert card == (tuned.output_dir / "README.md").read_text() and "| 2 (mla) | sft |" in card


def test_push_uploads_every_file_in_one_commit(fake_hub, folder):
    evaluation = {"logit_relative_error": 0.05, "greedy_agreement": 0.9}
    _edit_json(folder / "mla_conversion_report.json", lambda r: r.update(evaluation=evaluation))
    (folder / ".notes.txt").write_text("local notes")  # hidden: not uploaded
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x.lock").write_text("")
    (folder / "model.safetensors.incomplete").write_bytes(b"partial download")  # leftover: not uploaded
    before = _folder_bytes(folder)

    url = hub.push_to_hub(
        folder, REPO, private=True, revision="mla-v1", commit_message="Add the tiny MLA model", api=_api(fake_hub)
    )

    assert fake_hub.errors == []
    assert fake_hub.create_payloads == [
        {"name": REPO.split("/")[1], "organization": "tiny-user", "visibility": "private", "type": "model"}
    ]
    assert fake_hub.repos[REPO].private
    assert fake_hub.branch_requests == [(REPO, "mla-v1", {})]
    assert len(fake_hub.commits) == 1
    commit = fake_hub.commits[0]
    assert url == f"{fake_hub.base_url}/{REPO}/commit/{commit.oid}"
    assert (commit.repo_id, commit.revision, commit.summary) == (REPO, "mla-v1", "Add the tiny MLA model")
    expected = _expected_files(folder)
    # The folder's card lacks the evaluation: the commit carries one generated from the report instead.
    assert "logit_relative_error" not in expected["README.md"].decode()
    expected["README.md"] = model_card(_report(folder)).encode()
    assert {"model.safetensors", "config.json", "README.md", "mla_attention.py", "tokenizer.json"} <= set(expected)
    assert commit.files.keys() == expected.keys()
    for name, data in expected.items():
        assert commit.files[name] == data, name
    assert fake_hub.repos[REPO].branches == {"main": {}, "mla-v1": expected}  # main untouched
    if fake_hub.lfs:
        assert commit.lfs_paths == {"model.safetensors"}
        assert hashlib.sha256(expected["model.safetensors"]).hexdigest() in fake_hub.lfs_blobs
    else:  # one create_commit, never the client's multi-commit upload_folder pipeline
        assert commit.lfs_paths == set() and fake_hub.pipelined_uploads == 0
    # The card was completed from the report for the upload (and validated by the "Hub").
    card = commit.files["README.md"].decode()
    assert "| logit_relative_error | 0.05 |" in card and "| 320 |" in card and "84.38%" in card
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: image-text-to-text\ntags:\n- hf-mla-vlm")
    assert fake_hub.validated_cards and all(c == card for c in fake_hub.validated_cards)
    assert _folder_bytes(folder) == before  # push never writes into the folder


def test_push_again_to_an_existing_repo_and_branch(fake_hub, folder):
    api = _api(fake_hub)
    first = hub.push_to_hub(folder, REPO, revision="mla-v1", api=api)
    (folder / "mla_attention.py").write_text((folder / "mla_attention.py").read_text() + "\n# edited\n")
    second = hub.push_to_hub(folder, REPO, revision="mla-v1", api=api)
    third = hub.push_to_hub(folder, REPO, api=api)  # main
    assert fake_hub.errors == [] and len({first, second, third}) == 3
    assert [c.revision for c in fake_hub.commits] == ["mla-v1", "mla-v1", "main"]
    assert fake_hub.commits[0].summary == (
        "Upload llava_next_mla converted with hf-mla-vlm (rope_dim=8, kv_rank=8, stage=mla)"
    )
    assert [p["visibility"] for p in fake_hub.create_payloads] == ["public"] * 3  # 409 the 2nd and 3rd time
    assert len(fake_hub.branch_requests) == 2  # not for main; the 2nd answered 409 (exists)
    assert fake_hub.repos[REPO].branches["mla-v1"]["mla_attention.py"].endswith(b"# edited\n")
    assert fake_hub.repos[REPO].branches["main"] == _expected_files(folder)


def test_the_stand_in_refuses_a_commit_to_a_missing_branch(fake_hub, folder):
    api = _api(fake_hub)
    api.create_repo(REPO)
    with pytest.raises(huggingface_hub.errors.RevisionNotFoundError):
        api.upload_folder(repo_id=REPO, folder_path=folder, revision="nowhere")
    assert fake_hub.commits == []


def test_push_refuses_a_broken_folder_without_any_request(fake_hub, folder):
    _truncate(folder / "model.safetensors", -1000)
    _append(folder / "mla_attention.py", "\nimport hf_mla_vlm\n")
    with pytest.raises(ValueError) as raised:
        hub.push_to_hub(folder, REPO, api=_api(fake_hub))
    message = str(raised.value)
    assert "model.safetensors is not a readable safetensors file" in message and "imports hf_mla_vlm" in message
    assert fake_hub.requests == [] and fake_hub.repos == {}


def test_push_refuses_a_folder_without_report_without_any_request(fake_hub, folder):
    (folder / "mla_conversion_report.json").unlink()
    with pytest.raises(ValueError, match="mla_conversion_report.json is missing or unreadable"):
        hub.push_to_hub(folder, REPO, api=_api(fake_hub))
    assert fake_hub.requests == []


def test_push_with_an_injected_client_object(folder):
    """`api` may be any object with the three methods (here a recorder): the calls and their arguments."""

    class Recorder:
        def __init__(self) -> None:
            self.calls: list[tuple[str, tuple, dict]] = []

        def create_repo(self, *args, **kwargs):
            self.calls.append(("create_repo", args, kwargs))

        def create_branch(self, *args, **kwargs):
            self.calls.append(("create_branch", args, kwargs))

        def create_commit(self, *args, **kwargs):
            self.calls.append(("create_commit", args, kwargs))
            return "0123abcd"

    (folder / ".notes.txt").write_text("local notes")
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "mla_attention.cpython-311.pyc").write_bytes(b"\0")
    recorder = Recorder()
    assert hub.push_to_hub(folder, REPO, revision="refs/pr/1", token="t", api=recorder) == "0123abcd"
    assert [name for name, _, _ in recorder.calls] == ["create_repo", "create_commit"]  # no branch for a PR ref
    _, args, kwargs = recorder.calls[0]
    assert args == (REPO,) and kwargs == {"private": False, "exist_ok": True, "repo_type": "model", "token": "t"}
    commit = recorder.calls[1][2]
    assert commit["revision"] == "refs/pr/1" and commit["repo_type"] == "model" and commit["token"] == "t"
    paths = [op.path_in_repo for op in commit["operations"]]
    assert sorted(paths) == sorted(n for n in _expected_files(folder) if "__pycache__" not in n)
    assert len(paths) == len(set(paths)) and not any(p.startswith(".") or "__pycache__" in p for p in paths)
    sources = {op.path_in_repo: op.path_or_fileobj for op in commit["operations"]}
    assert sources["model.safetensors"] == str(folder / "model.safetensors")  # read from disk, not copied
    assert sources["README.md"] == (folder / "README.md").read_bytes()  # the folder's complete card


# --- verify ---------------------------------------------------------------------------------------------------------
def _flip_a_byte(path: Path, offset_from_end: int = 7) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF  # inside the last tensor's data, far from the header
    path.write_bytes(bytes(data))


def _record_files(folder: Path) -> None:
    from hf_mla_vlm.utils import weight_file_digests

    _edit_json(folder / "mla_conversion_report.json", lambda r: r.update(files=weight_file_digests(folder)))


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_a_converted_folder_verifies(arch, converted):
    assert checks.verify_folder(converted[arch]) == []


def test_flipped_bytes_load_silently_but_fail_verification(folder):
    _flip_a_byte(folder / "model.safetensors")
    assert checks.check_checkpoint_folder(folder) == []  # safetensors has no checksum: the structure is intact
    from transformers import AutoModelForImageTextToText

    AutoModelForImageTextToText.from_pretrained(folder)  # and the model loads
    assert checks.verify_folder(folder) == [
        "model.safetensors does not match the sha256 recorded in mla_conversion_report.json (bytes changed, e.g. a "
        "corrupted disk or transfer): download or convert it again."
    ]


def test_verify_reports_changed_sizes_and_unrecorded_weight_files(folder):
    save_file({"x": torch.zeros(2)}, folder / "extra.safetensors")
    _edit_json(folder / "mla_conversion_report.json", lambda r: r["files"]["model.safetensors"].update(bytes=1))
    problems = checks.verify_folder(folder, forward=False)
    assert any("model.safetensors has" in p and "recorded 1" in p for p in problems), problems
    assert any(
        "extra.safetensors is a weight file that mla_conversion_report.json does not record" in p for p in problems
    )


def test_verify_runs_a_forward_pass(folder):
    def poison(tensors):
        key = next(k for k in tensors if k.endswith("embed_tokens.weight"))
        tensors[key] = torch.full_like(tensors[key], float("nan"))

    _rewrite_weights(folder, poison)
    _record_files(folder)  # the hashes match: only the forward pass can tell
    assert checks.verify_folder(folder, forward=False) == []
    (problem,) = checks.verify_folder(folder)
    assert "a forward pass on 8 text tokens gives logits" in problem and "with non-finite values" in problem


def test_a_config_without_auto_map_says_how_to_fix_it(folder):
    _edit_json(folder / "config.json", lambda c: c.pop("auto_map"))
    (problem,) = checks.verify_folder(folder)
    assert problem.startswith("config.json has no auto_map: the folder cannot load with trust_remote_code=True")
    assert "Re-save it with hf_mla_vlm" in problem


# --- push faults: the folder is never changed -----------------------------------------------------------------------
def test_push_refuses_flipped_bytes_without_any_request(fake_hub, folder):
    _flip_a_byte(folder / "model.safetensors")
    before = _folder_bytes(folder)
    with pytest.raises(ValueError, match="does not match the sha256 recorded"):
        hub.push_to_hub(folder, REPO, api=_api(fake_hub))
    assert fake_hub.requests == [] and _folder_bytes(folder) == before


def _cli_push(folder: Path, monkeypatch, capsys, endpoint: str, token: str) -> tuple[int, str]:
    from hf_mla_vlm import cli

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    monkeypatch.setenv("HF_TOKEN", token)
    code = cli.main(["push", str(folder), REPO, "--no-forward-check"])
    return code, capsys.readouterr().err


def test_push_with_a_refused_token(fake_hub, folder, monkeypatch, capsys):
    (folder / "README.md").write_text("# my own card\n")  # incomplete: the upload would carry a generated one
    before = _folder_bytes(folder)
    code, err = _cli_push(folder, monkeypatch, capsys, fake_hub.base_url, token="not-the-token")
    assert code == 3 and fake_hub.commits == []
    (line,) = [line for line in err.splitlines() if "error:" in line]
    assert line.startswith("hf-mla-vlm push: error: the Hub refused the token (HTTP 401") and "hf auth login" in line
    assert "Traceback" not in err and _folder_bytes(folder) == before


def test_push_when_the_hub_cannot_be_reached(folder, monkeypatch, capsys):
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    huggingface_hub.set_client_factory(lambda: http_client.Client(event_hooks={"request": [loopback_only]}))
    try:
        before = _folder_bytes(folder)
        code, err = _cli_push(folder, monkeypatch, capsys, f"http://127.0.0.1:{port}", token=TOKEN)
    finally:
        huggingface_hub.set_client_factory(huggingface_hub.utils._http.default_client_factory)
    assert code == 3
    (line,) = [line for line in err.splitlines() if "error:" in line]
    assert "cannot connect to the Hugging Face Hub (ConnectError" in line and "check the network connection" in line
    assert _folder_bytes(folder) == before


def test_push_in_offline_mode(folder, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    before = _folder_bytes(folder)
    code, err = _cli_push(folder, monkeypatch, capsys, "https://huggingface.co", token=TOKEN)
    assert code == 3 and "offline mode" in err and "unset HF_HUB_OFFLINE" in err
    assert _folder_bytes(folder) == before
