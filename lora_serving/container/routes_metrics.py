"""`GET /metrics` in Prometheus' text format, and the middleware that counts every answered request."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lora_serving.container.metrics import ServerMetrics
from lora_serving.container.runtime import server_state

router = APIRouter()


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(server_state(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


class RequestCountMiddleware:
    """Counts requests by route template (`/predictions/{model_name}`, not each model name) and status.
    Plain ASGI rather than BaseHTTPMiddleware, which would hide a client's disconnect from the streams."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_and_note_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            route = scope.get("route")
            self.metrics.requests.labels(route.path if route else "unmatched", str(status)).inc()
