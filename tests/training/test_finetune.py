"""Two-stage recovery fine-tuning on the tiny random models (CPU, a few steps each)."""

import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainingArguments

import hf_mla_vlm  # noqa: F401  (registers the MLA classes)
from hf_mla_vlm import cli
from hf_mla_vlm.conversations import Conversation
from hf_mla_vlm.conversion_scripts.convert import convert
from hf_mla_vlm.errors import InputError
from hf_mla_vlm.tiny_models import QWEN_STYLE, TINY_ARCHS, tiny_image
from hf_mla_vlm.training.checkpoint import load_model, plain_model_from_state_dict, save_atomically
from hf_mla_vlm.training.data import IGNORE_INDEX, ChatCollator, assistant_spans
from hf_mla_vlm.training.finetune import check_stage, finetune
from hf_mla_vlm.training.trainable import (
    LoraSettings,
    apply_lora,
    apply_trainable_set,
    lora_target_modules,
    merge_lora,
    trainable_parameter_names,
)
from hf_mla_vlm.training.trainer import wsd_steps
from hf_mla_vlm.zoo.vqa_data import generate_split


# the module itself (a package attribute of the same name could be the function)
finetune_module = importlib.import_module("hf_mla_vlm.training.finetune")
END_OF_TURN = {arch: "<|im_end|>" if arch in QWEN_STYLE else "</s>" for arch in TINY_ARCHS}
LAYERS = (0, 1)  # tiny models: 2 decoder layers


@pytest.fixture(scope="module")
def converted(native_checkpoints, tmp_path_factory):
    """`{(arch, stage): folder}`: tiny LLaVA and Qwen2.5-VL in the stage-1 (partial_rope) and stage-2 (mla) forms."""
    root = tmp_path_factory.mktemp("finetune-sources")
    folders = {}
    for arch in ("llava", "qwen2_5_vl"):
        for stage, form in ((1, "partial_rope"), (2, "mla")):
            out = root / f"{arch}-{form}"
            convert(native_checkpoints[arch], out, rope_dim=8, kv_rank=8, rope_strategy="uniform", mla_stage=form,
                    progress=False)  # fmt: skip
            folders[arch, stage] = out
    return folders


def _fixed_conversations(n: int = 2) -> list[Conversation]:
    return [sample.to_conversation() for sample in generate_split("train", n, seed=3, image_size=56)]


def _logits(model, batch: dict) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return model.eval()(**inputs).logits


# Two short runs cover both stages, both named trainable sets and both positional schemes (1-D RoPE, M-RoPE).
RUNS = [("llava", 1, "paper"), ("qwen2_5_vl", 2, "official")]


@pytest.fixture(scope="module")
def runs(converted, tmp_path_factory):
    """A fixed batch of two conversations, repeated for 8 steps at a high learning rate, per case of `RUNS`."""
    root = tmp_path_factory.mktemp("finetune-runs")
    results = {}
    for arch, stage, trainable in RUNS:
        source = converted[arch, stage]
        before = {k: v.clone() for k, v in load_model(source).state_dict().items()}
        result = finetune(
            source, _fixed_conversations(), root / f"{arch}-stage{stage}", stage=stage, trainable=trainable,
            learning_rate=5e-3, per_device_train_batch_size=2, gradient_accumulation_steps=1, max_steps=8,
            logging_steps=1, return_model=True,
        )  # fmt: skip
        results[arch, stage, trainable] = (source, before, result)
    return results


@pytest.mark.parametrize("case", RUNS, ids=lambda case: f"{case[0]}-stage{case[1]}-{case[2]}")
def test_a_few_steps_lower_the_loss_on_a_repeated_batch(runs, case):
    losses = [entry["loss"] for entry in runs[case][2].report["training"]["losses"]]
    assert len(losses) == 8
    # the first step runs at learning rate 0 (warm-up), so the first logged loss is the untrained model's
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("case", RUNS, ids=lambda case: f"{case[0]}-stage{case[1]}-{case[2]}")
def test_frozen_parameters_are_bit_identical_and_trainable_ones_changed(runs, case):
    _, before, result = runs[case]
    trainable = set(result.trainable_names)
    after = result.model.state_dict()
    assert set(after) == set(before)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == trainable


