"""A fused projection's adapter buffers, checked once and then added every step: the serving engine's path.

add_lora_packed checks its arguments and finds its route at every call, which is right for a caller that may
pass new tensors each time but cost the engine 50-70 us of Python a call on CPU, 32 calls a decode step at
bench_lora's shapes (~2 ms of a ~60 ms step). The engine's buffers and rank tensors live as long as it does
(adapters are written into them in place), so LoraGroup checks and resolves them once; each add() checks only
what changes per call: x, y and the step's metadata. Anything that the prepared C-kernel path does not take
goes through add_lora_packed, with its checks and errors.
"""

from __future__ import annotations

import torch

from .metadata import LoraBatchMeta
from .ops import _check_shapes, add_lora_packed
from .torch_path import NativeGroup


class LoraGroup:
    """lora_a_slices[i] [S, R_max, H], lora_b_slices[i] [S, O_i, R_max], slot_ranks_slices[i] [S], as for
    add_lora_packed; `add(y, x, token_slots, meta)` is add_lora_packed on them."""

    def __init__(self, lora_a_slices, lora_b_slices, slot_ranks_slices, *, backend=None) -> None:
        self.lora_a_slices, self.lora_b_slices = tuple(lora_a_slices), tuple(lora_b_slices)
        self.slot_ranks_slices = tuple(slot_ranks_slices)
        self.backend = backend
        self.hidden = self.lora_a_slices[0].shape[2]
        self.out_features = sum(lora_b.shape[1] for lora_b in self.lora_b_slices)
        # Checks everything but the per-call tensors (x and y of one token stand in for them).
        probe_x = torch.empty(1, self.hidden, dtype=self.lora_a_slices[0].dtype)
        probe_y = torch.empty(1, self.out_features, dtype=probe_x.dtype)
        _check_shapes(probe_y, probe_x, self.lora_a_slices, self.lora_b_slices, torch.zeros(1, dtype=torch.long),
                      self.slot_ranks_slices)
        self._native = (NativeGroup.for_buffers(self.lora_a_slices, self.lora_b_slices, self.slot_ranks_slices)
                        if backend in (None, "auto", "torch") else None)

    @property
    def compact_ranks(self) -> torch.Tensor | None:
        """[S, slices]: the ranks each slot's compact copy of A was made at (0: none yet); None off the C kernel."""
        return None if self._native is None else self._native.compact_ranks

    def slot_written(self, slot: int) -> None:
        """To be called after a slot's weights and ranks are written (DeviceSlots.write does): on the C kernel's
        path it refreshes the slot's compact copy of A (cpu_native.CompactA), which add() reads while the slot's
        ranks are the ones it was made at. Weights rewritten at unchanged ranks without this call would leave
        the copy stale; ranks changed without it only send the slot back to the full-width rows."""
        if self._native is not None:
            self._native.slot_written(slot)

    def add(self, y: torch.Tensor, x: torch.Tensor, token_slots: torch.Tensor, meta: LoraBatchMeta) -> None:
        native = self._native
        if (native is not None and x.dtype == y.dtype == native.dtype and x.device.type == "cpu"
                and x.shape == (meta.num_tokens, self.hidden) and y.shape == (meta.num_tokens, self.out_features)
                and x.stride(1) == 1 and y.stride(1) == 1 and meta.device.type == "cpu"):
            native.add(y, x, meta)
            return
        add_lora_packed(y, x, self.lora_a_slices, self.lora_b_slices, token_slots, self.slot_ranks_slices, meta,
                        backend=self.backend)
