"""Hugging Face TGI's generate API: its request (LMI's parameters plus `adapter_id`) and its answers.

TGI names things slightly differently from LMI: `logprob` and `special` in tokens, `seed` and
`input_length` in details, and a stream of server-sent events with an `index` per token.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from handler.errors import InvalidRequestError
from handler.lmi_schema import GenerationParameters
from handler.output_format import Generation
from handler.sequence import RequestOutput, SamplingParams, TokenOutput


class TgiParameters(GenerationParameters):
    adapter_id: str | None = None
    # TGI features this engine does not have; a client that sets one is told so.
    best_of: int | None = None
    typical_p: float | None = None
    watermark: bool = False
    truncate: int | None = None
    frequency_penalty: float | None = None
    grammar: dict | None = None

    def sampling_params(self) -> SamplingParams:
        for name in ("best_of", "typical_p", "watermark", "truncate", "frequency_penalty", "grammar"):
            value = getattr(self, name)
            if value and not (name == "best_of" and value == 1):
                raise InvalidRequestError(f"parameters.{name} is not supported")
        return super().sampling_params()


class TgiRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    inputs: str
    parameters: TgiParameters = TgiParameters()
    stream: bool = False


def generate_response(generation: Generation, parameters: TgiParameters, special_ids: frozenset[int]) -> dict:
    text = generation.prompt + generation.text if parameters.return_full_text else generation.text
    result: dict[str, Any] = {"generated_text": text}
    if parameters.details:
        result["details"] = {
            "finish_reason": generation.finish_reason.value if generation.finish_reason else None,
            "generated_tokens": len(generation.tokens),
            "seed": parameters.seed,
            "prefill": ([{"id": token["id"], "text": token["text"], "logprob": token["log_prob"]}
                         for token in generation.prefill] if generation.prefill is not None else []),
            "tokens": [_token(token, special_ids) for token in generation.tokens],
            "top_tokens": None,
        }
    return result


def stream_events(generation: Generation, output: RequestOutput, parameters: TgiParameters,
                  special_ids: frozenset[int]) -> list[dict]:
    """TGI's stream events for one engine step; the last one of the request carries the text and details,
    or the error."""
    if output.finished and output.error:
        return [{"error": output.error, "error_type": "generation"}]
    first_index = len(generation.tokens) - len(output.tokens)
    events: list[dict] = [
        {"index": first_index + offset, "token": _token(token, special_ids), "generated_text": None,
         "details": None, "top_tokens": None}
        for offset, token in enumerate(output.tokens)
    ]
    if output.finished and events:
        last = events[-1]
        last["generated_text"] = (generation.prompt + generation.text if parameters.return_full_text
                                  else generation.text)
        last["details"] = {
            "finish_reason": generation.finish_reason.value if generation.finish_reason else None,
            "generated_tokens": len(generation.tokens),
            "seed": parameters.seed,
            "input_length": generation.num_prompt_tokens,
        }
    return events


def _token(token: TokenOutput, special_ids: frozenset[int]) -> dict:
    return {"id": token.id, "text": token.text, "logprob": token.log_prob, "special": token.id in special_ids}
