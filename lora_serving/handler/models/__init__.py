"""Model families the engine runs, chosen from the checkpoint's config.json."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig

from lora_serving.handler.errors import ModelLoadError
from lora_serving.handler.models.gemma import Gemma2Model, Gemma3TextModel
from lora_serving.handler.models.llama import LORA_GROUPS, LlamaModel
from lora_serving.handler.models.mistral import MistralModel
from lora_serving.handler.models.moe import MixtralModel, Qwen3MoeModel
from lora_serving.handler.models.phi3 import Phi3Model
from lora_serving.handler.models.qwen2 import Qwen2Model
from lora_serving.handler.models.qwen3 import Qwen3Model
from lora_serving.handler.tp.comm import TensorParallelComm
from lora_serving.handler.tp.plan import ShardingPlan

MODEL_FAMILIES: dict[str, type[LlamaModel]] = {
    "llama": LlamaModel,
    "mistral": MistralModel,
    "qwen2": Qwen2Model,
    "qwen3": Qwen3Model,
    "gemma2": Gemma2Model,
    "gemma3_text": Gemma3TextModel,
    "phi3": Phi3Model,
    "mixtral": MixtralModel,
    "qwen3_moe": Qwen3MoeModel,
}

__all__ = ["LORA_GROUPS", "LlamaModel", "MODEL_FAMILIES", "load_hf_config", "load_model"]


def load_hf_config(model_dir: str | Path, trust_remote_code: bool = False):
    """The checkpoint's config, refused at once (before anything reads its shapes) if no family here runs it."""
    if not (Path(model_dir) / "config.json").is_file():
        raise ModelLoadError(f"no config.json in model directory {model_dir}")
    hf_config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    family_of(hf_config)
    return hf_config


def family_of(hf_config) -> type[LlamaModel]:
    family = MODEL_FAMILIES.get(hf_config.model_type)
    if family is None:
        raise ModelLoadError(
            f"unsupported architecture {hf_config.model_type!r} "
            f"({', '.join(getattr(hf_config, 'architectures', None) or [])}); "
            f"supported: {', '.join(sorted(MODEL_FAMILIES))}"
        )
    return family


def load_model(model_dir: str | Path, hf_config, dtype: torch.dtype, device: torch.device,
               plan: ShardingPlan | None = None, comm: TensorParallelComm | None = None) -> LlamaModel:
    """The whole model, or with a sharding plan and its rank's collectives, that rank's shard."""
    return family_of(hf_config)(hf_config, model_dir, dtype, device, plan, comm)
