"""SageMaker's and DJL's inference routes: `GET /ping`, `POST /invocations`, `POST /predictions/{model}`.

The body is LMI's text-generation schema (SPEC section 4), or a chat request (`messages`) answered as an
OpenAI chat completion. The adapter comes from the `X-Amzn-SageMaker-Adapter-Identifier` header, else the
body's `adapters`, else the `?adapter=` query.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from lora_serving.container.chat_responses import respond_to_chat
from lora_serving.container.client_disconnect import CLIENT_CLOSED_REQUEST, GenerationStreamResponse, until_disconnected
from lora_serving.container.runtime import read_json, require_runtime, server_state
from lora_serving.handler.api.openai_chat_request import parse_chat_request
from lora_serving.handler.generation_runner import GenerationRunner, RunningPrompt
from lora_serving.handler.api.lmi_request import TextGenerationRequest, is_chat_request, parse_text_generation
from lora_serving.handler.api.lmi_answer import encode_stream_record, lmi_response, lmi_stream_records, stream_media_type
from lora_serving.handler.api.sagemaker import ADAPTER_IDENTIFIER_HEADER

router = APIRouter()


@router.get("/ping")
async def ping(request: Request) -> JSONResponse:
    """200 only once the model is loaded and the engine thread is stepping; SageMaker polls it."""
    state = server_state(request)
    if state.runtime is not None and state.runtime.engine_loop.is_running:
        return JSONResponse({"status": "Healthy"})
    if state.runtime is not None:
        error = state.runtime.engine_loop.fatal_error or "the engine loop has stopped"
        return JSONResponse({"status": "Unhealthy", "error": error}, status_code=503)
    return JSONResponse({"status": "Loading" if state.startup_error is None else "Failed",
                         "error": state.startup_error}, status_code=503)


@router.post("/invocations")
@router.post("/predictions/{model_name}")
async def invocations(request: Request) -> Response:
    runtime = require_runtime(request)
    body = await read_json(request)
    header_adapter = request.headers.get(ADAPTER_IDENTIFIER_HEADER)
    query_adapter = request.query_params.get("adapter")
    if is_chat_request(body):
        chat = parse_chat_request(body)
        adapter = header_adapter or chat.adapters or query_adapter or None
        stream_format = "sse" if runtime.config.output_formatter == "sse" else "jsonlines"
        return await respond_to_chat(request, runtime, chat, adapter, stream_format=stream_format)

    parsed = parse_text_generation(body, header_adapter=header_adapter, query_adapter=query_adapter,
                                   output_formatter=runtime.config.output_formatter)
    running = await runtime.runner.start(parsed.jobs, with_prefill=parsed.options.decoder_input_details)
    if parsed.stream:
        return GenerationStreamResponse(_lmi_stream(runtime.runner, running[0], parsed), running,
                                        media_type=stream_media_type(parsed.stream_format))
    finished, generations = await until_disconnected(request, runtime.runner.complete(running))
    if not finished:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return JSONResponse(lmi_response(parsed, generations))


async def _lmi_stream(runner: GenerationRunner, running: RunningPrompt,
                      parsed: TextGenerationRequest) -> AsyncIterator[str]:
    async for output in runner.follow(running):
        for record in lmi_stream_records(running.generation, output, parsed.options):
            yield encode_stream_record(record, parsed.stream_format)
