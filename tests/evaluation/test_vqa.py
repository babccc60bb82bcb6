# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""VQA accuracy evaluation: `vqa_accuracy`, `vqa_image_size`, `evaluate(task="vqa")` and `evaluate --task vqa`."""

import json
from collections import Counter

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlavaImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

from hf_mla_vlm import cli
from hf_mla_vlm.evaluation import evaluate, vqa_accuracy, vqa_image_size
from hf_mla_vlm.tiny_models import LLAVA_CHAT_TEMPLATE, QWEN_STYLE, SPECIAL_TOKENS, TINY_ARCHS, build_tiny_vlm
from hf_mla_vlm.zoo import ANSWERS, QTYPES, generate_split
from tests.utils import load_native


# crop, largest square pinpoint, isqrt(max_pixels)
NATIVE_SIZE = {"llava": 28, "llava_next": 56, "qwen2_5_vl": 112, "qwen2_vl": 112, "llava_onevision": 56}


@pytest.fixture(scope="module")
def tiny():
    return {arch: build_tiny_vlm(arch) for arch in TINY_ARCHS}


def _check_structure(result: dict, samples) -> None:
    counts = Counter(sample.qtype for sample in samples)
    assert result["num_samples"] == len(samples) == sum(result["counts"].values())
    assert result["counts"] == dict(counts) and list(result["counts"]) == [q for q in QTYPES if q in counts]
    assert list(result["per_type"]) == list(result["counts"])
    assert all(0.0 <= accuracy <= 1.0 for accuracy in result["per_type"].values())
    correct = sum(result["per_type"][q] * n for q, n in result["counts"].items())
    assert result["accuracy"] == pytest.approx(correct / len(samples))
    predictions = result["predictions"]
    assert [p["question"] for p in predictions] == [s.question for s in samples]
    assert [p["answer"] for p in predictions] == [s.answer for s in samples]
    assert all(isinstance(p["prediction"], str) for p in predictions)
    assert sum(p["correct"] for p in predictions) == round(correct)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_vqa_accuracy_on_native_and_converted_models(native_checkpoints, tmp_path, arch):
    from hf_mla_vlm import convert

    native, processor = load_native(native_checkpoints[arch])
    samples = generate_split("test", 10, seed=1, image_size=vqa_image_size(processor))
    assert set(QTYPES) == {sample.qtype for sample in samples}  # balanced schedule: every type twice
    result = vqa_accuracy(native, processor, samples, batch_size=4, return_predictions=True, progress=False)
    _check_structure(result, samples)
    assert "predictions" not in vqa_accuracy(native, processor, samples[:2], progress=False)

    # Full rank (rope_dim = kv_rank = head_dim) is exact: the MLA model generates the same answers.
    full = convert(native_checkpoints[arch], tmp_path / "mla", rope_dim=32, kv_rank=32, progress=False).output_dir
    mla, mla_processor = load_native(full)
    assert mla.config.model_type == f"{arch}_mla"
    converted = vqa_accuracy(mla, mla_processor, samples, batch_size=4, return_predictions=True, progress=False)
    _check_structure(converted, samples)
    assert [p["prediction"] for p in converted["predictions"]] == [p["prediction"] for p in result["predictions"]]
    assert converted == result


class _TokenAnswerer(torch.nn.Module):
    """A stand-in model whose `generate` answers the queued samples in order: correctly for colour and shape
    questions, "no" for the rest. It checks that each row holds its sample's question and is padded on the left."""

    def __init__(self, tokenizer, samples):
        super().__init__()
        self.tokenizer, self.queue, self.calls = tokenizer, list(samples), []

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(self, input_ids, attention_mask, pixel_values, max_new_tokens, do_sample, pad_token_id, **kwargs):
        assert not do_sample and pad_token_id == self.tokenizer.pad_token_id and not kwargs
        assert pixel_values.shape[0] == input_ids.shape[0] and attention_mask[:, -1].all()  # left padding
        self.calls.append(tuple(input_ids.shape))
        rows = []
        for row, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            sample = self.queue.pop(0)
            prompt, question = row[len(row) - sum(mask) :], self._ids(sample.question)
            assert any(prompt[i : i + len(question)] == question for i in range(len(prompt)))
            answer = sample.answer if sample.qtype in ("color", "shape") else "no"
            rows.append(row + self._ids(f"{answer} .") + [self.tokenizer.eos_token_id])
        width = max(map(len, rows))
        assert width - input_ids.shape[1] <= max_new_tokens
        return torch.tensor([row + [pad_token_id] * (width - len(row)) for row in rows])


def _vqa_vocabulary_processor(samples):
    """A LLaVA processor whose word-level tokenizer knows every word of the prompts and answers (the tiny models'
    tokenizer maps most of them to `<unk>`), so that the questions and answers survive a round trip."""
    split = pre_tokenizers.Whitespace()
    texts = [s.question + " " + s.messages(with_answer=False)[0]["content"][1]["text"] for s in samples]
    texts += ["USER: ASSISTANT:", " ".join(ANSWERS)]
    words = sorted({word for text in texts for word, _ in split.pre_tokenize_str(text)})
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIAL_TOKENS + words)}, unk_token="<unk>"))
    backend.pre_tokenizer = split
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left",
    )  # fmt: skip
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[4:]})
    image_processor = LlavaImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
        image_token="<image>", num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE,
    )  # fmt: skip


