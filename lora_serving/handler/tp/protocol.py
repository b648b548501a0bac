"""What rank 0 tells the other ranks, and how: length-prefixed pickles on each rank's stdin.

The control channel is the worker's stdin pipe, not a collective: a rank waits for the next step as long
as the server is idle without any collective timing out, and its read ends (EOF) the moment rank 0's
process goes away, so no rank outlives the server. Tensors (activations, adapter weights) travel over
the process group (handler/tp/comm.py), on the device.

Per step rank 0 sends one StepMessage: the slot writes and clears since the last step (every rank holds
its shard of an adapter before any step uses the slot: the writes come first in the message that first
uses it), the copy-on-write block copies, the forward's inputs and the LoRA plan. Ranks 1..N-1 run the
same forward on their shards (handler/runner/); only rank 0 computes logits and samples.
"""

from __future__ import annotations

import pickle
import struct
from dataclasses import dataclass, field
from typing import BinaryIO

from lora_serving.handler.lora.step_plan import LoraStepPlan
from lora_serving.handler.step_inputs import StepInputs

_LENGTH = struct.Struct("<Q")


@dataclass(slots=True)
class WorkerInit:
    """Sent once, after the ranks have connected: what rank 0 decided that every rank must agree on."""

    num_kv_blocks: int


@dataclass(slots=True)
class SlotWrite:
    """An adapter going into a slot: its modules in this order, each A [rank, in] then B [out, rank] of
    the whole module, concatenated into one tensor that rank 0 broadcasts right after (each rank keeps its
    shard). `modules` empty: the slot is cleared."""

    slot: int
    content_hash: str | None
    modules: list[tuple[int, str, int, int, int]] = field(default_factory=list)  # layer, module, rank, in, out


@dataclass(slots=True)
class StepMessage:
    inputs: StepInputs
    slot_writes: list[SlotWrite]
    block_copies: list[tuple[int, int]]
    lora: LoraStepPlan | None


@dataclass(slots=True)
class Stop:
    """Finish: the engine is closing."""


def send(pipe: BinaryIO, message) -> None:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    pipe.write(_LENGTH.pack(len(payload)))
    pipe.write(payload)
    pipe.flush()


def receive(pipe: BinaryIO):
    """The next message, or Stop when rank 0 has closed the pipe (its process ended)."""
    header = pipe.read(_LENGTH.size)
    if len(header) < _LENGTH.size:
        return Stop()
    (length,) = _LENGTH.unpack(header)
    payload = pipe.read(length)
    if len(payload) < length:
        return Stop()
    return pickle.loads(payload)


@dataclass(slots=True)
class WorkerStart:
    """The first message a rank reads: who it is and where to connect."""

    config: object  # handler.config.Config
    rank: int
    world_size: int
    device: str
    store_port: int
    timeout_seconds: float
