"""Tool calls and reasoning over real HTTP with the `openai` SDK, on a server whose model's chat template
takes `tools` (Hermes' form) and which reads calls with option.tool_call_parser=hermes and thinking with
option.reasoning_parser=qwen3.

The tiny model has random weights, so what it writes is only as structured as a grammar makes it:
`required` and a named function are held to the function's schema by the server itself; for `auto` the
test asks for the Hermes form with a regular expression (vLLM's `structured_outputs`), and the model
writes it token by token, its choice of characters its own, for the parser to find, whole and streamed.
Every answer is checked against what the model answers on /invocations for the prompt that transformers
itself renders from the same conversation.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.server.conftest import LORA_PROPERTIES, lmi_model_dir, start_server

# Hermes' / Qwen's layout: tools listed in the system turn, calls as <tool_call> blocks, results in
# <tool_response> blocks.
TOOLS_TEMPLATE = """\
{%- if tools %}<|system|>
{% if messages[0].role == 'system' %}{{ messages[0].content }}
{% endif %}Tools:
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}Call one as <tool_call>{"name": ..., "arguments": ...}</tool_call>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' and tools %}
{%- elif message.role == 'assistant' and message.tool_calls %}<|assistant|>
{{ message.content or '' }}{% for call in message.tool_calls %}<tool_call>
{{ {"name": call.function.name, "arguments": call.function.arguments} | tojson }}
</tool_call>{% endfor %}
{% elif message.role == 'tool' %}<|user|>
<tool_response>
{{ message.content }}
</tool_response>
{% else %}<|{{ message.role }}|>
{{ message.content }}
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|assistant|>
{% endif %}"""

WEATHER_PARAMETERS = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 8},
    "days": {"type": "integer", "minimum": 1, "maximum": 7}}, "required": ["city", "days"],
    "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "the forecast",
                                      "parameters": WEATHER_PARAMETERS}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "string", "enum": ["utc", "cet"]}}, "required": ["zone"],
        "additionalProperties": False}}},
]
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "weather in the city"}]
WEATHER_CHOICE = {"type": "function", "function": {"name": "get_weather"}}
# The Hermes form, with the characters of the city left to the model.
HERMES_CALL = r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[a-z]{1,8}", "days": [1-7]\}\}\n</tool_call>'


@pytest.fixture(scope="module")
def tools_server(tiny_models, server_adapters, tmp_path_factory):
    # The tools make a long prompt in the tiny tokenizer: the tiny model with a longer context (same shapes,
    # so the server's adapters fit it).
    base = tiny_models.get("llama-long", "llama", max_position_embeddings=2048)
    root = tmp_path_factory.mktemp("tools-server")
    model_dir = lmi_model_dir(base, root / "model", {
        **LORA_PROPERTIES, "option.max_model_len": "1024", "option.cache_dir": str(root / "cache"),
        "option.enable_auto_tool_choice": "true",
        "option.tool_call_parser": "hermes", "option.reasoning_parser": "qwen3"}, server_adapters)
    (model_dir / "chat_template.jinja").write_text(TOOLS_TEMPLATE)
    live = start_server(model_dir)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def openai_client(tools_server):
    return openai.OpenAI(base_url=f"{tools_server.url}/v1", api_key="not-checked", max_retries=0)


@pytest.fixture(scope="module")
def lmi(tools_server):
    """/invocations' greedy answer to the prompt transformers renders from `messages` and `tools`."""
    tokenizer = tools_server.runtime.engine.tokenizer

    def answer(messages, adapter=None, max_new_tokens=12, tools=TOOLS, **parameters) -> tuple[dict, int]:
        for message in messages:  # templates take the arguments of earlier calls as objects
            for call in message.get("tool_calls", []):
                call["function"]["arguments"] = json.loads(call["function"]["arguments"])
        prompt = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        body = {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, "details": True, **parameters}}
        if adapter:
            body["adapters"] = adapter
        with tools_server.client() as client:
            return client.post("/invocations", json=body).json(), len(tokenizer(prompt).input_ids)

    return answer


def arguments_of(call) -> dict:
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, next(t for t in TOOLS if t["function"]["name"] == call.function.name)
                        ["function"]["parameters"])
    return arguments


