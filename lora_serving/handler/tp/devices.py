"""Which devices the tensor-parallel ranks run on, and how many CPU threads each gets."""

from __future__ import annotations

import torch

from lora_serving.handler.config import TENSOR_PARALLEL_MAX, Config
from lora_serving.handler.cpu_threads import available_cores
from lora_serving.handler.errors import ConfigError


def resolve_degree(config: Config, first: torch.device) -> int:
    """`max`: every GPU visible from the first (DJL's device_id); on a CPU 1, today's behaviour (more ranks
    on one CPU split the same cores: it runs, for tests and checks, but is not faster)."""
    if config.tensor_parallel_degree != TENSOR_PARALLEL_MAX:
        return config.tensor_parallel_degree
    if first.type == "cuda":
        return max(1, torch.cuda.device_count() - (first.index or 0))
    return 1


def rank_devices(degree: int, first: torch.device) -> list[torch.device]:
    """One device per rank. On CUDA rank i uses cuda:(first + i), so N may not exceed the GPUs visible from
    the first. On a CPU the ranks share the machine and each gets cores / N threads, so N may be up to the
    CPU's cores."""
    if first.type == "cuda":
        first_index = first.index or 0
        available = torch.cuda.device_count() - first_index
        if degree > available:
            raise ConfigError("tensor_parallel_degree", degree,
                              f"asks for {degree} GPUs but {available} are visible from cuda:{first_index}")
        return [torch.device("cuda", first_index + rank) for rank in range(degree)]
    cores = available_cores()
    if degree > cores:
        raise ConfigError("tensor_parallel_degree", degree,
                          f"asks for {degree} ranks but {torch.cuda.device_count()} GPUs are visible and the CPU "
                          f"has {cores} cores (on a CPU each rank needs a core of its own)")
    return [first] * degree


def cpu_threads_per_rank(config: Config, world_size: int) -> int:
    if config.cpu_threads != "auto":
        return int(config.cpu_threads)
    return max(1, available_cores() // world_size)
