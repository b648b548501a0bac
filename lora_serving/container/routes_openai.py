"""OpenAI-compatible routes: `/v1/completions`, `/v1/chat/completions`, `/v1/models`.

The `model` field names an adapter, or the base model by its name (listed by /v1/models) or left empty; the
SageMaker adapter header, when present, wins as on every inference route.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from lora_serving.container.chat_responses import OPENAI_STREAM_END, respond_to_chat
from lora_serving.container.client_disconnect import CLIENT_CLOSED_REQUEST, GenerationStreamResponse, until_disconnected
from lora_serving.handler.api.openai_completions import CompletionChunks, CompletionRequest, completion
from lora_serving.container.runtime import Runtime, read_json, require_runtime
from lora_serving.handler.api.openai_chat_request import parse_chat_request
from lora_serving.handler.generation_runner import RunningPrompt
from lora_serving.handler.api.lmi_request import PromptJob
from lora_serving.handler.api.validation import validate_model
from lora_serving.handler.api.lmi_answer import encode_stream_record
from lora_serving.handler.api.sagemaker import ADAPTER_IDENTIFIER_HEADER

router = APIRouter(prefix="/v1")


@router.get("/models")
async def list_models(request: Request) -> JSONResponse:
    runtime = require_runtime(request)
    created = int(time.time())
    models = [{"id": runtime.model_name, "object": "model", "created": created, "owned_by": "lora-serving",
               "root": runtime.model_name, "parent": None}]
    if runtime.config.enable_lora:
        models += [{"id": adapter.name, "object": "model", "created": created, "owned_by": "lora-serving",
                    "root": runtime.model_name, "parent": runtime.model_name}
                   for adapter in runtime.engine.list_adapters()]
    return JSONResponse({"object": "list", "data": models})


@router.post("/chat/completions")
async def chat_completions(request: Request) -> Response:
    runtime = require_runtime(request)
    chat = parse_chat_request(await read_json(request))
    return await respond_to_chat(request, runtime, chat, _adapter(request, runtime, chat.model),
                                 stream_format="sse", openai_stream_end=True)


@router.post("/completions")
async def completions(request: Request) -> Response:
    runtime = require_runtime(request)
    body = validate_model(CompletionRequest, await read_json(request))
    params = body.sampling_params()
    adapter = _adapter(request, runtime, body.model)
    running = await runtime.runner.start([PromptJob(prompt, params, adapter) for prompt in body.prompt])
    identity = {"completion_id": f"cmpl-{uuid.uuid4().hex}", "model": body.model or runtime.model_name,
                "created": int(time.time()), "logprobs": body.logprobs is not None}
    if body.stream:
        chunks = CompletionChunks(running[0].generation, echo=body.echo, include_usage=body.include_usage_in_stream,
                                  **identity)
        return GenerationStreamResponse(_completion_stream(runtime, running[0], chunks), running,
                                        media_type="text/event-stream")
    finished, generations = await until_disconnected(request, runtime.runner.complete(running))
    if not finished:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return JSONResponse(completion(generations, echo=body.echo, **identity))


async def _completion_stream(runtime: Runtime, running: RunningPrompt, chunks: CompletionChunks) -> AsyncIterator[str]:
    async for output in runtime.runner.follow(running):
        for chunk in chunks.for_output(output):
            yield encode_stream_record(chunk, "sse")
    yield OPENAI_STREAM_END


def _adapter(request: Request, runtime: Runtime, model: str | None) -> str | None:
    header_adapter = request.headers.get(ADAPTER_IDENTIFIER_HEADER)
    if header_adapter:
        return header_adapter
    return None if not model or model == runtime.model_name else model
