"""Hugging Face TGI's generate API: its request (LMI's parameters plus `adapter_id`) and its answers.

TGI names things slightly differently from LMI: `logprob` and `special` in tokens, `seed` and
`input_length` in details, and a stream of server-sent events with an `index` per token.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from lora_serving.handler.errors import InvalidRequestError
from lora_serving.handler.api.lmi_request import GenerationParameters
from lora_serving.handler.api.generation import Choice, Generation
from lora_serving.handler.sequence import RequestOutput, SamplingParams, StructuredOutput, TokenOutput
from lora_serving.handler.api.structured_fields import tgi_grammar


class TgiParameters(GenerationParameters):
    adapter_id: str | None = None
    grammar: dict | None = None
    # TGI features this engine does not have; a client that sets one is told so.
    watermark: bool = False
    truncate: int | None = None

    def sampling_params(self) -> SamplingParams:
        for name in ("watermark", "truncate"):
            if getattr(self, name):
                raise InvalidRequestError(f"parameters.{name} is not supported")
        return super().sampling_params()

    def structured_output(self, prefix: str = "", others=()) -> StructuredOutput | None:
        grammar = tgi_grammar(self.grammar) if self.grammar is not None else None
        return super().structured_output(prefix, (*others, grammar))


class TgiRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    inputs: str
    parameters: TgiParameters = TgiParameters()
    stream: bool = False


def generate_response(generation: Generation, parameters: TgiParameters, special_ids: frozenset[int]) -> dict:
    """The best sequence's text; with best_of, the others in `details.best_of_sequences`, as TGI answers."""
    best, *others = generation.returned()
    result: dict[str, Any] = {"generated_text": _text(generation, best, parameters)}
    if parameters.details:
        result["details"] = _sequence_details(generation, best, parameters, special_ids)
        if others:
            result["details"]["best_of_sequences"] = [
                {"generated_text": _text(generation, choice, parameters),
                 **_sequence_details(generation, choice, parameters, special_ids)}
                for choice in others
            ]
    return result


def _sequence_details(generation: Generation, choice: Choice, parameters: TgiParameters,
                      special_ids: frozenset[int]) -> dict:
    return {
        "finish_reason": choice.finish_reason.value if choice.finish_reason else None,
        "generated_tokens": len(choice.tokens),
        "seed": parameters.seed,
        "prefill": ([{"id": token["id"], "text": token["text"], "logprob": token["log_prob"]}
                     for token in generation.prefill] if generation.prefill is not None else []),
        "tokens": [_token(token, special_ids) for token in choice.tokens],
        "top_tokens": ([_top_tokens(token, special_ids) for token in choice.tokens]
                       if parameters.top_n_tokens else None),
    }


def stream_events(generation: Generation, output: RequestOutput, parameters: TgiParameters,
                  special_ids: frozenset[int]) -> list[dict]:
    """TGI's stream events for one engine step; the last one of the request carries the text and details,
    or the error."""
    if output.finished and output.error:
        return [{"error": output.error, "error_type": "generation"}]
    first_index = len(generation.tokens) - len(output.tokens)
    events: list[dict] = [
        {"index": first_index + offset, "token": _token(token, special_ids), "generated_text": None,
         "details": None, "top_tokens": _top_tokens(token, special_ids) if parameters.top_n_tokens else None}
        for offset, token in enumerate(output.tokens)
    ]
    if output.finished and events:
        first = generation.choices[0]
        last = events[-1]
        last["generated_text"] = _text(generation, first, parameters)
        last["details"] = {
            "finish_reason": first.finish_reason.value if first.finish_reason else None,
            "generated_tokens": len(first.tokens),
            "seed": parameters.seed,
            "input_length": generation.num_prompt_tokens,
        }
    return events


def _text(generation: Generation, choice: Choice, parameters: TgiParameters) -> str:
    return generation.prompt + choice.text if parameters.return_full_text else choice.text


def _token(token: TokenOutput, special_ids: frozenset[int]) -> dict:
    return {"id": token.id, "text": token.listed_text, "logprob": token.log_prob, "special": token.id in special_ids}


def _top_tokens(token: TokenOutput, special_ids: frozenset[int]) -> list[dict]:
    return [{"id": top.id, "text": top.text, "logprob": top.log_prob, "special": top.id in special_ids}
            for top in token.top_tokens or ()]
