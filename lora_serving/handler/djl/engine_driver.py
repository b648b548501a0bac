"""Requests of the synchronous modes (rolling batch, plain batching), whose worker thread steps the engine
itself: start a request's prompts, and route each step's outputs to the request they belong to."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from lora_serving.handler.djl.request import DjlRequest, Item
from lora_serving.handler.engine import Engine
from lora_serving.handler.errors import EngineError
from lora_serving.handler.lora.resolver import AdapterResolver
from lora_serving.handler.output_format import Generation
from lora_serving.handler.sequence import RequestOutput, SamplingParams
from lora_serving.handler.submission import add_prompt, start_prompts


@dataclass(eq=False)
class ActiveRequest:
    request: DjlRequest
    generations: dict[str, Generation] = field(default_factory=dict)  # by engine request id
    headers: dict[str, str] = field(default_factory=dict)


class EngineDriver:
    def __init__(self, engine: Engine, *, model_name: str, resolver: AdapterResolver | None = None) -> None:
        self.engine = engine
        self.model_name = model_name
        self._resolver = resolver
        self._owners: dict[str, ActiveRequest] = {}  # engine request id -> its DJL request

    def start(self, item, seed: int | None = None) -> ActiveRequest | Item:
        """Parse and submit one DJL request item; a refused request is answered by its failure Item."""
        try:
            request = DjlRequest.parse(item, self.engine, output_formatter=self.engine.config.output_formatter,
                                       model_name=self.model_name, seed=seed)
            if self._resolver is not None:
                self._resolver.ensure_blocking(job.adapter for job in request.jobs)
            started = start_prompts(self.engine, request.jobs, with_prefill=request.with_prefill,
                                    submit=self._submit, abort=self.engine.abort)
        except EngineError as error:
            return Item.failure(error)
        request.begin([generation for generation, _ in started])
        active = ActiveRequest(request, {request_id: generation for generation, request_id in started},
                               {"Content-Type": request.content_type})
        for request_id in active.generations:
            self._owners[request_id] = active
        return active

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
