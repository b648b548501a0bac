"""Tool-call and reasoning parsers on strings, and the chat prompt a template without tools makes: each format's calls found, content kept, malformed calls
shown as content; and a text fed piece by piece (as a stream) gives the same message as fed whole."""

from __future__ import annotations

import json

import pytest

from lora_serving.handler.api.chat_answer import AnswerPlan, ChoiceInterpreter
from lora_serving.handler.api.chat_prompt import TOOLS_FALLBACK_HEADER, render_chat_prompt
from lora_serving.handler.api.openai_chat_request import ChatMessage
from lora_serving.handler.errors import InvalidRequestError
from lora_serving.handler.reasoning_parsers import REASONING_PARSERS
from lora_serving.handler.tool_parsers import TOOL_CALL_PARSERS
from lora_serving.handler.api.tool_schema import ToolDefinition, ToolPlan, tool_plan

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


def auto(parser: str, parallel: bool = True, reasoning: str | None = None) -> AnswerPlan:
    return AnswerPlan(ToolPlan("auto", parallel, parser=TOOL_CALL_PARSERS[parser]()),
                      REASONING_PARSERS[reasoning] if reasoning else None)


def whole(plan: AnswerPlan, text: str) -> dict:
    interpreter = ChoiceInterpreter(plan)
    interpreter.feed(text, final=True)
    return interpreter.message()


def streamed(plan: AnswerPlan, text: str, piece: int = 1) -> tuple[dict, list[dict]]:
    """The message fed `piece` characters at a time, and the deltas it streamed."""
    interpreter = ChoiceInterpreter(plan)
    pieces = [text[start:start + piece] for start in range(0, len(text), piece)] or [""]
    deltas = [interpreter.feed(part, final=index == len(pieces) - 1) for index, part in enumerate(pieces)]
    return interpreter.message(), [delta for delta in deltas if delta]


def calls(message: dict) -> list[tuple[str, dict]]:
    return [(call["function"]["name"], json.loads(call["function"]["arguments"]))
            for call in message.get("tool_calls", [])]


CASES = [
    ("hermes", 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
               '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
     "Let me look.\n", [("get_weather", {"city": "Oslo"}), ("get_time", {})]),
    # The last block unclosed (the model stopped at EOS), arguments written as JSON text.
    ("qwen", '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}',
     None, [("get_weather", {"city": "Rome"})]),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Lima"}}; '
                    '{"name": "get_time", "parameters": {}}',
     None, [("get_weather", {"city": "Lima"}), ("get_time", {})]),
    ("llama3_json", ' {"name": "get_time", "parameters": {}}', None, [("get_time", {})]),
    ("mistral", 'Sure.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Kyiv"}}]',
     "Sure.", [("get_weather", {"city": "Kyiv"})]),
]


@pytest.mark.parametrize("parser, text, content, expected", CASES)
@pytest.mark.parametrize("piece", [None, 1, 3])
def test_each_format_finds_its_calls_whole_and_streamed(parser, text, content, expected, piece):
    message = whole(auto(parser), text) if piece is None else streamed(auto(parser), text, piece)[0]
    assert message["content"] == content
    assert calls(message) == expected
    assert all(call["id"].startswith("call_") and call["type"] == "function" for call in message["tool_calls"])


@pytest.mark.parametrize("parser, text", [
    ("hermes", "no call here, only < and <tool_ and text"),
    ("hermes", '<tool_call>\n{"arguments": {"city": \n</tool_call>'),  # no name: nothing streamed
    ("llama3_json", "The weather is {mild} today"),
    ("llama3_json", '{"city": "Oslo"}'),  # JSON, but no call
    ("mistral", "[TOOL_CALLS] not json"),
])
def test_text_without_well_formed_calls_is_the_content(parser, text):
    for message in (whole(auto(parser), text), streamed(auto(parser), text)[0]):
        assert message["content"] == text
        assert "tool_calls" not in message


def test_a_call_that_turns_out_malformed_after_it_began_streaming_stays_as_far_as_it_went():
    # A stream cannot take back the name and arguments it sent (nor can vLLM's); the whole answer is content.
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>'
    assert "tool_calls" not in whole(auto("hermes"), text)
    message, _ = streamed(auto("hermes"), text)
    assert message["content"] == text
    # The arguments stopped where they stopped being JSON, not at the end of the text.
    assert [call["function"] for call in message["tool_calls"]] == [{"name": "get_weather",
                                                                      "arguments": '{"city": \n'}]


