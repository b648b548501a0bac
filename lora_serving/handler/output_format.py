"""LMI answers (SPEC section 4) and chat completions, built from what the engine reports.

A `Generation` collects one prompt's RequestOutputs, one `Choice` per sequence the request generates
(n / best_of); the functions below turn it into LMI's JSON answer, LMI's streamed records (one per token,
the last one carrying `generated_text` and `details`); handler/openai_format.py makes OpenAI's objects of
it. Shared by the HTTP server and the DJL handler.
"""

from __future__ import annotations

import json
from typing import Any

from lora_serving.handler.lmi_schema import OutputOptions, StreamFormat, TextGenerationRequest
from lora_serving.handler.request_sequences import returned_choices
from lora_serving.handler.sequence import FinishReason, RequestOutput, SamplingParams, TokenOutput

# LMI's stand-in token for a streamed record that carries no token (an error or abort before any token).
NO_TOKEN = {"id": -1, "text": "", "log_prob": -1, "special_token": True}


class Choice:
    """One sequence of the request's answer."""

    def __init__(self, index: int) -> None:
        self.index = index
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
    def log_probs(self) -> list[float]:
        return [token.log_prob for token in self.tokens]


class Generation:
    """One prompt's answer as it arrives from the engine. `tokens`, `text`, `finish_reason` and `error` are
    its first choice's: the one streamed, and the whole answer when n is 1."""

    def __init__(self, prompt: str, prompt_token_ids: list[int], prefill: list[dict] | None = None,
                 params: SamplingParams | None = None) -> None:
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        # Prompt tokens as LMI's `details.prefill` lists them; only when the client asked.
        self.prefill = prefill
        self.params = params or SamplingParams()
        self.choices = [Choice(index) for index in range(self.params.num_sequences)]

    def add(self, output: RequestOutput) -> None:
        self.choices[output.index].add(output)
        if output.prompt_log_probs is not None and self.prefill is not None:
            for token, log_prob in zip(self.prefill, output.prompt_log_probs):
                token["log_prob"] = log_prob

    def returned(self) -> list[Choice]:
        """The n choices answered, best first when best_of is given (handler.request_sequences)."""
        return returned_choices(self.choices, self.params, lambda choice: choice.log_probs)

    @property
    def finished(self) -> bool:
        return all(choice.finished for choice in self.choices)

    @property
    def failed(self) -> Choice | None:
        return next((choice for choice in self.choices if choice.finish_reason is FinishReason.ERROR), None)

    @property
    def tokens(self) -> list[TokenOutput]:
        return self.choices[0].tokens

    @property
    def text(self) -> str:
        return self.choices[0].text

    @property
    def finish_reason(self) -> FinishReason | None:
        return self.choices[0].finish_reason

    @property
    def error(self) -> str | None:
        return self.choices[0].error

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


def prefill_tokens(tokenizer, token_ids: list[int]) -> list[dict]:
    """The prompt's tokens for `decoder_input_details`; their log_prob is filled in when the engine has
    scored the prompt (the first token's stays null: nothing comes before it)."""
    return [{"id": token_id, "text": tokenizer.decode([token_id]), "log_prob": None} for token_id in token_ids]


def token_dict(token: TokenOutput) -> dict:
    return {"id": token.id, "text": token.listed_text, "log_prob": token.log_prob}


def top_tokens(token: TokenOutput) -> list[dict]:
    """LMI's `top_tokens` entry for one generated token: its alternatives, best first."""
    return [{"id": top.id, "text": top.text, "log_prob": top.log_prob} for top in token.top_tokens or ()]


# ---- LMI --------------------------------------------------------------------------------------------


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
