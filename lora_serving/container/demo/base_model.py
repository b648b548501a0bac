"""The demo's base model: a small Llama trained to copy plain prompts and to do each task when asked."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lora_serving.container.demo.recipe import BASE_SCHEDULE, MODEL_SHAPE, SEED
from lora_serving.container.demo.training import train
from lora_serving.container.demo.training_data import base_model_example, batch_maker


def train_base_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_SHAPE,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    train(model, batch_maker(tokenizer, base_model_example), BASE_SCHEDULE, seed=SEED)
    return model
