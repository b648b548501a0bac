"""Running prompts through the engine loop for the HTTP routes: submit, follow, time, collect.

Every route (LMI, OpenAI, TGI) starts its prompts here, so that tokenisation, the refusal of bad requests
before any byte of the answer is sent, latency metrics and the abort of unfinished requests happen in one
place whatever the API.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

from container.engine_loop import EngineLoop, RequestStream
from container.metrics import ServerMetrics
from handler.errors import EngineError
from handler.lmi_schema import PromptJob
from handler.output_format import Generation, prefill_tokens
from handler.sequence import FinishReason, RequestOutput


class GenerationFailedError(EngineError):
    """The engine failed a request after accepting it (answered 500)."""


@dataclass(eq=False)
class RunningPrompt:
    generation: Generation
    stream: RequestStream
    submitted_at: float = field(default_factory=time.perf_counter)
    last_token_at: float | None = None


class GenerationRunner:
    def __init__(self, engine_loop: EngineLoop, metrics: ServerMetrics) -> None:
        self._engine_loop = engine_loop
        self._engine = engine_loop.engine
        self._metrics = metrics

    async def start(self, jobs: Iterable[PromptJob], *, with_prefill: bool = False) -> list[RunningPrompt]:
        """Submit every job, or none: if the engine refuses one, those already submitted are aborted and
        the refusal is raised (before the response starts, so it becomes a 4xx)."""
        started: list[RunningPrompt] = []
        try:
            for job in jobs:
                prompt_token_ids = self._engine.tokenize(job.prompt)
                prefill = prefill_tokens(self._engine.tokenizer, prompt_token_ids) if with_prefill else None
                stream = await self._engine_loop.submit(prompt_token_ids, job.params, job.adapter)
                started.append(RunningPrompt(Generation(job.prompt, prompt_token_ids, prefill), stream))
        except BaseException:
            abort_all(started)
            raise
        return started

    async def follow(self, running: RunningPrompt) -> AsyncIterator[RequestOutput]:
        """Each output of the request, already added to its Generation."""
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
            if prompt.generation.finish_reason is FinishReason.ERROR:
                raise GenerationFailedError(prompt.generation.error or "generation failed")
        return [prompt.generation for prompt in running]

    async def _drain(self, running: RunningPrompt) -> None:
        async for _ in self.follow(running):
            pass

    def _record_latency(self, running: RunningPrompt) -> None:
        now = time.perf_counter()
        if running.last_token_at is None:
            self._metrics.time_to_first_token.observe(now - running.submitted_at)
        else:
            self._metrics.inter_token_latency.observe(now - running.last_token_at)
        running.last_token_at = now


def abort_all(running: Iterable[RunningPrompt]) -> None:
    for prompt in running:
        prompt.stream.abort()