STREAMED_CASES = [
    ("hermes", 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo, \\"Norway\\" {}"}}'
               '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": ["utc", {"a": 1}]}}\n</tool_call>'),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Lima"}}; '
                    '{"name": "get_time", "parameters": {"zone":"cet"}}'),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Kyiv"}}, '
                '{"name": "get_time", "arguments": {"zone": "utc"}}]'),
]


@pytest.mark.parametrize("parser, text", STREAMED_CASES)
@pytest.mark.parametrize("piece", [1, 4])
def test_auto_calls_stream_their_name_then_their_arguments_in_pieces(parser, text, piece):
    message, deltas = streamed(auto(parser), text, piece)
    call_deltas = [call for delta in deltas for call in delta.get("tool_calls", [])]
    for index, expected in enumerate(whole(auto(parser), text)["tool_calls"]):
        mine = [call for call in call_deltas if call["index"] == index]
        # The first carries the id, type and name; the rest only pieces of the arguments.
        assert mine[0]["id"].startswith("call_") and mine[0]["type"] == "function"
        assert mine[0]["function"]["name"] == expected["function"]["name"]
        assert all(set(call) == {"index", "function"} and set(call["function"]) == {"arguments"}
                   for call in mine[1:])
        assert len(mine) > 3  # the arguments came as they were written
        streamed_arguments = "".join(call["function"]["arguments"] for call in mine)
        # The pieces add up to the whole answer's arguments, which are the object as the model wrote it.
        assert streamed_arguments == expected["function"]["arguments"]
        assert streamed_arguments == message["tool_calls"][index]["function"]["arguments"]
        assert streamed_arguments in text


def test_arguments_written_as_json_text_stream_as_one_piece_after_the_name():
    text = '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}\n</tool_call>'
    message, deltas = streamed(auto("hermes"), text)
    call_deltas = [delta["tool_calls"][0] for delta in deltas if "tool_calls" in delta]
    assert [call["function"] for call in call_deltas] == [{"name": "get_weather", "arguments": ""},
                                                          {"arguments": '{"city": "Rome"}'}]


def test_without_parallel_tool_calls_a_stream_stops_after_the_first_call():
    message, deltas = streamed(auto("hermes", parallel=False), STREAMED_CASES[0][1])
    assert {call["index"] for delta in deltas for call in delta.get("tool_calls", [])} == {0}
    assert calls(message) == [("get_weather", {"city": 'Oslo, "Norway" {}'})]


def test_auto_keeps_special_tokens_in_the_text_so_that_the_marker_reaches_the_parser():
    from lora_serving.handler.sequence import SamplingParams
    for parser in TOOL_CALL_PARSERS:
        params = SamplingParams()
        assert params.skip_special_tokens
        plan_for([WEATHER], None).adjust_request(params)
        assert not params.skip_special_tokens
    params = SamplingParams()
    plan_for([WEATHER], "none").adjust_request(params)
    assert params.skip_special_tokens


def test_a_stream_sends_content_before_the_call_and_holds_back_only_what_may_begin_one():
    text = 'Checking <tool now.<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    _, deltas = streamed(auto("hermes"), text)
    content = [delta["content"] for delta in deltas if "content" in delta]
    assert "".join(content) == "Checking <tool now."
    # "<tool" was held while it could begin "<tool_call>", and let go when " " showed it does not.
    assert content[:9] == list("Checking ") and "<tool " in content
    call_deltas = [delta["tool_calls"] for delta in deltas if "tool_calls" in delta]
    assert all(len(call) == 1 and call[0]["index"] == 0 for call in call_deltas)
    # The name once the head is written, then the arguments as they are.
    assert [call[0]["function"] for call in call_deltas] == [{"name": "get_time", "arguments": ""},
                                                             {"arguments": "{"}, {"arguments": "}"}]


def test_without_parallel_tool_calls_only_the_first_call_is_answered():
    text = CASES[0][1]
    assert calls(whole(auto("hermes", parallel=False), text)) == [("get_weather", {"city": "Oslo"})]


def test_named_function_streams_its_arguments_as_generated():
    plan = AnswerPlan(ToolPlan("named", False, function="get_weather"))
    message, deltas = streamed(plan, '{"city": "Oslo"}', piece=4)
    assert deltas[0]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"ci'}
    assert "id" in deltas[0]["tool_calls"][0] and "id" not in deltas[1]["tool_calls"][0]
    assert "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas) == '{"city": "Oslo"}'
    assert message["content"] is None and calls(message) == [("get_weather", {"city": "Oslo"})]


