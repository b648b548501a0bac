"""The LMI text-generation request (SPEC section 4), parsed into what the engine takes.

`{"inputs": str | [str], "parameters": {...}, "stream": bool, "adapters": str | [str]}` becomes one
`PromptJob` (prompt, SamplingParams, adapter) per input, plus how the answer must be shaped. Every
problem is an InvalidRequestError whose message names the field, so that the HTTP server and the DJL
handler, which both use this module, answer a bad request the same way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import field_validator

from lora_serving.handler.api.sampling_fields import SamplingFields
from lora_serving.handler.api.validation import validate_model
from lora_serving.handler.errors import InvalidRequestError
from lora_serving.handler.sequence import DEFAULT_MAX_NEW_TOKENS, SamplingParams

StreamFormat = Literal["jsonlines", "sse"]


class GenerationParameters(SamplingFields):
    """LMI's `parameters` object, with the vLLM-backed extras LMI users send (the shared ones in
    SamplingFields). A key this server does not know is refused by name: a client asking for something it
    would not get must hear so."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    do_sample: bool = False
    stop_sequences: list[str] = []
    ignore_eos_token: bool = False
    details: bool = False
    decoder_input_details: bool = False
    return_full_text: bool = False
    top_n_tokens: int = 0
    output_formatter: Literal["json", "jsonlines", "sse"] | None = None
    n: int | None = None  # best_of when only best_of is given, as LMI does
    best_of: int | None = None
    min_tokens: int | None = None
    min_new_tokens: int | None = None  # transformers' name for min_tokens

    @field_validator("stop_sequences", mode="before")
    @classmethod
    def _one_stop_sequence_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    def sampling_params(self) -> SamplingParams:
        if self.min_tokens is not None and self.min_new_tokens is not None:
            raise InvalidRequestError("parameters.min_tokens and parameters.min_new_tokens are the same: send one")
        return self.build_sampling_params(
            "parameters.",
            max_new_tokens=self.max_new_tokens,
            do_sample=self.do_sample,
            stop=[*self.stop, *self.stop_sequences],
            ignore_eos=self.ignore_eos_token,
            n=self.n if self.n is not None else self.best_of or 1,
            best_of=self.best_of,
            min_tokens=self.min_tokens or self.min_new_tokens or 0,
            top_n_tokens=self.top_n_tokens,
            prompt_log_probs=self.decoder_input_details,
            structured=self.structured_output("parameters."),
        )


@dataclass(frozen=True, slots=True)
class OutputOptions:
    """What the answer carries besides the generated text."""

    details: bool = False
    decoder_input_details: bool = False
    return_full_text: bool = False
    top_n_tokens: int = 0  # alternatives listed with each token (`top_tokens`)


@dataclass(slots=True)
class PromptJob:
    """One prompt for the engine."""

    prompt: str
    params: SamplingParams
    adapter: str | None


@dataclass(slots=True)
class TextGenerationRequest:
    jobs: list[PromptJob]
    batched: bool  # `inputs` was a list: the answer is a list too
    stream: bool
    stream_format: StreamFormat
    options: OutputOptions


# The keys of an LMI text request; the generation parameters go under "parameters".
TEXT_REQUEST_FIELDS = frozenset({"inputs", "parameters", "stream", "adapters"})


def is_chat_request(body: Any) -> bool:
    """LMI answers `{"messages": [...]}` as an OpenAI chat completion."""
    return isinstance(body, dict) and "messages" in body


def parse_text_generation(
    body: Any,
    *,
    header_adapter: str | None = None,
    query_adapter: str | None = None,
    output_formatter: str = "json",
) -> TextGenerationRequest:
    """Parse an LMI request body. The adapter is chosen as SPEC section 3 says: the header, then the body's
    `adapters`, then the query; an empty value counts as not given. `output_formatter` is the server's
    `option.output_formatter`; a request may override it with `parameters.output_formatter`."""
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object with 'inputs'")
    unknown = sorted(set(body) - TEXT_REQUEST_FIELDS)
    if unknown:
        raise InvalidRequestError(f"{unknown[0]}: not a field this server knows or honours (refused rather than "
                                  f"ignored; a request has {', '.join(sorted(TEXT_REQUEST_FIELDS))})")
    inputs = body.get("inputs")
    if inputs is None:
        raise InvalidRequestError("the request has no 'inputs'")
    batched = isinstance(inputs, list)
    prompts = inputs if batched else [inputs]
    if not prompts or not all(isinstance(prompt, str) for prompt in prompts):
        raise InvalidRequestError("'inputs' must be a string or a non-empty list of strings")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequestError(f"'stream' must be true or false, got {stream!r}")
    if stream and len(prompts) > 1:
        raise InvalidRequestError("streaming answers one input at a time: send 'inputs' as a string")
    raw_parameters = body.get("parameters", {})
    if raw_parameters is None:
        raw_parameters = {}
    parameters = validate_model(GenerationParameters, raw_parameters, "parameters")
    params = parameters.sampling_params()
    if stream and params.num_sequences > 1:
        raise InvalidRequestError("parameters.n / best_of > 1 cannot be streamed here (LMI answers them whole, "
                                  "with details.best_of_sequences): send 'stream': false")
    adapters = _adapters_per_prompt(body.get("adapters"), len(prompts), header_adapter, query_adapter)
    formatter = parameters.output_formatter or output_formatter
    return TextGenerationRequest(
        # Each prompt gets its own SamplingParams: the engine keeps per-request state next to it.
        jobs=[PromptJob(prompt, dataclasses.replace(params), adapter) for prompt, adapter in zip(prompts, adapters)],
        batched=batched,
        stream=stream,
        stream_format="sse" if formatter == "sse" else "jsonlines",
        options=OutputOptions(
            details=parameters.details,
            decoder_input_details=parameters.decoder_input_details,
            return_full_text=parameters.return_full_text,
            top_n_tokens=parameters.top_n_tokens,
        ),
    )


def _adapters_per_prompt(
    body_adapters: Any, num_prompts: int, header_adapter: str | None, query_adapter: str | None
) -> list[str | None]:
    if header_adapter:
        return [header_adapter] * num_prompts
    if body_adapters is not None and body_adapters != "" and body_adapters != []:
        if isinstance(body_adapters, str):
            return [body_adapters] * num_prompts
        if not isinstance(body_adapters, list) or not all(isinstance(name, str) for name in body_adapters):
            raise InvalidRequestError("'adapters' must be a string or a list of strings")
        if len(body_adapters) != num_prompts:
            raise InvalidRequestError(
                f"Number of adapters is not equal to the number of inputs ({len(body_adapters)} adapters, "
                f"{num_prompts} inputs)"
            )
        return [name or None for name in body_adapters]
    return [query_adapter or None] * num_prompts
