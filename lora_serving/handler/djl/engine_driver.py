"""Requests of the synchronous modes (rolling batch, plain batching), whose worker thread steps the engine
itself: start a request's prompts, and route each step's outputs to the request they belong to.

A request naming adapters that option.adapter_resolver is still fetching can wait without holding up the
others (rolling batch): it is then an ActiveRequest with `resolving` futures and nothing submitted, until
`submit_resolved` submits it (or answers its failure) once the fetches are done."""

from __future__ import annotations

import uuid
from concurrent.futures import Future, wait
from dataclasses import dataclass, field

from lora_serving.handler.djl.request import DjlRequest, Item
from lora_serving.handler.engine import Engine
from lora_serving.handler.errors import EngineError
from lora_serving.handler.lora.resolver import AdapterResolver
from lora_serving.handler.api.generation import Generation
from lora_serving.handler.sequence import RequestOutput, SamplingParams
from lora_serving.handler.submission import add_prompt, start_prompts


@dataclass(eq=False)
class ActiveRequest:
    request: DjlRequest
    generations: dict[str, Generation] = field(default_factory=dict)  # by engine request id
    headers: dict[str, str] = field(default_factory=dict)
    resolving: list[Future] = field(default_factory=list)  # adapter fetches to wait for before submitting


class EngineDriver:
    def __init__(self, engine: Engine, *, model_name: str, resolver: AdapterResolver | None = None) -> None:
        self.engine = engine
        self.model_name = model_name
        self._resolver = resolver
        self._owners: dict[str, ActiveRequest] = {}  # engine request id -> its DJL request

    def start(self, item, seed: int | None = None, *, wait_for_adapters: bool = True) -> ActiveRequest | Item:
        """Parse and submit one DJL request item; a refused request is answered by its failure Item. With
        `wait_for_adapters` false, a request whose adapters are being resolved comes back unsubmitted."""
        try:
            request = DjlRequest.parse(item, self.engine, output_formatter=self.engine.config.output_formatter,
                                       model_name=self.model_name, seed=seed)
            resolving = self._begin_resolving(request)
        except EngineError as error:
            return Item.failure(error)
        active = ActiveRequest(request, headers={"Content-Type": request.content_type}, resolving=resolving)
        if resolving and wait_for_adapters:
            wait(resolving)
        return active if resolving and not wait_for_adapters else self.submit_resolved(active)

    def submit_resolved(self, active: ActiveRequest) -> ActiveRequest | Item:
        """Submit a request whose adapter fetches are all done (as it is, while one still runs); a failed fetch
        or a refused prompt is answered by its failure Item."""
        if not all(future.done() for future in active.resolving):
            return active
        for future in active.resolving:
            error = future.exception()  # the fetch's own error, for every request that waited for it
            if error is not None:
                return Item.failure(error if isinstance(error, EngineError) else f"adapter fetch failed: {error}")
        try:
            started = start_prompts(self.engine, active.request.jobs, with_prefill=active.request.with_prefill,
                                    submit=self._submit, abort=self.engine.abort)
        except EngineError as error:
            return Item.failure(error)
        active.resolving = []
        active.request.begin([generation for generation, _ in started])
        active.generations = {request_id: generation for generation, request_id in started}
        for request_id in active.generations:
            self._owners[request_id] = active
        return active

    def wait_for_resolving(self, actives: list[ActiveRequest], timeout: float) -> None:
        """Block until one of these requests' fetches is done, at most `timeout` seconds: what an iteration
        with nothing to step does instead of returning at once to a caller that calls again at once."""
        pending = [future for active in actives for future in active.resolving if not future.done()]
        if pending:
            wait(pending, timeout=timeout, return_when="FIRST_COMPLETED")

    def _begin_resolving(self, request: DjlRequest) -> list[Future]:
        if self._resolver is None:
            return []
        names = dict.fromkeys(job.adapter for job in request.jobs if job.adapter)
        futures = (self._resolver.begin(name) for name in names)
        return [future for future in futures if future is not None]

    def step(self) -> bool:
        """One engine step, its outputs recorded by the requests they belong to; False if nothing ran."""
        if not self.engine.has_unfinished_requests():
            return False
        for output in self.engine.step():
            self._record(output)
        return True

    def finish(self, active: ActiveRequest) -> None:
        """Forget a request that got its last item, aborting whatever of it still runs."""
        for request_id, generation in active.generations.items():
            self._owners.pop(request_id, None)
            if not generation.finished:
                self.engine.abort(request_id)

    def _submit(self, prompt_token_ids: list[int], params: SamplingParams, adapter: str | None) -> str:
        request_id = uuid.uuid4().hex
        add_prompt(self.engine, request_id, prompt_token_ids, params, adapter)
        return request_id

    def _record(self, output: RequestOutput) -> None:
        active = self._owners.get(output.request_id)
        if active is None:  # finished (aborted) in an earlier iteration
            return
        generation = active.generations[output.request_id]
        generation.add(output)
        active.request.record(generation, output)
