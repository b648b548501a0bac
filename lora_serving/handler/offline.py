"""`Engine.generate`: prompts in, whole answers out, with the engine stepped here until all are done."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING
from typing import Sequence as SequenceOf

from lora_serving.handler.errors import InvalidRequestError
from lora_serving.handler.request_sequences import returned_choices
from lora_serving.handler.sequence import GenerationResult, SamplingParams

if TYPE_CHECKING:
    from lora_serving.handler.engine import Engine

_request_counter = itertools.count()


def generate_offline(
    engine: Engine,
    prompts: str | list[int] | SequenceOf[str | list[int]],
    params: SamplingParams | SequenceOf[SamplingParams] | None,
    adapters: str | None | SequenceOf[str | None],
) -> list[GenerationResult]:
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    count = len(prompts)
    params_list = _broadcast(params if params is not None else SamplingParams(), count, "params")
    adapter_list = _broadcast(adapters, count, "adapters")
    request_ids = [f"generate-{next(_request_counter)}" for _ in range(count)]
    results: dict[tuple[str, int], GenerationResult] = {}
    for request_id, prompt, prompt_params, adapter in zip(request_ids, prompts, params_list, adapter_list):
        prompt_token_ids = engine.tokenize(prompt)
        engine.add_request(request_id, prompt_token_ids, prompt_params, adapter)
        for index in range(prompt_params.num_sequences):
            results[request_id, index] = GenerationResult(request_id, prompt_token_ids, [], "", [], None,
                                                          index=index)
    pending = set(results)
    while pending:
        for output in engine.step():
            result = results.get((output.request_id, output.index))
            if result is None:
                continue
            for token in output.tokens:
                result.token_ids.append(token.id)
                result.log_probs.append(token.log_prob)
                result.text += token.text
                if token.top_tokens is not None:
                    result.top_tokens.append(token.top_tokens)
            if output.prompt_log_probs is not None:
                result.prompt_log_probs = output.prompt_log_probs
            if output.finished:
                result.finish_reason = output.finish_reason
                result.error = output.error
                pending.discard((output.request_id, output.index))
    answers = []
    for request_id, prompt_params in zip(request_ids, params_list):
        choices = [results[request_id, index] for index in range(prompt_params.num_sequences)]
        for choice in choices[1:]:  # the prompt was scored once, by the first sequence
            choice.prompt_log_probs = choices[0].prompt_log_probs
        choices = returned_choices(choices, prompt_params, lambda choice: choice.log_probs)
        if prompt_params.num_sequences > 1:
            choices[0].choices = choices
        answers.append(choices[0])
    return answers


def _broadcast(value, count: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise InvalidRequestError(f"got {len(value)} {name} for {count} prompts")
        return list(value)
    return [value] * count
