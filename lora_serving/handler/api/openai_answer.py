"""OpenAI's answer objects (chat completions, and what the legacy completions API shares with them), built
from a Generation: one choice per returned sequence, log-probabilities with their top alternatives."""

from __future__ import annotations

from lora_serving.handler.api.chat_answer import PLAIN_ANSWER, AnswerPlan, ChoiceInterpreter
from lora_serving.handler.api.generation import Choice, Generation
from lora_serving.handler.sequence import FinishReason, RequestOutput, TokenOutput


def openai_finish_reason(reason: FinishReason | None) -> str | None:
    if reason is None:
        return None
    if reason in (FinishReason.EOS, FinishReason.STOP_SEQUENCE):
        return "stop"
    return reason.value  # "length", and "error" / "aborted" where OpenAI has no name


def usage(generations: list[Generation]) -> dict:
    """Prompt tokens once per prompt; completion tokens of every sequence generated (best_of included)."""
    prompt_tokens = sum(generation.num_prompt_tokens for generation in generations)
    completion_tokens = sum(len(choice.tokens) for generation in generations for choice in generation.choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _chat_token(text: str, log_prob: float) -> dict:
    return {"token": text, "logprob": log_prob, "bytes": list(text.encode())}


def chat_logprobs(tokens: list[TokenOutput]) -> dict:
    return {
        "content": [
            {**_chat_token(token.listed_text, token.log_prob),
             "top_logprobs": [_chat_token(top.text, top.log_prob) for top in token.top_tokens or ()]}
            for token in tokens
        ]
    }


def chat_completion(generation: Generation, *, completion_id: str, model: str, created: int, logprobs: bool,
                    plan: AnswerPlan = PLAIN_ANSWER) -> dict:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [_whole_choice(index, choice, logprobs, plan) for index, choice in enumerate(generation.returned())],
        "usage": usage([generation]),
    }


def _whole_choice(index: int, choice: Choice, logprobs: bool, plan: AnswerPlan) -> dict:
    if plan.is_plain:
        message, called_tools = {"role": "assistant", "content": choice.text}, False
    else:
        interpreter = ChoiceInterpreter(plan)
        interpreter.feed(choice.text, final=True)
        message, called_tools = interpreter.message(), interpreter.called_tools
    return {"index": index, "message": message, "logprobs": chat_logprobs(choice.tokens) if logprobs else None,
            "finish_reason": chat_finish_reason(choice, plan, called_tools)}


def chat_finish_reason(choice: Choice, plan: AnswerPlan, called_tools: bool) -> str | None:
    """OpenAI's: "tool_calls" when the model chose to call (auto) or had to (required) and ended; a call to the
    function the request named ends with "stop", as OpenAI ends it; "length" says calls were cut off."""
    if called_tools and plan.tools.mode in ("auto", "required") and choice.finish_reason in (
            FinishReason.EOS, FinishReason.STOP_SEQUENCE):
        return "tool_calls"
    return openai_finish_reason(choice.finish_reason)


def usage_chunk(generation: Generation, *, object_name: str, completion_id: str, model: str, created: int) -> dict:
    """The last streamed chunk when the client asked for `stream_options.include_usage`: the usage, and no
    choices (OpenAI's shape, which its SDK and vLLM's benchmark client read)."""
    return {"id": completion_id, "object": object_name, "created": created, "model": model,
            "choices": [], "usage": usage([generation])}


class ChatChunks:
    """The chunks of one streamed chat answer, engine step by engine step: one per token, each choice's
    first carrying the role and its last the finish reason, then a usage chunk when the client asked for
    `include_usage`. With tools or reasoning (`plan`), a token whose text is held back (it may begin a tool
    call) makes no chunk unless it carries log-probabilities or the finish."""

    def __init__(self, generation: Generation, *, completion_id: str, model: str, created: int, logprobs: bool,
                 include_usage: bool, plan: AnswerPlan = PLAIN_ANSWER) -> None:
        self._generation = generation
        self._identity = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                          "model": model}
        self._usage_identity = {"completion_id": completion_id, "model": model, "created": created}
        self._logprobs = logprobs
        self._include_usage = include_usage
        self._plan = plan
        self._started: set[int] = set()
        self._interpreters: dict[int, ChoiceInterpreter] = {}

    def for_output(self, output: RequestOutput) -> list[dict]:
        """What `output` (already added to the generation) adds to the stream."""
        choice = self._generation.choices[output.index]
        tokens = output.tokens or [None]
        chunks = []
        for position, token in enumerate(tokens):
            is_last = output.finished and position == len(tokens) - 1
            text = token.text if token else ""
            if self._plan.is_plain:
                delta: dict = {"content": text}
            else:
                delta = self._interpreter(choice.index).feed(text, final=is_last)
                if not delta and not is_last and not (self._logprobs and token):
                    continue
            if choice.index not in self._started:
                self._started.add(choice.index)
                delta = {"role": "assistant", **delta}
            chunks.append({**self._identity, "choices": [self._chunk_choice(choice, delta, token, is_last)]})
        if self._include_usage and self._generation.finished and output.finished:
            chunks.append(usage_chunk(self._generation, object_name="chat.completion.chunk", **self._usage_identity))
        return chunks

    def _interpreter(self, index: int) -> ChoiceInterpreter:
        if index not in self._interpreters:
            self._interpreters[index] = ChoiceInterpreter(self._plan)
        return self._interpreters[index]

    def _chunk_choice(self, choice: Choice, delta: dict, token: TokenOutput | None, is_last: bool) -> dict:
        called_tools = choice.index in self._interpreters and self._interpreters[choice.index].called_tools
        return {
            "index": choice.index,
            "delta": delta,
            "logprobs": chat_logprobs([token]) if self._logprobs and token else None,
            "finish_reason": chat_finish_reason(choice, self._plan, called_tools) if is_last else None,
        }
