"""Answering a chat request, for LMI's `/invocations` chat form and OpenAI's `/v1/chat/completions`.

The two differ only in how a stream is framed: LMI writes one chunk per line (or `data:` events with
`option.output_formatter=sse`); OpenAI always uses server-sent events ending with `data: [DONE]`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from lora_serving.container.client_disconnect import CLIENT_CLOSED_REQUEST, GenerationStreamResponse, until_disconnected
from lora_serving.container.runtime import Runtime
from lora_serving.handler.api.openai_chat_request import ChatCompletionRequest, PreparedChat, prepare_chat
from lora_serving.handler.api.lmi_request import PromptJob, StreamFormat
from lora_serving.handler.api.openai_answer import ChatChunks, chat_completion
from lora_serving.handler.api.lmi_answer import encode_stream_record, stream_media_type

OPENAI_STREAM_END = "data: [DONE]\n\n"


async def respond_to_chat(
    request: Request,
    runtime: Runtime,
    chat: ChatCompletionRequest,
    adapter: str | None,
    *,
    stream_format: StreamFormat,
    openai_stream_end: bool = False,
) -> Response:
    prepared = prepare_chat(chat, runtime.engine.tokenizer, runtime.config)
    running = await runtime.runner.start([PromptJob(prepared.prompt, prepared.params, adapter)])
    identity = {
        "completion_id": f"chatcmpl-{uuid.uuid4().hex}",
        "model": chat.model or adapter or runtime.model_name,
        "created": int(time.time()),
    }
    if chat.stream:
        return GenerationStreamResponse(
            _chat_stream(runtime, running[0], chat, prepared, identity, stream_format, openai_stream_end),
            running, media_type=stream_media_type(stream_format))
    finished, generations = await until_disconnected(request, runtime.runner.complete(running))
    if not finished:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return JSONResponse(chat_completion(generations[0], logprobs=chat.logprobs, plan=prepared.answer, **identity))


async def _chat_stream(runtime: Runtime, running, chat: ChatCompletionRequest, prepared: PreparedChat,
                       identity: dict, stream_format: StreamFormat, openai_stream_end: bool) -> AsyncIterator[str]:
    chunks = ChatChunks(running.generation, logprobs=chat.logprobs, include_usage=chat.include_usage_in_stream,
                        plan=prepared.answer, **identity)
    async for output in runtime.runner.follow(running):
        for chunk in chunks.for_output(output):
            yield encode_stream_record(chunk, stream_format)
    if openai_stream_end:
        yield OPENAI_STREAM_END
