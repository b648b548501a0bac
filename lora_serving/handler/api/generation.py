"""One prompt's answer as the engine reports it, collected for any format to shape: a `Generation` holds one
`Choice` per sequence the request generates (n / best_of), with tokens, finish reason and error."""

from __future__ import annotations

from lora_serving.handler.request_sequences import returned_choices
from lora_serving.handler.sequence import FinishReason, RequestOutput, SamplingParams, TokenOutput


class Choice:
    """One sequence of the request's answer."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.tokens: list[TokenOutput] = []
        self.finish_reason: FinishReason | None = None
        self.error: str | None = None

    def add(self, output: RequestOutput) -> None:
        self.tokens.extend(output.tokens)
        if output.finished:
            self.finish_reason = output.finish_reason
            self.error = output.error

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return "".join(token.text for token in self.tokens)

    @property
    def log_probs(self) -> list[float]:
        return [token.log_prob for token in self.tokens]


class Generation:
    """One prompt's answer as it arrives from the engine. `tokens`, `text`, `finish_reason` and `error` are
    its first choice's: the one streamed, and the whole answer when n is 1."""

    def __init__(self, prompt: str, prompt_token_ids: list[int], prefill: list[dict] | None = None,
                 params: SamplingParams | None = None) -> None:
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        # Prompt tokens as LMI's `details.prefill` lists them; only when the client asked.
        self.prefill = prefill
        self.params = params or SamplingParams()
        self.choices = [Choice(index) for index in range(self.params.num_sequences)]

    def add(self, output: RequestOutput) -> None:
        self.choices[output.index].add(output)
        if output.prompt_log_probs is not None and self.prefill is not None:
            for token, log_prob in zip(self.prefill, output.prompt_log_probs):
                token["log_prob"] = log_prob

    def returned(self) -> list[Choice]:
        """The n choices answered, best first when best_of is given (handler.request_sequences)."""
        return returned_choices(self.choices, self.params, lambda choice: choice.log_probs)

    @property
    def finished(self) -> bool:
        return all(choice.finished for choice in self.choices)

    @property
    def failed(self) -> Choice | None:
        return next((choice for choice in self.choices if choice.finish_reason is FinishReason.ERROR), None)

    @property
    def tokens(self) -> list[TokenOutput]:
        return self.choices[0].tokens

    @property
    def text(self) -> str:
        return self.choices[0].text

    @property
    def finish_reason(self) -> FinishReason | None:
        return self.choices[0].finish_reason

    @property
    def error(self) -> str | None:
        return self.choices[0].error

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


def prefill_tokens(tokenizer, token_ids: list[int]) -> list[dict]:
    """The prompt's tokens for `decoder_input_details`; their log_prob is filled in when the engine has
    scored the prompt (the first token's stays null: nothing comes before it)."""
    return [{"id": token_id, "text": tokenizer.decode([token_id]), "log_prob": None} for token_id in token_ids]