@pytest.mark.parametrize("case", RUNS, ids=lambda case: f"{case[0]}-stage{case[1]}-{case[2]}")
def test_saved_folder_reloads_with_the_same_logits(runs, case):
    source, _, result = runs[case]
    out = result.output_dir
    assert (out / "finetune_report.json").is_file() and (out / "config.json").is_file()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no staging / checkpoint dirs
    config = json.loads((out / "config.json").read_text())
    assert config["mla_stage"] == ("partial_rope" if case[1] == 1 else "mla") and "AutoModel" in config["auto_map"]
    reloaded = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    assert type(reloaded) is type(result.model)
    batch = ChatCollator(AutoProcessor.from_pretrained(out))(_fixed_conversations())
    torch.testing.assert_close(_logits(reloaded, batch), _logits(result.model, batch), rtol=0, atol=1e-6)
    assert not torch.allclose(_logits(load_model(source), batch), _logits(result.model, batch))


@pytest.mark.parametrize("case", RUNS, ids=lambda case: f"{case[0]}-stage{case[1]}-{case[2]}")
def test_saved_folder_verifies_against_its_recorded_hashes(runs, case):
    from hf_mla_vlm.conversion_scripts.hub import verify_folder

    out = runs[case][2].output_dir
    files = json.loads((out / "finetune_report.json").read_text())["files"]
    data = (out / "model.safetensors").read_bytes()
    assert files["model.safetensors"] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert verify_folder(out) == []


@pytest.mark.parametrize("case", RUNS, ids=lambda case: f"{case[0]}-stage{case[1]}-{case[2]}")
def test_saved_folder_carries_the_conversion_report_and_a_card_that_pushes(runs, case):
    from hf_mla_vlm.conversion_scripts.hub import card_for_upload, card_problems, read_report

    source, _, result = runs[case]
    out, before = result.output_dir, read_report(source)
    report = read_report(out)
    assert report["kv_cache"] == before["kv_cache"] and report["settings"] == before["settings"]
    assert report["files"] == result.report["files"] != before["files"]  # the trained weights' digests
    [entry] = report["fine_tuning"]
    assert entry["stage"] == case[1] and entry["objective"] == "sft" and entry["steps"] == 8
    assert entry["tokens_seen"] == result.report["training"]["tokens_seen"] > 0
    card = (out / "README.md").read_text()
    assert card_problems(card, report) == [] and card_for_upload(out) == card
    form = {1: "partial_rope", 2: "mla"}[case[1]]  # the stage's number and the form it trains
    assert f"| {case[1]} ({form}) | sft | - | - | {result.report['settings']['data']} | 8 |" in card
    assert "No recovery fine-tuning" in (source / "README.md").read_text() and "No recovery fine-tuning" not in card


def test_conversion_of_a_fine_tuned_stage1_folder_keeps_its_fine_tuning(runs, tmp_path):
    from hf_mla_vlm.conversion_scripts.hub import read_report

    stage1 = runs["llava", 1, "paper"][2].output_dir
    out = convert(stage1, tmp_path / "mla", kv_rank=8, mla_stage="mla", progress=False).output_dir
    assert read_report(out)["fine_tuning"] == read_report(stage1)["fine_tuning"]
    assert "| 1 (partial_rope) | sft |" in (out / "README.md").read_text()
    plain = runs["llava", 1, "paper"][0]  # a stage-1 conversion that was never fine-tuned: nothing to carry
    assert "fine_tuning" not in read_report(plain)


