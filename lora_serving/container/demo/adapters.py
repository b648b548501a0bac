"""The demo's LoRA adapters: each trained with PEFT to answer plain prompts with its own task."""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from lora_serving.container.demo.recipe import ADAPTER_SCHEDULE, SEED, AdapterRecipe
from lora_serving.container.demo.training import train
from lora_serving.container.demo.training_data import adapter_example_sampler, batch_maker


def train_adapter(
    base_model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, recipe: AdapterRecipe
) -> PeftModel:
    """Train one adapter on a private copy of the base model, whose own weights stay untouched."""
    lora_config = LoraConfig(
        task_type="CAUSAL_LM",
        r=recipe.rank,
        lora_alpha=recipe.alpha,
        target_modules=list(recipe.target_modules),
        use_rslora=recipe.use_rslora,
        lora_dropout=0.0,
    )
    # get_peft_model wraps the modules it is given in place, hence the copy.
    torch.manual_seed(SEED)
    peft_model = get_peft_model(copy.deepcopy(base_model), lora_config)
    make_batch = batch_maker(tokenizer, adapter_example_sampler(recipe.name))
    train(peft_model.get_base_model(), make_batch, ADAPTER_SCHEDULE, seed=SEED)
    return peft_model
