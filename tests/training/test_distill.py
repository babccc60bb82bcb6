"""Self-distillation and mixed text + image training data (CPU, tiny random models)."""

import collections
import dataclasses
import importlib
import json

import pytest
import torch

import hf_mla_vlm  # noqa: F401  (registers the MLA classes)
from hf_mla_vlm.conversion_scripts.convert import convert
from hf_mla_vlm.evaluation.perplexity import token_stream
from hf_mla_vlm.training.checkpoint import load_model
from hf_mla_vlm.training.data import IGNORE_INDEX, ChatCollator, TextWindow
from hf_mla_vlm.training.distill import distillation_kl, distilled_positions, mixed_training_items, text_windows
from hf_mla_vlm.training.finetune import finetune
from hf_mla_vlm.zoo.vqa_data import generate_split
from tests.utils import load_native


def _conversations(n: int, seed: int = 3):
    return [sample.to_conversation() for sample in generate_split("train", n, seed=seed, image_size=56)]


def _windows(processor, n: int, seq_len: int = 24, offset: int = 0):
    words = "the red circle is left of a blue square . what is this ? a cat above the green dog ."
    return text_windows(processor, [words * 8] * 40, seq_len, n + offset)[offset:]


def test_distillation_kl_is_the_temperature_scaled_kl_over_the_mask():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    mask = torch.tensor([[True, True, False, True, False], [False, True, True, True, True]])
    assert distillation_kl(teacher, teacher, mask).item() == pytest.approx(0.0, abs=1e-6)
    p, q = (teacher[mask] / 2).softmax(-1), (student[mask] / 2).log_softmax(-1)
    expected = 4 * (p * (p.log() - q)).sum()
    assert distillation_kl(student, teacher, mask, temperature=2.0).item() == pytest.approx(expected.item(), rel=1e-5)
    labels = torch.full((1, 4), IGNORE_INDEX)
    labels[0, 2] = 7
    assert distilled_positions(labels).tolist() == [[False, True, False, False]]


