# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""A deterministic, seedable procedural visual-question-answering dataset.

Scenes are a few coloured shapes (red/green/blue/yellow circles, squares and triangles) on the cells of a
`grid x grid` lattice, drawn on a white canvas. Each sample asks one templated question whose answer is a single
word from the fixed vocabulary `ANSWERS`:

* `"color"`: "What color is the circle?" -> "red" (only asked about a shape present exactly once);
* `"shape"`: "What shape is the blue object?" -> "square" (only asked about a colour present exactly once);
* `"count"`: "How many shapes are there?", "How many red shapes are there?", "How many circles are there?" ->
  "zero" ... "nine";
* `"position"`: "Where is the red circle?" -> "top-left", "top", ..., "bottom-right";
* `"relation"`: "Is the red circle left of the blue square?" -> "yes" / "no" (also "right of", "above", "below";
  only asked when the relation is well defined: different columns for left/right, different rows for above/below).

Position and relation answers depend only on the 2-D layout of the objects (the same objects in other cells give
other answers), so a model must use where the image tokens are in the image, not only which tokens they are; this
makes the rotary treatment of image tokens matter.

Splits come from disjoint seed streams (the seed mixed with the split name through SHA-256, not Python's salted
`hash`) and are also scene-disjoint by construction: every scene is assigned to exactly one split by a stable hash
of its content (80% train, 10% validation, 10% test), and a split only keeps its own scenes.

The `answer_question` oracle computes the answer of any templated question from a scene; the generator uses it, so
questions and answers cannot drift apart.

