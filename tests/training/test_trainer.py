"""The recovery Trainers: length-aware sampling of mixed text + image data, and the loss under gradient accumulation
(CPU, tiny random models)."""

import pytest
import torch
from transformers import TrainingArguments
from transformers.trainer_pt_utils import BatchRebalanceSampler

import hf_mla_vlm  # noqa: F401  (registers the MLA classes)
from hf_mla_vlm.conversion_scripts.convert import convert
from hf_mla_vlm.training.checkpoint import load_model
from hf_mla_vlm.training.data import ChatCollator, TextWindow, item_length
from hf_mla_vlm.training.distill import mixed_training_items
from hf_mla_vlm.training.finetune import finetune
from hf_mla_vlm.training.sources import ConversationDataset
from hf_mla_vlm.training.trainer import RecoveryTrainer
from hf_mla_vlm.zoo.vqa_data import generate_split
from tests.utils import load_native


def _mixed_items(processor, windows: int, conversations: int, seed: int = 0) -> list:
    """Short image conversations and text windows longer than any of them, shuffled together."""
    convs = [s.to_conversation() for s in generate_split("train", conversations, seed=3, image_size=56)]
    longest = max(item_length(processor, c) for c in convs)
    text = [TextWindow(tuple(range(5 + i, 5 + i + longest + 16))) for i in range(windows)]
    return mixed_training_items({"text": text, "vqa": convs}, [windows, conversations], windows + conversations, seed)


def _trainer(native, items, tmp_path, seed=0, **arguments) -> RecoveryTrainer:
    model, processor = load_native(native)
    args = TrainingArguments(output_dir=str(tmp_path / "ckpt"), use_cpu=True, report_to="none", seed=seed,
                             data_seed=seed, remove_unused_columns=False, **arguments)  # fmt: skip
    return RecoveryTrainer(model=model, args=args, train_dataset=ConversationDataset(items),
                           data_collator=ChatCollator(processor), processing_class=processor)  # fmt: skip


def test_item_length_is_the_collated_row_length(native_checkpoints):
    dataset = None  # one dataset measured with both processors: each gets its own lengths, not the cached ones
    for arch in ("llava_next", "qwen2_5_vl"):
        _, processor = load_native(native_checkpoints[arch])
        dataset = dataset or ConversationDataset(_mixed_items(processor, 1, 2))
        lengths = dataset.lengths(processor, progress=False)
        assert dataset.lengths(processor, progress=False) is lengths  # measured once per processor
        for item, length in zip(dataset.conversations, lengths, strict=True):
            assert ChatCollator(processor)([item])["input_ids"].shape[1] == length
    with pytest.raises(TypeError, match="Conversation or TextWindow"):
        item_length(processor, "a string")


def test_batch_rebalance_splits_each_step_by_length_and_keeps_its_samples(native_checkpoints, tmp_path):
    native = native_checkpoints["llava"]
    _, processor = load_native(native)
    items = _mixed_items(processor, 4, 12)
    lengths = ConversationDataset(items).lengths(processor, progress=False)
    trainer = _trainer(native, items, tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                       train_sampling_strategy="batch_rebalance")  # fmt: skip
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, BatchRebalanceSampler)
    micro = list(sampler)
    assert len(micro) == 4  # 2 steps of 2 micro-batches
    steps = [micro[i] + micro[i + 1] for i in (0, 2)]
    assert sorted(i for step in steps for i in step) == list(range(16))  # every sample once, 8 per step
    assert all(len(step) == 8 for step in steps)
    padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in micro)
    unsplit = sum(8 * max(lengths[i] for i in step) for step in steps)
    assert padded < 0.75 * unsplit, (padded, unsplit)  # the text windows no longer pad the conversations
    batches = list(trainer.get_train_dataloader())
    assert [b["input_ids"].shape for b in batches] == [(len(b), max(lengths[i] for i in b)) for b in micro]
    assert sum(int(b["attention_mask"].sum()) for b in batches) == sum(lengths)


def test_batch_rebalance_follows_the_data_seed(native_checkpoints, tmp_path):
    native = native_checkpoints["llava"]
    _, processor = load_native(native)
    items = _mixed_items(processor, 4, 12)
    settings = dict(
        per_device_train_batch_size=4, gradient_accumulation_steps=2, train_sampling_strategy="batch_rebalance"
    )
    orders = [
        list(_trainer(native, items, tmp_path, seed=seed, **settings)._get_train_sampler()) for seed in (0, 0, 1)
    ]
    assert orders[0] == orders[1] and orders[0] != orders[2]


@pytest.fixture(scope="module")
def stage2(native_checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer") / "llava-mla"
    convert(native_checkpoints["llava"], out, rope_dim=8, kv_rank=4, rope_strategy="uniform", progress=False)
    return out


@pytest.mark.parametrize(("objective", "label_weight"), [("sft", 0.0), ("distill", 0.0), ("distill", 0.5)])
def test_one_step_in_length_sorted_micro_batches_equals_one_batch(
    objective, label_weight, stage2, native_checkpoints, tmp_path
):
    """One SGD step over the same 8 samples, as one batch or as 2 micro-batches split by length: the same update
    (the step's loss is normalised by the labelled tokens of the whole step, label loss included)."""
    _, processor = load_native(native_checkpoints["llava"])
    items = _mixed_items(processor, 2, 6)
    teacher = native_checkpoints["llava"] if objective == "distill" else None
    common = dict(stage=2, objective=objective, teacher=teacher, label_weight=label_weight, learning_rate=0.5,
                  max_steps=1, warmup_ratio=0.0, decay_ratio=0.0, training_args={"optim": "sgd"},
                  return_model=True)  # fmt: skip
    whole = finetune(stage2, items, tmp_path / "whole", per_device_train_batch_size=8, gradient_accumulation_steps=1,
                     **common)  # fmt: skip
    split = finetune(stage2, items, tmp_path / "split", per_device_train_batch_size=4, gradient_accumulation_steps=2,
                     train_sampling_strategy="batch_rebalance", **common)  # fmt: skip
    assert split.report["settings"]["train_sampling_strategy"] == "batch_rebalance"
    before = load_model(stage2).state_dict()
    after = [r.model.state_dict() for r in (whole, split)]
    for name in whole.trainable_names:
        delta = [state[name] - before[name] for state in after]
        assert delta[0].abs().max() > 0, name
        torch.testing.assert_close(delta[1], delta[0], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("objective", ["sft", "distill"])
def test_training_forwards_build_no_kv_cache(objective, native_checkpoints, stage2, tmp_path, monkeypatch):
    """The recovery Trainers run the student (and the teacher) with `use_cache=False`: a model whose config says
    `use_cache` would build a `DynamicCache` in every training forward (and a converted model pack its latent rows
    into it and read them back)."""
    import transformers

    built = []
    init = transformers.DynamicCache.__init__
    monkeypatch.setattr(
        transformers.DynamicCache, "__init__", lambda self, *a, **k: built.append(1) or init(self, *a, **k)
    )
    _, processor = load_native(native_checkpoints["llava"])
    teacher = native_checkpoints["llava"] if objective == "distill" else None
    assert load_model(stage2).config.text_config.use_cache  # the saved configs ask for a cache
    finetune(stage2, _mixed_items(processor, 1, 3), tmp_path / "out", stage=2, objective=objective, teacher=teacher,
             per_device_train_batch_size=4, max_steps=2)  # fmt: skip
    assert built == []
