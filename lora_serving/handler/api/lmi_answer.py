"""LMI answers (SPEC section 4), built from a Generation (api/generation.py): LMI's JSON answer and its
streamed records (one per token, the last one carrying `generated_text` and `details`), as jsonlines or
server-sent events. Shared by the HTTP server and the DJL handler.
"""

from __future__ import annotations

import json
from typing import Any

from lora_serving.handler.api.lmi_request import OutputOptions, StreamFormat, TextGenerationRequest
from lora_serving.handler.api.generation import Choice, Generation
from lora_serving.handler.sequence import FinishReason, RequestOutput, TokenOutput

# LMI's stand-in token for a streamed record that carries no token (an error or abort before any token).
NO_TOKEN = {"id": -1, "text": "", "log_prob": -1, "special_token": True}


def token_dict(token: TokenOutput) -> dict:
    return {"id": token.id, "text": token.listed_text, "log_prob": token.log_prob}


def top_tokens(token: TokenOutput) -> list[dict]:
    """LMI's `top_tokens` entry for one generated token: its alternatives, best first."""
    return [{"id": top.id, "text": top.text, "log_prob": top.log_prob} for top in token.top_tokens or ()]


def lmi_response(request: TextGenerationRequest, generations: list[Generation]) -> dict | list:
    """The non-streaming answer: one object, or a list in input order for list `inputs`."""
    results = [_lmi_result(generation, request.options) for generation in generations]
    return results if request.batched else results[0]


def _lmi_result(generation: Generation, options: OutputOptions) -> dict:
    """With several choices, LMI answers the best in `generated_text` and `details`, and the others in
    `details.best_of_sequences`, details or not."""
    best, *others = generation.returned()
    result: dict[str, Any] = {"generated_text": _generated_text(generation, best, options)}
    if options.details or others:
        result["details"] = {**_details(generation, best, options), **_choice_tokens(best, options)}
        if others:
            result["details"]["best_of_sequences"] = [
                {"generated_text": _generated_text(generation, choice, options),
                 **_details(generation, choice, options, with_inputs=False), **_choice_tokens(choice, options)}
                for choice in others
            ]
    return result


def _choice_tokens(choice: Choice, options: OutputOptions) -> dict:
    tokens: dict[str, Any] = {"tokens": [token_dict(token) for token in choice.tokens]}
    if options.top_n_tokens:
        tokens["top_tokens"] = [top_tokens(token) for token in choice.tokens]
    return tokens


def lmi_stream_records(generation: Generation, output: RequestOutput, options: OutputOptions) -> list[dict]:
    """The streamed records for what one engine step added to `generation` (already added to it)."""
    records: list[dict] = [
        {"token": token_dict(token), **({"top_tokens": top_tokens(token)} if options.top_n_tokens else {})}
        for token in output.tokens
    ]
    if not output.finished:
        return records
    if not records:
        records.append({"token": dict(NO_TOKEN)})
    last = records[-1]
    first = generation.choices[0]
    last["generated_text"] = _generated_text(generation, first, options)
    if options.details or first.finish_reason is FinishReason.ERROR:
        last["details"] = _details(generation, first, options)
        if options.top_n_tokens:
            last["details"]["top_tokens"] = [top_tokens(token) for token in first.tokens]
    if first.error:
        last["error"] = first.error
    return records


def encode_stream_record(record: dict, stream_format: StreamFormat) -> str:
    line = json.dumps(record, ensure_ascii=False)
    return f"data: {line}\n\n" if stream_format == "sse" else line + "\n"


def stream_media_type(stream_format: StreamFormat) -> str:
    return "text/event-stream" if stream_format == "sse" else "application/jsonlines"


def _generated_text(generation: Generation, choice: Choice, options: OutputOptions) -> str:
    return generation.prompt + choice.text if options.return_full_text else choice.text


def _details(generation: Generation, choice: Choice, options: OutputOptions, with_inputs: bool = True) -> dict:
    details: dict[str, Any] = {
        "finish_reason": choice.finish_reason.value if choice.finish_reason else None,
        "generated_tokens": len(choice.tokens),
    }
    if with_inputs:
        details["inputs"] = generation.prompt
    if options.decoder_input_details and generation.prefill is not None:
        details["prefill"] = generation.prefill
    return details