@pytest.mark.parametrize("model", ["model", "a1"])
def test_a_named_function_is_called_with_arguments_that_validate(openai_client, lmi, model):
    chat = openai_client.chat.completions.create(model=model, messages=MESSAGES, tools=TOOLS,
                                                 tool_choice=WEATHER_CHOICE, max_tokens=40, temperature=0)
    choice = chat.choices[0]
    assert choice.message.content is None and choice.finish_reason == "stop"  # OpenAI's, for a named function
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    arguments_of(call)
    # What the model writes under the function's schema, for this adapter, on the template's prompt.
    expected, prompt_tokens = lmi(MESSAGES, None if model == "model" else model, 40,
                                  guided_json=WEATHER_PARAMETERS)
    assert call.function.arguments == expected["generated_text"]
    assert chat.usage.prompt_tokens == prompt_tokens


def test_a_named_function_streams_its_arguments_as_the_sdk_assembles_them(openai_client):
    whole = openai_client.chat.completions.create(model="a2", messages=MESSAGES, tools=TOOLS,
                                                  tool_choice=WEATHER_CHOICE, max_tokens=40, temperature=0)
    with openai_client.chat.completions.stream(model="a2", messages=MESSAGES, tools=TOOLS, tool_choice=WEATHER_CHOICE,
                                               max_tokens=40, temperature=0) as stream:
        chunks = [event.chunk for event in stream if event.type == "chunk"]
        final = stream.get_final_completion()
    [call] = final.choices[0].message.tool_calls
    assert call.function.arguments == whole.choices[0].message.tool_calls[0].function.arguments
    argument_deltas = [chunk.choices[0].delta.tool_calls[0].function.arguments for chunk in chunks
                       if chunk.choices and chunk.choices[0].delta.tool_calls]
    assert len(argument_deltas) > 3  # streamed as generated, not in one piece at the end


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("parallel", [True, False])
def test_required_calls_at_least_one_function_with_valid_arguments(openai_client, stream, parallel):
    request = dict(model="a1", messages=MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=120,
                   temperature=0, parallel_tool_calls=parallel)
    if stream:
        try:
            with openai_client.chat.completions.stream(**request) as events:
                chat = events.get_final_completion()
        except openai.LengthFinishReasonError as cut_off:  # the SDK's helper raises, holding the answer
            chat = cut_off.completion
    else:
        chat = openai_client.chat.completions.create(**request)
    choice = chat.choices[0]
    calls = choice.message.tool_calls
    if parallel:
        # The random model, free to add calls, adds them until max_tokens cuts the list: its whole calls
        # are answered, and "length" says there was more.
        assert choice.finish_reason == "length" and len(calls) > 1
    else:
        assert choice.finish_reason == "tool_calls" and len(calls) == 1
    for call in calls:
        arguments_of(call)


# Some content first, then a call: both parts written by the model, under the regular expression.
AUTO_REQUEST = dict(model="a1", messages=MESSAGES, tools=TOOLS, tool_choice="auto", max_tokens=150, temperature=0,
                    extra_body={"structured_outputs": {"regex": "[a-z]{2,6}\\n" + HERMES_CALL}})


@pytest.mark.parametrize("stream", [False, True])
def test_auto_finds_the_calls_the_model_writes_in_the_parsers_form(openai_client, stream):
    if stream:
        with openai_client.chat.completions.stream(**AUTO_REQUEST) as events:
            chat = events.get_final_completion()
    else:
        chat = openai_client.chat.completions.create(**AUTO_REQUEST)
    choice = chat.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert 2 <= len(choice.message.content.strip()) <= 6 and "<tool_call>" not in choice.message.content
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert arguments_of(call)["city"].isalpha()


