"""DJL's rolling-batch mode (`option.rolling_batch` set and not `disable`).

DJL's Java loop (RollingBatch.java) calls the handler once per iteration with every request it holds: those
already running first, in the order they came, with empty content, then the new ones with their properties
and body (and a `seed` item). Each iteration runs one engine step and answers every request of the batch
with one item, in the same order; a request whose item says `last` leaves DJL's list, and ours. A request
refused at parsing is answered at once (last, with its 4xx). `reset_rollingbatch` (sent after an
iteration DJL saw fail) aborts everything this side still runs. A request whose adapter
option.adapter_resolver is still fetching is answered with empty items, not last, until it is submitted.
"""

from __future__ import annotations

import logging

from djl_python import Output

from lora_serving.handler.djl.engine_driver import ActiveRequest, EngineDriver
from lora_serving.handler.djl.outputs import rolling_batch_output
from lora_serving.handler.djl.request import JSON, Item

logger = logging.getLogger(__name__)

# How long an iteration with nothing to step waits for an adapter fetch before answering DJL (which calls
# again at once while it holds requests).
IDLE_WAIT_SECONDS = 0.05


class RollingBatch:
    def __init__(self, driver: EngineDriver) -> None:
        self._driver = driver
        self._active: list[ActiveRequest] = []  # the requests DJL's list holds, in its order

    def inference(self, inputs) -> Output:
        if inputs.get_property("reset_rollingbatch"):
            self.reset()
        batch = inputs.get_batches()
        if len(batch) < len(self._active):
            # DJL's list lost requests ours still has: answering would misplace items. Failing the iteration
            # makes DJL fail its requests and reset.
            self.reset()
            raise RuntimeError(f"rolling batch out of step: {len(batch)} requests sent, {len(self._active)} running")
        entries: list[ActiveRequest | Item] = list(self._active)
        for item in batch[len(self._active):]:
            entries.append(self._driver.start(item, seed=_seed(item), wait_for_adapters=False))
        # A request whose adapter is still being fetched waits without holding up the others' steps.
        entries = [self._driver.submit_resolved(entry) if isinstance(entry, ActiveRequest) and entry.resolving
                   else entry for entry in entries]
        if not self._driver.step():
            self._driver.wait_for_resolving([entry for entry in entries if isinstance(entry, ActiveRequest)],
                                            IDLE_WAIT_SECONDS)
        answers = []
        still_active = []
        for entry in entries:
            if isinstance(entry, Item):
                answers.append((entry, {"Content-Type": JSON}))
                continue
            if entry.resolving:
                answers.append((Item("", False), entry.headers))
                still_active.append(entry)
                continue
            item = entry.request.take_item()
            answers.append((item, entry.headers))
            if item.last:
                self._driver.finish(entry)
            else:
                still_active.append(entry)
        self._active = still_active
        return rolling_batch_output(answers)

    def reset(self) -> None:
        if self._active:
            logger.warning("rolling batch reset: aborting %d requests", len(self._active))
        for active in self._active:
            self._driver.finish(active)
        self._active = []


def _seed(item) -> int | None:
    """The seed DJL draws for each new request (RollingBatch.java), used if a sampling request has none."""
    return int(item.get_as_string("seed")) if item.contains_key("seed") else None
