"""Builders for LoRA test batches: slot buffers with garbage past each rank, popularity patterns."""

import random
from dataclasses import dataclass

import torch

from lora_serving import kernels

POPULARITIES = ("distinct", "uniform", "zipf", "same", "huge_segment")


@dataclass(frozen=True)
class Case:
    tokens: int
    hidden: int
    out_features: tuple[int, ...]  # one entry per slice
    ranks: str  # "1", "8", "16", "64" or "mixed"
    popularity: str
    dtype: torch.dtype = torch.float32
    no_adapter_tokens: bool = False
    max_rank: int = 64
    num_slots: int = 8
    rank_major: bool = True
    # The slices' lora_a as the column blocks of one buffer (allocate_lora_group_buffers), as the engine
    # allocates fused projections; rank-major then.
    shared_a: bool = False

    def __str__(self):
        layout = "shared_a" if self.shared_a else "rank_major" if self.rank_major else "natural"
        dtype = str(self.dtype).removeprefix("torch.")
        none = "+none" if self.no_adapter_tokens else ""
        return (
            f"T{self.tokens}-H{self.hidden}-O{'x'.join(map(str, self.out_features))}-r{self.ranks}"
            f"-{self.popularity}{none}-{dtype}-{layout}"
        )


@dataclass
class Batch:
    y: torch.Tensor
    x: torch.Tensor
    lora_a: list[torch.Tensor]
    lora_b: list[torch.Tensor]
    token_slots: torch.Tensor
    slot_ranks: list[torch.Tensor]
    num_slots: int


def make_batch(case: Case, device="cpu", seed=0) -> Batch:
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    num_slots = max(case.num_slots, case.tokens) if case.popularity == "distinct" else case.num_slots
    token_slots = _token_slots(case.tokens, num_slots, case.popularity, case.no_adapter_tokens, rng)
    lora_a, lora_b, slot_ranks = [], [], []
    shared = kernels.allocate_lora_group_buffers(num_slots, case.max_rank, case.hidden, case.out_features,
                                                 dtype=case.dtype, device=device) if case.shared_a else None
    for index, out_features in enumerate(case.out_features):
        ranks = _slot_ranks(case.ranks, num_slots, case.max_rank, rng)
        buffers = (shared[0][index], shared[1][index]) if shared else None
        a, b = _slot_buffers(num_slots, case.max_rank, case.hidden, out_features, ranks, case, generator, buffers)
        lora_a.append(a if shared else a.to(device))
        lora_b.append(b if shared else b.to(device))
        slot_ranks.append(torch.tensor(ranks, dtype=torch.int64, device=device))
    x = torch.randn(case.tokens, case.hidden, generator=generator).to(device, case.dtype)
    y = torch.randn(case.tokens, sum(case.out_features), generator=generator).to(device, case.dtype)
    return Batch(y, x, lora_a, lora_b, token_slots.to(device), slot_ranks, num_slots)


def _token_slots(tokens, num_slots, popularity, no_adapter_tokens, rng) -> torch.Tensor:
    if popularity == "distinct":
        slots = rng.sample(range(num_slots), tokens)
    elif popularity == "uniform":
        slots = [rng.randrange(num_slots) for _ in range(tokens)]
    elif popularity == "zipf":
        weights = [1 / (k + 1) ** 1.2 for k in range(num_slots)]
        slots = rng.choices(range(num_slots), weights=weights, k=tokens)
    elif popularity == "same":
        slots = [num_slots - 1] * tokens
    elif popularity == "huge_segment":
        # One long prefill of consecutive tokens, then decode tokens of other slots.
        huge = max(1, tokens * 4 // 5)
        slots = [2 % num_slots] * huge + [rng.randrange(num_slots) for _ in range(tokens - huge)]
    else:
        raise ValueError(popularity)
    if no_adapter_tokens:
        slots = [-1 if rng.random() < 0.3 else slot for slot in slots]
    return torch.tensor(slots, dtype=torch.int64)


def _slot_ranks(ranks: str, num_slots, max_rank, rng) -> list[int]:
    if ranks == "mixed":
        # 0: the slot's adapter does not target this module.
        return [rng.choice([0, 1, 8, 16, 33, max_rank]) for _ in range(num_slots)]
    return [int(ranks)] * num_slots


def _slot_buffers(num_slots, max_rank, hidden, out_features, ranks, case, generator, buffers=None):
    if buffers is not None:
        lora_a, lora_b = buffers
    elif case.rank_major:
        lora_a, lora_b = kernels.allocate_lora_buffers(
            num_slots, max_rank, hidden, out_features, dtype=case.dtype, device="cpu"
        )
    else:
        lora_a = torch.empty(num_slots, max_rank, hidden, dtype=case.dtype)
        lora_b = torch.empty(num_slots, out_features, max_rank, dtype=case.dtype)
    # Everything past a slot's rank is garbage that must never reach y.
    lora_a.fill_(float("nan"))
    lora_b.fill_(float("nan"))
    for slot, rank in enumerate(ranks):
        lora_a[slot, :rank] = (torch.randn(rank, hidden, generator=generator) / hidden**0.5).to(lora_a.device)
        lora_b[slot, :, :rank] = (torch.randn(out_features, rank, generator=generator) / rank**0.5).to(lora_b.device)
    return lora_a, lora_b


def tolerance(dtype: torch.dtype) -> dict:
    return {
        torch.float32: dict(atol=1e-4, rtol=1e-4),
        torch.float16: dict(atol=2e-2, rtol=1e-2),
        torch.bfloat16: dict(atol=1e-1, rtol=5e-2),
    }[dtype]
