"""The overload bound (`job_queue_size`, DJL's key): a generation request that arrives when
`max_rolling_batch_size` requests can run and `job_queue_size` more already wait is answered at once, 503 with
`Retry-After` (429 on the TGI routes, as TGI answers past --max-concurrent-requests), instead of queueing
without limit until every client times out together.

A request counts from its arrival until its answer ends (a stream: its last byte). The check happens before
the body is read, so a rejection costs next to nothing and the accepted requests are not slowed; /ping and
the other routes are never counted or refused.
"""

from __future__ import annotations

from http import HTTPStatus

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from lora_serving.container.http_errors import TGI_PATHS, error_response
from lora_serving.container.runtime import ServerState

GENERATION_PATHS = frozenset({"/invocations", "/v1/completions", "/v1/chat/completions", *TGI_PATHS})
GENERATION_PREFIXES = ("/predictions/",)
# Seconds a rejected client is told to wait: requests on CPU and GPU alike finish within a few.
RETRY_AFTER_SECONDS = 1


def is_generation_request(scope: Scope) -> bool:
    path = scope["path"]
    return scope["method"] == "POST" and (path in GENERATION_PATHS or path.startswith(GENERATION_PREFIXES))


def api_of(path: str) -> str:
    if path.startswith("/v1/"):
        return "openai"
    return "tgi" if path in TGI_PATHS else "lmi"


class OverloadGate:
    """Plain ASGI (not BaseHTTPMiddleware, which would hide a client's disconnect from the streams)."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        runtime = self.state.runtime
        if scope["type"] != "http" or runtime is None or not is_generation_request(scope):
            await self.app(scope, receive, send)
            return
        capacity = runtime.config.max_rolling_batch_size + runtime.config.job_queue_size
        metrics = self.state.metrics
        if metrics.requests_in_flight >= capacity:
            metrics.note_rejected(api_of(scope["path"]))
            await self._reject(scope, receive, send, runtime.config.job_queue_size)
            return
        metrics.requests_in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            metrics.requests_in_flight -= 1

    async def _reject(self, scope: Scope, receive: Receive, send: Send, job_queue_size: int) -> None:
        tgi = scope["path"] in TGI_PATHS
        status = HTTPStatus.TOO_MANY_REQUESTS if tgi else HTTPStatus.SERVICE_UNAVAILABLE
        message = (f"the server is overloaded: {job_queue_size} requests already wait (job_queue_size); "
                   f"retry in {RETRY_AFTER_SECONDS}s")
        response = error_response(Request(scope), status, message)
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        await response(scope, receive, send)
