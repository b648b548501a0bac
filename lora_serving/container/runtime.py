"""What the routes work with once the model is loaded, and the request helpers they share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from lora_serving.container.adapter_manager import AdapterManager
from lora_serving.container.http_errors import PayloadTooLargeError, ServiceUnavailableError
from lora_serving.container.metrics import ServerMetrics
from lora_serving.handler import Config, Engine
from lora_serving.handler.engine_loop import EngineLoop
from lora_serving.handler.generation_runner import GenerationRunner
from lora_serving.handler.lora.resolver import AdapterResolver
from lora_serving.handler.api.validation import parse_json

# Prompts are text: 16 MiB is far beyond any context window, and bounds what one client makes us hold.
MAX_REQUEST_BYTES = 16 * 1024 * 1024


@dataclass
class Runtime:
    config: Config
    engine: Engine
    engine_loop: EngineLoop
    runner: GenerationRunner
    adapters: AdapterManager
    # The base model's name in the OpenAI `model` field and /v1/models.
    model_name: str
    # option.adapter_resolver, when set.
    resolver: AdapterResolver | None = None


@dataclass
class ServerState:
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    runtime: Runtime | None = None
    startup_error: str | None = None
    # Set when the engine stopped for good after start-up (a tensor-parallel rank died): the server exits.
    engine_error: str | None = None


def server_state(request: Request) -> ServerState:
    return request.app.state.server


def require_runtime(request: Request) -> Runtime:
    state = server_state(request)
    if state.runtime is None:
        raise ServiceUnavailableError(state.startup_error or "the model is still loading")
    return state.runtime


async def read_body(request: Request) -> bytes:
    """The request body, refused with 413 past MAX_REQUEST_BYTES before more of it is held in memory."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_REQUEST_BYTES:
        raise PayloadTooLargeError(f"the request body is {int(declared)} bytes, over the {MAX_REQUEST_BYTES} allowed")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_REQUEST_BYTES:
            raise PayloadTooLargeError(f"the request body is over the {MAX_REQUEST_BYTES} bytes allowed")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request) -> Any:
    return parse_json(await read_body(request))
