"""Real PEFT LoRA adapters for the tests, made and saved by PEFT itself, and PEFT as the reference."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from tests.models import reference_model

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_peft_adapter(base_dir: Path, out_dir: Path, *, r: int = 8, alpha: float = 16, targets=None,
                      use_rslora: bool = False, rank_pattern=None, alpha_pattern=None, seed: int = 0,
                      weight_scale: float = 1.0, target_parameters=None) -> Path:
    """Random (non-zero) LoRA weights on the base model's projections, saved with save_pretrained."""
    base = reference_model(base_dir)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets or ALL_PROJECTIONS, use_rslora=use_rslora,
                        rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {},
                        target_parameters=target_parameters, init_lora_weights=False, task_type="CAUSAL_LM")
    torch.manual_seed(seed)
    peft_model = get_peft_model(_fresh_copy(base_dir), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.mul_(weight_scale)
    peft_model.save_pretrained(str(out_dir))
    del base
    return out_dir


def _fresh_copy(base_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)


@functools.lru_cache(maxsize=16)
def peft_reference(base_dir: Path, adapter_dir: Path):
    return PeftModel.from_pretrained(_fresh_copy(base_dir), str(adapter_dir)).eval()


def peft_greedy(base_dir: Path, adapter_dir: Path | None, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """What PEFT generates greedily for this prompt with this adapter alone (None: the base model)."""
    model = reference_model(base_dir) if adapter_dir is None else peft_reference(base_dir, adapter_dir)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=2)
    return out[0, len(prompt_ids):].tolist()