Longer than the package's usual ~400 lines: the scene generator, the question templates and the answer
vocabulary are one definition of the task and are kept together.
"""

import hashlib
import math
import random
import re
import string
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from PIL import Image, ImageDraw

from hf_mla_vlm.conversations import COLORS as _SCENE_COLORS
from hf_mla_vlm.conversations import Conversation


Split = Literal["train", "validation", "test"]
SPLITS: tuple[str, ...] = ("train", "validation", "test")
SPLIT_SHARES: dict[str, int] = {"train": 8, "validation": 1, "test": 1}  # tenths of the scene space per split

COLORS: dict[str, tuple[int, int, int]] = {c: _SCENE_COLORS[c] for c in ("red", "green", "blue", "yellow")}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
QTYPES: tuple[str, ...] = ("color", "shape", "count", "position", "relation")
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
POSITIONS: tuple[str, ...] = (
    "top-left", "top", "top-right", "left", "center", "right", "bottom-left", "bottom", "bottom-right",
)  # fmt: skip
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
YES_NO: tuple[str, ...] = ("yes", "no")
ANSWERS: tuple[str, ...] = (*COLORS, *SHAPES, *NUMBER_WORDS, *POSITIONS, *YES_NO)
INSTRUCTION = "Answer with a single word."


@dataclass(frozen=True)
class SceneObject:
    """One shape of a scene: its colour and kind and the (row, column) grid cell it sits in (row 0 is the top)."""

    color: str
    shape: str
    row: int
    col: int

    @property
    def name(self) -> str:
        """How questions refer to the object, e.g. `"red circle"` (unique within a generated scene)."""
        return f"{self.color} {self.shape}"


@dataclass
class VQASample:
    """One image-question-answer sample with the scene it was rendered from."""

    image: Image.Image
    question: str
    answer: str
    qtype: str
    scene: tuple[SceneObject, ...]
    grid: int = 3

    def messages(self, with_answer: bool = True, instruction: str | None = INSTRUCTION) -> list[dict]:
        """Transformers chat messages: the user turn holds the image and the question (followed by `instruction`
        when given), the assistant turn the answer (left out when `with_answer` is false, e.g. for generation)."""
        text = self.question if not instruction else f"{self.question} {instruction}"
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        if with_answer:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": self.answer}]})
        return messages

    def to_conversation(self, instruction: str | None = INSTRUCTION) -> Conversation:
        """The sample as a calibration `Conversation` (question and answer, one image)."""
        return Conversation(self.messages(with_answer=True, instruction=instruction), [self.image])


# ----------------------------------------------------------------------------------------------------------- scenes


def _stable_int(*parts: object) -> int:
    """A 64-bit integer from the parts' text, identical across processes and Python versions."""
    digest = hashlib.sha256("\x1f".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def random_scene(
    rng: random.Random, grid: int = 3, min_objects: int = 2, max_objects: int = 4
) -> tuple[SceneObject, ...]:
    """`min_objects..max_objects` objects in distinct cells, with no repeated (colour, shape) pair, so that every
    object has a unique name. Objects are ordered by cell (row-major)."""
    most = min(grid * grid, len(COLORS) * len(SHAPES))
    if not 1 <= min_objects <= max_objects <= most:
        raise ValueError(f"Need 1 <= min_objects <= max_objects <= {most} for a {grid}x{grid} grid.")
    count = rng.randint(min_objects, max_objects)
    cells = rng.sample([(r, c) for r in range(grid) for c in range(grid)], count)
    kinds = rng.sample([(color, shape) for color in COLORS for shape in SHAPES], count)
    objects = [SceneObject(color, shape, row, col) for (color, shape), (row, col) in zip(kinds, cells)]
    return tuple(sorted(objects, key=lambda o: (o.row, o.col)))


def scene_key(scene: Iterable[SceneObject]) -> tuple[tuple[str, str, int, int], ...]:
    """A canonical, order-independent, hashable description of a scene."""
    return tuple(sorted((o.color, o.shape, o.row, o.col) for o in scene))


def scene_split(scene: Iterable[SceneObject]) -> str:
    """The split a scene belongs to (stable hash of its content; 80/10/10 train/validation/test)."""
    bucket = _stable_int("vqa-scene", scene_key(scene)) % sum(SPLIT_SHARES.values())
    for split, share in SPLIT_SHARES.items():
        if bucket < share:
            return split
        bucket -= share
    raise AssertionError("unreachable")


def render_scene(
    objects: Iterable[SceneObject], image_size: int = 224, grid: int = 3, jitter: bool = True
) -> Image.Image:
    """Draw `objects` on a white `image_size x image_size` canvas, each inside its grid cell.

    Like `conversations.draw_scene`, a shape fills about two thirds of its cell; with `jitter`, its size and offset
    vary slightly, deterministically from the object itself, and it always stays inside its cell.
    """
    image = Image.new("RGB", (image_size, image_size), "white")
    draw = ImageDraw.Draw(image)
    cell = image_size / grid
    for obj in objects:
        if not (0 <= obj.row < grid and 0 <= obj.col < grid):
            raise ValueError(f"{obj} lies outside a {grid}x{grid} grid.")
        if obj.color not in COLORS or obj.shape not in SHAPES:
            raise ValueError(f"Unknown colour or shape in {obj}; colours {tuple(COLORS)}, shapes {SHAPES}.")
        h = _stable_int("vqa-jitter", obj.color, obj.shape, obj.row, obj.col) if jitter else 0
        scale = (0.58 + 0.14 * ((h & 0xFF) / 255)) if jitter else 2 / 3
        side = scale * cell
        slack = cell - side  # free room in the cell; the shape is placed anywhere in its middle part
        fx = (0.3 + 0.4 * (((h >> 8) & 0xFF) / 255)) if jitter else 0.5
        fy = (0.3 + 0.4 * (((h >> 16) & 0xFF) / 255)) if jitter else 0.5
        x0, y0 = obj.col * cell + fx * slack, obj.row * cell + fy * slack
        x1, y1 = x0 + side, y0 + side
        box = (round(x0), round(y0), round(x1) - 1, round(y1) - 1)
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon(((box[0] + box[2]) / 2, box[1], box[0], box[3], box[2], box[3]), fill=fill)
    return image


# -------------------------------------------------------------------------------------------------------- questions


def _band(index: int, grid: int) -> int:
    """Row/column index -> 0 (top/left), 1 (middle) or 2 (bottom/right); the identity for a 3x3 grid."""
    return 1 if grid == 1 else round(2 * index / (grid - 1))


def position_name(row: int, col: int, grid: int = 3) -> str:
    """The absolute position word of a cell ("top-left", "top", ..., "center", ..., "bottom-right")."""
    return POSITIONS[3 * _band(row, grid) + _band(col, grid)]


def relation_holds(a: SceneObject, relation: str, b: SceneObject) -> bool | None:
    """Whether `a <relation> b` holds, from grid cells only; `None` when it is not well defined (same column for
    left/right, same row for above/below)."""
    if relation in ("left of", "right of"):
        if a.col == b.col:
            return None
        return (a.col < b.col) == (relation == "left of")
    if relation in ("above", "below"):
        if a.row == b.row:
            return None
        return (a.row < b.row) == (relation == "above")
    raise ValueError(f"Unknown relation {relation!r}; choose one of {RELATIONS}.")


_C = "|".join(COLORS)
_S = "|".join(SHAPES)
_R = "|".join(RELATIONS)
_PATTERNS = {
    "color": re.compile(rf"What color is the ({_S})\?"),
    "shape": re.compile(rf"What shape is the ({_C}) object\?"),
    "count_all": re.compile(r"How many shapes are there\?"),
    "count_color": re.compile(rf"How many ({_C}) shapes are there\?"),
    "count_shape": re.compile(rf"How many ({_S})s are there\?"),
    "position": re.compile(rf"Where is the ({_C}) ({_S})\?"),
    "relation": re.compile(rf"Is the ({_C}) ({_S}) ({_R}) the ({_C}) ({_S})\?"),
}


def _one(objects: Sequence[SceneObject], what: str) -> SceneObject:
    if len(objects) != 1:
        raise ValueError(f"The question about {what} is ambiguous or void: {len(objects)} matching objects.")
    return objects[0]


def _number(n: int) -> str:
    if n >= len(NUMBER_WORDS):
        raise ValueError(f"Counts above {len(NUMBER_WORDS) - 1} have no answer word.")
    return NUMBER_WORDS[n]


def answer_question(question: str, scene: Sequence[SceneObject], grid: int = 3) -> str:
    """The answer of a templated question about `scene` (the oracle the generator uses). Raises `ValueError` for
    an unknown template or a question that is ambiguous / ill-defined for this scene."""
    for kind, pattern in _PATTERNS.items():
        match = pattern.fullmatch(question.strip())
        if match is None:
            continue
        g = match.groups()
        if kind == "color":
            return _one([o for o in scene if o.shape == g[0]], f"the {g[0]}").color
        if kind == "shape":
            return _one([o for o in scene if o.color == g[0]], f"the {g[0]} object").shape
        if kind == "count_all":
            return _number(len(scene))
        if kind == "count_color":
            return _number(sum(o.color == g[0] for o in scene))
        if kind == "count_shape":
            return _number(sum(o.shape == g[0] for o in scene))
        if kind == "position":
            obj = _one([o for o in scene if (o.color, o.shape) == g], f"the {g[0]} {g[1]}")
            return position_name(obj.row, obj.col, grid)
        a = _one([o for o in scene if (o.color, o.shape) == g[:2]], f"the {g[0]} {g[1]}")
        b = _one([o for o in scene if (o.color, o.shape) == g[3:]], f"the {g[3]} {g[4]}")
        holds = relation_holds(a, g[2], b)
        if holds is None or a == b:
            raise ValueError(f"{question!r} is not well defined for this scene.")
        return "yes" if holds else "no"
    raise ValueError(f"Not a known question template: {question!r}.")


def make_question(rng: random.Random, qtype: str, scene: Sequence[SceneObject]) -> str | None:
    """A random question of type `qtype` that is well posed for `scene`, or `None` when the scene admits none."""
    if qtype == "color":
        counts = Counter(o.shape for o in scene)
        shapes = [s for s in SHAPES if counts[s] == 1]
        return f"What color is the {rng.choice(shapes)}?" if shapes else None
    if qtype == "shape":
        counts = Counter(o.color for o in scene)
        colors = [c for c in COLORS if counts[c] == 1]
        return f"What shape is the {rng.choice(colors)} object?" if colors else None
    if qtype == "count":
        variant = rng.randrange(3)
        if variant == 0:
            return "How many shapes are there?"
        if variant == 1:
            return f"How many {rng.choice(list(COLORS))} shapes are there?"
        return f"How many {rng.choice(SHAPES)}s are there?"
    if qtype == "position":
        return f"Where is the {rng.choice(scene).name}?" if scene else None
    if qtype == "relation":
        candidates = [
            (a, relation, b)
            for a in scene
            for b in scene
            if a != b
            for relation in RELATIONS
            if relation_holds(a, relation, b) is not None
        ]
        if not candidates:
            return None
        a, relation, b = rng.choice(candidates)
        return f"Is the {a.name} {relation} the {b.name}?"
    raise ValueError(f"Unknown question type {qtype!r}; choose one of {QTYPES}.")


# ----------------------------------------------------------------------------------------------------------- splits


def _qtype_schedule(rng: random.Random, num_samples: int, weights: dict[str, float] | None) -> list[str]:
    if weights is None:  # exactly balanced: shuffled blocks of all question types
        schedule: list[str] = []
        while len(schedule) < num_samples:
            schedule.extend(rng.sample(QTYPES, len(QTYPES)))
        return schedule[:num_samples]
    unknown = set(weights) - set(QTYPES)
    if unknown:
        raise ValueError(f"Unknown question types in qtype_weights: {sorted(unknown)}; choose from {QTYPES}.")
    values = [float(weights.get(q, 0.0)) for q in QTYPES]
    if any(v < 0 for v in values) or sum(values) <= 0:
        raise ValueError(f"qtype_weights must be non-negative with a positive sum, got {weights}.")
    return rng.choices(QTYPES, weights=values, k=num_samples)


def generate_split(
    split: Split,
    num_samples: int,
    seed: int = 0,
    image_size: int = 224,
    qtype_weights: dict[str, float] | None = None,
    *,
    grid: int = 3,
    min_objects: int = 2,
    max_objects: int = 4,
    max_tries: int = 10_000,
) -> list[VQASample]:
    """`num_samples` samples of one split; the same arguments always give identical images and texts.

    Question types are exactly balanced by default (shuffled blocks of `QTYPES`), or drawn with `qtype_weights`
    (missing types weigh 0). Scenes are drawn from a seed stream specific to `(seed, split)` and kept only when
    `scene_split` assigns them to `split`, so no scene appears in two splits.
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose one of {SPLITS}.")
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}.")
    rng = random.Random(_stable_int("vqa-split", seed, split))
    samples = []
    for qtype in _qtype_schedule(rng, num_samples, qtype_weights):
        for _ in range(max_tries):
            scene = random_scene(rng, grid=grid, min_objects=min_objects, max_objects=max_objects)
            if scene_split(scene) != split:
                continue
            question = make_question(rng, qtype, scene)
            if question is not None:
                break
        else:
            raise RuntimeError(f"No {qtype!r} question found for {split} scenes in {max_tries} tries.")
        answer = answer_question(question, scene, grid)
        image = render_scene(scene, image_size=image_size, grid=grid)
        samples.append(VQASample(image, question, answer, qtype, scene, grid))
    return samples


def answer_distribution(samples: Iterable[VQASample]) -> dict[str, dict[str, int]]:
    """Answer counts per question type: `{qtype: {answer: count}}` (keys sorted)."""
    counts: dict[str, Counter] = {}
    for sample in samples:
        counts.setdefault(sample.qtype, Counter())[sample.answer] += 1
    return {qtype: dict(sorted(counts[qtype].items())) for qtype in sorted(counts)}


# ------------------------------------------------------------------------------------------- encoding and scoring


def encode_for_training(
    processor, samples: Iterable[VQASample], with_answer: bool = True, instruction: str | None = INSTRUCTION
) -> Iterator[dict]:
    """Each sample as one batch-1 processor output (through the processor's chat template and image processing).

    With `with_answer`, the text holds the answer turn (training / teacher forcing); without, it ends with the
    generation prompt (evaluation: generate, then `score_answer`).
    """
    for sample in samples:
        text = processor.apply_chat_template(
            sample.messages(with_answer=with_answer, instruction=instruction),
            tokenize=False,
            add_generation_prompt=not with_answer,
        )
        yield dict(processor(text=[text], images=[sample.image], return_tensors="pt"))


_DIGITS = {str(i): word for i, word in enumerate(NUMBER_WORDS)}


def _normalize(text: str) -> str:
    words = text.strip().lower().split()
    word = words[0].strip(string.punctuation) if words else ""
    return _DIGITS.get(word, word)


def score_answer(predicted_text: str, answer: str) -> bool:
    """Exact match of the first word of `predicted_text` with `answer`, after lowercasing and stripping whitespace
    and surrounding punctuation (inner hyphens are kept: "Top-left." matches "top-left"); digits count as their
    number words ("2" matches "two")."""
    return _normalize(predicted_text) != "" and _normalize(predicted_text) == _normalize(answer)


def per_type_accuracy(samples: Sequence[VQASample], correct: Sequence[bool]) -> dict:
    """Accuracy overall and per question type of scored samples: `{"accuracy", "per_type", "counts"}`, the types in
    `QTYPES` order (types without samples left out; the accuracy of zero samples is `nan`)."""
    if len(samples) != len(correct):
        raise ValueError(f"{len(samples)} samples but {len(correct)} scores.")
    tally = Counter(sample.qtype for sample in samples)
    order = [qtype for qtype in QTYPES if qtype in tally] + sorted(set(tally) - set(QTYPES))
    right = Counter(sample.qtype for sample, ok in zip(samples, correct) if ok)
    return {
        "accuracy": sum(map(bool, correct)) / len(correct) if correct else math.nan,
        "per_type": {qtype: right[qtype] / tally[qtype] for qtype in order},
        "counts": {qtype: tally[qtype] for qtype in order},
    }


__all__ = [
    "ANSWERS",
    "COLORS",
    "INSTRUCTION",
    "NUMBER_WORDS",
    "POSITIONS",
    "QTYPES",
    "RELATIONS",
    "SHAPES",
    "SPLITS",
    "SPLIT_SHARES",
    "SceneObject",
    "VQASample",
    "answer_distribution",
    "answer_question",
    "encode_for_training",
    "generate_split",
    "make_question",
    "per_type_accuracy",
    "position_name",
    "random_scene",
    "relation_holds",
    "render_scene",
    "scene_key",
    "scene_split",
    "score_answer",
]