def test_required_sends_each_item_of_the_list_its_schema_makes_once_whole():
    plan = AnswerPlan(ToolPlan("required"))
    listed = '[{"name": "get_weather", "parameters": {"city": "Oslo"}}, {"name": "get_time", "parameters": {}}]'
    assert calls(whole(plan, listed)) == [("get_weather", {"city": "Oslo"}), ("get_time", {})]
    message, deltas = streamed(plan, listed)
    assert [[call["index"] for call in delta["tool_calls"]] for delta in deltas] == [[0], [1]]
    # Cut off by max_tokens inside the second item: the first is answered.
    assert calls(whole(plan, listed[:-12])) == [("get_weather", {"city": "Oslo"})]


@pytest.mark.parametrize("parser, text, reasoning, content", [
    ("qwen3", "<think>\nsunny, check\n</think>\n\nIt is sunny.", "\nsunny, check\n", "\n\nIt is sunny."),
    ("qwen3", "It is sunny.", None, "It is sunny."),  # thinking off: no <think>, all content
    ("qwen3", "<think>cut off", "cut off", None),
    ("deepseek_r1", "the prompt opened the thought</think>Answer", "the prompt opened the thought", "Answer"),
    ("deepseek_r1", "<think>a</think>b", "a", "b"),
])
@pytest.mark.parametrize("piece", [None, 1, 2])
def test_reasoning_goes_into_reasoning_content(parser, text, reasoning, content, piece):
    plan = AnswerPlan(reasoning=REASONING_PARSERS[parser])
    message = whole(plan, text) if piece is None else streamed(plan, text, piece)[0]
    assert (message["reasoning_content"], message["content"]) == (reasoning, content)


def test_reasoning_then_a_tool_call():
    text = '<think>needs weather</think><tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    for message in (whole(auto("hermes", reasoning="qwen3"), text), streamed(auto("hermes", reasoning="qwen3"), text)[0]):
        assert message["reasoning_content"] == "needs weather"
        assert message["content"] is None
        assert calls(message) == [("get_weather", {"city": "Oslo"})]


def plan_for(tools, choice, parallel=True, auto_enabled=True):
    return tool_plan([ToolDefinition.model_validate(tool) for tool in tools] if tools else None, choice, parallel,
                     enable_auto_tool_choice=auto_enabled, tool_call_parser="hermes" if auto_enabled else "")


def test_tool_choice_plans():
    assert plan_for([WEATHER], None).mode == "auto"  # OpenAI's default with tools
    assert plan_for([WEATHER], "none").mode == "none"
    named = plan_for([WEATHER, TIME], {"type": "function", "function": {"name": "get_weather"}})
    assert named.mode == "named" and json.loads(named.grammar.value) == WEATHER["function"]["parameters"]
    required = json.loads(plan_for([WEATHER, TIME], "required", parallel=False).grammar.value)
    assert required["maxItems"] == 1 and [item["properties"]["name"]["enum"] for item in required["items"]["anyOf"]] \
        == [["get_weather"], ["get_time"]]
    assert plan_for(None, None) is None


@pytest.mark.parametrize("tools, choice, auto_enabled, message", [
    ([WEATHER], "auto", False, 'tool_choice "auto" needs option.enable_auto_tool_choice'),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, True, "names function 'nope', which is not in"),
    ([WEATHER], "sometimes", True, "tool_choice must be"),
    (None, "required", True, "tool_choice needs tools"),
    ([WEATHER, WEATHER], "required", True, "two functions are named 'get_weather'"),
])
def test_tool_choices_that_cannot_be_honoured_are_refused_by_name(tools, choice, auto_enabled, message):
    with pytest.raises(InvalidRequestError, match=message):
        plan_for(tools, choice, auto_enabled=auto_enabled)


def test_a_template_without_tools_gets_them_in_the_system_message_and_calls_in_content(tiny_models):
    """The demo tokenizer's template reads neither `tools` nor `tool_calls`: the documented fallback."""
    messages = [ChatMessage.model_validate(message) for message in [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "rain"},
    ]]
    prompt = render_chat_prompt(tiny_models.tokenizer, messages, [WEATHER])
    assert prompt.startswith("<|system|>\nbe brief\n\n" + TOOLS_FALLBACK_HEADER + json.dumps([WEATHER]))
    assert '<|assistant|>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n<|tool|>\nrain\n' in prompt
    assert prompt.endswith("<|assistant|>\n")
