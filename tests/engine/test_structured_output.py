"""Structured output: what the engine generates under a JSON schema, regex or choice parses and validates,
whatever the (random) model would have said, and in one batch with requests that have no grammar."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from lora_serving.handler import Engine, SamplingParams
from lora_serving.handler.errors import InvalidRequestError
from lora_serving.handler.sequence import StructuredOutput
from tests.engine.test_parity import random_prompts
from tests.models import reference_greedy

# Bounded everywhere (lengths, items, numbers), so that a random model's answer ends within max_new_tokens
# (200: enough for every string at its longest, each character written as a \uXXXX escape).
ORDER_SCHEMA = {
    "type": "object",
    "properties": {
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 8},
                "tier": {"enum": ["free", "pro", "enterprise"]},
            },
            "required": ["name", "tier"],
            "additionalProperties": False,
        },
        "items": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
                  "minItems": 1, "maxItems": 3},
        "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
        "express": {"type": "boolean"},
    },
    "required": ["customer", "items", "code", "express"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llama(tiny_models):
    model_dir = tiny_models.get("llama", "llama")
    return model_dir, Engine(model_dir, dtype="float32", max_rolling_batch_size=16)


def _structured(kind, value, **params) -> SamplingParams:
    text = value if isinstance(value, str) else json.dumps(value)
    return SamplingParams(max_new_tokens=200, structured=StructuredOutput(kind, text, source="test"), **params)


def test_schema_regex_and_choice_outputs_validate_next_to_plain_requests(llama):
    model_dir, engine = llama
    prompts = random_prompts(6, seed=50)
    results = engine.generate(prompts, [
        _structured("json_schema", ORDER_SCHEMA),
        _structured("json_schema", ORDER_SCHEMA, do_sample=True, seed=5, temperature=1.5, n=2),
        _structured("regex", r"[a-z]{3,6}@[a-z]{2,5}\.(com|org)"),
        _structured("choice", ["red cat", "blue \"dog\"", "中文"], do_sample=True, seed=1),
        _structured("json_object", "", frequency_penalty=0.5, top_n_tokens=3),
        SamplingParams(max_new_tokens=12),
    ])
    for answer in (results[0], *results[1].choices):
        jsonschema.validate(json.loads(answer.text), ORDER_SCHEMA)
        assert answer.finish_reason.value == "eos_token"
    assert re.fullmatch(r"[a-z]{3,6}@[a-z]{2,5}\.(com|org)", results[2].text)
    assert results[3].text in ("red cat", "blue \"dog\"", "中文")
    if results[4].finish_reason.value != "length":  # an object may be open-ended: only a finished one parses
        assert isinstance(json.loads(results[4].text), dict)
    assert results[5].token_ids == reference_greedy(model_dir, prompts[5], 12)


@pytest.mark.parametrize("kind, value, message", [
    ("json_schema", "{not json", "test is invalid"),
    ("json_schema", {"type": "objectx"}, "Invalid type"),
    ("json_schema", {"type": "array", "uniqueItems": True}, "uniqueItems"),
    ("json_schema", {"$ref": "#/$defs/missing"}, "missing"),
    ("regex", "[a-", "unclosed character class"),
])
def test_a_spec_that_cannot_be_enforced_is_refused_with_the_reason(llama, kind, value, message):
    _, engine = llama
    with pytest.raises(InvalidRequestError, match=re.escape(message)):
        engine.add_request(f"bad-{kind}-{message}", "a prompt", _structured(kind, value))
    assert not engine.has_unfinished_requests()
