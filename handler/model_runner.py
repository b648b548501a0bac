"""Owns all device work of a step: the flat input tensors, the forward pass, the KV cache, sampling."""

from __future__ import annotations

import torch

from handler.block_manager import BlockManager
from handler.forward_context import DecodeKV, ForwardContext, LoraApplier, PaddedDecodes
from handler.models import LlamaModel
from handler.sampler import SampledTokens, Sampler
from handler.scheduler import ScheduledStep


# On CPU, up to this many K elements per layer in the padded [B, kv_heads, longest, d] tensor, one gather
# and one attention call for all decodes beat one call per sequence (small models, short contexts:
# per-call overhead dominates); above it, per sequence won, up to 4x at bench_engine's shapes.
# Measured crossover on 2 cores: between 0.26M (padded 1.6x faster) and 0.82-1.05M (per sequence 1.1-1.4x).
PAD_DECODES_MAX_ELEMENTS = 2**19


def kv_bytes_per_token(model: LlamaModel) -> int:
    element_size = torch.empty((), dtype=model.dtype).element_size()
    return 2 * model.num_layers * model.num_kv_heads * model.head_dim * element_size


class ModelRunner:
    def __init__(self, model: LlamaModel, block_manager: BlockManager) -> None:
        self.model = model
        self.device = model.device
        self.block_manager = block_manager
        # calloc-backed zeros: pages are only touched when K/V are written, and masked-out padding
        # positions read zeros rather than NaN garbage.
        self.kv_cache = torch.zeros(
            (model.num_layers, 2, model.num_kv_heads, block_manager.num_blocks, block_manager.block_size,
             model.head_dim),
            dtype=model.dtype,
            device=self.device,
        )
        self.sampler = Sampler(self.device)
        # How decodes read their K/V (handler/forward_context.py): "padded" (always, on GPUs),
        # "per_sequence", or "auto" (CPU): padded while the padded tensor is small. Tests force each.
        self.decode_form = "padded" if self.device.type == "cuda" else "auto"

    def execute(self, step: ScheduledStep, lora: LoraApplier | None = None) -> SampledTokens:
        """Run one forward pass over the step's tokens; return each sampling sequence's next token and
        log-prob, in `step.sampling_rows()` order (decodes, prefills, then sequences forked this step)."""
        self._copy_blocks(self.block_manager.take_copies())
        ctx, input_ids, last_token_index = self._prepare(step)
        ctx.lora = lora
        hidden = self.model.forward(input_ids, ctx, self.kv_cache)
        self._score_prompts(step, ctx, input_ids, hidden)
        logits = self.model.compute_logits(hidden[last_token_index])
        seqs, rows = step.sampling_rows()
        for seq in seqs:
            seq.num_cached_tokens = seq.num_tokens
        return self.sampler.sample(logits, seqs, rows)

    # ---- for the generation parameters (handler/sampler.py) -----------------------------------------

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write of KV blocks shared by a request's sequences (handler/block_manager.py)."""
        if copies:
            sources, destinations = (torch.tensor(side, dtype=torch.long, device=self.device) for side in zip(*copies))
            self.kv_cache[:, :, :, destinations] = self.kv_cache[:, :, :, sources]

    def _score_prompts(self, step: ScheduledStep, ctx: ForwardContext, input_ids: torch.Tensor,
                       hidden: torch.Tensor) -> None:
        """Each prompt token's log-probability for the prefills that asked (once), from the hidden states
        of the tokens before it."""
        for seq, (start, _) in zip(step.prefill_seqs, ctx.prefill_ranges):
            # A request's first sequence scores the prompt; the others share it (and, preempted, skip it).
            if seq.params.prompt_log_probs and seq.prompt_log_probs is None and seq.index == 0:
                prompt_end = start + len(seq.prompt_token_ids)
                log_probs = torch.log_softmax(self.model.compute_logits(hidden[start : prompt_end - 1]).float(), -1)
                scored = log_probs.gather(1, input_ids[start + 1 : prompt_end, None]).squeeze(1)
                seq.prompt_log_probs = [None, *scored.tolist()]

    def _prepare(self, step: ScheduledStep) -> tuple[ForwardContext, torch.Tensor, torch.Tensor]:
        block_size = self.block_manager.block_size
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
            slots.append(self.block_manager.slot_of(seq, position))
            last_token_index.append(len(input_ids) - 1)
            decode_tables.append(seq.block_table)
            decode_lengths.append(seq.num_tokens)

        prefill_ranges: list[tuple[int, int]] = []
        for seq in step.prefill_seqs:
            start = len(input_ids)
            count = seq.num_tokens
            input_ids.extend(seq.token_ids)
            positions.extend(range(count))
            table = seq.block_table
            slots.extend(table[i // block_size] * block_size + i % block_size for i in range(count))
            prefill_ranges.append((start, start + count))
            last_token_index.append(start + count - 1)

        device = self.device
        ctx = ForwardContext(
            positions=torch.tensor(positions, dtype=torch.long, device=device),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            num_decode_tokens=len(step.decode_seqs),
            decode_kv=self._decode_kv(decode_tables, decode_lengths),
            prefill_ranges=prefill_ranges,
        )
        return (
            ctx,
            torch.tensor(input_ids, dtype=torch.long, device=device),
            torch.tensor(last_token_index, dtype=torch.long, device=device),
        )

    def _decode_kv(self, tables: list[list[int]], lengths: list[int]) -> list[DecodeKV] | PaddedDecodes:
        device = self.device
        width = max((len(table) for table in tables), default=0)
        if tables and self._pads(len(tables), width):
            return PaddedDecodes(
                block_tables=torch.tensor([table + [0] * (width - len(table)) for table in tables],
                                          dtype=torch.long, device=device),
                context_lens=torch.tensor(lengths, dtype=torch.long, device=device),
                longest=max(lengths),
                shortest=min(lengths),
            )
        decode_kv = []
        for table, length in zip(tables, lengths):
            first = table[0]
            if table[-1] - first == len(table) - 1 and table == list(range(first, first + len(table))):
                decode_kv.append(DecodeKV(length=length, first_block=first, block_ids=None))
            else:
                decode_kv.append(DecodeKV(length=length, first_block=None,
                                          block_ids=torch.tensor(table, dtype=torch.long, device=device)))
        return decode_kv

    def _pads(self, num_decodes: int, width: int) -> bool:
        if self.decode_form != "auto":
            return self.decode_form == "padded"
        padded_tokens = num_decodes * width * self.block_manager.block_size
        return padded_tokens * self.model.num_kv_heads * self.model.head_dim <= PAD_DECODES_MAX_ELEMENTS