def test_a_broken_source_report_is_refused_before_training(converted, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(converted["llava", 1], source)
    (source / "mla_conversion_report.json").write_text("{not json")
    with pytest.raises(InputError, match="unreadable"):
        finetune(source, _fixed_conversations(), tmp_path / "out", stage=1, max_steps=1)
    assert not (tmp_path / "out").exists()


def test_report_counts_and_schedule(runs):
    report = runs["llava", 1, "paper"][2].report
    params = report["parameters"]
    # paper stage 1 on the tiny LLaVA: 2 layers x (q 128x128 + k_rope 16x128 + k_nope 48x128), no biases
    assert params["trainable"] == params["set_parameters"] == 2 * (128 + 16 + 48) * 128
    assert params["trainable_fraction"] == pytest.approx(params["trainable"] / params["total"])
    assert params["by_rule"]["k_rope_proj"] == {"tensors": 2, "parameters": 2 * 16 * 128}
    schedule = report["settings"]["schedule"]
    assert schedule == {
        "type": "warmup_stable_decay", "total_steps": 8, "warmup_steps": 1, "stable_steps": 6, "decay_steps": 1,
        "decay_type": "1-sqrt",
    }  # fmt: skip
    rates = [entry["learning_rate"] for entry in report["training"]["losses"]]
    assert rates[0] == 0.0 and rates[1:] == [5e-3] * 7  # one decay step starts at 1 - sqrt(0) = 1
    assert report["training"]["tokens_seen"] > 0 and report["environment"]["peft"]


@pytest.mark.parametrize("total, expected", [(20, (2, 16, 2)), (100, (10, 80, 10)), (7, (1, 5, 1))])
def test_warmup_stable_decay_follows_the_official_schedule(tmp_path, total, expected):
    """Transformers' warmup_stable_decay (5.17 and 5.23) with our step counts = the official lr_scheduler.py:
    linear warm-up, constant, then 1 - sqrt decay to 0."""
    assert wsd_steps(total, 0.1, 0.1) == expected
    args = TrainingArguments(
        output_dir=str(tmp_path), learning_rate=1.0, warmup_steps=0.1, lr_scheduler_type="warmup_stable_decay",
        lr_scheduler_kwargs={"decay_type": "1-sqrt"}, report_to="none", use_cpu=True,
    )  # fmt: skip
    trainer = finetune_module.RecoveryTrainer(model=torch.nn.Linear(2, 2), args=args, decay_ratio=0.1)
    trainer.create_optimizer_and_scheduler(num_training_steps=total)
    warmup, stable, decay = expected
    for step in range(total):
        if step < warmup:
            want = step / warmup
        elif step < warmup + stable:
            want = 1.0
        else:
            want = 1.0 - ((step - warmup - stable) / decay) ** 0.5
        assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(want), step
        trainer.optimizer.step()
        trainer.lr_scheduler.step()


def _attention_names(stage: int, projections: tuple[str, ...], biases: bool = False) -> set[str]:
    kinds = ("weight", "bias") if biases else ("weight",)
    prefix = "model.language_model.layers"
    return {f"{prefix}.{i}.self_attn.{proj}.{kind}" for i in LAYERS for proj in projections for kind in kinds}


def test_trainable_sets_select_exactly_the_expected_llava_parameters(converted):
    layer_norms = ("input_layernorm", "post_attention_layernorm")
    norms = {f"model.language_model.layers.{i}.{n}.weight" for i in LAYERS for n in layer_norms}
    norms.add("model.language_model.norm.weight")
    projector = {f"model.multi_modal_projector.linear_{i}.{kind}" for i in (1, 2) for kind in ("weight", "bias")}
    stage1 = load_model(converted["llava", 1])
    stage2 = load_model(converted["llava", 2])

    def selected(model, stage, trainable):
        return {name for names in trainable_parameter_names(model, stage, trainable).values() for name in names}

    assert selected(stage1, 1, "paper") == _attention_names(1, ("q_proj", "k_rope_proj", "k_nope_proj"))
    official = _attention_names(1, ("q_proj", "k_nope_proj", "v_proj")) | norms | projector
    assert selected(stage1, 1, "official") == official
    mla = ("q_proj", "k_rope_proj", "kv_a_proj.text", "kv_a_proj.image", "kv_b_proj.text", "kv_b_proj.image")
    assert selected(stage2, 2, "paper") == _attention_names(2, (*mla, "o_proj"))
    assert selected(stage2, 2, "official") == _attention_names(2, (*mla, "o_proj")) | norms | projector
    assert selected(stage2, 2, [r"\.o_proj\.", r"^lm_head\."]) == _attention_names(2, ("o_proj",)) | {"lm_head.weight"}

    apply_trainable_set(stage2, sorted(selected(stage2, 2, "paper")))
    assert {n for n, p in stage2.named_parameters() if p.requires_grad} == selected(stage2, 2, "paper")
    with pytest.raises(ValueError, match="matches no parameter"):
        trainable_parameter_names(stage2, 2, [r"k_nope_proj"])  # a stage-1 projection on a stage-2 model
    with pytest.raises(ValueError, match="trainable must be one of"):
        trainable_parameter_names(stage2, 2, "everything")


def test_qwen_trainable_sets_include_biases_and_the_merger(converted):
    model = load_model(converted["qwen2_5_vl", 1])
    paper = trainable_parameter_names(model, 1, "paper")
    assert set(paper["q_proj"]) == _attention_names(1, ("q_proj",), biases=True)
    official = trainable_parameter_names(model, 1, "official")
    assert official["aligner"] and all(name.startswith("model.visual.merger.") for name in official["aligner"])


def test_stage_must_match_the_checkpoint_form(converted, native_checkpoints):
    assert check_stage(converted["llava", 1], 1).mla_stage == "partial_rope"
    with pytest.raises(ValueError, match="mla_stage='partial_rope'"):
        check_stage(converted["llava", 2], 1)
    with pytest.raises(ValueError, match="mla_stage='mla'"):
        check_stage(converted["qwen2_5_vl", 1], 2)
    with pytest.raises(ValueError, match="hf-mla-vlm convert .* --stage partial_rope"):
        check_stage(native_checkpoints["llava"], 1)


def test_lora_merge_equals_the_adapter_model_and_rejects_nan(converted):
    source = converted["llava", 2]
    batch = ChatCollator(AutoProcessor.from_pretrained(source))(_fixed_conversations())
    model = load_model(source)
    names = [n for names in trainable_parameter_names(model, 2, "paper").values() for n in names]
    apply_trainable_set(model, names)
    peft_model = apply_lora(model, names, LoraSettings(r=4, alpha=8))
    adapters = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert adapters and all("lora_" in n for n in adapters)  # paper stage 2: only linear layers, all adapted
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # LoRA starts as a no-op (B = 0): give it an effect to merge
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    state = {k: v.clone() for k, v in peft_model.state_dict().items()}
    expected = _logits(peft_model, batch)
    assert not torch.allclose(expected, _logits(load_model(source), batch))

    merged = merge_lora(peft_model)
    assert type(merged) is type(load_model(source)) and not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, batch), expected, rtol=0, atol=1e-5)
    # the FSDP / ZeRO-3 path: rebuild from a gathered state dict, then merge
    rebuilt = plain_model_from_state_dict(source, state, names, LoraSettings(r=4, alpha=8))
    torch.testing.assert_close(_logits(rebuilt, batch), expected, rtol=0, atol=1e-5)

    o_proj = LoraSettings(r=2, target_modules=[r"\.o_proj$"])
    assert lora_target_modules(load_model(source), names, o_proj) == [
        f"model.language_model.layers.{i}.self_attn.o_proj" for i in LAYERS
    ]
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        lora_target_modules(load_model(source), names, LoraSettings(target_modules=["k_nope_proj"]))

    poisoned = apply_lora(load_model(source), names, LoraSettings(r=4))
    with torch.no_grad():
        next(p for n, p in poisoned.named_parameters() if "lora_B" in n).fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        merge_lora(poisoned)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_collator_labels_only_the_assistant_answers(native_checkpoints, arch):
    processor = AutoProcessor.from_pretrained(native_checkpoints[arch])
    tokenizer = processor.tokenizer
    eot = END_OF_TURN[arch]

    def ask(question, answer, image=True):
        content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
        return [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]

    single = [
        Conversation(ask("what is the image ?", "blue"), [tiny_image(0)]),
        Conversation(ask("what is left of the red circle ?", "a green square"), [tiny_image(1, (56, 30))]),
    ]
    batch = ChatCollator(processor)(single)
    assert "position_ids" not in batch  # Qwen2.5-VL computes M-RoPE positions from the grid itself
    for row, answer in enumerate(["blue", "a green square"]):
        labels = batch["labels"][row]
        assert tokenizer.decode(labels[labels != IGNORE_INDEX]) == f"{answer} {eot}"
        padding = batch["attention_mask"][row] == 0
        assert (labels[padding] == IGNORE_INDEX).all()
    assert batch["attention_mask"][:, 0].all()  # right padding

    messages = ask("what is this ?", "a cat") + ask("what is the image ?", "red", image=False)
    two_turns = Conversation(messages, [tiny_image(2)])
    encoded, spans = assistant_spans(processor, two_turns)
    ids = encoded["input_ids"][0]
    assert [tokenizer.decode(ids[start:end]) for start, end in spans] == [f"a cat {eot}", f"red {eot}"]
    labels = ChatCollator(processor)([two_turns])["labels"][0]
    assert tokenizer.decode(labels[labels != IGNORE_INDEX]) == f"a cat {eot} red {eot}"


