"""A test front end that drives the real DJL Python worker the way DJL Serving's Java classes do.

Followed class by class (../shared/third_party/djl-serving/engines/python/src/main/java/ai/djl/python/engine):
- PyModel.load: the `option.*` keys of serving.properties, without the prefix, are the init parameters;
  `async_mode` picks async mode; `rolling_batch` set and not `disable` picks rolling-batch mode.
- PyProcess.startPythonProcess: start the worker (worker.WorkerProcess), connect, send the init call (the
  init parameters plus `handler=handle`, no content) and fail if it answers >= 300.
- ModelInfo.load + WorkerThread.runAllConfigJobs: with option.enable_lora, every entry of
  `<model_dir>/adapters/` becomes a `register_adapter` call (name = the entry's name, alias null,
  src = its absolute path) before any request; a >= 300 answer fails the worker ("Failed to register
  adapter").
- PyProcess.predict: adapter calls (a `handler` property) go straight to the worker except in async mode;
  otherwise rolling batch, else async, else a plain call.
- PyPredictor.batchPredict: one request is sent as it is; several become one batch (`batch_size`,
  `batch_NNN.`-prefixed properties and content) whose answer is split by `batch_(\\d+)\\.(.*)` content keys.
- RollingBatch.run + Request: every iteration sends every active request, the new ones with their
  properties and data (and a `seed` item), the others empty; each answer item is decoded and appended to
  its request's response; requests whose item says `last` leave the batch. A failed iteration fails every
  active request and the next iteration carries `reset_rollingbatch`.
- AsyncRequestManager: each request gets a `request_tracking_id` property; answers are matched to their
  request by it, whenever they arrive.

One simplification: calls that wait for their answer (PyProcess.predictStandard) take turns on the
connection. Java's Connection keeps a single response future, so two overlapping calls (a rolling-batch
iteration and an adapter call) would race there; the Python worker answers them in order anyway.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from lora_serving.handler.config import parse_properties
from tests.djl.wire import WorkerOutput, decode_item
from tests.djl.worker import WorkerProcess

REQUEST_TRACKING_ID = "request_tracking_id"
BATCH_CONTENT_KEY = re.compile(r"batch_(\d+)\.(.*)")
CALL_TIMEOUT_SECONDS = 120


@dataclass
class ClientRequest:
    """What DJL's HTTP layer hands the model: the request's headers as properties and its body as `data`."""

    properties: dict[str, str]
    data: bytes
    handler: str | None = None

    @classmethod
    def json(cls, body: dict, **headers: str) -> ClientRequest:
        return cls({"Content-Type": "application/json", **headers}, json.dumps(body).encode())


@dataclass
class Response:
    """A request's answer as Request.java assembles it: code, headers (properties) and the body's chunks."""

    code: int = 200
    message: str | None = None
    properties: dict[str, str] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    items: int = 0  # answer items received (one per rolling-batch iteration the request took part in)
    first_chunk_at: float | None = None  # time.monotonic() of the first piece of the body
    finished_at: float | None = None  # time.monotonic() of the last item
    next_token: str | None = None
    last: bool = False

    def add_item(self, item_bytes: bytes, properties: dict[str, str] | None) -> None:
        """Request.addResponse."""
        if properties:
            self.properties.update(properties)
        self.items += 1
        item = decode_item(item_bytes)
        if "data" in item:
            self.next_token = item["data"]
        if "last" in item:
            self.last = item["last"].lower() == "true"
        if not self.next_token and not self.last:
            return  # non-streaming: nothing to send until the end
        if "code" in item:
            self.code = int(item["code"])
            body = {"code": self.code}
            if "error" in item:
                body["error"] = item["error"]
                self.message = item["error"]
            self._append(json.dumps(body).encode(), last=True)
        else:
            self._append(self.next_token.encode(), last=self.last)

    def fail(self, code: int, message: str) -> None:
        self.last = True
        self.code = code
        self._append(json.dumps({"code": code, "message": message}).encode(), last=True)

    def _append(self, data: bytes, last: bool) -> None:
        if self.first_chunk_at is None:
            self.first_chunk_at = time.monotonic()
        self.chunks.append(data)
        if last:
            self.finished_at = time.monotonic()
            self.done.set()

    def wait(self, timeout: float = CALL_TIMEOUT_SECONDS) -> Response:
        if not self.done.wait(timeout):
            raise TimeoutError(f"no last item within {timeout} s; chunks so far: {self.chunks!r}")
        return self

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def json(self):
        return json.loads(self.body)

    def json_lines(self) -> list:
        return [json.loads(line) for line in self.body.decode().splitlines() if line.strip()]


class DjlFrontEnd:
    """PyModel + PyProcess + PyPredictor + RollingBatch + AsyncRequestManager for one worker."""

    def __init__(self, djl_dir: Path, model_dir: Path, sock_dir: Path, extra_env: dict[str, str] | None = None) -> None:
        self.model_dir = model_dir
        properties = parse_properties((model_dir / "serving.properties").read_text())
        self.options = {key[len("option."):]: value for key, value in properties.items() if key.startswith("option.")}
        options = self.options
        self.rolling_batch = options.get("rolling_batch") not in (None, "disable")
        self.async_mode = options.get("async_mode", "false").lower() == "true"
        self.max_rolling_batch_size = int(options.get("max_rolling_batch_size", "32"))
        self.worker = WorkerProcess(djl_dir, model_dir, sock_dir, entry_point=options.get("entryPoint", ""),
                                    async_mode=self.async_mode, on_output=self.on_output, extra_env=extra_env)
        self._call_lock = threading.Lock()
        self._call_done = threading.Event()
        self._call_output: WorkerOutput | None = None
        self._ready = False
        self._active: dict[str, Response] = {}  # AsyncRequestManager.activeRequests
        self._rolling: RollingBatchLoop | None = None

    # ---- PyProcess ----------------------------------------------------------------------------------

    def start(self) -> None:
        self.worker.start()
        init = self.predict_standard({**self.options}, [])
        if init.code >= 300:
            # PyModel.load reports the message; DJL logs the worker's output. The error Output's body holds the
            # handler's own error text, which the log may not have reached yet.
            body = b"".join(value for _, value in init.content).decode(errors="replace")
            raise RuntimeError(f"Failed to initialize model: {init.message}\n{body}\n{self.worker.output()}")
        self._ready = True
        if self.rolling_batch:
            self._rolling = RollingBatchLoop(self)
        if self.options.get("enable_lora", "false").lower() == "true":
            self._register_model_dir_adapters()

    def stop(self) -> None:
        if self._rolling is not None:
            self._rolling.shutdown()
        self.worker.stop()

    def on_output(self, output: WorkerOutput | None) -> None:
        """Connection.RequestHandler: the async response callback first, then the response future."""
        if output is None:  # the worker disconnected
            for response in list(self._active.values()):
                response.fail(500, "Inference Engine Failure")
            self._active.clear()
            self._call_output = WorkerOutput(500, "Python worker disconnected.")
            self._call_done.set()
            return
        if self.async_mode:
            self._add_async_output(output)
        self._call_output = output
        self._call_done.set()

    def predict_standard(self, properties: dict[str, str | None], content: list[tuple[str, bytes]]) -> WorkerOutput:
        properties = dict(properties)
        properties.setdefault("handler", "handle")
        with self._call_lock:
            self._call_done.clear()
            self.worker.send(properties, content)
            if not self._call_done.wait(CALL_TIMEOUT_SECONDS):
                raise TimeoutError(f"the worker did not answer within {CALL_TIMEOUT_SECONDS} s\n"
                                   + self.worker.output())
            return self._call_output

    def _register_model_dir_adapters(self) -> None:
        adapters_dir = self.model_dir / "adapters"
        if not adapters_dir.is_dir():
            return
        for entry in adapters_dir.iterdir():
            answer = self.adapter_call("register_adapter", {"name": entry.name, "alias": None,
                                                            "src": str(entry.resolve())})
            if answer.code >= 300:
                raise RuntimeError(f"Failed to register adapter: {answer.message}")

    # ---- requests -----------------------------------------------------------------------------------

    def submit(self, request: ClientRequest) -> Response:
        """PyProcess.predict for one request (WorkerThread with a batch of one)."""
        if request.handler is not None and not self.async_mode:
            return _whole(self.predict_standard({**request.properties, "handler": request.handler},
                                                _content(request)))
        if self._rolling is not None:
            return self._rolling.add(request)
        if self.async_mode:
            return self._submit_async(request)
        return _whole(self.predict_standard(request.properties, _content(request)))

    def submit_batch(self, requests: list[ClientRequest]) -> list[Response]:
        """PyPredictor.batchPredict in plain mode: several requests in one call."""
        if len(requests) == 1:
            return [self.submit(requests[0])]
        properties: dict[str, str | None] = {"batch_size": str(len(requests))}
        content = []
        for index, request in enumerate(requests):
            prefix = f"batch_{index:03d}."
            properties.update({prefix + key: value for key, value in request.properties.items()})
            content += [(prefix + key, value) for key, value in _content(request)]
        output = self.predict_standard(properties, content)
        if output.code >= 300:
            return [_whole(output) for _ in requests]
        if len(output.content) != len(requests):
            raise AssertionError(f"Batch output size mismatch, expected: {len(requests)}, "
                                 f"actual: {len(output.content)}")
        answers = [Response(code=output.code, message=output.message, properties=dict(output.properties))
                   for _ in requests]
        for key, value in output.content:
            match = BATCH_CONTENT_KEY.fullmatch(key or "")
            if match is None:
                raise AssertionError(f"Unexpected batch output key: {key}")
            answers[int(match.group(1))].chunks.append(value)
        for answer in answers:
            answer.done.set()
        return answers

    def adapter_call(self, handler: str, properties: dict[str, str | None],
                     options: dict[str, str] | None = None) -> Response:
        """PyAdapter: name/alias/src as properties, the registration's options as content items."""
        content = [(key, value.encode()) for key, value in (options or {}).items()]
        if self.async_mode:
            return self._submit_async(ClientRequest(dict(properties), b"", handler), content)
        output = self.predict_standard({"handler": handler, **properties}, content)
        return _whole(output)

    # ---- AsyncRequestManager ------------------------------------------------------------------------

    def _submit_async(self, request: ClientRequest, content: list[tuple[str, bytes]] | None = None) -> Response:
        tracking_id = str(uuid.uuid4())
        response = Response()
        self._active[tracking_id] = response
        properties = {**request.properties, REQUEST_TRACKING_ID: tracking_id,
                      "handler": request.handler or "handle"}
        self.worker.send(properties, content if content is not None else _content(request))
        return response

    def _add_async_output(self, output: WorkerOutput) -> None:
        if not self._ready:
            return  # the init call's answer
        tracking_id = output.properties.get(REQUEST_TRACKING_ID)
        response = self._active.get(tracking_id)
        if response is None:
            raise AssertionError(f"an answer for unknown request tracking ID {tracking_id}: {output}")
        if output.code != 200:
            response.fail(output.code, f"Async Inference Failure {output.message}")
            del self._active[tracking_id]
            return
        response.add_item(output.content[0][1], output.properties)
        if response.last:
            del self._active[tracking_id]

    @property
    def num_active_async(self) -> int:
        return len(self._active)


