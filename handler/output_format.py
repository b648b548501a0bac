"""LMI answers (SPEC section 4) and chat completions, built from what the engine reports.

A `Generation` collects one prompt's RequestOutputs; the functions below turn it into LMI's JSON answer,
LMI's streamed records (one per token, the last one carrying `generated_text` and `details`), or OpenAI
chat completion objects. Shared by the HTTP server and the DJL handler.
"""

from __future__ import annotations

import json
from typing import Any

from handler.lmi_schema import OutputOptions, StreamFormat, TextGenerationRequest
from handler.sequence import FinishReason, RequestOutput, TokenOutput

# LMI's stand-in token for a streamed record that carries no token (an error or abort before any token).
NO_TOKEN = {"id": -1, "text": "", "log_prob": -1, "special_token": True}


class Generation:
    """One prompt's answer as it arrives from the engine."""

    def __init__(self, prompt: str, prompt_token_ids: list[int], prefill: list[dict] | None = None) -> None:
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        # Prompt tokens as LMI's `details.prefill` lists them; only when the client asked.
        self.prefill = prefill
        self.tokens: list[TokenOutput] = []
        self.finish_reason: FinishReason | None = None
        self.error: str | None = None

    def add(self, output: RequestOutput) -> None:
        self.tokens.extend(output.tokens)
        if output.finished:
            self.finish_reason = output.finish_reason
            self.error = output.error

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return "".join(token.text for token in self.tokens)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


def prefill_tokens(tokenizer, token_ids: list[int]) -> list[dict]:
    """The prompt's tokens for `decoder_input_details`; the engine does not score the prompt, so log_prob
    is null (LMI's first prefill token has a null log_prob too)."""
    return [{"id": token_id, "text": tokenizer.decode([token_id]), "log_prob": None} for token_id in token_ids]


def token_dict(token: TokenOutput) -> dict:
    return {"id": token.id, "text": token.text, "log_prob": token.log_prob}


# ---- LMI --------------------------------------------------------------------------------------------


def lmi_response(request: TextGenerationRequest, generations: list[Generation]) -> dict | list:
    """The non-streaming answer: one object, or a list in input order for list `inputs`."""
    results = [_lmi_result(generation, request.options) for generation in generations]
    return results if request.batched else results[0]


def _lmi_result(generation: Generation, options: OutputOptions) -> dict:
    result: dict[str, Any] = {"generated_text": _generated_text(generation, options)}
    if options.details:
        result["details"] = {**_details(generation, options), "tokens": [token_dict(t) for t in generation.tokens]}
    return result


def lmi_stream_records(generation: Generation, output: RequestOutput, options: OutputOptions) -> list[dict]:
    """The streamed records for what one engine step added to `generation` (already added to it)."""
    records: list[dict] = [{"token": token_dict(token)} for token in output.tokens]
    if not output.finished:
        return records
    if not records:
        records.append({"token": dict(NO_TOKEN)})
    last = records[-1]
    last["generated_text"] = _generated_text(generation, options)
    if options.details or generation.finish_reason is FinishReason.ERROR:
        last["details"] = _details(generation, options)
    if generation.error:
        last["error"] = generation.error
    return records


def encode_stream_record(record: dict, stream_format: StreamFormat) -> str:
    line = json.dumps(record, ensure_ascii=False)
    return f"data: {line}\n\n" if stream_format == "sse" else line + "\n"


def stream_media_type(stream_format: StreamFormat) -> str:
    return "text/event-stream" if stream_format == "sse" else "application/jsonlines"


def _generated_text(generation: Generation, options: OutputOptions) -> str:
    return generation.prompt + generation.text if options.return_full_text else generation.text


def _details(generation: Generation, options: OutputOptions) -> dict:
    details: dict[str, Any] = {
        "finish_reason": generation.finish_reason.value if generation.finish_reason else None,
        "generated_tokens": len(generation.tokens),
        "inputs": generation.prompt,
    }
    if options.decoder_input_details and generation.prefill is not None:
        details["prefill"] = generation.prefill
    return details


# ---- OpenAI chat completions --------------------------------------------------------------------------


def openai_finish_reason(reason: FinishReason | None) -> str | None:
    if reason is None:
        return None
    if reason in (FinishReason.EOS, FinishReason.STOP_SEQUENCE):
        return "stop"
    return reason.value  # "length", and "error" / "aborted" where OpenAI has no name


def usage(generation: Generation) -> dict:
    completion_tokens = len(generation.tokens)
    return {
        "prompt_tokens": generation.num_prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": generation.num_prompt_tokens + completion_tokens,
    }


def chat_logprobs(tokens: list[TokenOutput]) -> dict:
    return {
        "content": [
            {"token": token.text, "logprob": token.log_prob, "bytes": list(token.text.encode()), "top_logprobs": []}
            for token in tokens
        ]
    }


def chat_completion(generation: Generation, *, completion_id: str, model: str, created: int, logprobs: bool) -> dict:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": generation.text},
                "logprobs": chat_logprobs(generation.tokens) if logprobs else None,
                "finish_reason": openai_finish_reason(generation.finish_reason),
            }
        ],
        "usage": usage(generation),
    }


def chat_completion_chunks(
    generation: Generation,
    output: RequestOutput,
    *,
    completion_id: str,
    model: str,
    created: int,
    logprobs: bool,
    first: bool,
) -> list[dict]:
    """The `chat.completion.chunk` objects for one engine step: one per token, the first one also saying
    the role, the last one the finish reason."""
    tokens = output.tokens or [None]
    chunks = []
    for index, token in enumerate(tokens):
        delta: dict[str, str] = {"content": token.text if token else ""}
        if first and index == 0:
            delta = {"role": "assistant", **delta}
        is_last = output.finished and index == len(tokens) - 1
        chunks.append({
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "delta": delta,
                    "logprobs": chat_logprobs([token]) if logprobs and token else None,
                    "finish_reason": openai_finish_reason(generation.finish_reason) if is_last else None,
                }
            ],
        })
    return chunks


def chat_usage_chunk(generation: Generation, *, completion_id: str, model: str, created: int) -> dict:
    """The last streamed chunk when the client asked for `stream_options.include_usage`."""
    return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [], "usage": usage(generation)}


class ChatChunks:
    """The chunks of one streamed chat answer, engine step by engine step: the first carries the role, the
    last the finish reason, followed by a usage chunk when the client asked for `include_usage`."""

    def __init__(self, generation: Generation, *, completion_id: str, model: str, created: int, logprobs: bool,
                 include_usage: bool) -> None:
        self._generation = generation
        self._identity = {"completion_id": completion_id, "model": model, "created": created}
        self._logprobs = logprobs
        self._include_usage = include_usage
        self._first = True

    def for_output(self, output: RequestOutput) -> list[dict]:
        """What `output` (already added to the generation) adds to the stream."""
        chunks = chat_completion_chunks(self._generation, output, logprobs=self._logprobs, first=self._first,
                                        **self._identity)
        self._first = False
        if output.finished and self._include_usage:
            chunks.append(chat_usage_chunk(self._generation, **self._identity))
        return chunks

