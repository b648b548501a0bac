"""DJL's plain batching (no rolling batch, no async mode): each call is a batch of new requests, answered
whole once all of them finished. A streaming request gets all its lines at once."""

from __future__ import annotations

from djl_python import Output

from lora_serving.handler.djl.engine_driver import ActiveRequest, EngineDriver
from lora_serving.handler.djl.outputs import whole_output
from lora_serving.handler.djl.request import JSON


class PlainBatches:
    def __init__(self, driver: EngineDriver) -> None:
        self._driver = driver

    def inference(self, inputs) -> Output:
        entries = [self._driver.start(item) for item in inputs.get_batches()]
        running = [entry for entry in entries if isinstance(entry, ActiveRequest)]
        while not all(active.request.finished for active in running):
            if not self._driver.step():
                raise RuntimeError("the engine holds none of this batch's unfinished requests")
        answers = []
        for entry in entries:
            if isinstance(entry, ActiveRequest):
                answers.append((entry.request.take_item(), entry.request.content_type))
                self._driver.finish(entry)
            else:
                answers.append((entry, JSON))
        return whole_output(answers, batched=inputs.is_batch())
