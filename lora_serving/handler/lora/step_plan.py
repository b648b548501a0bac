"""A step's LoRA plan as plain values: which slot each token reads, and which projection groups any adapter
of the step targets. Rank 0's slot admission makes it (slot_admission.py); it travels to the other
tensor-parallel ranks inside the step message, and each rank's runner turns it into a LoraStepApplier."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class LoraStepPlan:
    token_slots: list[int]  # per token of the step, -1 = no adapter
    groups: set[str]  # projection groups some adapter in the step targets
