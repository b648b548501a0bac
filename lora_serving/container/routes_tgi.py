"""TGI-compatible routes: `POST /generate`, `POST /generate_stream`, and `POST /` (TGI's compat route,
which streams when the body says `"stream": true`; huggingface_hub's InferenceClient posts there).
The adapter is `parameters.adapter_id`, unless the SageMaker adapter header names one."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from lora_serving.container.client_disconnect import CLIENT_CLOSED_REQUEST, GenerationStreamResponse, until_disconnected
from lora_serving.container.runtime import Runtime, read_json, require_runtime
from lora_serving.handler.api.tgi import TgiRequest, generate_response, stream_events
from lora_serving.handler.errors import InvalidRequestError
from lora_serving.handler.generation_runner import RunningPrompt
from lora_serving.handler.api.lmi_request import PromptJob
from lora_serving.handler.api.validation import validate_model
from lora_serving.handler.api.lmi_answer import encode_stream_record
from lora_serving.handler.api.sagemaker import ADAPTER_IDENTIFIER_HEADER

router = APIRouter()


@router.post("/generate")
async def generate(request: Request) -> Response:
    return await _answer(request, stream=False, as_list=False)


@router.post("/generate_stream")
async def generate_stream(request: Request) -> Response:
    return await _answer(request, stream=True, as_list=False)


@router.post("/")
async def compat_generate(request: Request) -> Response:
    return await _answer(request, stream=None, as_list=True)


async def _answer(request: Request, *, stream: bool | None, as_list: bool) -> Response:
    """`stream` None: as the body says. TGI's compat route answers a list of one."""
    runtime = require_runtime(request)
    body = validate_model(TgiRequest, await read_json(request))
    adapter = request.headers.get(ADAPTER_IDENTIFIER_HEADER) or body.parameters.adapter_id or None
    job = PromptJob(body.inputs, body.parameters.sampling_params(), adapter)
    streaming = body.stream if stream is None else stream
    if streaming and job.params.num_sequences > 1:
        raise InvalidRequestError("parameters.best_of > 1 cannot be streamed (as in TGI)")
    running = await runtime.runner.start([job], with_prefill=body.parameters.decoder_input_details)
    special_ids = frozenset(runtime.engine.tokenizer.all_special_ids)
    if streaming:
        return GenerationStreamResponse(_event_stream(runtime, running[0], body, special_ids), running,
                                        media_type="text/event-stream")
    finished, generations = await until_disconnected(request, runtime.runner.complete(running))
    if not finished:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    result = generate_response(generations[0], body.parameters, special_ids)
    return JSONResponse([result] if as_list else result)


async def _event_stream(runtime: Runtime, running: RunningPrompt, body: TgiRequest,
                        special_ids: frozenset[int]) -> AsyncIterator[str]:
    async for output in runtime.runner.follow(running):
        for event in stream_events(running.generation, output, body.parameters, special_ids):
            yield encode_stream_record(event, "sse")
