"""Adding a front end's prompts to the engine, shared by the HTTP server and the DJL handler.

`add_prompt` is the one place where an unregistered adapter named by a generation request becomes a bad
argument (400, `Adapter X is not registered`); the management routes keep AdapterNotFoundError's 404, where
the adapter is the resource asked for. `start_prompts` submits all of a request's prompts or none of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

from lora_serving.handler.engine import Engine
from lora_serving.handler.errors import AdapterNotFoundError, InvalidRequestError
from lora_serving.handler.api.lmi_request import PromptJob
from lora_serving.handler.api.generation import Generation, prefill_tokens
from lora_serving.handler.sequence import SamplingParams

Handle = TypeVar("Handle")


def add_prompt(engine: Engine, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
               adapter: str | None) -> None:
    try:
        engine.add_request(request_id, prompt_token_ids, params, adapter)
    except AdapterNotFoundError as error:
        raise InvalidRequestError(str(error)) from None


def start_prompts(
    engine: Engine,
    jobs: Iterable[PromptJob],
    *,
    with_prefill: bool,
    submit: Callable[[list[int], SamplingParams, str | None], Handle],
    abort: Callable[[Handle], None],
) -> list[tuple[Generation, Handle]]:
    """Tokenise and submit every job, or none: if one is refused, those already submitted are aborted and the
    refusal is raised, so that the caller answers it before any byte of an answer. `submit` returns what
    the caller follows the request by (a request id, a stream)."""
    started: list[tuple[Generation, Handle]] = []
    try:
        for job in jobs:
            prompt_token_ids = engine.tokenize(job.prompt)
            prefill = prefill_tokens(engine.tokenizer, prompt_token_ids) if with_prefill else None
            handle = submit(prompt_token_ids, job.params, job.adapter)
            started.append((Generation(job.prompt, prompt_token_ids, prefill, job.params), handle))
    except BaseException:
        for _, handle in started:
            abort(handle)
        raise
    return started
