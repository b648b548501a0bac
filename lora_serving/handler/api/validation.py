"""Request validation every format shares: the body as JSON, a pydantic model's failure as an
InvalidRequestError naming each bad field, token-id keys of JSON objects."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from lora_serving.handler.errors import InvalidRequestError

ModelT = TypeVar("ModelT", bound=BaseModel)


def token_id_keys(bias: dict[str, float], where: str) -> dict[int, float]:
    """JSON object keys are strings: OpenAI's and vLLM's logit_bias keys are token ids written as strings."""
    try:
        return {int(token): value for token, value in bias.items()}
    except ValueError:
        bad = next(token for token in bias if not token.strip().lstrip("-").isdigit())
        raise InvalidRequestError(f"{where}: key {bad!r} is not a token id") from None


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
