"""The collectives a rank takes part in, over a process group object of its own.

The group is made from a TCPStore and ProcessGroupGloo / ProcessGroupNCCL directly, not through
torch.distributed's default group: nothing process-wide changes, so one process may hold a TP=1 engine
and a TP=2 engine side by side (the tests do) and close one without touching the other. Every collective
carries the group's timeout, so a rank that stops answering fails the step instead of hanging it.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist


class TensorParallelComm:
    def __init__(self, group, rank: int, world_size: int, device: torch.device) -> None:
        self._group = group
        self.rank = rank
        self.world_size = world_size
        self.device = device
        # Bytes each rank contributed to all-reduces and broadcasts, by what they carried: the benchmark's
        # and the tests' check that the sharding plan's accounting is what the model really sends.
        self.bytes_sent: dict[str, int] = {}

    @classmethod
    def connect(cls, store: dist.Store, rank: int, world_size: int, device: torch.device,
                timeout_seconds: float) -> "TensorParallelComm":
        timeout = datetime.timedelta(seconds=timeout_seconds)
        if device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            group = dist.ProcessGroupNCCL(store, rank, world_size, options)
        else:
            group = dist.ProcessGroupGloo(store, rank, world_size, timeout)
        return cls(group, rank, world_size, device)

    def all_reduce(self, tensor: torch.Tensor, what: str) -> None:
        """In place: the sum over ranks."""
        self._count(what, tensor)
        self._group.allreduce([tensor]).wait()

    def broadcast(self, tensor: torch.Tensor, what: str) -> None:
        """In place: rank 0's tensor on every rank."""
        self._count(what, tensor)
        self._group.broadcast(tensor, 0).wait()

    def _count(self, what: str, tensor: torch.Tensor) -> None:
        self.bytes_sent[what] = self.bytes_sent.get(what, 0) + tensor.numel() * tensor.element_size()
