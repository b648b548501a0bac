"""Plain fp32 loops: the ground truth that both the Triton and the torch paths are tested against.

Deliberately naive (one token at a time, slicing to the real rank) so that it is obviously right.
"""

import torch


def add_lora_reference(y, x, lora_a, lora_b, token_slots, slot_ranks):
    """Return y + LoRA delta in fp32, without touching y.

    For each token t with s = token_slots[t] >= 0 and r = slot_ranks[s] > 0:
        out[t] = y[t] + lora_b[s, :, :r] @ (lora_a[s, :r] @ x[t])
    """
    out = y.detach().to(torch.float32).clone()
    slots = token_slots.tolist()
    ranks = slot_ranks.tolist()
    for token, slot in enumerate(slots):
        if slot < 0 or ranks[slot] == 0:
            continue
        rank = ranks[slot]
        shrunk = lora_a[slot, :rank].float() @ x[token].float()  # [r]
        out[token] += lora_b[slot, :, :rank].float() @ shrunk  # [O]
    return out


def add_lora_packed_reference(y, x, lora_a_slices, lora_b_slices, token_slots, slot_ranks_slices):
    """Return y + the deltas of several slices in fp32; slice i writes columns offset_i : offset_i + O_i."""
    out = y.detach().to(torch.float32).clone()
    offset = 0
    for lora_a, lora_b, slot_ranks in zip(lora_a_slices, lora_b_slices, slot_ranks_slices):
        width = lora_b.shape[1]
        out[:, offset : offset + width] = add_lora_reference(
            out[:, offset : offset + width], x, lora_a, lora_b, token_slots, slot_ranks
        )
        offset += width
    return out
