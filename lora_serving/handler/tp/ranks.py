"""Rank 0's side of tensor parallelism: it starts ranks 1..N-1, sends them each step, and watches them.

Rank 0 is the process that builds the Engine (the server, or DJL's one Python worker, which owns all N
devices). Each other rank is a child process running `python -m lora_serving.handler.runner.worker` (a fresh interpreter:
nothing of the parent's process-wide state is changed or inherited, and it imports handler, which sets
the OpenMP wait policy, before torch). A rank that dies is noticed two ways: at once, by its exit status,
which rank 0 checks before every step and every half second while idle (handler/engine_loop.py); and
inside a step, by the collective that fails when its peer is gone or times out after
`tensor_parallel_timeout` seconds when its peer hangs. Either way the engine raises RankFailedError naming
the rank, and the server exits with that message.
"""

from __future__ import annotations

import datetime
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from lora_serving.handler.errors import RankFailedError
from lora_serving.handler.tp import protocol
from lora_serving.handler.tp.comm import TensorParallelComm

logger = logging.getLogger(__name__)

# How often start-up checks that the ranks it waits for are still alive.
POLL_SECONDS = 0.05
# A dead rank's exit is seen within this long after its pipe breaks.
EXIT_WAIT_SECONDS = 2.0
# How long start-up waits for a rank that is alive but has not joined, or not loaded its shard (a large
# model from a slow disk takes minutes); a rank that exits fails start-up at once.
STARTUP_TIMEOUT_SECONDS = 1800.0
# The directory lora_serving is imported from: the other ranks import it from there too.
_PACKAGE_PARENT = Path(__file__).resolve().parents[3]


class RankGroup:
    """Ranks 1..N-1 as seen from rank 0, connected, with rank 0's collectives in `comm`."""

    def __init__(self, config, world_size: int, devices: list[torch.device], timeout_seconds: float) -> None:
        self.world_size = world_size
        self.timeout_seconds = timeout_seconds
        self._failed: RankFailedError | None = None
        self._store = dist.TCPStore("127.0.0.1", 0, world_size, True,
                                    timeout=datetime.timedelta(seconds=timeout_seconds), wait_for_workers=False)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PACKAGE_PARENT), env.get("PYTHONPATH")]))
        self._processes: dict[int, subprocess.Popen] = {}
        try:
            for rank in range(1, world_size):
                process = subprocess.Popen([sys.executable, "-m", "lora_serving.handler.runner.worker"],
                                           stdin=subprocess.PIPE, env=env, cwd=str(_PACKAGE_PARENT))
                self._processes[rank] = process
                protocol.send(process.stdin, protocol.WorkerStart(
                    config=config, rank=rank, world_size=world_size, device=str(devices[rank]),
                    store_port=self._store.port, timeout_seconds=timeout_seconds))
            self.wait_for("joined")
            self.comm = TensorParallelComm.connect(self._store, 0, world_size, devices[0], timeout_seconds)
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> dict[int, int]:
        return {rank: process.pid for rank, process in self._processes.items()}

    def wait_for(self, stage: str) -> None:
        """Until every rank has reached `stage` (it sets `<stage>/<rank>` in the store); a rank that exits
        first fails start-up with its exit status, one that takes longer than the timeout with that."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        pending = set(self._processes)
        while pending:
            self.check_alive()
            pending = {rank for rank in pending if not self._store.check([f"{stage}/{rank}"])}
            if pending and time.monotonic() > deadline:
                raise self._fail(min(pending), f"did not reach start-up stage {stage!r} in time")
            if pending:
                time.sleep(POLL_SECONDS)

    def send(self, message, tensors: list[torch.Tensor] = ()) -> None:
        """The message to every rank, then each tensor broadcast from rank 0, in order."""
        for rank, process in self._processes.items():
            try:
                protocol.send(process.stdin, message)
            except (BrokenPipeError, OSError, ValueError):
                self.check_alive(wait_seconds=EXIT_WAIT_SECONDS)
                raise self._fail(rank, "stopped reading its step messages")
        for tensor in tensors:
            self.comm.broadcast(tensor, "adapter_weights")

    def check_alive(self, wait_seconds: float = 0.0) -> None:
        """Raise RankFailedError naming the first rank that has exited (or failed before)."""
        if self._failed is not None:
            raise self._failed
        deadline = time.monotonic() + wait_seconds
        while True:
            exited = {rank: code for rank, process in self._processes.items() if (code := process.poll()) is not None}
            if exited:
                # The ranks that lost a peer mid-collective exit too, with status 1 (a worker's error): one
                # killed by a signal is the likelier cause.
                rank = min(exited, key=lambda rank: (exited[rank] >= 0, rank))
                raise self._fail(rank, f"exited with status {exited[rank]}")
            if time.monotonic() >= deadline:
                return
            time.sleep(POLL_SECONDS)

    def failure_in_step(self, error: BaseException) -> RankFailedError:
        """The error for a collective or send that failed mid-step: names the rank that died if one did."""
        if isinstance(error, RankFailedError):
            return error
        text = str(error)
        if "timeout" in text.lower() or "timed out" in text.lower():
            return self._hung(text)
        try:
            self.check_alive(wait_seconds=EXIT_WAIT_SECONDS)
        except RankFailedError as failed:
            return failed
        return self._fail(None, f"a step failed with every rank still running, leaving them out of step: {text}")

    def _hung(self, text: str) -> RankFailedError:
        """A collective timed out. The ranks that only waited for the hung one time out too (they share the
        timeout) and exit, as a worker does on any error; the ones still running after that are hung."""
        deadline = time.monotonic() + EXIT_WAIT_SECONDS
        while True:
            running = [rank for rank, process in self._processes.items() if process.poll() is None]
            if len(running) <= 1 or time.monotonic() >= deadline:
                break
            time.sleep(POLL_SECONDS)
        reason = f"a collective timed out after {self.timeout_seconds:g}s"
        if len(running) == 1:
            return self._fail(running[0], f"hung: it still runs but stopped answering ({reason}): {text}")
        if running:
            ranks = ", ".join(str(rank) for rank in running)
            return self._fail(None, f"{reason}; ranks {ranks} still run, one of them hung: {text}")
        return self._fail(None, f"{reason} and every other rank has exited: {text}")

    def _fail(self, rank: int | None, reason: str) -> RankFailedError:
        if self._failed is None:
            if rank is not None:
                message = f"tensor-parallel rank {rank} (of {self.world_size}) {reason}; the engine cannot go on"
            else:
                message = f"tensor parallelism over {self.world_size} ranks: {reason}; the engine cannot go on"
            self._failed = RankFailedError(message, rank=rank)
            logger.error("%s", self._failed)
            self._terminate()
        return self._failed

    def close(self) -> None:
        """Stop every rank: a Stop message, then a kill for any that does not exit in time."""
        for process in self._processes.values():
            try:
                protocol.send(process.stdin, protocol.Stop())
                process.stdin.close()
            except (BrokenPipeError, OSError, ValueError):
                pass
        deadline = time.monotonic() + 5.0
        for process in self._processes.values():
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _terminate(self) -> None:
        """A rank failed: the others cannot go on with it, so none is left waiting in a collective."""
        for process in self._processes.values():
            if process.poll() is None:
                process.kill()
        for process in self._processes.values():
            process.wait()
            if process.stdin is not None:
                try:
                    process.stdin.close()
                except (BrokenPipeError, OSError):
                    pass
