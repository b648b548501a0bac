"""DJL Serving's Python entry point (SPEC section 5), so the official LMI / DJL container can run this engine
as a custom handler: `handle(inputs)`, plus `register_adapter` / `unregister_adapter`, which DJL's adapter
management API calls by name.

The first call carries the model's properties (the `option.*` keys without the prefix, and `model_dir`) and
initialises the engine; an empty input then returns None. Each later call is a batch from
`inputs.get_batches()`, answered whole: this thread steps the engine until every request of the batch
has finished (a request with `"stream": true` gets all its jsonlines at once). Only djl_python's small
documented surface is used: Input.get_properties / is_empty / get_batches / get_as_json / get_property,
Output.add / add_property / error.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from djl_python import Input, Output
from model_hosting_container_standards.sagemaker.lora.constants import SageMakerLoRAApiHeader

from handler.chat_schema import parse_chat_request, render_chat_prompt
from handler.config import Config
from handler.engine import Engine
from handler.error_status import engine_error_status
from handler.errors import EngineError, InvalidRequestError
from handler.lmi_schema import PromptJob, TextGenerationRequest, is_chat_request, parse_text_generation
from handler.output_format import (
    Generation,
    chat_completion,
    chat_completion_chunks,
    encode_stream_record,
    lmi_response,
    lmi_stream_records,
    prefill_tokens,
    stream_media_type,
)
from handler.sequence import FinishReason, RequestOutput
from handler.submission import add_prompt

JSON = "application/json"


@dataclass
class _Item:
    """One request of the batch: what was asked, and what has come back so far."""

    request: TextGenerationRequest | None = None  # None: a chat request
    chat_model: str = ""
    generations: dict[str, Generation] = field(default_factory=dict)  # by engine request id, in input order
    stream_chunks: list[str] | None = None  # a list when the client asked for a stream
    created: int = field(default_factory=lambda: int(time.time()))


class _Service:
    def __init__(self, properties: dict[str, str]) -> None:
        self.engine = Engine(config=_config(properties))

    def inference(self, inputs: Input) -> Output:
        batch = inputs.get_batches()
        items: list[_Item | EngineError] = [self._start(item) for item in batch]
        self._run_until_finished([item for item in items if isinstance(item, _Item)])
        if len(batch) == 1 and isinstance(items[0], EngineError):
            return Output().error(str(items[0]), code=engine_error_status(items[0]))
        outputs = Output()
        for index, item in enumerate(items):
            try:
                body, content_type = self._answer(item)
            except EngineError as error:
                body, content_type = json.dumps({"code": engine_error_status(error), "error": str(error)}), JSON
            outputs.add(body, key="data", batch_index=index)
            outputs.add_property(f"batch_{index}_Content-Type", content_type)
        return outputs

    def _start(self, raw: Input) -> _Item | EngineError:
        if raw.is_empty():
            return InvalidRequestError("the request body is empty: send a JSON object")
        try:
            body = raw.get_as_json()
        except (ValueError, UnicodeDecodeError) as error:
            return InvalidRequestError(f"the request body is not valid JSON: {error}")
        header_adapter = raw.get_property(SageMakerLoRAApiHeader.ADAPTER_IDENTIFIER)
        try:
            if is_chat_request(body):
                chat = parse_chat_request(body)
                prompt = render_chat_prompt(self.engine.tokenizer, chat.messages)
                item = _Item(chat_model=chat.model or "")
                jobs = [PromptJob(prompt, chat.sampling_params(), header_adapter or chat.adapters)]
                stream = chat.stream
            else:
                item = _Item(request=parse_text_generation(body, header_adapter=header_adapter,
                                                           output_formatter=self.engine.config.output_formatter))
                jobs, stream = item.request.jobs, item.request.stream
            self._submit(item, jobs)
        except EngineError as error:
            return error
        if stream:
            item.stream_chunks = []
        return item

    def _submit(self, item: _Item, jobs: list[PromptJob]) -> None:
        with_prefill = item.request is not None and item.request.options.decoder_input_details
        try:
            for job in jobs:
                request_id = uuid.uuid4().hex
                prompt_token_ids = self.engine.tokenize(job.prompt)
                prefill = prefill_tokens(self.engine.tokenizer, prompt_token_ids) if with_prefill else None
                add_prompt(self.engine, request_id, prompt_token_ids, job.params, job.adapter)
                item.generations[request_id] = Generation(job.prompt, prompt_token_ids, prefill)
        except EngineError:
            for request_id in item.generations:
                self.engine.abort(request_id)
            raise

    def _run_until_finished(self, items: list[_Item]) -> None:
        owners = {request_id: item for item in items for request_id in item.generations}
        while any(not generation.finished for item in items for generation in item.generations.values()):
            for output in self.engine.step():
                item = owners.get(output.request_id)
                if item is not None:
                    item.generations[output.request_id].add(output)
                    if item.stream_chunks is not None:
                        item.stream_chunks.extend(self._stream_chunks(item, output))

    def _stream_chunks(self, item: _Item, output: RequestOutput) -> list[str]:
        generation = item.generations[output.request_id]
        if item.request is None:
            first = len(generation.tokens) == len(output.tokens)
            return [encode_stream_record(chunk, "jsonlines") for chunk in chat_completion_chunks(
                generation, output, completion_id=f"chatcmpl-{output.request_id}", model=item.chat_model,
                created=item.created, logprobs=False, first=first)]
        return [encode_stream_record(record, item.request.stream_format)
                for record in lmi_stream_records(generation, output, item.request.options)]

    def _answer(self, item: _Item | EngineError) -> tuple[str, str]:
        if isinstance(item, EngineError):
            raise item
        generations = list(item.generations.values())
        if item.stream_chunks is not None:
            stream_format = item.request.stream_format if item.request else "jsonlines"
            return "".join(item.stream_chunks), stream_media_type(stream_format)
        failed = [g for g in generations if g.finish_reason is FinishReason.ERROR]
        if failed:
            raise EngineError(failed[0].error or "generation failed")
        if item.request is None:
            request_id = next(iter(item.generations))
            return json.dumps(chat_completion(generations[0], completion_id=f"chatcmpl-{request_id}",
                                              model=item.chat_model, created=item.created, logprobs=False)), JSON
        return json.dumps(lmi_response(item.request, generations)), JSON


def _config(properties: dict[str, str]) -> Config:
    known = {name: value for name, value in properties.items() if name in Config.__dataclass_fields__}
    model_id = known.get("model_id", "")
    if not Path(model_id).is_dir():
        # DJL downloads an s3:// or hub model into model_dir before calling us.
        known["model_id"] = properties.get("model_dir", model_id)
    return Config.from_options(**known)


_service: _Service | None = None


def handle(inputs: Input) -> Output | None:
    global _service
    if _service is None:
        _service = _Service(inputs.get_properties())
    if inputs.is_empty():
        return None
    return _service.inference(inputs)


def register_adapter(inputs: Input) -> Output:
    """DJL calls this for `POST /models/{m}/adapters?name=&src=`; `src` is a local directory."""
    return _adapter_call(lambda engine: engine.register_adapter(
        inputs.get_property("name"), inputs.get_property("src"),
        pin=_flag(inputs.get_property("pin"), False), preload=_flag(inputs.get_property("preload"), True)))


def unregister_adapter(inputs: Input) -> Output:
    return _adapter_call(lambda engine: engine.unregister_adapter(inputs.get_property("name")))


def _adapter_call(call) -> Output:
    if _service is None:
        return Output().error("the model is not initialised yet", code=503)
    try:
        call(_service.engine)
    except EngineError as error:
        return Output().error(str(error), code=engine_error_status(error))
    return Output()


def _flag(value: str | None, default: bool) -> bool:
    return default if value is None else str(value).strip().lower() == "true"
