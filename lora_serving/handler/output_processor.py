"""Turns each sampled token into streamed text and decides when a request is done.

Stop sequences are matched on the text (LMI/vLLM semantics: the stop string itself is not returned). While
a request has stop strings, the last few characters are held back from the stream, because they may turn
out to be the start of a stop string; they are released as soon as they cannot be. A token in
`stop_token_ids` ends the request like a stop string; a grammar that is complete ends it like EOS. The text of
the token that ends a request (EOS, `stop_token_ids`) is left out of the answer, as vLLM and TGI leave it out;
details and logprobs still list the token.
"""

from __future__ import annotations

from lora_serving.handler.detokenizer import IncrementalDetokenizer
from lora_serving.handler.sequence import FinishReason, Sequence, TokenOutput, TopToken


class RequestTextState:
    def __init__(self, tokenizer, seq: Sequence, eos_token_ids: frozenset[int]) -> None:
        self._tokenizer = tokenizer
        self._detokenizer = IncrementalDetokenizer(tokenizer, seq.prompt_token_ids, seq.params.skip_special_tokens)
        self._eos_token_ids = eos_token_ids
        self._stops = seq.params.stop
        self._hold_back = max((len(stop) for stop in self._stops), default=1) - 1
        self.text = ""  # everything decoded so far, stop string included
        self.emitted = 0  # characters of `text` already streamed
        self.error: str | None = None  # why the request failed, with FinishReason.ERROR

    def process(self, seq: Sequence, token_id: int, log_prob: float,
                top: list[tuple[int, float]] | None = None) -> tuple[TokenOutput, FinishReason | None]:
        """Record the token `seq` just sampled (with its most likely alternatives, if asked); return its
        streamed form and the finish reason, if any."""
        grammar_accepts = seq.grammar is None or seq.grammar.accept(token_id)
        seq.output_token_ids.append(token_id)
        seq.output_log_probs.append(log_prob)
        previous_length = len(self.text)
        is_stop_token = token_id in seq.params.stop_token_ids or (
            token_id in self._eos_token_ids and not seq.params.ignore_eos)
        if not is_stop_token:  # the token that ends the answer is not part of its text
            self.text += self._detokenizer.add(token_id)

        finish: FinishReason | None = None
        visible_end = len(self.text)
        stop_at = self._find_stop(previous_length)
        if not grammar_accepts:  # the mask allowed nothing the grammar accepts: an extreme parameter's fallback
            finish = FinishReason.ERROR
            self.error = f"structured output: the grammar refused token {token_id} ({seq.grammar.error})"
        elif stop_at is not None:
            finish = FinishReason.STOP_SEQUENCE
            visible_end = stop_at
        elif token_id in seq.params.stop_token_ids:
            finish = FinishReason.STOP_SEQUENCE
        elif (token_id in self._eos_token_ids and not seq.params.ignore_eos) or (
                seq.grammar is not None and seq.grammar.is_finished):
            finish = FinishReason.EOS
        elif len(seq.output_token_ids) >= seq.params.max_new_tokens:
            finish = FinishReason.LENGTH

        if finish is None:
            visible_end = len(self.text) - self._hold_back if self._stops else len(self.text)
        elif stop_at is None:
            self.text += self._detokenizer.flush()
            visible_end = len(self.text)
        delta = self.text[self.emitted : visible_end] if visible_end > self.emitted else ""
        self.emitted = max(self.emitted, visible_end)
        top_tokens = None if top is None else [
            TopToken(id=top_id, text=self._tokenizer.decode([top_id]), log_prob=top_log_prob)
            for top_id, top_log_prob in top
        ]
        stop_token_text = self._tokenizer.decode([token_id]) if is_stop_token else None
        return TokenOutput(id=token_id, text=delta, log_prob=log_prob, top_tokens=top_tokens,
                           stop_token_text=stop_token_text), finish

    def _find_stop(self, previous_length: int) -> int | None:
        """Index in `text` where the earliest stop string that the new text completed begins."""
        if not self._stops:
            return None
        # A stop string completed by this token ends after previous_length, so it starts no earlier than this.
        search_from = max(0, previous_length - self._hold_back)
        found = [index for stop in self._stops if (index := self.text.find(stop, search_from)) != -1]
        return min(found) if found else None

    @property
    def final_text(self) -> str:
        return self.text[: self.emitted]
