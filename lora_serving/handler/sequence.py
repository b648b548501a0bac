"""Requests as the engine sees them: sampling parameters, sequence state, and what a step reports."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from lora_serving.handler.errors import InvalidRequestError

if TYPE_CHECKING:
    from lora_serving.handler.lora.peft_adapter import AdapterVersion
    from lora_serving.handler.structured_output import GrammarMatcher

DEFAULT_MAX_NEW_TOKENS = 30  # LMI's default
# Alternatives per token that a client may ask for (OpenAI's top_logprobs limit; vLLM's default cap).
MAX_TOP_LOG_PROBS = 20
# OpenAI's range for logit_bias values.
MAX_LOGIT_BIAS = 100.0

StructuredKind = Literal["json_schema", "json_object", "regex", "choice"]


@dataclass(frozen=True, slots=True)
class StructuredOutput:
    """What the generated text must match: a JSON schema (`value` is its JSON text), any JSON object, a
    regular expression, or one of fixed strings (`value` is their JSON list). The engine compiles it into a
    token mask (handler/structured_output.py)."""

    kind: StructuredKind
    value: str = ""
    # The request field that asked for it (`guided_json`, `response_format`), for error messages.
    source: str = field(default="", compare=False)


@dataclass(slots=True)
class SamplingParams:
    """Per-request generation parameters, named as LMI's `parameters` object names them."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k filter
    top_p: float = 1.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    # Choices returned, and sequences generated to pick them from (the n with the highest cumulative
    # log-probability); None means n. All of them share the prompt's KV blocks.
    n: int = 1
    best_of: int | None = None
    # OpenAI's penalties over the generated tokens: logit -= frequency * count + presence * (count > 0).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_p: float = 0.0
    typical_p: float = 1.0
    # EOS and stop_token_ids cannot end the answer before this many tokens.
    min_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    # token id -> added to its logit, in [-100, 100].
    logit_bias: dict[int, float] = field(default_factory=dict)
    # Alternatives reported with each generated token (with their log-probabilities), 0 for none.
    top_n_tokens: int = 0
    # Score the prompt: each prompt token's log-probability given the tokens before it.
    prompt_log_probs: bool = False
    structured: StructuredOutput | None = None
    # Leave special tokens (`<|eot_id|>`, an added `[TOOL_CALLS]`) out of the text, as vLLM does by default.
    # A tool-call parser whose marker a tokenizer may hold as a special token turns it off (tool_schema.py).
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            raise InvalidRequestError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise InvalidRequestError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            raise InvalidRequestError(f"top_k must be an integer >= 0 (or -1 for none), got {self.top_k!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise InvalidRequestError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not 0 <= self.seed < 2**64):  # what a torch.Generator takes
            raise InvalidRequestError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidRequestError("stop must be a list of non-empty strings")
        if not _is_int(self.n) or self.n < 1:
            raise InvalidRequestError(f"n must be a positive integer, got {self.n!r}")
        if self.best_of is not None and (not _is_int(self.best_of) or self.best_of < self.n):
            raise InvalidRequestError(f"best_of must be an integer >= n ({self.n}), got {self.best_of!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2.0 <= value <= 2.0:
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {value!r}")
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not _is_number(self.typical_p) or not 0.0 < self.typical_p <= 1.0:
            raise InvalidRequestError(f"typical_p must be in (0, 1], got {self.typical_p!r}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_new_tokens:
            raise InvalidRequestError(f"min_tokens must be an integer in [0, max_new_tokens], got {self.min_tokens!r}")
        if not isinstance(self.stop_token_ids, list) or not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise InvalidRequestError("stop_token_ids must be a list of token ids")
        if not isinstance(self.logit_bias, dict) or not all(
            _is_int(token) and token >= 0 and _is_number(bias) and abs(bias) <= MAX_LOGIT_BIAS
            for token, bias in self.logit_bias.items()
        ):
            raise InvalidRequestError("logit_bias must map token ids to numbers in [-100, 100]")
        if not isinstance(self.skip_special_tokens, bool):
            raise InvalidRequestError(f"skip_special_tokens must be true or false, got {self.skip_special_tokens!r}")
        if not _is_int(self.top_n_tokens) or not 0 <= self.top_n_tokens <= MAX_TOP_LOG_PROBS:
            raise InvalidRequestError(f"the number of top log-probabilities per token must be in "
                                      f"[0, {MAX_TOP_LOG_PROBS}], got {self.top_n_tokens!r}")

    @property
    def num_sequences(self) -> int:
        """Sequences generated for the request: best_of, or n."""
        return self.best_of or self.n

    @property
    def processes_logits(self) -> bool:
        """Whether anything changes this request's logits before the choice (penalties, biases, masks);
        requests with none skip that work."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or bool(self.logit_bias) or self.min_tokens > 0)

    @property
    def greedy(self) -> bool:
        # LMI: do_sample=false means greedy whatever the temperature; temperature 0 is greedy too.
        return not self.do_sample or self.temperature == 0


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    # Admitted: its tokens are being computed, over several steps when the prefill is chunked. It samples
    # when the last of them is, and runs (decodes) from then on.
    PREFILLING = "prefilling"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    """LMI's names for why generation stopped."""

    LENGTH = "length"
    EOS = "eos_token"
    STOP_SEQUENCE = "stop_sequence"
    ABORTED = "aborted"
    ERROR = "error"


_arrival_counter = itertools.count()


@dataclass(eq=False, slots=True)
class Sequence:
    """One request in flight: its tokens, where its KV lives, and its decoding state."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: str | None = None
    # Which of the request's sequences this is (n / best_of); the others are its `forks` until it is first
    # admitted, when they start sharing its prompt's KV blocks.
    index: int = 0
    forks: list["Sequence"] = field(default_factory=list)
    # The registered content this request was accepted with; it keeps it even if the name is re-registered.
    adapter_version: "AdapterVersion | None" = None
    status: SequenceStatus = SequenceStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    output_log_probs: list[float] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    # Tokens whose K/V are in the cache (from the prefix cache, or computed since admission); 0 while waiting.
    num_cached_tokens: int = 0
    # The prefix cache's hash chain over this sequence's full blocks, as far as it was needed
    # (handler/prefix_cache.py); tokens are only ever appended, so it stays valid.
    block_hashes: list[bytes] = field(default_factory=list)
    arrival_order: int = field(default_factory=lambda: next(_arrival_counter))
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    # Steps this sequence waited while at the head of the queue; the scheduler's fairness bound.
    steps_waited: int = 0
    # Tokens that may not be sampled before min_tokens (EOS, stop_token_ids); empty without min_tokens.
    min_tokens_suppressed: tuple[int, ...] = ()
    # The structured-output state: what the grammar allows next.
    grammar: "GrammarMatcher | None" = None
    # Each prompt token's log-probability (None for the first), when params.prompt_log_probs: filled as the
    # prefill computes the prompt, chunk by chunk; whole by the first sampled token.
    prompt_log_probs: list[float | None] | None = None

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def max_total_tokens(self) -> int:
        return len(self.prompt_token_ids) + self.params.max_new_tokens

    @property
    def scores_prompt(self) -> bool:
        """Whether this sequence still has prompt tokens to score: a request's first sequence scores its
        prompt once; the others share the scores (and, preempted, none scores again)."""
        return (self.params.prompt_log_probs and self.index == 0
                and (self.prompt_log_probs is None or len(self.prompt_log_probs) < len(self.prompt_token_ids)))

    @property
    def num_reusable_tokens(self) -> int:
        """Leading tokens whose K/V may come from the prefix cache: all but the last, whose logits the
        sequence needs; and while it scores its prompt, only those whose scores it has (scoring a token
        needs the hidden state of the one before it, which the cache does not keep)."""
        if self.scores_prompt:
            return len(self.prompt_log_probs) - 1 if self.prompt_log_probs else 0
        return self.num_tokens - 1


@dataclass(slots=True)
class TopToken:
    """An alternative to a generated token, with its log-probability under the model."""

    id: int
    text: str
    log_prob: float


@dataclass(slots=True)
class TokenOutput:
    """One generated token as streamed to clients."""

    id: int
    # What the token adds to the answer's text.
    text: str
    log_prob: float
    # The most likely tokens at this position, best first, when the request asked for top_n_tokens.
    top_tokens: list[TopToken] | None = None
    # The token's own text where the answer does not carry it: a token that ended the answer (EOS, one of
    # stop_token_ids) adds nothing to the text, yet details and logprobs list it as itself, as vLLM and TGI do.
    stop_token_text: str | None = None

    @property
    def listed_text(self) -> str:
        """How details and logprobs name this token."""
        return self.text if self.stop_token_text is None else self.stop_token_text


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request: the new tokens and text, and whether it finished."""

    request_id: str
    tokens: list[TokenOutput]
    finished: bool
    finish_reason: FinishReason | None = None
    error: str | None = None
    # Which of the request's sequences (n / best_of) this output belongs to.
    index: int = 0
    # With the first tokens of a request that asked to score its prompt: each prompt token's log-probability.
    prompt_log_probs: list[float | None] | None = None


@dataclass(slots=True)
class GenerationResult:
    """The whole answer to one prompt, as `Engine.generate` returns it."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    log_probs: list[float]
    finish_reason: FinishReason | None
    error: str | None = None
    index: int = 0
    top_tokens: list[list[TopToken]] = field(default_factory=list)
    prompt_log_probs: list[float | None] | None = None
    # With n or best_of > 1: the n choices returned, best first (this result is the first of them).
    choices: list["GenerationResult"] = field(default_factory=list, repr=False, compare=False)
