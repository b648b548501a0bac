"""Which device and dtype a rank computes in, how many CPU threads it uses, and how many KV blocks fit."""

from __future__ import annotations

import logging

import torch

from lora_serving import handler
from lora_serving.handler.config import Config
from lora_serving.handler.cpu_dtype import auto_cpu_dtype
from lora_serving.handler.cpu_threads import CpuThreads
from lora_serving.handler.errors import ConfigError
from lora_serving.handler.models import LlamaModel
from lora_serving.handler.tp.devices import cpu_threads_per_rank

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Memory kept free on a GPU for activations and the sampler, beyond the KV cache.
CUDA_ACTIVATION_RESERVE_BYTES = 2 * 1024**3


def resolve_device(config: Config) -> torch.device:
    """Rank 0's device (with tensor parallelism rank i uses the i-th device from there)."""
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", config.device, "CUDA is not available on this machine")
    return torch.device(config.device)


def resolve_dtype(config: Config, device: torch.device) -> torch.dtype:
    name = config.torch_dtype_name
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else auto_cpu_dtype()
    return TORCH_DTYPES[name]


def cpu_thread_policy(config: Config, device: torch.device, world_size: int) -> CpuThreads | None:
    """The adaptive thread count for a CPU engine with cpu_threads=auto; a fixed count is set here once, and
    so is each tensor-parallel rank's share of the cores (the ranks must not fight over them)."""
    if device.type != "cpu":
        return None
    if not handler.OPENMP_WAIT_CHOSEN:
        logger.warning("torch was imported before handler with no OMP_WAIT_POLICY set: its OpenMP threads spin "
                       "for milliseconds after every op, taking the CPU from other threads. Import handler "
                       "first, or set OMP_WAIT_POLICY=PASSIVE GOMP_SPINCOUNT=%s", handler.GOMP_SPINCOUNT)
    if world_size > 1:
        torch.set_num_threads(cpu_threads_per_rank(config, world_size))
        return None
    if config.cpu_threads == "auto":
        return CpuThreads()
    torch.set_num_threads(int(config.cpu_threads))
    return None


def kv_bytes_per_token(model: LlamaModel) -> int:
    element_size = torch.empty((), dtype=model.dtype).element_size()
    return 2 * model.num_layers * model.num_kv_heads * model.head_dim * element_size


def auto_num_kv_blocks(config: Config, model: LlamaModel, max_model_len: int) -> int:
    """KV blocks for every running sequence at max_model_len, as many of them as the memory budget holds
    (gpu_memory_utilization of the GPU, or cpu_kv_cache_mb); at least one whole sequence must fit."""
    device = model.device
    per_block = kv_bytes_per_token(model) * config.block_size
    wanted_tokens = config.max_rolling_batch_size * max_model_len
    wanted_blocks = -(-wanted_tokens // config.block_size)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used = total - free
        budget = int(total * config.gpu_memory_utilization) - used - CUDA_ACTIVATION_RESERVE_BYTES
    else:
        budget = config.cpu_kv_cache_mb * 1024**2
    affordable = budget // per_block
    min_blocks = -(-max_model_len // config.block_size)
    if affordable < min_blocks:
        raise ConfigError(
            "gpu_memory_utilization" if device.type == "cuda" else "cpu_kv_cache_mb",
            config.gpu_memory_utilization if device.type == "cuda" else config.cpu_kv_cache_mb,
            f"leaves room for {affordable * config.block_size} KV tokens, less than one sequence of "
            f"max_model_len {max_model_len}",
        )
    return int(min(wanted_blocks, affordable))
