"""Running prompts through an EngineLoop from asyncio code: submit, follow, time, collect.

Every HTTP route (LMI, OpenAI, TGI) and the DJL handler's async mode start their prompts here, so that
tokenisation, the refusal of bad requests before any byte of the answer is sent, latency observation and
the abort of unfinished requests happen in one place whatever the API.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

from lora_serving.handler.engine_loop import EngineLoop, RequestStream
from lora_serving.handler.errors import EngineError
from lora_serving.handler.api.lmi_request import PromptJob
from lora_serving.handler.lora.resolver import AdapterResolver
from lora_serving.handler.api.generation import Generation
from lora_serving.handler.sequence import RequestOutput
from lora_serving.handler.submission import start_prompts

# Called with seconds: from submission to the first token, or between two tokens.
LatencyObserver = Callable[[float], None]


class GenerationFailedError(EngineError):
    """The engine failed a request after accepting it."""


@dataclass(eq=False)
class RunningPrompt:
    generation: Generation
    stream: RequestStream
    submitted_at: float = field(default_factory=time.perf_counter)
    last_token_at: float | None = None


class GenerationRunner:
    def __init__(self, engine_loop: EngineLoop, *, on_first_token: LatencyObserver | None = None,
                 on_next_token: LatencyObserver | None = None, resolver: AdapterResolver | None = None) -> None:
        """`resolver`: registers on first use the adapters a request names that no one registered."""
        self._engine_loop = engine_loop
        self._engine = engine_loop.engine
        self._on_first_token = on_first_token
        self._on_next_token = on_next_token
        self._resolver = resolver

    async def start(self, jobs: Iterable[PromptJob], *, with_prefill: bool = False) -> list[RunningPrompt]:
        """Submit every job, or none (handler.submission.start_prompts), once their adapters are registered."""
        jobs = list(jobs)
        submitted_at = time.perf_counter()  # an adapter's first-use load counts in the time to first token
        if self._resolver is not None:
            await self._resolver.ensure(job.adapter for job in jobs)
        started = start_prompts(self._engine, jobs, with_prefill=with_prefill, submit=self._engine_loop.submit,
                                abort=RequestStream.abort)
        return [RunningPrompt(generation, stream, submitted_at) for generation, stream in started]

    async def follow(self, running: RunningPrompt) -> AsyncIterator[RequestOutput]:
        """Each output of the request, already added to its Generation; the request is aborted if the
        caller stops following before it finished."""
        try:
            async for output in running.stream:
                running.generation.add(output)
                if output.tokens:
                    self._record_latency(running)
                yield output
        finally:
            running.stream.abort()

    async def complete(self, running: list[RunningPrompt]) -> list[Generation]:
        """Wait for every request to finish; raise GenerationFailedError if the engine failed one."""
        try:
            await asyncio.gather(*(self._drain(prompt) for prompt in running))
        finally:
            abort_all(running)
        for prompt in running:
            failed = prompt.generation.failed
            if failed is not None:
                raise GenerationFailedError(failed.error or "generation failed")
        return [prompt.generation for prompt in running]

    async def _drain(self, running: RunningPrompt) -> None:
        async for _ in self.follow(running):
            pass

    def _record_latency(self, running: RunningPrompt) -> None:
        now = time.perf_counter()
        if running.last_token_at is None:
            if self._on_first_token is not None:
                self._on_first_token(now - running.submitted_at)
        elif self._on_next_token is not None:
            self._on_next_token(now - running.last_token_at)
        running.last_token_at = now


def abort_all(running: Iterable[RunningPrompt]) -> None:
    for prompt in running:
        prompt.stream.abort()
