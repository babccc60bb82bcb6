# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""The procedural VQA dataset: determinism, splits, answers vs scene geometry, chat formatting and scoring."""

import random
from collections import Counter

import numpy as np
import pytest

from hf_mla_vlm.conversations import Conversation, encode_conversations
from hf_mla_vlm.zoo import (
    ANSWERS,
    POSITIONS,
    QTYPES,
    SceneObject,
    VQASample,
    answer_distribution,
    answer_question,
    encode_for_training,
    generate_split,
    random_scene,
    render_scene,
    scene_key,
    score_answer,
)


SIZE = 56  # small images keep the tests fast


@pytest.fixture(scope="module")
def samples() -> list[VQASample]:
    return generate_split("train", 200, seed=3, image_size=SIZE)


@pytest.fixture(scope="module")
def processors():
    from hf_mla_vlm.tiny_models import build_tiny_vlm

    return {arch: build_tiny_vlm(arch)[1] for arch in ("llava", "qwen2_5_vl")}


def _object(scene, color, shape) -> SceneObject:
    (obj,) = [o for o in scene if (o.color, o.shape) == (color, shape)]
    return obj


def test_deterministic_pixels_and_text():
    a = generate_split("validation", 25, seed=7, image_size=SIZE)
    b = generate_split("validation", 25, seed=7, image_size=SIZE)
    assert [(s.question, s.answer, s.qtype, s.scene) for s in a] == [
        (s.question, s.answer, s.qtype, s.scene) for s in b
    ]
    for x, y in zip(a, b):
        assert np.array_equal(np.asarray(x.image), np.asarray(y.image))
    c = generate_split("validation", 25, seed=8, image_size=SIZE)
    assert [s.scene for s in a] != [s.scene for s in c]
    assert all(s.image.size == (SIZE, SIZE) and s.image.mode == "RGB" for s in a)


def test_splits_are_scene_disjoint():
    scenes = {
        split: {scene_key(s.scene) for s in generate_split(split, 300, seed=0, image_size=16)}
        for split in ("train", "validation", "test")
    }
    assert len(scenes["test"]) > 100
    assert not scenes["train"] & scenes["validation"]
    assert not scenes["train"] & scenes["test"]
    assert not scenes["validation"] & scenes["test"]


def test_qtypes_balanced_and_answers_in_vocabulary(samples):
    shares = Counter(s.qtype for s in samples)
    assert set(shares) == set(QTYPES)
    assert all(abs(n - len(samples) / len(QTYPES)) <= 1 for n in shares.values())
    assert all(s.answer in ANSWERS for s in samples)
    dist = answer_distribution(samples)
    assert set(dist) == set(QTYPES) and sum(sum(d.values()) for d in dist.values()) == len(samples)
    assert set(dist["relation"]) == {"yes", "no"} and len(dist["position"]) >= 6
    only = generate_split("test", 20, seed=1, image_size=16, qtype_weights={"position": 1.0, "relation": 1.0})
    assert {s.qtype for s in only} <= {"position", "relation"}


def test_scenes_are_unambiguous():
    rng = random.Random(0)
    for _ in range(200):
        scene = random_scene(rng)
        assert 2 <= len(scene) <= 4
        assert len({(o.row, o.col) for o in scene}) == len(scene)
        assert len({(o.color, o.shape) for o in scene}) == len(scene)


def test_answers_match_scene_geometry(samples):
    names = {(0, 0): "top-left", (0, 1): "top", (0, 2): "top-right", (1, 0): "left", (1, 1): "center"}
    names.update({(1, 2): "right", (2, 0): "bottom-left", (2, 1): "bottom", (2, 2): "bottom-right"})
    for s in samples:
        words = s.question.rstrip("?").split()
        if s.qtype == "position":  # Where is the <color> <shape>?
            obj = _object(s.scene, words[3], words[4])
            assert s.answer == names[(obj.row, obj.col)]
        elif s.qtype == "relation":  # Is the <color> <shape> <relation> the <color> <shape>?
            a, b = _object(s.scene, words[2], words[3]), _object(s.scene, words[-2], words[-1])
            relation = " ".join(words[4:-3])
            if relation in ("left of", "right of"):
                assert a.col != b.col
                holds = a.col < b.col if relation == "left of" else a.col > b.col
            else:
                assert a.row != b.row
                holds = a.row < b.row if relation == "above" else a.row > b.row
            assert s.answer == ("yes" if holds else "no")
        elif s.qtype == "color":  # What color is the <shape>?
            (obj,) = [o for o in s.scene if o.shape == words[-1]]
            assert s.answer == obj.color
        elif s.qtype == "shape":  # What shape is the <color> object?
            (obj,) = [o for o in s.scene if o.color == words[-2]]
            assert s.answer == obj.shape
        else:
            assert s.answer in ("zero", "one", "two", "three", "four")
        assert answer_question(s.question, s.scene) == s.answer


