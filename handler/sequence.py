"""Requests as the engine sees them: sampling parameters, sequence state, and what a step reports."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from handler.errors import InvalidRequestError

if TYPE_CHECKING:
    from handler.lora.peft_adapter import AdapterVersion

DEFAULT_MAX_NEW_TOKENS = 30  # LMI's default


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

    @property
    def greedy(self) -> bool:
        # LMI: do_sample=false means greedy whatever the temperature; temperature 0 is greedy too.
        return not self.do_sample or self.temperature == 0


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
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
    # The registered content this request was accepted with; it keeps it even if the name is re-registered.
    adapter_version: "AdapterVersion | None" = None
    status: SequenceStatus = SequenceStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    output_log_probs: list[float] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    # Tokens whose K/V are in the cache; 0 after admission or preemption (everything is recomputed).
    num_cached_tokens: int = 0
    arrival_order: int = field(default_factory=lambda: next(_arrival_counter))
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    # Steps this sequence waited while at the head of the queue; the scheduler's fairness bound.
    steps_waited: int = 0

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


@dataclass(slots=True)
class TokenOutput:
    """One generated token as streamed to clients."""

    id: int
    text: str
    log_prob: float


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request: the new tokens and text, and whether it finished."""

    request_id: str
    tokens: list[TokenOutput]
    finished: bool
    finish_reason: FinishReason | None = None
    error: str | None = None


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
