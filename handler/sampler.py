"""Turns each sequence's next-token logits into a token, following its own sampling parameters.

Order of processing as in transformers: repetition penalty, then temperature, top-k, top-p. Every sampled
request draws from its own generator, seeded from `seed` (or at random), so the same seed gives the same
output whatever else shares the batch.
"""

from __future__ import annotations

import random

import torch

from handler.sequence import Sequence


class Sampler:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._generators: dict[str, torch.Generator] = {}
        self._seed_source = random.SystemRandom()

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[float]]:
        """logits [B, V] fp32 -> (token id, log-probability under the model) per sequence."""
        log_probs = torch.log_softmax(logits, dim=-1)
        processed = logits
        penalised = [row for row, seq in enumerate(seqs) if seq.params.repetition_penalty != 1.0]
        if penalised:
            processed = logits.clone()
            for row in penalised:
                self._apply_repetition_penalty(processed[row], seqs[row])
        chosen = processed.argmax(dim=-1)
        sampled_rows = [row for row, seq in enumerate(seqs) if not seq.params.greedy]
        if sampled_rows:
            chosen = chosen.clone()
            for row in sampled_rows:
                chosen[row] = self._sample_row(processed[row], seqs[row])
        chosen_log_probs = log_probs.gather(1, chosen[:, None]).squeeze(1)
        return chosen.tolist(), chosen_log_probs.tolist()

    @staticmethod
    def _apply_repetition_penalty(row_logits: torch.Tensor, seq: Sequence) -> None:
        penalty = seq.params.repetition_penalty
        seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=row_logits.device)
        seen = seen[seen < row_logits.shape[0]]
        scores = row_logits[seen]
        row_logits[seen] = torch.where(scores < 0, scores * penalty, scores / penalty)

    def _sample_row(self, row_logits: torch.Tensor, seq: Sequence) -> int:
        params = seq.params
        scores = row_logits / params.temperature
        if params.top_k > 0 and params.top_k < scores.shape[0]:
            kth_largest = torch.topk(scores, params.top_k).values[-1]
            scores = scores.masked_fill(scores < kth_largest, float("-inf"))
        if params.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=False)
            cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
            # Drop the low tail whose total mass is at most 1 - top_p; the most likely token always stays.
            remove_sorted = cumulative <= (1.0 - params.top_p)
            remove_sorted[-1] = False
            scores = scores.masked_fill(remove_sorted.scatter(0, order, remove_sorted), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if not bool(torch.isfinite(probs).all()):
            # Extreme parameters overflowed the scaled logits: a temperature near 0 makes them all +-inf, whose
            # softmax is NaN. Their limit is the greedy choice; raising instead would fail the whole step.
            return int(row_logits.argmax())
        return int(torch.multinomial(probs, 1, generator=self._generator_for(seq)).item())

    def _generator_for(self, seq: Sequence) -> torch.Generator:
        generator = self._generators.get(seq.request_id)
        if generator is None:
            seed = seq.params.seed if seq.params.seed is not None else self._seed_source.getrandbits(63)
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed)
            self._generators[seq.request_id] = generator
        return generator