def _plain_kl(student, teacher, mask, temperature):
    """The unchunked formula: what `distillation_kl` computed before it worked in chunks."""
    s = student[mask].float() / temperature
    t = teacher[mask].float() / temperature
    return torch.nn.functional.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="sum") * (
        temperature**2
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("chunk", [1 << 24, 7, 23])  # one chunk; chunks of one row (V = 13 > 7); uneven chunks
def test_chunked_distillation_kl_equals_the_plain_formula_and_its_gradient(dtype, chunk, monkeypatch):
    import hf_mla_vlm.training.distill as distill

    monkeypatch.setattr(distill, "CHUNK_ELEMENTS", chunk)
    torch.manual_seed(1)
    student = (3 * torch.randn(3, 7, 13)).to(dtype).requires_grad_(True)
    teacher = (3 * torch.randn(3, 7, 13)).to(dtype)
    mask = torch.rand(3, 7) > 0.4
    mask[1] = False  # a sequence without a distilled position
    for temperature in (1.0, 2.0):
        got = distillation_kl(student, teacher, mask, temperature)
        (grad,) = torch.autograd.grad(3.0 * got, student)
        reference = student.detach().double().requires_grad_(True)
        expected = _plain_kl(reference, teacher.double(), mask, temperature)
        (expected_grad,) = torch.autograd.grad(3.0 * expected, reference)
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        assert got.dtype == torch.float32
        assert got.item() == pytest.approx(expected.item(), rel=1e-5)
        assert grad.dtype == dtype and not grad[1].any()
        assert torch.allclose(grad.double(), expected_grad, rtol=tol, atol=tol * expected_grad.abs().max().item())


def test_chunked_distillation_kl_keeps_one_logits_sized_tensor_for_the_backward():
    student = torch.randn(4, 50, 97, requires_grad=True)
    teacher, mask = torch.randn(4, 50, 97), torch.ones(4, 50, dtype=torch.bool)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        distillation_kl(student, teacher, mask)
    assert sum(saved) == student.numel()  # the gradient itself; the plain formula saves several such blocks
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        _plain_kl(student, teacher, mask, 1.0)
    assert sum(saved) >= 2 * student.numel()
    with pytest.raises(ValueError, match="one shape"):
        distillation_kl(student, teacher[:, :-1], mask)


def test_mixed_items_follow_the_weights_and_the_seed():
    sources = {"a": list(range(100)), "b": [f"b{i}" for i in range(100)]}
    items = mixed_training_items(sources, [3, 1], 10, seed=1)
    assert sorted(map(str, items)) == sorted([str(i) for i in range(8)] + ["b0", "b1"])  # 7.5 / 2.5 rounded
    assert items == mixed_training_items(sources, [3, 1], 10, seed=1) != mixed_training_items(sources, [3, 1], 10)
    with pytest.raises(ValueError, match="has 100 items"):
        mixed_training_items(sources, [1, 1], 300)
    with pytest.raises(ValueError, match="positive weight"):
        mixed_training_items(sources, [1, 0], 10)


@pytest.mark.parametrize("arch", ["llava_next", "qwen2_5_vl"])
def test_a_batch_mixes_text_windows_and_image_conversations(arch, native_checkpoints):
    model, processor = load_native(native_checkpoints[arch])
    image_ids = [model.config.image_token_id if arch == "qwen2_5_vl" else model.config.image_token_index]
    items = [_windows(processor, 1)[0], *_conversations(2)]
    batch = ChatCollator(processor, labels="all", exclude_token_ids=image_ids)(items)
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape[0] == 3 and (labels[0, 1:24] == ids[0, 1:24]).all()  # the text row: every token but the first
    for row in (1, 2):
        valid = batch["attention_mask"][row].bool()
        after_image = torch.zeros_like(valid)
        after_image[1:] = torch.isin(ids[row, :-1], torch.tensor(image_ids))
        expected = valid & ~after_image
        expected[0] = False
        assert torch.equal(labels[row] != IGNORE_INDEX, expected)
    if arch == "qwen2_5_vl":
        assert (batch["mm_token_type_ids"][0] == 0).all() and (batch["mm_token_type_ids"][1:] > 0).any()
    with torch.no_grad():
        model(**{k: v for k, v in batch.items() if k != "labels"})  # images of rows 1-2 only: the model accepts it
    sft = ChatCollator(processor)(items)  # assistant labels for conversations, every token for text
    assert (sft["labels"][0, :24] == ids[0, :24]).all() and (sft["labels"][1:] != IGNORE_INDEX).sum() < 40


@pytest.fixture(scope="module")
def stage2(native_checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("distill") / "llava-mla"
    convert(native_checkpoints["llava"], out, rope_dim=8, kv_rank=4, rope_strategy="uniform", progress=False)
    return out


def _kl_to_teacher(student, teacher, batch) -> float:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    mask = distilled_positions(batch["labels"])
    with torch.no_grad():
        return (distillation_kl(student.eval()(**inputs).logits, teacher(**inputs).logits, mask) / mask.sum()).item()


def test_distillation_brings_the_student_towards_the_teacher(stage2, native_checkpoints, tmp_path):
    teacher, processor = load_native(native_checkpoints["llava"])
    train = [*_windows(processor, 4), *_conversations(4)]
    held_out = ChatCollator(processor, labels="all", exclude_token_ids=[teacher.config.image_token_index])(
        [*_windows(processor, 2, offset=4), *_conversations(2, seed=11)]
    )
    before = _kl_to_teacher(load_model(stage2), teacher, held_out)
    result = finetune(
        stage2, train, tmp_path / "distilled", stage=2, objective="distill", teacher=native_checkpoints["llava"],
        learning_rate=3e-3, per_device_train_batch_size=4, gradient_accumulation_steps=1, max_steps=12,
        logging_steps=1, return_model=True,
    )  # fmt: skip
    after = _kl_to_teacher(result.model, teacher, held_out)
    assert after < 0.7 * before, (before, after)
    settings = result.report["settings"]
    assert settings["objective"] == "distill" and settings["temperature"] == 1.0
    assert result.report["training"]["losses"][-1]["loss"] < result.report["training"]["losses"][0]["loss"]


@pytest.mark.parametrize("bf16", [False, True])
def test_the_teacher_runs_in_the_students_precision(bf16, stage2, native_checkpoints, tmp_path):
    """Under `bf16` Accelerate runs the prepared student in autocast; the teacher, which the Trainer does not
    prepare, must run under it too (it ran its matmuls in float32 before: the largest kernels of an H200 step)."""
    teacher, processor = load_native(native_checkpoints["llava"])
    vocab = teacher.lm_head.out_features
    seen = {}

    def record(module, args):  # at the LM heads: Accelerate's autocast is inside the student's forward
        is_head = isinstance(module, torch.nn.Linear) and module.out_features == vocab
        name = "teacher" if module is teacher.lm_head else "student" if is_head else None
        if name is not None:
            dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32
            seen.setdefault(name, []).append(dtype)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        finetune(
            stage2, [*_windows(processor, 2), *_conversations(2)], tmp_path / "out", stage=2, objective="distill",
            teacher=teacher, per_device_train_batch_size=4, max_steps=1, bf16=bf16,
        )  # fmt: skip
    finally:
        handle.remove()
    expected = torch.bfloat16 if bf16 else torch.float32
    assert seen == {"student": [expected], "teacher": [expected]}


def test_distillation_needs_a_native_teacher_and_the_control_is_the_native_model(stage2, native_checkpoints, tmp_path):
    with pytest.raises(ValueError, match="teacher"):
        finetune(stage2, _conversations(2), tmp_path / "a", stage=2, objective="distill", max_steps=1)
    with pytest.raises(ValueError, match="original"):
        finetune(stage2, _conversations(2), tmp_path / "b", stage=2, objective="distill", teacher=stage2, max_steps=1)
    with pytest.raises(ValueError, match="ORIGINAL"):
        finetune(stage2, _conversations(2), tmp_path / "c", stage=0, max_steps=1)
    native = native_checkpoints["llava"]
    before = {k: v.clone() for k, v in load_model(native).state_dict().items()}
    result = finetune(
        native, _conversations(2), tmp_path / "control", stage=0, learning_rate=1e-3, per_device_train_batch_size=2,
        gradient_accumulation_steps=1, max_steps=2, return_model=True,
    )  # fmt: skip
    changed = {name for name, value in result.model.state_dict().items() if not torch.equal(before[name], value)}
    assert changed and changed == set(result.trainable_names)
    assert all(".self_attn." in name and "language_model" in name for name in changed)
    assert {name.split(".")[-2] for name in changed} == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_text_windows_pack_the_token_stream(native_checkpoints):
    _, processor = load_native(native_checkpoints["llava"])
    windows = text_windows(processor, ["a cat . the dog"] * 10, 7, 3)
    assert [len(w.input_ids) for w in windows] == [7, 7, 7] and isinstance(windows[0], TextWindow)
    every = text_windows(processor, ["a cat . the dog"] * 10, 7)  # every whole window of the stream
    assert every[:3] == windows and len(every) == len(token_stream(processor, ["a cat . the dog"] * 10)) // 7
    with pytest.raises(ValueError, match="fewer than"):
        text_windows(processor, ["a cat"], 7, 3)


def test_finetune_cli_mixes_sources_and_distils(stage2, native_checkpoints, tmp_path):
    from hf_mla_vlm import cli

    out = tmp_path / "cli"
    assert cli.main(["finetune", str(stage2), "--stage", "2", "--objective", "distill", "--out", str(out)]) == 2
    assert not out.exists()  # refused before anything was written
    code = cli.main([
        "finetune", str(stage2), "--stage", "2", "--objective", "distill", "--teacher",
        str(native_checkpoints["llava"]), "--data", "wikipedia,zoo-vqa", "--mix", "1", "3", "--num-samples", "4",
        "--text-seq-len", "32", "--max-steps", "1", "--batch-size", "2", "--grad-accum", "1", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    settings = json.loads((out / "finetune_report.json").read_text())["settings"]
    assert settings["objective"] == "distill" and settings["data"] == "wikipedia:1,zoo-vqa:3"
    assert settings["num_conversations"] == 4


def _short_distill(native, **extra) -> dict:
    """`finetune` settings of two stage-2 distillation steps from the native `native`, logging every step."""
    return dict(stage=2, objective="distill", teacher=native, learning_rate=1e-3, per_device_train_batch_size=2,
                gradient_accumulation_steps=1, max_steps=2, logging_steps=1, **extra)  # fmt: skip


def _losses(result) -> list[float]:
    return [entry["loss"] for entry in result.report["training"]["losses"]]


def test_qwen_towers_train_with_one_vision_attention_call_per_block(native_checkpoints, tmp_path, monkeypatch):
    """finetune swaps `BatchedVisionAttention` into the student's and the teacher's Qwen2.5-VL vision towers for the
    run: both use it, the loss and the trained weights are those of Transformers' chunked attention, and the saved
    model holds Transformers' modules again."""
    import contextlib

    from hf_mla_vlm.zoo import batched_attention

    finetune_module = importlib.import_module("hf_mla_vlm.training.finetune")
    native = native_checkpoints["qwen2_5_vl"]
    student = tmp_path / "qwen-mla"
    convert(native, student, rope_dim=8, kv_rank=4, rope_strategy="uniform", progress=False)
    calls = collections.Counter()
    forward = batched_attention.BatchedVisionAttention.forward
    monkeypatch.setattr(batched_attention.BatchedVisionAttention, "forward",
                        lambda self, *a, **k: calls.update([id(self.qkv)]) or forward(self, *a, **k))  # fmt: skip
    settings = _short_distill(native, return_model=True)
    batched = finetune(student, _conversations(2), tmp_path / "batched", **settings)
    depth = load_model(native).config.vision_config.depth
    assert len(calls) == 2 * depth  # every block of both towers (keyed by their qkv modules)
    assert not any(isinstance(m, batched_attention.BatchedVisionAttention) for m in batched.model.modules())

    monkeypatch.setattr(finetune_module, "batch_vision_attention", lambda model: contextlib.nullcontext(0))
    chunked = finetune(student, _conversations(2), tmp_path / "chunked", **settings)
    assert _losses(batched) == pytest.approx(_losses(chunked), rel=1e-5)
    for (name, value), expected in zip(batched.model.state_dict().items(), chunked.model.state_dict().values()):
        torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-6, msg=name)


def test_qwen_training_forwards_take_their_positions_from_the_collator(native_checkpoints, tmp_path, monkeypatch):
    """finetune's collator computes Qwen2.5-VL's M-RoPE positions (`RopeIndex`, on a weightless model): neither the
    student's nor the teacher's forward computes them itself (on a GPU that synchronises per row and image), and
    the losses are those of forwards that do."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl

    data_module = importlib.import_module("hf_mla_vlm.training.data")
    native = native_checkpoints["qwen2_5_vl"]
    student = tmp_path / "qwen-mla"
    convert(native, student, rope_dim=8, kv_rank=4, rope_strategy="uniform", progress=False)
    calls = collections.Counter()
    get_rope_index = modeling_qwen2_5_vl.Qwen2_5_VLModel.get_rope_index

    def counted(self, *args, **kwargs):
        calls[next(self.parameters()).device.type] += 1
        return get_rope_index(self, *args, **kwargs)

    monkeypatch.setattr(modeling_qwen2_5_vl.Qwen2_5_VLModel, "get_rope_index", counted)
    settings = _short_distill(native)
    collated = finetune(student, _conversations(2), tmp_path / "collated", **settings)
    assert calls == {"meta": 2}  # one per batch, in the collator
    calls.clear()
    monkeypatch.setattr(data_module, "rope_index", lambda config: None)
    in_forward = finetune(student, _conversations(2), tmp_path / "in_forward", **settings)
    assert calls == {"cpu": 4}  # the student's and the teacher's forward, per batch
    assert _losses(collated) == _losses(in_forward)


def test_llava_next_training_reads_its_image_sizes_on_the_host(native_checkpoints, tmp_path, monkeypatch):
    """finetune's collator passes LLaVA-NeXT's `image_sizes` as lists (the registry's `host_inputs`), which device
    placement leaves on the host; the models read them per image, and the losses are those of the tensor."""
    data_module = importlib.import_module("hf_mla_vlm.training.data")
    native = native_checkpoints["llava_next"]
    student = tmp_path / "next-mla"
    convert(native, student, rope_dim=8, kv_rank=4, rope_strategy="uniform", progress=False)
    seen = []
    collate = data_module.ChatCollator.__call__

    def recorded(self, items):
        batch = collate(self, items)
        seen.append(batch["image_sizes"])
        return batch

    monkeypatch.setattr(data_module.ChatCollator, "__call__", recorded)
    settings = _short_distill(native)
    listed = finetune(student, _conversations(2), tmp_path / "listed", **settings)
    assert seen and all(isinstance(sizes, list) and isinstance(sizes[0][0], int) for sizes in seen)
    seen.clear()
    spec = data_module.arch_spec
    monkeypatch.setattr(data_module, "arch_spec", lambda t: dataclasses.replace(spec(t), host_inputs=()))
    tensors = finetune(student, _conversations(2), tmp_path / "tensors", **settings)
    assert seen and all(isinstance(sizes, torch.Tensor) for sizes in seen)
    assert _losses(listed) == _losses(tensors)