class RollingBatchLoop:
    """RollingBatch.java: one thread sending every active request to the worker, iteration after
    iteration, while any is active."""

    def __init__(self, front_end: DjlFrontEnd) -> None:
        self._front_end = front_end
        self._lock = threading.Condition()
        self._requests: list[_RollingRequest] = []
        self._reset = False
        self._stop = False
        self._fail_next = False
        self.iterations = 0
        self.batch_sizes: list[int] = []
        self._thread = threading.Thread(target=self._run, name="rolling-batch", daemon=True)
        self._thread.start()

    def add(self, request: ClientRequest) -> Response:
        with self._lock:
            if len(self._requests) >= self._front_end.max_rolling_batch_size:
                self._lock.wait_for(lambda: len(self._requests) < self._front_end.max_rolling_batch_size,
                                    CALL_TIMEOUT_SECONDS)
            rolling = _RollingRequest(request, str(random.randrange(2**31)))
            self._requests.append(rolling)
            self._lock.notify_all()
            return rolling.response

    def drop_all_and_reset(self) -> None:
        """Make the next iteration fail on the Java side (predictStandard throwing EngineException, e.g. a
        timeout): RollingBatch.java then forgets every request it holds and sends `reset_rollingbatch` with
        the next batch. Java leaves the dropped requests unanswered; here they get a 500, so no test hangs."""
        with self._lock:
            self._fail_next = True

    def shutdown(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        self._thread.join(10)

    def _run(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._requests or self._stop)
                if self._stop:
                    return
                properties: dict[str, str | None] = {}
                if self._reset:
                    properties["reset_rollingbatch"] = "true"
                    self._reset = False
                content = []
                batch = list(self._requests)
                for index, rolling in enumerate(batch):
                    prefix = f"batch_{index:03d}."
                    first = rolling.response.next_token is None
                    if first:
                        properties.update({prefix + key: value for key, value in rolling.request.properties.items()})
                    content.append((prefix + "data", rolling.request.data if first else b""))
                    if first:
                        content.append((prefix + "seed", rolling.seed.encode()))
                properties["batch_size"] = str(len(batch))
            output = self._front_end.predict_standard(properties, content)
            with self._lock:
                self.iterations += 1
                self.batch_sizes.append(len(batch))
                if self._fail_next:
                    self._fail_next = False
                    for rolling in self._requests:
                        rolling.response.fail(500, "prediction failed")
                    self._requests.clear()
                    self._reset = True
                    continue
                if output.code != 200 or len(output.content) != len(batch):
                    for rolling in batch:
                        rolling.response.fail(output.code, "Batch inference failed")
                    self._requests.clear()
                    self._reset = True
                    self._lock.notify_all()
                    continue
                per_item: dict[int, dict[str, str]] = {}
                for key, value in output.properties.items():
                    if key.startswith("batch_"):
                        separator = key.find("_", 7)
                        if separator > 0:
                            per_item.setdefault(int(key[6:separator]), {})[key[separator + 1:]] = value
                for index, rolling in enumerate(batch):
                    rolling.response.add_item(output.content[index][1], per_item.get(index))
                self._requests = [rolling for rolling in self._requests if not rolling.response.last]
                self._lock.notify_all()


@dataclass
class _RollingRequest:
    request: ClientRequest
    seed: str
    response: Response = field(default_factory=Response)


def _content(request: ClientRequest) -> list[tuple[str, bytes]]:
    return [("data", request.data)]


def _whole(output: WorkerOutput) -> Response:
    """A plain call's Output as the client sees it: all its content, at once."""
    response = Response(code=output.code, message=output.message, properties=dict(output.properties),
                        chunks=[value for _, value in output.content])
    response.done.set()
    return response
