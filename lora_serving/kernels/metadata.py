"""Per-step batch metadata, built once per engine step and reused by every LoRA layer call.

Everything that depends only on which token uses which slot lives here, so that the layer calls
do no host/device synchronisation and no regrouping: `build` reads token_slots to the host once.
"""

import itertools
from dataclasses import dataclass, field

import torch

# Tokens per Triton tile. tl.dot needs every block dim >= 16 on a GPU; past 64 tokens a tile's
# weight reuse stops paying for the registers it costs.
SMALLEST_TOKEN_BLOCK = 16
LARGEST_TOKEN_BLOCK = 64


@dataclass(eq=False)
class LoraBatchMeta:
    """Which tokens use which adapter slot, grouped by slot.

    A "segment" is the set of tokens that share one slot; a "tile" is up to `token_block`
    tokens of one segment, the unit of work of one Triton program.
    """

    num_tokens: int
    num_slots: int
    sorted_token_ids: torch.Tensor  # [N] int64: tokens with an adapter, grouped by slot, batch order kept
    active_slots: tuple[int, ...]  # slots with at least one token, ascending
    segment_starts: tuple[int, ...]  # where each active slot's tokens start in sorted_token_ids
    segment_counts: tuple[int, ...]
    segment_first_tokens: tuple[int, ...]  # first batch index if the segment's tokens are consecutive, else -1
    token_block: int
    # Plans derived from this step for one path (e.g. the torch path's index tensors per rank
    # pattern), so that the 50-odd layer calls of a step compute each one once.
    plan_cache: dict = field(default_factory=dict, repr=False)
    _tiles: torch.Tensor | None = field(default=None, repr=False)

    @property
    def tiles(self) -> torch.Tensor:
        """[3, num_tiles] int32: slot, start, end (positions in sorted_token_ids); the Triton kernels' work list,
        made at first use (the CPU path never reads it, and making it cost ~20 us a step)."""
        if self._tiles is None:
            tiles = [(slot, tile_start, min(tile_start + self.token_block, start + count))
                     for slot, start, count in zip(self.active_slots, self.segment_starts, self.segment_counts)
                     for tile_start in range(start, start + count, self.token_block)]
            tiles = torch.tensor(tiles, dtype=torch.int32).T if tiles else torch.zeros(3, 0, dtype=torch.int32)
            self._tiles = tiles.contiguous().to(self.device, non_blocking=True)
        return self._tiles

    @property
    def num_lora_tokens(self) -> int:
        return self.sorted_token_ids.shape[0]

    @property
    def num_tiles(self) -> int:
        return self.tiles.shape[1]

    @property
    def device(self) -> torch.device:
        return self.sorted_token_ids.device

    @classmethod
    def build(cls, token_slots: torch.Tensor, num_slots: int, device=None) -> "LoraBatchMeta":
        """Group a step's tokens by slot. token_slots: [T] int, -1 = no adapter.

        The metadata lands on `device` (default: token_slots' device). Reading token_slots is the one
        sync; an engine that has them on the host passes a CPU tensor and device="cuda" to skip it.
        """
        if token_slots.dim() != 1:
            raise ValueError(f"token_slots must be 1-D, got shape {tuple(token_slots.shape)}")
        device = token_slots.device if device is None else torch.device(device)
        # A few torch ops for what grows with the tokens (the sort), plain Python over segments for the rest: the
        # ~25 small torch ops this took before cost ~0.4 ms a step on CPU, more than a decode step's LoRA math.
        slots = token_slots.to("cpu", torch.int64)
        if slots.numel():
            lowest, highest = torch.aminmax(slots)
            if int(lowest) < -1 or int(highest) >= num_slots:
                raise ValueError(f"token_slots must lie in [-1, {num_slots}), got {slots.tolist()}")
        # Tokens without an adapter sort last (key num_slots) and are cut off; the sort is stable, so batch order
        # is kept inside a slot.
        keys = torch.where(slots >= 0, slots, num_slots)
        tokens_per_key = torch.bincount(keys, minlength=num_slots + 1).tolist()
        sorted_token_ids = torch.argsort(keys, stable=True)[: len(keys) - tokens_per_key[num_slots]]
        order = sorted_token_ids.tolist()
        active_slots = [slot for slot in range(num_slots) if tokens_per_key[slot]]
        counts = [tokens_per_key[slot] for slot in active_slots]
        starts = list(itertools.accumulate(counts, initial=0))[:-1]
        first_tokens = [order[start] if order[start + count - 1] - order[start] + 1 == count else -1
                        for start, count in zip(starts, counts)]

        return cls(
            num_tokens=slots.numel(),
            num_slots=num_slots,
            sorted_token_ids=sorted_token_ids.to(device, non_blocking=True),
            active_slots=tuple(active_slots),
            segment_starts=tuple(starts),
            segment_counts=tuple(counts),
            segment_first_tokens=tuple(first_tokens),
            token_block=_token_block(max(counts, default=0)),
        )


def _token_block(largest_segment: int) -> int:
    block = SMALLEST_TOKEN_BLOCK
    while block < largest_segment and block < LARGEST_TOKEN_BLOCK:
        block *= 2
    return block
