"""The prompt a chat request's messages (and tools) make through the model's own chat template.

Assistant messages carrying `tool_calls` reach the template with each call's arguments as an object (the
templates of Llama 3, Qwen and Mistral write them with `tojson`), `role: tool` messages with their
`tool_call_id`. The tools go in the template's `tools` variable. A template without one gets them in a
system message instead (the first, or a new one): "Tools you may call:" and their JSON; a template that
does not read `tool_calls` gets an assistant's calls as JSON in its content. A template that rejects a
conversation (a role it does not know, roles out of order) answers 400 with its reason.
"""

from __future__ import annotations

import json
import re
from typing import Any

from lora_serving.handler.errors import InvalidRequestError

TOOLS_FALLBACK_HEADER = "Tools you may call:\n"
# A template that reads the word reads the variable: the templates that take tools all name it so.
_NAMES_TOOLS = re.compile(r"\btools\b")


def render_chat_prompt(tokenizer, messages: list, tools: list[dict] | None = None) -> str:
    """The prompt text, ending where the assistant answers. `messages` are chat_schema.ChatMessage."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("this model's tokenizer has no chat template: send 'inputs' instead of 'messages'")
    template = tokenizer.get_chat_template(tools=tools or None)
    conversation = [template_message(message, index) for index, message in enumerate(messages)]
    template_tools = None
    if tools:
        if _NAMES_TOOLS.search(template):
            template_tools = tools
        else:
            conversation = _with_tools_in_system_message(conversation, tools)
    if "tool_calls" not in template:
        conversation = [_calls_in_content(message) for message in conversation]
    try:
        return tokenizer.apply_chat_template(conversation, tools=template_tools, tokenize=False,
                                             add_generation_prompt=True)
    except Exception as error:  # a template raises for conversations it rejects (e.g. roles out of order)
        raise InvalidRequestError(f"the chat template rejected these messages: {error}") from None


def template_message(message, index: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"role": message.role, "content": message.text()}
    if message.tool_calls:
        entry["tool_calls"] = [_template_call(call, f"messages[{index}].tool_calls[{position}]")
                               for position, call in enumerate(message.tool_calls)]
    if message.tool_call_id is not None:
        entry["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        entry["name"] = message.name
    return entry


def _template_call(call, where: str) -> dict[str, Any]:
    try:
        arguments = json.loads(call.function.arguments)
    except json.JSONDecodeError as error:
        raise InvalidRequestError(f"{where}.function.arguments is not JSON: {error}") from None
    return {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": arguments}}


def _with_tools_in_system_message(conversation: list[dict], tools: list[dict]) -> list[dict]:
    text = TOOLS_FALLBACK_HEADER + json.dumps(tools, ensure_ascii=False)
    if conversation and conversation[0]["role"] == "system":
        first = conversation[0]
        return [{**first, "content": f"{first['content']}\n\n{text}" if first["content"] else text},
                *conversation[1:]]
    return [{"role": "system", "content": text}, *conversation]


def _calls_in_content(message: dict) -> dict:
    if "tool_calls" not in message:
        return message
    calls = "\n".join(json.dumps({"name": call["function"]["name"], "arguments": call["function"]["arguments"]},
                                 ensure_ascii=False) for call in message["tool_calls"])
    return {**message, "content": f"{message['content']}\n{calls}" if message["content"] else calls}
