"""The bridge between the engine, which one thread must step, and an asyncio event loop (the HTTP server's,
or DJL's worker in async mode).

The engine thread steps while any request is unfinished and sleeps on an event otherwise. Each step's
outputs are handed to the event loop in one call, which puts each on the queue of the request it belongs
to. A `RequestStream` is that queue seen from the server; aborting it (the client left, the response
failed, the caller dropped it) aborts the request in the engine at its next step, which frees its KV blocks
and batch slot.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import Callable

from lora_serving.handler import Engine, RequestOutput, SamplingParams
from lora_serving.handler.errors import RankFailedError
from lora_serving.handler.sequence import FinishReason
from lora_serving.handler.submission import add_prompt

logger = logging.getLogger(__name__)

# How long the idle engine thread sleeps between checks for a stop request.
IDLE_WAIT_SECONDS = 0.5
# A step that produced nothing (every waiting request waits for its adapter to load) is retried after
# this long rather than in a busy loop.
NOTHING_RAN_WAIT_SECONDS = 0.002


class RequestStream:
    """The outputs of one engine request, in order, ending with the last of its sequences' finished ones."""

    def __init__(self, engine_loop: EngineLoop, request_id: str, queue: asyncio.Queue[RequestOutput],
                 num_sequences: int) -> None:
        self.request_id = request_id
        self._engine_loop = engine_loop
        self._queue = queue
        self._unfinished = num_sequences
        self._finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._finished:
            raise StopAsyncIteration
        output = await self._queue.get()
        self._unfinished -= output.finished
        # One failed sequence fails the request: its other sequences are aborted when the caller stops.
        self._finished = self._unfinished == 0 or output.finish_reason is FinishReason.ERROR
        return output

    def abort(self) -> None:
        """Stop the request if any of its sequences still runs; safe to call at any time, any number of times."""
        self._finished = True
        if self._unfinished:
            self._unfinished = 0
            self._engine_loop._abort(self.request_id)


class EngineLoop:
    def __init__(self, engine: Engine, event_loop: asyncio.AbstractEventLoop,
                 on_fatal_error: Callable[[str], None] | None = None) -> None:
        """`on_fatal_error(message)`: called on the engine thread when the engine cannot go on (a tensor-
        parallel rank died): the loop has stopped and failed every request in flight; the process should exit."""
        self.engine = engine
        self._event_loop = event_loop
        self._on_fatal_error = on_fatal_error
        # Why the loop stopped for good, when it did not stop because it was asked to.
        self.fatal_error: str | None = None
        # Touched only on the event loop's thread. Request id -> its outputs' queue, and its unfinished sequences.
        self._queues: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._unfinished: dict[str, int] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout)

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopping.is_set()

    def submit(self, prompt_token_ids: list[int], params: SamplingParams, adapter: str | None) -> RequestStream:
        """Queue a request and return its stream; raises the engine's error if the request is refused. Call it
        on the event loop's thread."""
        request_id = uuid.uuid4().hex
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._queues[request_id] = queue
        self._unfinished[request_id] = params.num_sequences
        try:
            add_prompt(self.engine, request_id, prompt_token_ids, params, adapter)
        except BaseException:
            del self._queues[request_id], self._unfinished[request_id]
            raise
        self._wake.set()
        return RequestStream(self, request_id, queue, params.num_sequences)

    def _abort(self, request_id: str) -> None:
        self._queues.pop(request_id, None)
        self._unfinished.pop(request_id, None)
        self.engine.abort(request_id)
        self._wake.set()

    # ---- the engine thread --------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._step_until_stopped()
        except RankFailedError as error:
            self._stop_for_good(str(error))

    def _step_until_stopped(self) -> None:
        while not self._stopping.is_set():
            if not self.engine.has_unfinished_requests():
                self._wake.wait(IDLE_WAIT_SECONDS)
                self._wake.clear()
                self.engine.check_health()  # a dead rank is noticed while idle too, not at the next request
                continue
            try:
                outputs = self.engine.step()
            except RankFailedError:
                raise
            except Exception as error:  # keep serving: fail what is in flight, not the process
                logger.exception("engine step failed")
                self._event_loop.call_soon_threadsafe(self._fail_all, f"internal error: {error}")
                continue
            if outputs:
                self._event_loop.call_soon_threadsafe(self._dispatch, outputs)
            else:
                self._wake.wait(NOTHING_RAN_WAIT_SECONDS)
                self._wake.clear()

    def _stop_for_good(self, message: str) -> None:
        logger.critical("engine stopped: %s", message)
        self.fatal_error = message
        self._stopping.set()
        self._event_loop.call_soon_threadsafe(self._fail_all, message)
        if self._on_fatal_error is not None:
            self._on_fatal_error(message)

    # ---- back on the event loop ---------------------------------------------------------------------

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            queue = self._queues.get(output.request_id)
            if queue is None:  # aborted by its client while this step ran
                continue
            if output.finished:
                self._unfinished[output.request_id] -= 1
                if not self._unfinished[output.request_id]:
                    del self._queues[output.request_id], self._unfinished[output.request_id]
            queue.put_nowait(output)

    def _fail_all(self, message: str) -> None:
        for request_id, queue in list(self._queues.items()):
            queue.put_nowait(RequestOutput(request_id, [], finished=True, finish_reason=FinishReason.ERROR,
                                           error=message))
            self._abort(request_id)
