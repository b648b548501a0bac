"""The one training loop of the demo, used for the base model and for each LoRA adapter."""

from __future__ import annotations

import math
import random
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from transformers import LlamaForCausalLM

from lora_serving.container.demo.recipe import TrainingSchedule
from lora_serving.container.demo.training_data import IGNORED_LABEL, TokenBatch


@contextmanager
def single_cpu_thread() -> Iterator[None]:
    """Train on one CPU thread, restoring the caller's thread count afterwards.

    The demo's matrices are tiny: a second thread gains little on an idle machine, and on a shared one
    its waits made each step up to 30 times slower in our measurements. One thread also fixes the order
    of floating-point reductions, so the build gives the same weights whatever the machine's core count.
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous_threads)


def answer_loss(model: LlamaForCausalLM, batch: TokenBatch) -> torch.Tensor:
    """Cross-entropy on the answer tokens only; the LM head runs only where a label is."""
    hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    # Position t predicts token t + 1.
    next_labels = batch.labels[:, 1:]
    is_answer = next_labels != IGNORED_LABEL
    logits = model.lm_head(hidden[:, :-1][is_answer])
    return torch.nn.functional.cross_entropy(logits, next_labels[is_answer])


def warmup_cosine(schedule: TrainingSchedule) -> Callable[[int], float]:
    def learning_rate_factor(step: int) -> float:
        warmup = min(1.0, (step + 1) / schedule.warmup_steps)
        return warmup * 0.5 * (1.0 + math.cos(math.pi * step / schedule.steps))

    return learning_rate_factor


def train(
    model: LlamaForCausalLM,
    make_batch: Callable[[random.Random, int], TokenBatch],
    schedule: TrainingSchedule,
    seed: int,
) -> float:
    """Train the parameters of `model` that require grad; returns the last step's loss.

    For a PEFT model pass its underlying LlamaForCausalLM (`get_base_model()`): only the LoRA weights
    require grad there.
    """
    rng = random.Random(seed)
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=schedule.learning_rate, betas=(0.9, 0.98), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(schedule))
    model.train()
    for _ in range(schedule.steps):
        loss = answer_loss(model, make_batch(rng, schedule.batch_size))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
    model.eval()
    return loss.item()
