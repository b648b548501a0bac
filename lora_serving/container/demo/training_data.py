"""Training examples for the demo: (text, answer) pairs in the toy language, and their token batches."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import PreTrainedTokenizerFast

from lora_serving.container.demo.prompts import chat_prompt, instruction, plain_prompt
from lora_serving.container.demo.recipe import BASE_TASK_WEIGHTS, CHAT_SHARE
from lora_serving.container.demo.toy_language import TASKS, random_sentence

# Labels at prompt and padding positions: ignored by the loss.
IGNORED_LABEL = -100

# The text a user sends (made a prompt by `batch_maker`) and the answer to learn.
Example = tuple[str, str]
ExampleSampler = Callable[[random.Random], Example]


def base_model_example(rng: random.Random) -> Example:
    """A sentence answered by a copy, or a text naming a task answered by that task."""
    task = rng.choices(list(BASE_TASK_WEIGHTS), weights=list(BASE_TASK_WEIGHTS.values()))[0]
    sentence = random_sentence(rng)
    text = sentence if task == "copy" else instruction(task, sentence)
    return text, TASKS[task](sentence)


def adapter_example_sampler(task: str) -> ExampleSampler:
    """Sentences answered by `task`: what the adapter for that task must make the default."""

    def sample(rng: random.Random) -> Example:
        sentence = random_sentence(rng)
        return sentence, TASKS[task](sentence)

    return sample


def tokenizer_corpus(num_lines: int, seed: int) -> list[str]:
    """The base model's examples as text, so that each word of the toy language becomes one token."""
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        text, answer = base_model_example(rng)
        lines.append(plain_prompt(text) + answer)
    return lines


@dataclass(frozen=True)
class TokenBatch:
    input_ids: torch.Tensor  # [B, T], right-padded
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T]: the answer's tokens and EOS, IGNORED_LABEL elsewhere


def tokenize_prompts_and_answers(tokenizer: PreTrainedTokenizerFast, pairs: list[tuple[str, str]]) -> TokenBatch:
    """Prompt tokens as the server will make them (with BOS), then the answer's tokens and EOS.

    Prompt and answer are encoded apart so that the prompt's tokens are exactly those of a request for
    that prompt alone, whatever BPE would have merged across the boundary.
    """
    prompts = tokenizer([prompt for prompt, _ in pairs])["input_ids"]
    answers = tokenizer([answer for _, answer in pairs], add_special_tokens=False)["input_ids"]
    rows = [(prompt, answer + [tokenizer.eos_token_id]) for prompt, answer in zip(prompts, answers)]
    length = max(len(prompt) + len(answer) for prompt, answer in rows)
    input_ids, attention_mask, labels = [], [], []
    for prompt, answer in rows:
        padding = length - len(prompt) - len(answer)
        input_ids.append(prompt + answer + [tokenizer.pad_token_id] * padding)
        attention_mask.append([1] * (len(prompt) + len(answer)) + [0] * padding)
        labels.append([IGNORED_LABEL] * len(prompt) + answer + [IGNORED_LABEL] * padding)
    return TokenBatch(torch.tensor(input_ids), torch.tensor(attention_mask), torch.tensor(labels))


def batch_maker(
    tokenizer: PreTrainedTokenizerFast, sample_example: ExampleSampler
) -> Callable[[random.Random, int], TokenBatch]:
    """A function drawing a fresh batch of `sample_example`'s examples per training step, each text made
    a plain prompt or, CHAT_SHARE of them, a chat one."""

    def make_batch(rng: random.Random, batch_size: int) -> TokenBatch:
        pairs = []
        for _ in range(batch_size):
            text, answer = sample_example(rng)
            prompt = chat_prompt(tokenizer, text) if rng.random() < CHAT_SHARE else plain_prompt(text)
            pairs.append((prompt, answer))
        return tokenize_prompts_and_answers(tokenizer, pairs)

    return make_batch
