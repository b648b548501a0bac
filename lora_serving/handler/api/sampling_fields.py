"""The one mapping from request fields to SamplingParams, which every request format extends.

The fields LMI's `parameters`, OpenAI's chat and completions bodies and TGI's `parameters` share, by the
names they share, live here with their defaults; each format adds the fields it names its own way (LMI's
`max_new_tokens` and `do_sample`, OpenAI's `max_tokens` and sampling unless temperature is 0) and passes them
to `build_sampling_params`, so a new shared field is added once. Strict types: "30" is not a number. A key a
format does not know is refused by name, never silently ignored; null means "not given".
"""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, field_validator, model_validator

from lora_serving.handler.api.structured_fields import GuidedDecodingFields
from lora_serving.handler.api.validation import token_id_keys
from lora_serving.handler.sequence import SamplingParams


class SamplingFields(GuidedDecodingFields):
    model_config = ConfigDict(strict=True, extra="forbid")

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = []
    stop_token_ids: list[int] = []
    logit_bias: dict[str, float] = {}
    skip_special_tokens: bool = True  # vLLM's (LMI passes it on); auto tool choice turns it off

    @model_validator(mode="before")
    @classmethod
    def _nulls_mean_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    def build_sampling_params(self, where: str = "", **format_fields: Any) -> SamplingParams:
        """SamplingParams of the shared fields, overridden and completed by the format's own (`format_fields`);
        `where` prefixes field names in errors (LMI's `parameters.`)."""
        fields: dict[str, Any] = {
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "min_p": self.min_p,
            "typical_p": self.typical_p,
            "seed": self.seed,
            "repetition_penalty": self.repetition_penalty,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "stop": self.stop,
            "stop_token_ids": self.stop_token_ids,
            "logit_bias": token_id_keys(self.logit_bias, f"{where}logit_bias"),
            "skip_special_tokens": self.skip_special_tokens,
        }
        fields.update(format_fields)
        return SamplingParams(**fields)