def test_scores_exactly_the_types_a_model_answers_correctly():
    samples = generate_split("validation", 40, seed=5, image_size=28)
    processor = _vqa_vocabulary_processor(samples)
    model = _TokenAnswerer(processor.tokenizer, samples)
    result = vqa_accuracy(model, processor, samples, batch_size=16, return_predictions=True, progress=False)
    assert model.queue == [] and [shape[0] for shape in model.calls] == [16, 16, 8]

    relation = [s for s in samples if s.qtype == "relation"]
    share_no = sum(s.answer == "no" for s in relation) / len(relation)
    assert 0.0 < share_no < 1.0  # the relation score is neither trivially 0 nor 1
    assert result["per_type"] == {"color": 1.0, "shape": 1.0, "count": 0.0, "position": 0.0, "relation": share_no}
    assert result["counts"] == {q: 8 for q in QTYPES} and result["num_samples"] == 40
    assert result["accuracy"] == pytest.approx((8 + 8 + share_no * 8) / 40)
    for sample, prediction in zip(samples, result["predictions"]):
        expected = sample.answer if sample.qtype in ("color", "shape") else "no"
        assert prediction["prediction"] == f"{expected} ."  # only the new tokens, special tokens skipped
        assert prediction["correct"] == (expected == sample.answer)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_predictions_do_not_depend_on_the_batch_size(tiny, arch):
    model, processor = tiny[arch]
    samples = generate_split("test", 8, seed=2, image_size=vqa_image_size(processor))
    assert len({len(s.question.split()) for s in samples}) > 1  # prompts of different lengths: left padding
    one = vqa_accuracy(model, processor, samples, batch_size=1, return_predictions=True, progress=False)
    four = vqa_accuracy(model, processor, samples, batch_size=4, return_predictions=True, progress=False)
    assert [p["prediction"] for p in one["predictions"]] == [p["prediction"] for p in four["predictions"]]
    assert len({p["prediction"] for p in four["predictions"]}) > 1 and one == four


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_vqa_image_size_is_the_native_resolution(tiny, arch):
    _, processor = tiny[arch]
    size = vqa_image_size(processor)
    assert size == NATIVE_SIZE[arch]
    image = generate_split("test", 1, image_size=size)[0].image
    encoded = processor.image_processor(images=[image], return_tensors="pt")
    if arch in QWEN_STYLE:  # smart_resize keeps the size: one 14-pixel patch per 14 pixels
        assert encoded["image_grid_thw"].tolist() == [[1, size // 14, size // 14]]
    elif arch == "llava":
        assert tuple(encoded["pixel_values"].shape[-2:]) == (size, size)
    else:  # the 56 x 56 pinpoint without rescaling: 2 x 2 crops of 28 plus the base view
        assert encoded["image_sizes"].tolist() == [[size, size]] and encoded["pixel_values"].shape[1] == 5


def test_vqa_image_size_of_released_settings_and_unknown_processors(tiny):
    import copy

    llava_next = copy.deepcopy(tiny["llava_next"][1])
    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # LLaVA-v1.6
    llava_next.image_processor.image_grid_pinpoints = pinpoints
    assert vqa_image_size(llava_next) == 672  # the largest square pinpoint, not the largest side (1008)
    llava_next.image_processor.image_grid_pinpoints = [[56, 112], [112, 56], [112, 112]]  # graft.py
    assert vqa_image_size(llava_next) == 112
    qwen = copy.deepcopy(tiny["qwen2_5_vl"][1])
    qwen.image_processor.size = {"shortest_edge": 3136, "longest_edge": 12845056}  # Qwen2.5-VL: 3584 = 128 * 28
    assert vqa_image_size(qwen) == 3584
    qwen.image_processor.size = {"shortest_edge": 3136, "longest_edge": 100 * 100}  # isqrt 100 -> 3 * 28
    assert vqa_image_size(qwen) == 84
    with pytest.raises(ValueError, match="LLaVA, LLaVA-NeXT or Qwen2.5-VL processor"):
        vqa_image_size(tiny["llava"][1].tokenizer)


def test_evaluate_vqa_argument_errors(native_checkpoints):
    with pytest.raises(ValueError, match="Unknown task"):
        evaluate(native_checkpoints["llava"], task="caption")
    with pytest.raises(ValueError, match="Unknown VQA split"):
        evaluate(native_checkpoints["llava"], task="vqa", vqa_split="dev")


def test_evaluate_cli_vqa_writes_per_type_accuracies(native_checkpoints, tmp_path, capsys):
    src = str(native_checkpoints["llava_next"])
    text = tmp_path / "text.txt"
    text.write_text(" ".join(["what is this ? a cat . the dog is left of the red circle ."] * 10))
    out = tmp_path / "vqa.json"
    argv = ["evaluate", src, "--task", "vqa", "--num-samples", "7", "--batch-size", "3", "--split", "validation"]
    argv += ["--reference", src, "--text-file", str(text), "--seq-len", "16", "--output", str(out)]
    assert cli.main(argv) == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert result["task"] == "vqa" and result["data"] is None and result["fidelity"] is None
    vqa = result["vqa"]
    assert vqa["num_samples"] == 7 == sum(vqa["counts"].values()) and set(vqa["per_type"]) == set(QTYPES)
    assert vqa["split"] == "validation" and vqa["image_size"] == 56 and "predictions" not in vqa
    assert result["reference_vqa"] == vqa  # the same checkpoint as reference
    assert result["perplexity"]["ppl"] == pytest.approx(result["reference_perplexity"]["ppl"])
    settings = result["settings"]
    assert settings["vqa_samples"] == 7 and settings["vqa_batch_size"] == 3 and settings["batch_size"] == 3
    assert set(result["timings_s"]) >= {"vqa_data_s", "vqa_s", "reference_vqa_s", "perplexity_s"}

    # image size override, no reference
    assert cli.main(["evaluate", src, "--task", "vqa", "--num-samples", "2", "--image-size", "28"]) == 0
    small = json.loads(capsys.readouterr().out)
    assert small["vqa"]["image_size"] == 28 and small["reference_vqa"] is None and small["perplexity"] is None