@pytest.mark.parametrize("stage", [1, 2])
def test_qwen_training_forward_uses_3d_mrope_positions(converted, stage):
    """The position ids reaching the rotary embedding in a training forward are `get_rope_index`'s 3-D M-RoPE ids
    from the image grid, not 1-D text positions (the official training hook loses them, method.md §7.9)."""
    source = converted["qwen2_5_vl", stage]
    processor = AutoProcessor.from_pretrained(source)
    conversations = _fixed_conversations(2)
    conversations[1].images[0] = conversations[1].images[0].resize((112, 56))  # another grid, another length
    batch = ChatCollator(processor)(conversations)
    model = load_model(source).train()
    seen = []
    rotary = model.model.language_model.rotary_emb

    def record(module, args, kwargs):
        seen.append(args[1] if len(args) > 1 else kwargs["position_ids"])

    handle = rotary.register_forward_pre_hook(record, with_kwargs=True)
    try:
        model(**batch).loss.backward()
    finally:
        handle.remove()
    expected, _ = model.model.get_rope_index(
        batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"],
    )  # fmt: skip
    assert len(seen) == 1 and seen[0].shape == (3, *batch["input_ids"].shape)
    assert torch.equal(seen[0], expected)
    image = batch["input_ids"] == model.config.image_token_id
    assert (expected[1][image] != expected[2][image]).any()  # height and width differ on image tokens


