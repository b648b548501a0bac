"""Turns each sequence's next-token logits into a token, following its own sampling parameters.

Per row: the request's processors (handler/logits_processors.py), its grammar mask
(handler/structured_output.py), then greedy argmax or, for sampled requests, its warpers and a draw from
its own generator, seeded from `seed` (or at random), so the same seed gives the same output whatever else
shares the batch. The log-probabilities reported are the model's own (log-softmax of the raw logits), for
the chosen token and, where asked, its most likely alternatives.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from handler.logits_processors import process_row, warp_row
from handler.sequence import Sequence
from handler.structured_output import apply_masks, fill_masks


@dataclass(slots=True)
class SampledTokens:
    token_ids: list[int]
    log_probs: list[float]
    # Per sequence: its most likely tokens as (id, log-probability), best first; None where not asked.
    top: list[list[tuple[int, float]] | None]


class Sampler:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._generators: dict[Sequence, torch.Generator] = {}
        self._seed_source = random.SystemRandom()

    def release(self, seq: Sequence) -> None:
        self._generators.pop(seq, None)

    def sample(self, logits: torch.Tensor, seqs: list[Sequence], rows: list[int] | None = None) -> SampledTokens:
        """logits [R, V] fp32; `rows[i]` is the row `seqs[i]` samples from (None: row i)."""
        if rows is not None:
            logits = logits[torch.tensor(rows, dtype=torch.long, device=logits.device)]
        log_probs = torch.log_softmax(logits, dim=-1)
        processed = logits
        processed_rows = [row for row, seq in enumerate(seqs) if seq.params.processes_logits]
        grammar_rows = [row for row, seq in enumerate(seqs) if seq.grammar is not None]
        if processed_rows or grammar_rows:
            processed = logits.clone()
            for row in processed_rows:
                process_row(processed[row], seqs[row])
            if grammar_rows:
                self._mask(processed, grammar_rows, seqs)
        chosen = processed.argmax(dim=-1)
        sampled_rows = [row for row, seq in enumerate(seqs) if not seq.params.greedy]
        if sampled_rows:
            chosen = chosen.clone()
            for row in sampled_rows:
                chosen[row] = self._sample_row(processed[row], seqs[row])
        chosen_log_probs = log_probs.gather(1, chosen[:, None]).squeeze(1)
        return SampledTokens(chosen.tolist(), chosen_log_probs.tolist(), self._top(log_probs, seqs))

    @staticmethod
    def _mask(processed: torch.Tensor, grammar_rows: list[int], seqs: list[Sequence]) -> None:
        bitmasks = fill_masks([seqs[row].grammar for row in grammar_rows], processed.shape[1])
        index = torch.tensor(grammar_rows, dtype=torch.long, device=processed.device)
        masked = processed.index_select(0, index)
        apply_masks(masked, bitmasks)
        processed.index_copy_(0, index, masked)

    @staticmethod
    def _top(log_probs: torch.Tensor, seqs: list[Sequence]) -> list[list[tuple[int, float]] | None]:
        wanted = [seq.params.top_n_tokens for seq in seqs]
        top: list[list[tuple[int, float]] | None] = [None] * len(seqs)
        rows = [row for row, count in enumerate(wanted) if count]
        if not rows:
            return top
        most = max(wanted[row] for row in rows)
        values, ids = log_probs[torch.tensor(rows, device=log_probs.device)].topk(most, dim=-1)
        for row, row_values, row_ids in zip(rows, values.tolist(), ids.tolist()):
            top[row] = list(zip(row_ids[: wanted[row]], row_values[: wanted[row]]))
        return top

    def _sample_row(self, row_logits: torch.Tensor, seq: Sequence) -> int:
        probs = torch.softmax(warp_row(row_logits, seq), dim=-1)
        if not bool(torch.isfinite(probs).all()):
            # Extreme parameters overflowed the scaled logits: a temperature near 0 makes them all +-inf, whose
            # softmax is NaN. Their limit is the greedy choice; raising instead would fail the whole step.
            return int(row_logits.argmax())
        return int(torch.multinomial(probs, 1, generator=self._generator_for(seq)).item())

    def _generator_for(self, seq: Sequence) -> torch.Generator:
        generator = self._generators.get(seq)
        if generator is None:
            seed = seq.params.seed
            # The i-th sequence of a seeded request draws as the same request seeded with seed + i would.
            seed = self._seed_source.getrandbits(63) if seed is None else (seed + seq.index) % 2**64
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed)
            self._generators[seq] = generator
        return generator
