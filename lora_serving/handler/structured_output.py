"""Structured output: a request's JSON schema, regex or choice list as a mask over the next token.

The grammar library is llguidance (docs/ENGINE.md says why, docs/BENCHMARKS.md has the measurements). A
spec is compiled once per engine (one tokenizer) and cached; each request gets a copy of the compiled,
never-advanced matcher, so that the lexer states the library builds lazily are shared and warm. A spec the
library cannot honour, or only in part (an unimplemented JSON Schema keyword), is refused with its reason:
a client asking for a schema never gets text that merely looks like one.

Masks are filled as bitmasks (one bit per token, 32 to an int32) and applied to the logits of the rows
that have a grammar in one branch-free add of 0 or -inf per token, looked up byte by byte.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict

import llguidance
import llguidance.hf
import torch

from lora_serving.handler.errors import InvalidRequestError
from lora_serving.handler.sequence import StructuredOutput

# Compiled specs kept per engine: a service with one schema per customer adapter reuses a few hundred.
GRAMMAR_CACHE_SIZE = 256
# JSON is written as json.dumps writes it, with no other whitespace: a model free to add whitespace can add
# it forever (a small one does), and an answer cut off by max_new_tokens is no JSON at all. A schema may
# say otherwise in its "x-guidance" key (llguidance's own options).
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# (kind, value) -> the grammar llguidance builds from it.
_FROM_SPEC = {
    "json_schema": lambda value: llguidance.LLMatcher.grammar_from_json_schema(value, defaults=JSON_LAYOUT),
    "json_object": lambda _: llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_LAYOUT),
    "regex": llguidance.LLMatcher.grammar_from_regex,
    "choice": lambda value: llguidance.LLMatcher.grammar_from_lark(
        "start: " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in json.loads(value))),
}
# A spec whose lexer would take long to build is refused, not served slowly: a mask that takes long holds
# up the whole step. llguidance's fuel runs at about 14k units per millisecond (its defaults: 1M to build,
# 200k per mask); these bound the first mask at about 15 ms and any later one at about 4 ms.
LIMITS = llguidance.LLParserLimits(initial_lexer_fuel=200_000, step_lexer_fuel=50_000)
# Byte value -> the additive mask of its 8 tokens (bit i set: token allowed, 0.0; else -inf).
_BYTE_TO_MASK = torch.where((torch.arange(256)[:, None] >> torch.arange(8)) & 1 == 1, 0.0, float("-inf"))


class GrammarMatcher:
    """One sequence's position in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._matcher = matcher

    def fill_mask(self, bitmask_row: torch.Tensor) -> None:
        """Write the allowed next tokens into `bitmask_row` (int32, contiguous, on the CPU)."""
        self._matcher.unsafe_compute_mask_ptr(bitmask_row.data_ptr(), bitmask_row.numel() * 4)

    def accept(self, token_id: int) -> bool:
        return self._matcher.consume_token(token_id)

    @property
    def is_finished(self) -> bool:
        """The grammar is complete and allows nothing more."""
        return self._matcher.is_stopped()

    @property
    def error(self) -> str:
        return self._matcher.get_error()


class StructuredOutputCompiler:
    """Compiles specs against one tokenizer; thread-safe (requests are added from the server's threads)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: frozenset[int], tokenizer_lock: threading.Lock) -> None:
        self._hf_tokenizer = tokenizer
        self._tokenizer_lock = tokenizer_lock
        self.vocab_size = vocab_size
        self._eos_token_ids = sorted(eos_token_ids) or None
        self._tokenizer: llguidance.LLTokenizer | None = None  # built at the first spec: about a second
        self._compiled: OrderedDict[tuple[str, str], llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def matcher(self, spec: StructuredOutput) -> GrammarMatcher:
        """A fresh matcher for `spec`; InvalidRequestError naming the request's field that asked for it if
        the spec is invalid or uses what the library does not implement."""
        key = (spec.kind, spec.value)
        with self._lock:
            compiled = self._compiled.get(key)
            if compiled is not None:
                self._compiled.move_to_end(key)
                return GrammarMatcher(compiled.deep_copy())
            tokenizer = self._llg_tokenizer()
        compiled = self._compile(spec, spec.source or spec.kind, tokenizer)
        with self._lock:
            self._compiled[key] = compiled
            if len(self._compiled) > GRAMMAR_CACHE_SIZE:
                self._compiled.popitem(last=False)
        return GrammarMatcher(compiled.deep_copy())

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        if self._tokenizer is None:
            with self._tokenizer_lock:  # it serialises the tokenizer, which other threads encode with
                self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, n_vocab=self.vocab_size,
                                                               eos_token=self._eos_token_ids)
        return self._tokenizer

    def _compile(self, spec: StructuredOutput, field: str, tokenizer: llguidance.LLTokenizer) -> llguidance.LLMatcher:
        try:
            grammar = _FROM_SPEC[spec.kind](spec.value)
        except ValueError as error:  # not a JSON object where one is needed
            raise InvalidRequestError(f"{field} is invalid: {error}") from None
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if is_error or messages:
            # A warning is a part of the spec the library would not enforce: refused, not ignored.
            raise InvalidRequestError(f"{field} cannot be enforced: {'; '.join(messages)}")
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0, limits=LIMITS)
        # The first mask builds the lexer's first states, shared by every copy: here, in the request's
        # thread, rather than in the engine's step; and a spec that exhausts the limits fails here, as a 400.
        GrammarMatcher(matcher).fill_mask(torch.empty((self.vocab_size + 31) // 32, dtype=torch.int32))
        if matcher.is_error():
            raise InvalidRequestError(f"{field} cannot be enforced: {matcher.get_error().splitlines()[0]}")
        return matcher


def fill_masks(matchers: list[GrammarMatcher], vocab_size: int) -> torch.Tensor:
    """The next-token bitmasks of `matchers`, [len(matchers), ceil(vocab / 32)] int32."""
    bitmasks = torch.empty((len(matchers), (vocab_size + 31) // 32), dtype=torch.int32)
    for row, matcher in enumerate(matchers):
        matcher.fill_mask(bitmasks[row])
    return bitmasks


def apply_masks(logits: torch.Tensor, bitmasks: torch.Tensor) -> None:
    """logits [R, V] += 0 where allowed, -inf where not, in place."""
    num_rows, vocab_size = logits.shape
    table = _BYTE_TO_MASK.to(device=logits.device, dtype=logits.dtype)
    byte_values = bitmasks.to(logits.device).view(torch.uint8).view(-1).long()
    logits += table.index_select(0, byte_values).view(num_rows, -1)[:, :vocab_size]
