"""OpenAI's tool fields on a chat request (`tools`, `tool_choice`, `parallel_tool_calls`), checked and
turned into what the answer needs: which mode the calls are in, and, for a call the client requires, the
grammar that makes its arguments valid.

`tool_choice` as OpenAI defines it: `none` (the model answers in text), `auto` (the default with tools: the
model may call; its calls are found by `option.tool_call_parser`, which `option.enable_auto_tool_choice`
allows), `required` (one call or more) or `{"type": "function", "function": {"name": ...}}` (that one).
For the last two the answer is generated under a JSON schema, as vLLM does it: the named function's
arguments object, or for `required` a list of `{"name", "parameters"}` (one item without
`parallel_tool_calls`), so that the arguments always parse and validate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from lora_serving.handler.errors import InvalidRequestError
from lora_serving.handler.api.structured_fields import json_schema
from lora_serving.handler.sequence import SamplingParams, StructuredOutput
from lora_serving.handler.tool_parsers import TOOL_CALL_PARSERS, ToolCallParser

ToolMode = Literal["none", "auto", "required", "named"]
# A function given no parameters takes none.
NO_PARAMETERS = {"type": "object", "properties": {}}


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    name: str
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None  # the arguments are always held to the schema where a call is required


class ToolDefinition(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition


@dataclass(frozen=True, slots=True)
class ToolPlan:
    mode: ToolMode
    parallel: bool = True
    function: str | None = None  # the one `named` calls
    parser: ToolCallParser | None = None  # how `auto` finds calls
    grammar: StructuredOutput | None = None  # what `required` and `named` generate under

    def adjust_request(self, params: SamplingParams) -> None:
        """What the plan needs of generation beyond its grammar: `auto`'s parser sees the format's marker."""
        if self.parser is not None:
            self.parser.adjust_request(params)


def tool_plan(tools: list[ToolDefinition] | None, tool_choice: Any, parallel_tool_calls: bool, *,
              enable_auto_tool_choice: bool, tool_call_parser: str) -> ToolPlan | None:
    """The plan for a request's tool fields, or None when it has no tools; InvalidRequestError naming the
    field for a choice the request or the server cannot honour."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise InvalidRequestError("tool_choice needs tools: the request lists none")
        return None
    names = [tool.function.name for tool in tools]
    if len(set(names)) != len(names):
        raise InvalidRequestError(f"tools: two functions are named {_first_repeated(names)!r}")
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return ToolPlan("none")
    if choice == "auto":
        if not (enable_auto_tool_choice and tool_call_parser):
            raise InvalidRequestError('tool_choice "auto" needs option.enable_auto_tool_choice=true and '
                                      "option.tool_call_parser on this server; send tool_choice \"required\", "
                                      "a named function or \"none\"")
        return ToolPlan("auto", parallel_tool_calls, parser=TOOL_CALL_PARSERS[tool_call_parser]())
    if choice == "required":
        return ToolPlan("required", parallel_tool_calls, grammar=json_schema(
            _required_schema(tools, parallel_tool_calls), 'tool_choice "required"'))
    name = _named_function(choice)
    tool = next((tool for tool in tools if tool.function.name == name), None)
    if tool is None:
        raise InvalidRequestError(f"tool_choice names function {name!r}, which is not in tools")
    return ToolPlan("named", False, function=name, grammar=json_schema(
        tool.function.parameters or NO_PARAMETERS, f"tools[{names.index(name)}].function.parameters"))


def _named_function(choice: Any) -> str:
    if (isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict)
            and isinstance(choice["function"].get("name"), str)):
        return choice["function"]["name"]
    raise InvalidRequestError('tool_choice must be "none", "auto", "required" or {"type": "function", '
                              f'"function": {{"name": ...}}}}, got {json.dumps(choice)[:80]}')


def _required_schema(tools: list[ToolDefinition], parallel: bool) -> dict:
    calls = [{
        "type": "object",
        "properties": {"name": {"type": "string", "enum": [tool.function.name]},
                       "parameters": tool.function.parameters or NO_PARAMETERS},
        "required": ["name", "parameters"],
        "additionalProperties": False,
    } for tool in tools]
    schema = {"type": "array", "minItems": 1, "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def _first_repeated(names: list[str]) -> str:
    return next(name for index, name in enumerate(names) if name in names[:index])
