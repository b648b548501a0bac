"""Turns each sequence's next-token logits into a token, following its own sampling parameters.

Per row: the request's processors (handler/logits_processors.py), its grammar mask
(handler/structured_output.py), then greedy argmax or, for sampled requests, its warpers and a draw. The
sampled rows draw together, by inverse transform (one uniform number per row, against the row's cumulative
probabilities): torch.multinomial draws one exponential number per vocabulary entry, which at 64 streams of
a 49k vocabulary cost more than the step's attention. A seeded request's number comes from its own
generator, seeded from `seed`, so the same seed gives the same output whatever else shares the batch; the
others' from one generator seeded at random. The log-probabilities reported are the model's own (log-softmax of the raw logits), for
the chosen token and, where asked, its most likely alternatives.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from lora_serving.handler.logits_processors import process_rows, warp_row
from lora_serving.handler.sequence import Sequence
from lora_serving.handler.structured_output import apply_masks, fill_masks
from lora_serving.kernels import cpu_logits


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
        self._unseeded = torch.Generator(device=device)
        self._unseeded.manual_seed(self._seed_source.getrandbits(63))

    def release(self, seq: Sequence) -> None:
        self._generators.pop(seq, None)

    def sample(self, logits: torch.Tensor, seqs: list[Sequence], rows: list[int] | None = None) -> SampledTokens:
        """logits [R, V] fp32; `rows[i]` is the row `seqs[i]` samples from (None: row i).

        Only the rows of requests with processors or a grammar are copied and changed; the others are chosen
        from the logits as they are, so they cost what they would in a batch of their own kind.
        """
        if rows is not None:
            logits = logits[torch.tensor(rows, dtype=torch.long, device=logits.device)]
        # On CPU one C pass gives each row's argmax and log-normalizer; torch's log_softmax would write a copy of the
        # logits for the one log-probability per row that is reported.
        summaries = cpu_logits.row_summaries(logits) if cpu_logits.serves(logits) else None
        chosen = summaries[0] if summaries is not None else greedy_choices(logits)
        changed = [row for row, seq in enumerate(seqs) if seq.params.processes_logits or seq.grammar is not None]
        changed_logits = self._process(logits, changed, seqs) if changed else None
        position = {row: index for index, row in enumerate(changed)}
        if changed:
            chosen[torch.tensor(changed, device=chosen.device)] = greedy_choices(changed_logits)
        sampled = [(row, seq) for row, seq in enumerate(seqs) if not seq.params.greedy]
        if sampled:
            index = torch.tensor([row for row, _ in sampled], dtype=torch.long, device=chosen.device)
            scores = self._scores(logits, changed_logits, position, sampled, index)
            chosen[index] = self._draw(scores, self._uniforms([seq for _, seq in sampled]), chosen[index])
        if summaries is not None:
            chosen_log_probs = logits.gather(1, chosen[:, None]).squeeze(1) - summaries[1] - summaries[2]
        else:
            chosen_log_probs = torch.log_softmax(logits, dim=-1).gather(1, chosen[:, None]).squeeze(1)
        top = self._top(logits, seqs, chosen, chosen_log_probs)
        return SampledTokens(chosen.tolist(), chosen_log_probs.tolist(), top)

    @staticmethod
    def _process(logits: torch.Tensor, changed: list[int], seqs: list[Sequence]) -> torch.Tensor:
        """A copy of the `changed` rows, each with its request's processors and grammar mask applied."""
        changed_logits = logits.index_select(0, torch.tensor(changed, dtype=torch.long, device=logits.device))
        process_rows(changed_logits, [seqs[row] for row in changed])  # rows without processors add nothing
        masked = [index for index, row in enumerate(changed) if seqs[row].grammar is not None]
        if masked:
            bitmasks = fill_masks([seqs[changed[index]].grammar for index in masked], logits.shape[1])
            if len(masked) == len(changed):
                apply_masks(changed_logits, bitmasks)
            else:
                index = torch.tensor(masked, dtype=torch.long, device=logits.device)
                rows_to_mask = changed_logits.index_select(0, index)
                apply_masks(rows_to_mask, bitmasks)
                changed_logits.index_copy_(0, index, rows_to_mask)
        return changed_logits

    @staticmethod
    def _top(logits: torch.Tensor, seqs: list[Sequence], chosen: torch.Tensor,
             chosen_log_probs: torch.Tensor) -> list[list[tuple[int, float]] | None]:
        """The most likely tokens of the rows that ask for them, from those rows' log_softmax; their chosen tokens'
        log-probabilities (in place) are taken from the same, so that a token reported in both agrees."""
        wanted = [seq.params.top_n_tokens for seq in seqs]
        top: list[list[tuple[int, float]] | None] = [None] * len(seqs)
        rows = [row for row, count in enumerate(wanted) if count]
        if not rows:
            return top
        index = torch.tensor(rows, device=logits.device)
        log_probs = torch.log_softmax(logits.index_select(0, index), dim=-1)
        chosen_log_probs[index] = log_probs.gather(1, chosen[index][:, None]).squeeze(1)
        values, ids = log_probs.topk(max(wanted[row] for row in rows), dim=-1)
        for row, row_values, row_ids in zip(rows, values.tolist(), ids.tolist()):
            top[row] = list(zip(row_ids[: wanted[row]], row_values[: wanted[row]]))
        return top

    @staticmethod
    def _scores(logits: torch.Tensor, changed_logits: torch.Tensor | None, position: dict[int, int],
                sampled: list[tuple[int, Sequence]], index: torch.Tensor) -> torch.Tensor:
        """The sampled rows' scores to draw from: their (processed) logits over their temperatures, in one
        division; the rows with other warpers (top-k, top-p, min-p, typical) get theirs one by one."""
        rows = logits.index_select(0, index)
        for out_row, (row, _) in enumerate(sampled):
            if row in position:
                rows[out_row] = changed_logits[position[row]]
        temperatures = torch.tensor([seq.params.temperature for _, seq in sampled], dtype=rows.dtype,
                                    device=rows.device)
        scores = rows / temperatures[:, None]
        for out_row, (_, seq) in enumerate(sampled):
            params = seq.params
            if params.top_k > 0 or params.top_p < 1.0 or params.min_p > 0.0 or params.typical_p < 1.0:
                scores[out_row] = warp_row(rows[out_row], seq)
        return scores

    def _uniforms(self, seqs: list[Sequence]) -> torch.Tensor:
        """One uniform number per sequence: a seeded one's from its own generator, the others' from the shared."""
        uniforms = torch.rand(len(seqs), generator=self._unseeded, device=self.device)
        for position, seq in enumerate(seqs):
            if seq.params.seed is not None:
                uniforms[position] = torch.rand(1, generator=self._generator_for(seq), device=self.device)[0]
        return uniforms

    @staticmethod
    def _draw(scores: torch.Tensor, uniforms: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
        """One token per row of `scores` [R, V] by inverse transform: the first whose cumulative probability
        passes the row's uniform. `fallback` (the greedy choices) for rows whose softmax is not finite: extreme
        parameters (a temperature near 0) overflow the scaled logits, whose limit is the greedy choice, and
        raising instead would fail the whole step."""
        cumulative = torch.softmax(scores, dim=-1).cumsum_(dim=-1)
        # A softmax is not finite only where it is NaN, which the sum of its row carries.
        finite = torch.isfinite(cumulative[:, -1])
        if not bool(finite.all()):
            cumulative[~finite] = 1.0  # any valid distribution: those rows take the fallback below
        targets = uniforms[:, None].to(cumulative.dtype) * cumulative[:, -1:]
        drawn = torch.searchsorted(cumulative, targets, right=True).squeeze(1).clamp_(max=scores.shape[1] - 1)
        return torch.where(finite, drawn, fallback)

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


def greedy_choices(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax (the first of equal maxima; NaN counts as the maximum, as in argmax), through max's
    indices: on CPU torch's argmax over vocabulary-wide rows runs several times slower than max, a few percent
    of a decode step at batch 32 (docs/BENCHMARKS.md, "bf16 on CPU")."""
    return logits.max(dim=-1).indices
