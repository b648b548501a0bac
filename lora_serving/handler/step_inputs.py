"""A step's forward-pass inputs as plain host values, and the tensors every rank builds from them.

Rank 0 describes the step once (`describe_step`, from the scheduler's choice and the block tables); with
tensor parallelism the same description is what it sends the other ranks, so every rank builds identical
positions, slot mappings and attention forms (`build_forward_inputs`) on its own device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lora_serving.handler.block_manager import BlockManager
from lora_serving.handler.forward_context import CachedKV, ForwardContext, PaddedDecodes, PrefillSpan
from lora_serving.handler.scheduler import ScheduledStep


@dataclass(slots=True)
class PrefillInput:
    start: int
    end: int
    context_len: int
    # With context: the block table up to its last token (its K/V are read from the cache); else None.
    cached_table: list[int] | None


@dataclass(slots=True)
class StepInputs:
    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    last_token_index: list[int]  # rows whose logits are sampled
    decode_tables: list[list[int]]
    decode_lengths: list[int]
    decode_form: str  # "per_sequence", "padded" or "kernel" (see handler/forward_context.py, handler/attention.py)
    prefills: list[PrefillInput]


def describe_step(step: ScheduledStep, block_manager: BlockManager, decode_form) -> StepInputs:
    """`decode_form(num_decodes, widest_table)`: the form the decodes' K/V take this step (see StepInputs)."""
    block_size = block_manager.block_size
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    last_token_index: list[int] = []
    decode_tables: list[list[int]] = []
    decode_lengths: list[int] = []
    for seq in step.decode_seqs:
        position = seq.num_tokens - 1
        input_ids.append(seq.output_token_ids[-1])  # a decoding sequence has sampled at least once
        positions.append(position)
        slots.append(block_manager.slot_of(seq, position))
        last_token_index.append(len(input_ids) - 1)
        decode_tables.append(seq.block_table)
        decode_lengths.append(seq.num_tokens)

    prefills: list[PrefillInput] = []
    for seq, length, completes in zip(step.prefill_seqs, step.prefill_lengths, step.prefill_completes):
        start = len(input_ids)
        context = seq.num_cached_tokens
        end = context + length
        input_ids.extend(seq.token_ids[context:end])
        positions.extend(range(context, end))
        table = seq.block_table
        slots.extend(table[i // block_size] * block_size + i % block_size for i in range(context, end))
        cached_table = list(table[: block_manager.blocks_needed(end)]) if context else None
        prefills.append(PrefillInput(start, start + length, context, cached_table))
        if completes:
            last_token_index.append(start + length - 1)
    width = max((len(table) for table in decode_tables), default=0)
    return StepInputs(
        input_ids=input_ids,
        positions=positions,
        slot_mapping=slots,
        last_token_index=last_token_index,
        decode_tables=[list(table) for table in decode_tables],
        decode_lengths=decode_lengths,
        decode_form=decode_form(len(decode_tables), width) if decode_tables else "per_sequence",
        prefills=prefills,
    )


def build_forward_inputs(inputs: StepInputs, device: torch.device) -> tuple[ForwardContext, torch.Tensor, torch.Tensor]:
    """(context, input ids [T], rows to sample [B]) on `device`."""
    prefills = [
        PrefillSpan(p.start, p.end, p.context_len,
                    _cached_kv(p.cached_table, p.context_len + p.end - p.start, device) if p.cached_table else None)
        for p in inputs.prefills
    ]
    ctx = ForwardContext(
        positions=torch.tensor(inputs.positions, dtype=torch.long, device=device),
        slot_mapping=torch.tensor(inputs.slot_mapping, dtype=torch.long, device=device),
        num_decode_tokens=len(inputs.decode_tables),
        decode_kv=_decode_kv(inputs, device),
        prefills=prefills,
    )
    return (
        ctx,
        torch.tensor(inputs.input_ids, dtype=torch.long, device=device),
        torch.tensor(inputs.last_token_index, dtype=torch.long, device=device),
    )


def _decode_kv(inputs: StepInputs, device: torch.device) -> list[CachedKV] | PaddedDecodes:
    tables, lengths = inputs.decode_tables, inputs.decode_lengths
    if inputs.decode_form != "per_sequence":
        width = max(len(table) for table in tables)
        return PaddedDecodes(
            block_tables=torch.tensor([table + [0] * (width - len(table)) for table in tables],
                                      dtype=torch.long, device=device),
            context_lens=torch.tensor(lengths, dtype=torch.long, device=device),
            longest=max(lengths),
            shortest=min(lengths),
            in_kernel=inputs.decode_form == "kernel",
        )
    return [_cached_kv(table, length, device) for table, length in zip(tables, lengths)]


def _cached_kv(table: list[int], length: int, device: torch.device) -> CachedKV:
    """The first `length` tokens of the sequence whose blocks are `table`: in place or to gather."""
    first = table[0]
    if table[-1] - first == len(table) - 1 and table == list(range(first, first + len(table))):
        return CachedKV(length=length, first_block=first, block_ids=None)
    return CachedKV(length=length, first_block=None, block_ids=torch.tensor(table, dtype=torch.long, device=device))
