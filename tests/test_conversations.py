"""Conversation sources (`hf_mla_vlm.conversations`): unusable inputs fail with a sentence naming the file and the
fix."""

import json
import shutil

import pytest

from hf_mla_vlm.conversations import builtin_conversations, encode_conversations, load_conversations, load_processor
from hf_mla_vlm.errors import InputError


def _rows(tmp_path, count=2):
    rows = []
    for i, conversation in enumerate(builtin_conversations(count, seed=3)):
        conversation.images[0].save(tmp_path / f"img{i}.png")
        rows.append({"image": f"img{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is there?"}, {"from": "gpt", "value": "shapes"}]})  # fmt: skip
    return rows


def test_malformed_json_names_the_file_and_the_place(tmp_path):
    data = tmp_path / "calib.json"
    data.write_text('[{"image": "a.png", "conversations": [}]')
    with pytest.raises(InputError, match=rf"Calibration file {data} is not valid JSON \(.* at line 1, column 39\)"):
        load_conversations(data, 1)
    data.write_text('{"image": "a.png"}')
    with pytest.raises(InputError, match=rf"{data} must hold a JSON list of conversations, not a dict"):
        load_conversations(data, 1)
    data.write_bytes(b'["\xff\xfe"]')
    with pytest.raises(InputError, match="is not UTF-8 text"):
        load_conversations(data, 1)


def test_a_bad_row_names_the_file_and_the_conversation(tmp_path):
    data = tmp_path / "calib.json"
    data.write_text(json.dumps([{"image": "a.png", "text": "no conversation"}]))
    with pytest.raises(InputError, match=rf"Calibration source {data}, conversation 0: .*neither 'conversations'"):
        load_conversations(data, 1)
    data.write_text(json.dumps([{"conversations": [{"from": "robot", "value": "hi"}]}]))
    with pytest.raises(InputError, match="conversation 0: Unknown conversation role"):
        load_conversations(data, 1)


@pytest.mark.parametrize("content", [b"this is not a picture", "truncated"])
def test_an_image_that_is_not_an_image_names_the_file(tmp_path, content):
    rows = _rows(tmp_path)
    bad = tmp_path / "img1.png"
    bad.write_bytes(content if isinstance(content, bytes) else bad.read_bytes()[:60])
    data = tmp_path / "calib.json"
    data.write_text(json.dumps(rows))
    with pytest.raises(InputError, match=rf"Calibration image {bad} is not an image PIL can read .* replace it"):
        load_conversations(data, 2)


@pytest.fixture
def no_template(native_checkpoints, tmp_path):
    folder = shutil.copytree(native_checkpoints["llava"], tmp_path / "no-template")
    (folder / "chat_template.jinja").unlink()
    return folder


def test_a_processor_without_chat_template_asks_for_one(no_template, native_checkpoints, tmp_path):
    with pytest.raises(InputError, match="has no chat template .* --chat-template FILE"):
        load_processor(no_template)
    with pytest.raises(FileNotFoundError, match="Chat template file .* not found"):
        load_processor(no_template, tmp_path / "absent.jinja")
    template = native_checkpoints["llava"] / "chat_template.jinja"
    processor = load_processor(no_template, template)
    assert processor.chat_template == template.read_text()
    assert len(list(encode_conversations(processor, builtin_conversations(1)))) == 1


def test_a_broken_chat_template_is_named(native_checkpoints, tmp_path):
    template = tmp_path / "broken.jinja"
    template.write_text("{% for message in messages %}{{ message['role'] }")
    processor = load_processor(native_checkpoints["llava"], template)
    with pytest.raises(InputError, match="chat template cannot render a calibration conversation .* --chat-template"):
        list(encode_conversations(processor, builtin_conversations(1)))


def test_zoo_vqa_source_is_the_train_split_of_the_zoo_task():
    from hf_mla_vlm.zoo.vqa_data import generate_split

    conversations = load_conversations("zoo-vqa", 5, seed=2)
    train = [s.to_conversation() for s in generate_split("train", 5, seed=2, image_size=224)]
    assert len(conversations) == 5 and all(c.images for c in conversations)
    assert [c.messages for c in conversations] == [c.messages for c in train]
