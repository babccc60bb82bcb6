# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""The recovery `Trainer`s: warmup-stable-decay sized from the real number of steps, and self-distillation.

`RecoveryTrainer` is a stock `transformers.Trainer` whose warmup-stable-decay schedule (linear warm-up, constant,
`1 - sqrt` decay, the official recipe) takes its warm-up and decay lengths from the Trainer's real number of
optimizer steps, and whose length-aware samplers (`train_sampling_strategy="batch_rebalance"` or
`"group_by_length"`) read the lengths of a `ConversationDataset` (the Trainer infers them only from items that are
dicts with `input_ids`).

`DistillationTrainer` replaces the label loss with `T^2 * KL(teacher || student)` of the next-token
distributions at every labelled position (`hf_mla_vlm.training.distill`), the teacher being the original model.
"""

import math
import time

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import BatchRebalanceSampler, LengthGroupedSampler
from transformers.trainer_utils import SchedulerType

from .distill import distillation_kl, distilled_positions
from .sources import ConversationDataset


LENGTH_AWARE_SAMPLING = ("batch_rebalance", "group_by_length")


def wsd_steps(total_steps: int, warmup: int | float, decay_ratio: float) -> tuple[int, int, int]:
    """(warm-up, stable, decay) optimizer steps of a warmup-stable-decay schedule over `total_steps`.

    `warmup` is a step count (>= 1) or a ratio (< 1), as `TrainingArguments.warmup_steps`; ratios give
    `ceil(ratio * total_steps)` steps. Decay takes `ceil(decay_ratio * total_steps)` steps, clipped to what warm-up
    leaves."""
    warmup = int(warmup) if warmup >= 1 else math.ceil(total_steps * warmup)
    decay = min(math.ceil(total_steps * decay_ratio), max(total_steps - warmup, 0))
    return warmup, total_steps - warmup - decay, decay


class RecoveryTrainer(Trainer):
    """`Trainer` that sizes the warmup-stable-decay schedule from the real number of optimizer steps and gives its
    length-aware samplers the lengths of a `ConversationDataset`.

    With `train_sampling_strategy="batch_rebalance"` and `gradient_accumulation_steps=k`, each optimizer step takes
    `per_device_train_batch_size * k` samples, sorts them by length and splits them into `k` micro-batches of
    varying size (Transformers' `BatchRebalanceSampler`): a step that mixes 512-token text windows with short image
    conversations no longer pads every conversation to 512 tokens. The loss of the step is the same (the Trainer
    normalises it by the labelled tokens of the whole step), only the padding goes.
    """

    def __init__(self, *args, decay_ratio: float = 0.1, **kwargs):
        super().__init__(*args, **kwargs)
        self.decay_ratio = decay_ratio
        self.schedule: dict = {}

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if (
            self.lr_scheduler is None
            and SchedulerType(self.args.lr_scheduler_type) == SchedulerType.WARMUP_STABLE_DECAY
        ):
            kwargs = dict(self.args.lr_scheduler_kwargs or {})
            warmup = self.args.get_warmup_steps(num_training_steps)
            if "num_decay_steps" not in kwargs:
                kwargs["num_decay_steps"] = wsd_steps(num_training_steps, warmup, self.decay_ratio)[2]
            kwargs.setdefault("decay_type", "1-sqrt")
            self.args.lr_scheduler_kwargs = kwargs
            stable = num_training_steps - warmup - kwargs["num_decay_steps"]
            self.schedule = {
                "type": "warmup_stable_decay",
                "total_steps": num_training_steps,
                "warmup_steps": warmup,
                "stable_steps": stable,
                "decay_steps": kwargs["num_decay_steps"],
                "decay_type": kwargs["decay_type"],
            }
        elif not self.schedule:
            self.schedule = {
                "type": SchedulerType(self.args.lr_scheduler_type).value,
                "total_steps": num_training_steps,
            }
        return super().create_scheduler(num_training_steps, optimizer)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # A training forward has no use for a KV cache, but a model whose config says `use_cache` builds one (a
        # `DynamicCache` per forward; a converted model packs its latent rows into it and reads them back).
        return super().compute_loss(model, {**inputs, "use_cache": False}, return_outputs, num_items_in_batch)

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        strategy = self.args.train_sampling_strategy
        if strategy not in LENGTH_AWARE_SAMPLING or not isinstance(dataset, ConversationDataset):
            return super()._get_train_sampler(train_dataset)
        lengths = dataset.lengths(
            self.processing_class,
            num_workers=self.args.dataloader_num_workers,
            progress=not self.args.disable_tqdm and self.is_local_process_zero(),
        )
        step_batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
        if strategy == "group_by_length":
            return LengthGroupedSampler(step_batch, lengths=lengths)
        world = max(1, self.args.world_size)
        return BatchRebalanceSampler(
            lengths=lengths,
            effective_batch_size=step_batch * world,
            dp_size=world,
            grad_accum=self.args.gradient_accumulation_steps,
            # the run's data seed (Transformers passes none: every seed would see the same order)
            seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
            rank=self.args.process_index if world > 1 else 0,
            drop_last=self.args.dataloader_drop_last,
        )


class DistillationTrainer(RecoveryTrainer):
    """`RecoveryTrainer` whose loss is self-distillation from `teacher` (frozen, moved to the training device on
    first use), plus `label_weight` times the label loss. Batches come from `ChatCollator(labels="all")`: the
    distilled positions are those followed by a label.

    The teacher runs under the same mixed precision as the student (`Accelerator.autocast`).

    The KL is summed over the distilled positions and divided by their number in the micro-batch, or, where the
    Trainer passes the number of labelled tokens of the whole accumulated batch and does not rescale the loss
    itself, by that number: each distilled position weighs the same under gradient accumulation and DDP.
    """

    def __init__(self, *args, teacher: torch.nn.Module, temperature: float = 1.0, label_weight: float = 0.0, **kw):
        super().__init__(*args, **kw)
        if temperature <= 0 or label_weight < 0:
            raise ValueError(f"temperature must be > 0 and label_weight >= 0, got {temperature}, {label_weight}.")
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature = temperature
        self.label_weight = label_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        mask = distilled_positions(labels)
        model_inputs = {k: v for k, v in inputs.items() if k != "labels" or self.label_weight > 0}
        model_inputs["use_cache"] = False  # as in `RecoveryTrainer.compute_loss`
        scaled = num_items_in_batch is not None and self.model_accepts_loss_kwargs
        if self.label_weight > 0 and scaled:
            # the label loss summed over this micro-batch and divided by the step's labelled tokens, as the stock
            # Trainer asks the model for (the Trainer then no longer divides by the accumulation steps)
            model_inputs["num_items_in_batch"] = num_items_in_batch
        outputs = model(**model_inputs)
        device = outputs.logits.device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        # in the student's precision: under `bf16` / `fp16` Accelerate runs the prepared student in autocast, and
        # the teacher, which is not prepared, would otherwise run its matmuls and attention in float32
        with torch.no_grad(), self.accelerator.autocast():
            teacher_inputs = {k: v for k, v in inputs.items() if k != "labels"}
            teacher_logits = self.teacher(**teacher_inputs, use_cache=False).logits
        kl = distillation_kl(outputs.logits, teacher_logits, mask.to(device), self.temperature)
        if scaled:
            loss = kl / num_items_in_batch  # the Trainer leaves this loss unscaled for gradient accumulation
        else:
            loss = kl / mask.sum().clamp_min(1)
        if self.label_weight > 0:
            loss = loss + self.label_weight * outputs.loss
        return (loss, outputs) if return_outputs else loss


class TimingCallback(TrainerCallback):
    """Wall time of `Trainer.train` (`seconds`)."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        self.seconds = time.perf_counter() - self.started


__all__ = ["LENGTH_AWARE_SAMPLING", "DistillationTrainer", "RecoveryTrainer", "TimingCallback", "wsd_steps"]
