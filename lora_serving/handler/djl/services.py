"""The engine as DJL's worker runs it, in the mode DJL picked.

`SyncService` serves rolling batch and plain batching: DJL's worker thread calls in, one call at a time,
and the engine steps on that thread. `AsyncService` serves async mode: the worker's event loop awaits
each call, many at a time, while the engine steps on its own thread (handler.engine_loop).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable

from djl_python import Output

from lora_serving.handler.djl.adapters import AdapterCall, DjlAdapters
from lora_serving.handler.djl.engine_driver import EngineDriver
from lora_serving.handler.djl.outputs import async_output
from lora_serving.handler.djl.plain import PlainBatches
from lora_serving.handler.djl.properties import engine_config, is_rolling_batch
from lora_serving.handler.djl.request import JSON, DjlRequest, Item
from lora_serving.handler.djl.rolling_batch import RollingBatch
from lora_serving.handler.engine import Engine
from lora_serving.handler.engine_loop import EngineLoop
from lora_serving.handler.error_status import engine_error_status
from lora_serving.handler.errors import EngineError, InvalidRequestError, RankFailedError
from lora_serving.handler.generation_runner import GenerationFailedError, GenerationRunner, RunningPrompt
from lora_serving.handler.hub import HubSettings, served_model_name
from lora_serving.handler.lora.resolver import AdapterResolver
from lora_serving.handler.lora.resolver_fetch import make_adapter_resolver

logger = logging.getLogger(__name__)

# How often a synchronous worker checks, between DJL's calls, that its tensor-parallel ranks are alive.
RANK_CHECK_SECONDS = 0.5

AdapterAction = Callable[[DjlAdapters, AdapterCall], str]


def start_engine(properties: dict[str, str]) -> Engine:
    # DJL registers <model_dir>/adapters/* itself, through register_adapter, once the model is loaded.
    return Engine(config=engine_config(properties), adapters_from_model_dir=False)


def start_resolver(engine: Engine) -> AdapterResolver | None:
    """option.adapter_resolver; DJL bounds the requests waiting itself (its job_queue_size)."""
    return make_adapter_resolver(engine, engine.config, hub=HubSettings.from_env(os.environ))


def exit_worker(message: str) -> None:
    """The engine cannot go on (a tensor-parallel rank died): end DJL's worker process, so that DJL sees the
    worker die, answers /ping with a failure and starts a new one, instead of feeding a dead engine."""
    logger.critical("exiting the worker: %s", message)
    logging.shutdown()
    os._exit(1)


def model_name(engine: Engine) -> str:
    return served_model_name(engine.config.model_id)


class SyncService:
    def __init__(self, properties: dict[str, str]) -> None:
        self.engine = start_engine(properties)
        # A request whose adapter is being fetched waits beside the running ones (rolling batch), or with its
        # batch (plain batching, answered whole anyway).
        driver = EngineDriver(self.engine, model_name=model_name(self.engine), resolver=start_resolver(self.engine))
        self.mode = RollingBatch(driver) if is_rolling_batch(properties) else PlainBatches(driver)
        self.adapters = DjlAdapters(self.engine)
        if self.engine.ranks is not None:
            # DJL calls in only when requests come: a rank that dies in between is noticed here.
            threading.Thread(target=self._watch_ranks, name="tp-watch", daemon=True).start()
        logger.info("engine serving DJL in %s mode", type(self.mode).__name__)

    def _watch_ranks(self) -> None:
        while True:
            time.sleep(RANK_CHECK_SECONDS)
            try:
                self.engine.check_health()
            except RankFailedError as error:
                exit_worker(str(error))

    def handle(self, inputs) -> Output | None:
        if inputs.is_empty():
            return None
        try:
            return self.mode.inference(inputs)
        except RankFailedError as error:
            exit_worker(str(error))

    def adapter_call(self, action: AdapterAction, inputs) -> Output:
        """Answered as DJL's synchronous services answer: the message is the management call's status."""
        try:
            return Output(message=action(self.adapters, AdapterCall.read(inputs)))
        except EngineError as error:
            return Output().error(str(error), code=engine_error_status(error), message=str(error))


class AsyncService:
    def __init__(self, engine: Engine, event_loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.adapters = DjlAdapters(engine)
        self._model_name = model_name(engine)
        self._engine_loop = EngineLoop(engine, event_loop, on_fatal_error=exit_worker)
        self._engine_loop.start()
        self._runner = GenerationRunner(self._engine_loop, resolver=start_resolver(engine))
        # Adapter loads in progress, by name: a request naming one waits for it, so that DJL's calls take
        # effect in the order DJL sent them although a load runs off the event loop.
        self._loading: dict[str, asyncio.Future] = {}
        logger.info("engine serving DJL in async mode")

    @classmethod
    async def start(cls, properties: dict[str, str]) -> AsyncService:
        engine = await asyncio.to_thread(start_engine, properties)
        return cls(engine, asyncio.get_running_loop())

    def stop(self) -> None:
        self._engine_loop.stop()

    async def handle(self, inputs) -> Output | AsyncIterator[Output] | None:
        """One Output for a whole answer; an async generator of Outputs, one per engine step, for a stream."""
        if inputs.is_empty():
            return None
        batch = inputs.get_batches()
        try:
            if len(batch) != 1:
                raise InvalidRequestError(f"async mode takes one request per call, got a batch of {len(batch)}")
            request = DjlRequest.parse(batch[0], self.engine, output_formatter=self.engine.config.output_formatter,
                                       model_name=self._model_name)
            await self._adapters_loaded(job.adapter for job in request.jobs)
            running = await self._runner.start(request.jobs, with_prefill=request.with_prefill)
        except EngineError as error:
            return async_output(Item.failure(error), JSON)
        request.begin([prompt.generation for prompt in running])
        if request.stream:
            return self._stream(request, running[0])
        try:
            await self._runner.complete(running)
        except GenerationFailedError:
            pass  # the request's item says so
        return async_output(request.take_item(), request.content_type)

    async def _stream(self, request: DjlRequest, running: RunningPrompt) -> AsyncIterator[Output]:
        # Closing this generator early (the worker dropping the request) aborts the engine request: follow()
        # does so when it is not iterated to the end.
        async for output in self._runner.follow(running):
            request.record(running.generation, output)
            item = request.take_item()
            if item.data or item.last:
                yield async_output(item, request.content_type)
            if item.last:
                return

    async def adapter_call(self, action: AdapterAction, inputs, *, loads_files: bool) -> Output:
        """Answered as DJL's async services answer: one encoded item, the message as its data."""
        try:
            call = AdapterCall.read(inputs)
            await self._adapters_loaded([call.name])
            if loads_files:
                load = asyncio.ensure_future(asyncio.to_thread(action, self.adapters, call))
                self._loading[call.name] = load
                try:
                    message = await load
                finally:
                    if self._loading.get(call.name) is load:
                        del self._loading[call.name]
            else:
                message = action(self.adapters, call)
        except EngineError as error:
            return async_output(Item.failure(error), JSON)
        return async_output(Item(message, True), JSON)

    async def _adapters_loaded(self, names) -> None:
        for name in names:
            load = self._loading.get(name) if name else None
            if load is not None:
                await asyncio.gather(asyncio.shield(load), return_exceptions=True)
