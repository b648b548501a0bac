"""Per-step batch metadata, built once per engine step and reused by every LoRA layer call.

Everything that depends only on which token uses which slot lives here, so that the layer calls
do no host/device synchronisation and no regrouping: `build` reads token_slots to the host once.
"""

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
    tiles: torch.Tensor  # [3, num_tiles] int32: slot, start, end (positions in sorted_token_ids)
    # Plans derived from this step for one path (e.g. the torch path's index tensors per rank
    # pattern), so that the 50-odd layer calls of a step compute each one once.
    plan_cache: dict = field(default_factory=dict, repr=False)

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
        slots = token_slots.to("cpu", torch.int64)
        if slots.numel() and (int(slots.min()) < -1 or int(slots.max()) >= num_slots):
            raise ValueError(f"token_slots must lie in [-1, {num_slots}), got {slots.tolist()}")

        has_adapter = slots >= 0
        # Tokens without an adapter sort last and are cut off.
        sort_keys = torch.where(has_adapter, slots, num_slots)
        sorted_token_ids = torch.argsort(sort_keys, stable=True)[: int(has_adapter.sum())]

        counts_per_slot = torch.bincount(slots[has_adapter], minlength=num_slots)
        active_slots = torch.nonzero(counts_per_slot).flatten()
        counts = counts_per_slot[active_slots]
        ends = torch.cumsum(counts, 0)
        starts = ends - counts
        first_tokens = sorted_token_ids[starts]
        last_tokens = sorted_token_ids[ends - 1]
        consecutive = last_tokens - first_tokens + 1 == counts
        first_tokens = torch.where(consecutive, first_tokens, -1)

        largest_segment = int(counts.max()) if counts.numel() else 0
        token_block = _token_block(largest_segment)
        tiles = _tiles(active_slots, starts, counts, token_block)

        return cls(
            num_tokens=slots.numel(),
            num_slots=num_slots,
            sorted_token_ids=sorted_token_ids.to(device, non_blocking=True),
            active_slots=tuple(active_slots.tolist()),
            segment_starts=tuple(starts.tolist()),
            segment_counts=tuple(counts.tolist()),
            segment_first_tokens=tuple(first_tokens.tolist()),
            token_block=token_block,
            tiles=tiles.to(device, non_blocking=True),
        )


def _token_block(largest_segment: int) -> int:
    block = SMALLEST_TOKEN_BLOCK
    while block < largest_segment and block < LARGEST_TOKEN_BLOCK:
        block *= 2
    return block


def _tiles(active_slots, starts, counts, token_block) -> torch.Tensor:
    """Split each segment into tiles of at most token_block tokens: the compact Triton grid."""
    tiles_per_segment = (counts + token_block - 1) // token_block
    segment_of_tile = torch.repeat_interleave(torch.arange(counts.numel()), tiles_per_segment)
    first_tile_of_segment = torch.cumsum(tiles_per_segment, 0) - tiles_per_segment
    tile_in_segment = torch.arange(segment_of_tile.numel()) - first_tile_of_segment[segment_of_tile]
    tile_starts = starts[segment_of_tile] + tile_in_segment * token_block
    segment_ends = (starts + counts)[segment_of_tile]
    tile_ends = torch.minimum(tile_starts + token_block, segment_ends)
    return torch.stack([active_slots[segment_of_tile], tile_starts, tile_ends]).to(torch.int32)
