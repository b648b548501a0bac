"""The request fields that ask for structured output, as LMI, vLLM, OpenAI and TGI name them, turned into
the one StructuredOutput the engine takes.

vLLM / LMI: `guided_json` (a schema, as an object or its JSON text), `guided_regex`, `guided_choice`, and
vLLM's newer `structured_outputs` object (`json`, `regex`, `choice`, `json_object`). OpenAI:
`response_format` (`text`, `json_object`, `json_schema` with its `schema`). TGI: `grammar` (`json` or
`regex` with its `value`). Asking in two ways at once, or for a kind this server does not enforce (vLLM's
`grammar`, `structural_tag`), is refused by name.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict

from lora_serving.handler.errors import InvalidRequestError
from lora_serving.handler.sequence import StructuredOutput


class GuidedDecodingFields(BaseModel):
    """vLLM's guided decoding fields, which LMI's `parameters` and vLLM's OpenAI server both accept."""

    model_config = ConfigDict(strict=True, extra="forbid")

    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    structured_outputs: dict | None = None

    def structured_output(self, prefix: str = "", others: tuple[StructuredOutput | None, ...] = ()
                          ) -> StructuredOutput | None:
        """The one spec these fields and `others` (from the API's own fields) ask for, if any."""
        return only_one(self._guided(prefix) + [spec for spec in others if spec is not None])

    def _guided(self, prefix: str) -> list[StructuredOutput]:
        specs = []
        if self.guided_json is not None:
            specs.append(json_schema(self.guided_json, f"{prefix}guided_json"))
        if self.guided_regex is not None:
            specs.append(StructuredOutput("regex", self.guided_regex, f"{prefix}guided_regex"))
        if self.guided_choice is not None:
            specs.append(choice(self.guided_choice, f"{prefix}guided_choice"))
        if self.structured_outputs is not None:
            specs.append(_vllm_structured_outputs(self.structured_outputs, f"{prefix}structured_outputs"))
        return specs


def only_one(specs: list[StructuredOutput]) -> StructuredOutput | None:
    if len(specs) > 1:
        raise InvalidRequestError(f"{specs[0].source} and {specs[1].source} both ask for structured output: "
                                  "send one")
    return specs[0] if specs else None


def json_schema(schema: Any, source: str) -> StructuredOutput:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as error:
            raise InvalidRequestError(f"{source} is not valid JSON: {error}") from None
    if not isinstance(schema, dict):
        raise InvalidRequestError(f"{source} must be a JSON schema object")
    return StructuredOutput("json_schema", json.dumps(schema, sort_keys=True), source)


def choice(choices: Any, source: str) -> StructuredOutput:
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise InvalidRequestError(f"{source} must be a non-empty list of non-empty strings")
    return StructuredOutput("choice", json.dumps(choices), source)


def response_format(value: Any, source: str = "response_format") -> StructuredOutput | None:
    """OpenAI's `response_format`."""
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput("json_object", "", source)
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise InvalidRequestError(f"{source}.json_schema must be an object with a 'schema'")
        return json_schema(spec["schema"], f"{source}.json_schema.schema")
    raise InvalidRequestError(f"{source}.type must be 'text', 'json_object' or 'json_schema', got {kind!r}")


def tgi_grammar(value: Any, source: str = "parameters.grammar") -> StructuredOutput:
    """TGI's `grammar`: {"type": "json" | "regex", "value": ...}."""
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "json":
        return json_schema(value.get("value"), f"{source}.value")
    if kind == "regex" and isinstance(value.get("value"), str):
        return StructuredOutput("regex", value["value"], f"{source}.value")
    raise InvalidRequestError(f"{source} must be {{'type': 'json' | 'regex', 'value': ...}}")


def _vllm_structured_outputs(value: dict, source: str) -> StructuredOutput:
    given = {key: item for key, item in value.items() if item not in (None, False)}
    unknown = sorted(set(given) - {"json", "regex", "choice", "json_object"})
    if unknown:
        raise InvalidRequestError(f"{source}.{unknown[0]} is not supported: json, regex, choice and json_object are")
    specs = []
    if "json" in given:
        specs.append(json_schema(given["json"], f"{source}.json"))
    if "regex" in given:
        if not isinstance(given["regex"], str):
            raise InvalidRequestError(f"{source}.regex must be a string")
        specs.append(StructuredOutput("regex", given["regex"], f"{source}.regex"))
    if "choice" in given:
        specs.append(choice(given["choice"], f"{source}.choice"))
    if "json_object" in given:
        specs.append(StructuredOutput("json_object", "", f"{source}.json_object"))
    if not specs:
        raise InvalidRequestError(f"{source} asks for nothing: give json, regex, choice or json_object")
    return only_one(specs)
