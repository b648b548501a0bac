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

from lora_serving.handler.errors import InvalidRequestError
from lora_serving.handler.sequence import DEFAULT_MAX_NEW_TOKENS, SamplingParams
from lora_serving.handler.structured_fields import GuidedDecodingFields

StreamFormat = Literal["jsonlines", "sse"]
ModelT = TypeVar("ModelT", bound=BaseModel)


class GenerationParameters(GuidedDecodingFields):
    """LMI's `parameters` object, with the vLLM-backed extras LMI users send. Strict types: "30" is not a
    number. A key this server does not know is refused by name, never silently ignored (a client asking
    for something it would not get must hear so); null means "not given"."""

    model_config = ConfigDict(strict=True, extra="forbid")

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
    top_n_tokens: int = 0
    output_formatter: Literal["json", "jsonlines", "sse"] | None = None
    n: int | None = None  # best_of when only best_of is given, as LMI does
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_p: float = 0.0
    typical_p: float = 1.0
    min_tokens: int | None = None
    min_new_tokens: int | None = None  # transformers' name for min_tokens
    stop_token_ids: list[int] = []
    logit_bias: dict[str, float] = {}

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
        if self.min_tokens is not None and self.min_new_tokens is not None:
            raise InvalidRequestError("parameters.min_tokens and parameters.min_new_tokens are the same: send one")
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
            n=self.n if self.n is not None else self.best_of or 1,
            best_of=self.best_of,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            min_p=self.min_p,
            typical_p=self.typical_p,
            min_tokens=self.min_tokens or self.min_new_tokens or 0,
            stop_token_ids=self.stop_token_ids,
            logit_bias=token_id_keys(self.logit_bias, "parameters.logit_bias"),
            top_n_tokens=self.top_n_tokens,
            prompt_log_probs=self.decoder_input_details,
            structured=self.structured_output("parameters."),
        )


def token_id_keys(bias: dict[str, float], where: str) -> dict[int, float]:
    """JSON object keys are strings: OpenAI's and vLLM's logit_bias keys are token ids written as strings."""
    try:
        return {int(token): value for token, value in bias.items()}
    except ValueError:
        bad = next(token for token in bias if not token.strip().lstrip("-").isdigit())
        raise InvalidRequestError(f"{where}: key {bad!r} is not a token id") from None


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
        if detail["type"] == "extra_forbidden":
            problem = "not a field this server knows or honours (refused rather than ignored)"
        elif detail["type"] != "missing":
            problem += f", got {_short_repr(detail['input'])}"
        problems.append(f"{location}: {problem}" if location else problem)
    return "; ".join(problems)


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