def test_two_process_torchrun_ranks_agree(converted, tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(
        textwrap.dedent(
            """
            import hashlib, os, sys
            import torch
            from hf_mla_vlm.training.finetune import finetune

            source, out = sys.argv[1], sys.argv[2]
            result = finetune(source, "zoo-vqa", out, stage=1, num_samples=4, image_size=56, learning_rate=1e-3,
                              per_device_train_batch_size=1, gradient_accumulation_steps=1, max_steps=2,
                              logging_steps=1, return_model=True)
            params = dict(result.model.named_parameters())
            digest = hashlib.sha256()
            for name in result.trainable_names:
                digest.update(params[name].detach().numpy().tobytes())
            rank = os.environ["RANK"]
            backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
            with open(os.path.join(os.path.dirname(out), f"rank{rank}.txt"), "w") as f:
                f.write(f"{digest.hexdigest()} {result.report['settings']['world_size']} {backend}")
            """
        )
    )
    source = converted["llava", 1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(worker), str(source), str(tmp_path / "out")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [(tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1)]
    assert ranks[0] == ranks[1] and ranks[0][1:] == ["2", "gloo"]
    report = json.loads((tmp_path / "out" / "finetune_report.json").read_text())
    assert report["settings"]["world_size"] == 2 and report["settings"]["global_batch_size"] == 2
    untrained = load_model(source)
    params = dict(untrained.named_parameters())
    digest = hashlib.sha256()
    for names in trainable_parameter_names(untrained, 1, "paper").values():
        for name in names:
            digest.update(params[name].detach().numpy().tobytes())
    assert digest.hexdigest() != ranks[0][0]  # the parameters did train


def test_interrupted_save_leaves_no_folder_that_looks_complete(converted, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune_module, "merge_lora", fail)  # after training, before saving
    with pytest.raises(KeyboardInterrupt):
        finetune(converted["llava", 2], _fixed_conversations(1), tmp_path / "out", stage=2, max_steps=1,
                 per_device_train_batch_size=1, gradient_accumulation_steps=1, lora=LoraSettings(r=2))  # fmt: skip
    assert not (tmp_path / "out").exists()
    model = load_model(converted["llava", 2])
    staging = tmp_path / ".out.incomplete"

    class BrokenProcessor:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_atomically(model, BrokenProcessor(), {}, tmp_path / "out", torch.float32)
    assert not (tmp_path / "out").exists() and not staging.exists()


def test_a_full_disk_while_replacing_an_output_keeps_the_old_one(converted, tmp_path, capsys):
    """--overwrite of an earlier fine-tuning output on a disk that fills up: the old output stays complete."""
    import errno

    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"the earlier output")

    class FullDisk:
        def save_pretrained(self, path):
            (path / "tokenizer.json").write_text("{")
            raise OSError(errno.ENOSPC, "No space left on device", str(path / "tokenizer.json"))

    with pytest.raises(OSError, match="No space left"):
        save_atomically(load_model(converted["llava", 2]), FullDisk(), {}, out, torch.float32)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "model.safetensors").read_bytes() == (
        b"the earlier output"
    )


