"""The LMI text-generation request (SPEC section 4), parsed into what the engine takes.

`{"inputs": str | [str], "parameters": {...}, "stream": bool, "adapters": str | [str]}` becomes one
`PromptJob` (prompt, SamplingParams, adapter) per input, plus how the answer must be shaped. Every
problem is an InvalidRequestError whose message names the field, so that the HTTP server and the DJL
handler, which both use this module, answer a bad request the same way.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from handler.errors import InvalidRequestError
from handler.sequence import DEFAULT_MAX_NEW_TOKENS, SamplingParams

StreamFormat = Literal["jsonlines", "sse"]
ModelT = TypeVar("ModelT", bound=BaseModel)


class GenerationParameters(BaseModel):
    """LMI's `parameters` object. Strict types: "30" is not a number. Unknown keys are ignored, as LMI's
    own backends ignore the parameters they do not know; null means "not given"."""

    model_config = ConfigDict(strict=True, extra="ignore")

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    stop: list[str] = []
    stop_sequences: list[str] = []
    ignore_eos_token: bool = False
    details: bool = False
    decoder_input_details: bool = False
    return_full_text: bool = False
    top_n_tokens: int | None = None
    output_formatter: Literal["json", "jsonlines", "sse"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _nulls_mean_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data

    @field_validator("stop", "stop_sequences", mode="before")
    @classmethod
    def _one_stop_string_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    def sampling_params(self) -> SamplingParams:
        if self.top_n_tokens:
            raise InvalidRequestError("parameters.top_n_tokens is not supported: the engine returns only the "
                                      "sampled token's log-probability")
        return SamplingParams(
            max_new_tokens=self.max_new_tokens,
            do_sample=self.do_sample,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=self.seed,
            repetition_penalty=self.repetition_penalty,
            stop=[*self.stop, *self.stop_sequences],
            ignore_eos=self.ignore_eos_token,
        )


@dataclass(frozen=True, slots=True)
class OutputOptions:
    """What the answer carries besides the generated text."""

    details: bool = False
    decoder_input_details: bool = False
    return_full_text: bool = False


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


def parse_json(body: bytes) -> Any:
    """A request body as JSON, or an InvalidRequestError saying what is wrong with it."""
    if not body.strip():
        raise InvalidRequestError("the request body is empty: send a JSON object")
    try:
        parsed = json.loads(body)
        # JSON may escape a lone surrogate ("\ud800"), which is no Unicode text: the tokenizer, and the encoder
        # of any answer that quotes it, would raise on it.
        json.dumps(parsed, ensure_ascii=False).encode()
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidRequestError(f"the request body is not valid JSON: {error}") from None
    except UnicodeEncodeError:
        raise InvalidRequestError("the request body is not valid Unicode: it holds a lone surrogate "
                                  "(an escape in \\ud800-\\udfff that is not part of a pair)") from None
    except RecursionError:
        raise InvalidRequestError("the request body is nested too deeply") from None
    return parsed


def validate_model(model: type[ModelT], data: Any, where: str = "") -> ModelT:
    """`model.model_validate(data)`, with a validation failure turned into an InvalidRequestError that names
    each bad field (`parameters.max_new_tokens: Input should be a valid integer, got '30'`)."""
    if not isinstance(data, dict):
        raise InvalidRequestError(f"'{where or 'the request body'}' must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise InvalidRequestError(describe_validation_error(error, where)) from None


def describe_validation_error(error: ValidationError, where: str = "") -> str:
    problems = []
    for detail in error.errors(include_url=False):
        location = ".".join(str(part) for part in (where, *detail["loc"]) if part != "")
        problem = detail["msg"]
        if detail["type"] not in ("missing", "extra_forbidden"):
            problem += f", got {_short_repr(detail['input'])}"
        problems.append(f"{location}: {problem}" if location else problem)
    return "; ".join(problems)


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