def test_auto_calls_stream_name_first_then_arguments_in_pieces_that_the_sdk_assembles(openai_client):
    whole = openai_client.chat.completions.create(**AUTO_REQUEST).choices[0].message
    chunks = list(openai_client.chat.completions.create(**AUTO_REQUEST, stream=True))
    call_deltas = [call for chunk in chunks if chunk.choices for call in chunk.choices[0].delta.tool_calls or ()]
    first, rest = call_deltas[0], call_deltas[1:]
    # vLLM's order: index, id, type and name first; then only pieces of the arguments.
    assert first.index == 0 and first.id.startswith("call_") and first.type == "function"
    assert first.function.name == "get_weather"
    assert len(rest) > 3 and all(delta.id is None and delta.function.name is None and delta.function.arguments
                                 for delta in rest)
    assert len(chunks[-1].choices[0].delta.tool_calls or ()) <= 1 and chunks[-1].choices[0].finish_reason == "tool_calls"
    # The SDK's own accumulation (its stream helper, and the state class under it) rebuilds the whole call.
    from openai.lib.streaming.chat import ChatCompletionStreamState
    state = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(chunk)
    with openai_client.beta.chat.completions.stream(**AUTO_REQUEST) as events:
        helper = events.get_final_completion().choices[0].message
    for assembled in (state.get_final_completion().choices[0].message, helper):
        [call] = assembled.tool_calls
        assert (call.function.name, call.function.arguments) == (whole.tool_calls[0].function.name,
                                                                 whole.tool_calls[0].function.arguments)
        assert call.id == first.id if assembled is not helper else call.id.startswith("call_")
        assert assembled.content == whole.content
    assert "".join(delta.function.arguments or "" for delta in call_deltas) == whole.tool_calls[0].function.arguments


def test_auto_passes_plain_text_through_as_content(openai_client, lmi):
    chat = openai_client.chat.completions.create(model="a2", messages=MESSAGES, tools=TOOLS, max_tokens=12,
                                                 temperature=0)
    expected, prompt_tokens = lmi(MESSAGES, "a2")
    assert chat.choices[0].message.content == expected["generated_text"]
    assert chat.choices[0].message.tool_calls is None
    assert chat.usage.prompt_tokens == prompt_tokens  # the tools were rendered into the prompt


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_result_turn_is_rendered_through_the_template(openai_client, lmi, stream):
    conversation = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "oslo", "days": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "rain, then sun"},
    ]
    request = dict(model="a1", messages=conversation, tools=TOOLS, max_tokens=12, temperature=0)
    if stream:
        chunks = list(openai_client.chat.completions.create(**request, stream=True,
                                                            stream_options={"include_usage": True}))
        text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
        usage = chunks[-1].usage
    else:
        chat = openai_client.chat.completions.create(**request)
        text, usage = chat.choices[0].message.content, chat.usage
    expected, prompt_tokens = lmi(json.loads(json.dumps(conversation)), "a1")
    assert text == expected["generated_text"]
    assert usage.prompt_tokens == prompt_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_thinking_goes_into_reasoning_content(openai_client, stream):
    request = dict(model="a2", messages=MESSAGES, max_tokens=40, temperature=0,
                   extra_body={"structured_outputs": {"regex": "<think>[a-z ]{3,12}</think>[a-z]{2,8}"}})
    if stream:
        chunks = list(openai_client.chat.completions.create(**request, stream=True))
        deltas = [chunk.choices[0].delta for chunk in chunks]
        reasoning = "".join((delta.model_extra or {}).get("reasoning_content") or "" for delta in deltas)
        content = "".join(delta.content or "" for delta in deltas)
        assert sum(1 for delta in deltas if (delta.model_extra or {}).get("reasoning_content")) > 1
    else:
        message = openai_client.chat.completions.create(**request).choices[0].message
        reasoning, content = message.model_extra["reasoning_content"], message.content
    assert 3 <= len(reasoning) <= 12 and "<think>" not in reasoning and "</think>" not in reasoning
    assert 2 <= len(content) <= 8 and content.isalpha()


@pytest.mark.parametrize("body, message", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "names function 'nope'"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}},
     "both ask for structured output"),
    ({"tools": [{"type": "code_interpreter"}]}, "tools.0.type"),
    ({"messages": MESSAGES + [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "get_time", "arguments": "{not json"}}]}]}, r"messages\[2\].tool_calls\[0\].function.arguments is not JSON"),
])
def test_tool_requests_that_cannot_be_honoured_are_refused_by_name(openai_client, body, message):
    request = {"model": "a1", "messages": MESSAGES, "tools": TOOLS, "max_tokens": 4, **body}
    with pytest.raises(openai.BadRequestError, match=message):
        openai_client.chat.completions.create(**request)
