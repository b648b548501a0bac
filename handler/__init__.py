"""The engine: rolling batching over a paged KV cache, with unmerged multi-LoRA.

Public API: `Engine(model_dir, **options)`, `SamplingParams`, `Config`.
"""

from handler.config import Config
from handler.engine import Engine
from handler.sequence import FinishReason, GenerationResult, RequestOutput, SamplingParams, TokenOutput

__all__ = ["Config", "Engine", "FinishReason", "GenerationResult", "RequestOutput", "SamplingParams", "TokenOutput"]