def test_finetune_cli_two_steps_with_lora_from_a_json(converted, native_checkpoints, tmp_path, capsys):
    rows = []
    for i, (question, answer) in enumerate([("what is the image ?", "a red circle ."), ("what is this ?", "a dog")]):
        tiny_image(i).save(tmp_path / f"{i}.png")
        turns = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]
        rows.append({"image": f"{i}.png", "conversations": turns})
    data = tmp_path / "data.json"
    data.write_text(json.dumps(rows))
    out = tmp_path / "stage1"
    args = ["finetune", str(converted["llava", 1]), "--stage", "1", "--data", str(data), "--out", str(out)]
    args += ["--max-steps", "2", "--batch-size", "1", "--grad-accum", "2", "--lr", "1e-3", "--lora-r", "4"]
    assert cli.main(args + ["--logging-steps", "1", "--trainable", "official"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "2 steps" in printed
    report = json.loads((out / "finetune_report.json").read_text())
    assert report["settings"]["lora"]["r"] == 4 and report["settings"]["lora"]["alpha"] == 8
    assert report["settings"]["trainable"] == "official" and report["settings"]["global_batch_size"] == 2
    assert report["settings"]["num_conversations"] == 2 and report["training"]["steps"] == 2
    reloaded = dict(AutoModelForImageTextToText.from_pretrained(out).named_parameters())
    source = dict(load_model(converted["llava", 1]).named_parameters())
    assert reloaded.keys() == source.keys()  # plain weights, adapters merged
    attention = "model.language_model.layers.0.self_attn"
    for name in ("model.language_model.norm.weight", f"{attention}.q_proj.weight"):  # trained directly / via LoRA
        assert not torch.equal(reloaded[name], source[name]), name
    for name in (f"{attention}.k_rope_proj.weight", f"{attention}.o_proj.weight"):  # frozen in official stage 1
        assert torch.equal(reloaded[name], source[name]), name

    bad = ["finetune", str(native_checkpoints["llava"]), "--stage", "1", "--out", str(tmp_path / "x")]
    assert cli.main(bad) == 2
    assert "--stage partial_rope" in capsys.readouterr().err