def test_position_and_relation_depend_on_layout(samples):
    """The same objects in other cells give other position / relation answers; colour, shape and count do not."""
    rng = random.Random(0)
    changed = Counter()
    for s in samples:
        rotated = tuple(SceneObject(o.color, o.shape, 2 - o.row, 2 - o.col) for o in s.scene)  # 180 degrees
        answer = answer_question(s.question, rotated)
        if s.qtype == "relation":
            assert answer != s.answer  # both left/right and above/below flip
        elif s.qtype == "position":
            obj = _object(s.scene, *s.question.rstrip("?").split()[3:5])
            assert (answer == s.answer) == ((obj.row, obj.col) == (1, 1))  # only the center maps to itself
        else:
            assert answer == s.answer
        cells = rng.sample([(r, c) for r in range(3) for c in range(3)], len(s.scene))
        permuted = tuple(SceneObject(o.color, o.shape, r, c) for o, (r, c) in zip(s.scene, cells))
        try:
            changed[s.qtype] += answer_question(s.question, permuted) != s.answer
        except ValueError:  # a relation can become ill-defined (same row / column)
            changed[s.qtype] += 1
    assert changed["position"] > 10 and changed["relation"] > 10
    assert changed["color"] == changed["shape"] == changed["count"] == 0
    # the image sees the layout too
    s = next(s for s in samples if s.qtype == "position")
    moved = tuple(SceneObject(o.color, o.shape, 2 - o.row, 2 - o.col) for o in s.scene)
    assert not np.array_equal(np.asarray(render_scene(moved, SIZE)), np.asarray(s.image))


def test_render_scene_objects_stay_in_their_cells():
    objects = [
        SceneObject(c, s, r, k) for (c, s), (r, k) in zip([("red", "circle"), ("blue", "square")], [(0, 2), (2, 0)])
    ]
    pixels = np.asarray(render_scene(objects, image_size=90)).astype(int)
    red = (pixels[..., 0] > 150) & (pixels[..., 1] < 100)
    blue = (pixels[..., 2] > 150) & (pixels[..., 0] < 100)
    ys, xs = np.nonzero(red)
    assert red.sum() > 100 and ys.max() < 30 and xs.min() >= 60
    ys, xs = np.nonzero(blue)
    assert blue.sum() > 100 and ys.min() >= 60 and xs.max() < 30
    assert (pixels[~(red | blue)] > 150).all(axis=-1).mean() > 0.95  # white background


def test_messages_and_conversation(samples):
    s = samples[0]
    user, assistant = s.messages()
    assert user["role"] == "user" and user["content"][0] == {"type": "image"}
    assert user["content"][1]["text"].startswith(s.question)
    assert assistant == {"role": "assistant", "content": [{"type": "text", "text": s.answer}]}
    assert len(s.messages(with_answer=False)) == 1
    assert s.messages(instruction=None)[0]["content"][1]["text"] == s.question
    conversation = s.to_conversation()
    assert isinstance(conversation, Conversation) and conversation.images == [s.image]


@pytest.mark.parametrize("arch", ["llava", "qwen2_5_vl"])
def test_chat_format_through_tiny_processors(processors, samples, arch):
    processor = processors[arch]
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>" if arch == "qwen2_5_vl" else "<image>")
    batch = samples[:3]
    for with_answer in (True, False):
        encoded = list(encode_for_training(processor, batch, with_answer=with_answer))
        assert len(encoded) == len(batch)
        for inputs in encoded:
            ids = inputs["input_ids"]
            assert ids.shape[0] == 1 and inputs["attention_mask"].shape == ids.shape
            if arch == "llava":
                assert tuple(inputs["pixel_values"].shape) == (1, 3, 28, 28)
                expected = 4  # (28 / 14)^2 patches, CLS dropped
            else:
                (thw,) = inputs["image_grid_thw"].tolist()
                assert inputs["pixel_values"].shape[0] == thw[0] * thw[1] * thw[2]
                expected = thw[0] * thw[1] * thw[2] // 4  # 2x2 spatial merge
            assert int((ids == image_token).sum()) == expected > 1  # the placeholder was expanded
    prompt = processor.apply_chat_template(
        batch[0].messages(with_answer=False), tokenize=False, add_generation_prompt=True
    )
    full = processor.apply_chat_template(batch[0].messages(), tokenize=False)
    assert batch[0].question in prompt and batch[0].answer in full and batch[0].answer not in prompt.split("?")[-1]
    with_answer = next(encode_for_training(processor, batch[:1]))["input_ids"].shape[1]
    without = next(encode_for_training(processor, batch[:1], with_answer=False))["input_ids"].shape[1]
    assert with_answer > without
    # the calibration pipeline accepts VQA conversations
    calibration = list(encode_conversations(processor, [s.to_conversation() for s in batch]))
    assert len(calibration) == len(batch)
    assert all(int((c["input_ids"] == image_token).sum()) > 1 for c in calibration)


@pytest.mark.parametrize(
    ("predicted", "answer", "expected"),
    [
        ("red", "red", True),
        ("Red.", "red", True),
        ("  RED  ", "red", True),
        ("red circle", "red", True),
        ("Top-left.", "top-left", True),
        ("top left", "top-left", False),
        ("Yes, it is.", "yes", True),
        ("no", "yes", False),
        ("2", "two", True),
        ("The circle is red", "red", False),
        ("", "red", False),
        ("reddish", "red", False),
    ],
)
def test_score_answer(predicted, answer, expected):
    assert score_answer(predicted, answer) is expected


def test_invalid_arguments():
    with pytest.raises(ValueError):
        generate_split("dev", 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        generate_split("train", 3, qtype_weights={"colour": 1.0})
    with pytest.raises(ValueError):
        answer_question("What is this?", ())
    assert set(POSITIONS) <= set(ANSWERS)
