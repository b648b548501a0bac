"""One request as DJL hands it to the handler: its body parsed into prompt jobs, and its answer shaped as
LMI's output formatters shape it, fed the engine's outputs as they come. Shared by all three modes.

The body is LMI's text schema or a chat request (`messages`), parsed by the same code as the HTTP server's
`/invocations`; the answer is the same JSON (or the same stream records) too. The adapter comes from the
`X-Amzn-SageMaker-Adapter-Identifier` property first, then a content item `adapter` (DJL's workflows), then
the body's `adapters`, as DJL's own input parser orders them.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from lora_serving.handler.api.chat_answer import PLAIN_ANSWER, AnswerPlan
from lora_serving.handler.api.openai_chat_request import parse_chat_request, prepare_chat
from lora_serving.handler.engine import Engine
from lora_serving.handler.error_status import engine_error_status
from lora_serving.handler.errors import EngineError
from lora_serving.handler.api.lmi_request import (
    PromptJob,
    StreamFormat,
    TextGenerationRequest,
    is_chat_request,
    parse_text_generation,
)
from lora_serving.handler.api.validation import parse_json
from lora_serving.handler.api.openai_answer import ChatChunks, chat_completion
from lora_serving.handler.api.generation import Generation
from lora_serving.handler.api.lmi_answer import (
    encode_stream_record,
    lmi_response,
    lmi_stream_records,
    stream_media_type,
)
from lora_serving.handler.api.sagemaker import ADAPTER_IDENTIFIER_HEADER
from lora_serving.handler.sequence import RequestOutput

JSON = "application/json"
# LMI's status for a request the model failed after accepting it ("Failed Dependency"); a client's mistake
# keeps its 4xx (handler.error_status).
MODEL_ERROR_STATUS = 424


@dataclass(frozen=True, slots=True)
class Item:
    """What one request is answered with at one iteration: DJL's {data, last[, code, error]} map."""

    data: str
    last: bool
    code: int | None = None
    error: str | None = None

    @classmethod
    def failure(cls, error: EngineError | str, code: int | None = None) -> Item:
        if isinstance(error, EngineError):
            code = code or engine_error_status(error)
        return cls("", True, code or MODEL_ERROR_STATUS, str(error))

    def as_map(self) -> dict[str, object]:
        fields: dict[str, object] = {"data": self.data, "last": self.last}
        if self.code is not None:
            fields["code"] = self.code
            fields["error"] = self.error or ""
        return fields


class DjlRequest:
    """Parse with `DjlRequest.parse`, submit `jobs`, `begin` with their Generations, then `record` each
    engine output (after adding it to its Generation) and `take_item` what the client gets now."""

    def __init__(self, jobs: list[PromptJob], *, stream: bool, stream_format: StreamFormat, with_prefill: bool,
                 text: TextGenerationRequest | None = None, chat=None, answer_plan: AnswerPlan = PLAIN_ANSWER,
                 model_name: str = "") -> None:
        self.jobs = jobs
        self.stream = stream
        self.stream_format = stream_format
        self.with_prefill = with_prefill
        self.content_type = stream_media_type(stream_format) if stream else JSON
        self._text = text
        self._chat = chat
        self._answer_plan = answer_plan
        self._chat_identity = {"completion_id": f"chatcmpl-{uuid.uuid4().hex}", "model": model_name,
                               "created": int(time.time())}
        self._chat_chunks: ChatChunks | None = None
        self._generations: list[Generation] = []
        self._pending = ""  # stream text not yet handed out

    @classmethod
    def parse(cls, item, engine: Engine, *, output_formatter: str, model_name: str,
              seed: int | None = None) -> DjlRequest:
        """`item` is one djl_python Input of the batch; raises EngineError (a 4xx) for a bad request.
        `seed` is the one DJL's rolling batch draws per request: used when a sampling request gives none."""
        body = parse_json(bytes(item.get_as_bytes() or b""))
        adapter = item.get_property(ADAPTER_IDENTIFIER_HEADER) or (
            item.get_as_string("adapter") if item.contains_key("adapter") else None)
        if is_chat_request(body):
            chat = parse_chat_request(body)
            prepared = prepare_chat(chat, engine.tokenizer, engine.config)
            adapter = adapter or chat.adapters or None
            request = cls([PromptJob(prepared.prompt, prepared.params, adapter)], stream=chat.stream,
                          stream_format="sse" if output_formatter == "sse" else "jsonlines", with_prefill=False,
                          chat=chat, answer_plan=prepared.answer, model_name=chat.model or adapter or model_name)
        else:
            text = parse_text_generation(body, header_adapter=adapter, output_formatter=output_formatter)
            request = cls(text.jobs, stream=text.stream, stream_format=text.stream_format,
                          with_prefill=text.options.decoder_input_details, text=text)
        if seed is not None:
            for job in request.jobs:
                if job.params.seed is None:
                    job.params.seed = seed
        return request

    def begin(self, generations: list[Generation]) -> None:
        self._generations = generations
        if self._chat is not None:
            self._chat_chunks = ChatChunks(generations[0], logprobs=self._chat.logprobs,
                                           include_usage=self._chat.include_usage_in_stream, plan=self._answer_plan,
                                           **self._chat_identity)

    @property
    def finished(self) -> bool:
        return all(generation.finished for generation in self._generations)

    def record(self, generation: Generation, output: RequestOutput) -> None:
        """Note what `output` (already added to `generation`) means for the answer."""
        if not self.stream:
            return
        if self._chat_chunks is not None:
            records = self._chat_chunks.for_output(output)
        else:
            records = lmi_stream_records(generation, output, self._text.options)
        self._pending += "".join(encode_stream_record(record, self.stream_format) for record in records)

    def take_item(self) -> Item:
        """The item for this iteration: new stream lines, or (not streaming) the whole answer once finished;
        a request the engine failed is answered with its error."""
        failed = next((g.failed for g in self._generations if g.failed is not None), None)
        if failed is not None:
            return Item.failure(failed.error or "generation failed")
        finished = self.finished
        if self.stream:
            data, self._pending = self._pending, ""
            return Item(data, finished)
        return Item(self._whole_answer() if finished else "", finished)

    def _whole_answer(self) -> str:
        if self._chat is not None:
            answer = chat_completion(self._generations[0], logprobs=self._chat.logprobs, plan=self._answer_plan,
                                     **self._chat_identity)
        else:
            answer = lmi_response(self._text, self._generations)
        return json.dumps(answer, ensure_ascii=False)
