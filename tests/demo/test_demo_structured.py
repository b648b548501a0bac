"""Structured output on the demo model, whose adapters' styles stay visible inside the JSON they are held
to: every adapter's answer to a schema request parses and validates."""

from __future__ import annotations

import json
import tarfile

import jsonschema
import pytest

from lora_serving.container.demo.examples import DEMO_PROMPTS
from lora_serving.container.demo.recipe import ADAPTER_NAMES
from lora_serving.handler import Engine, SamplingParams
from lora_serving.handler.sequence import StructuredOutput

SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "maxLength": 80},
                   "words": {"type": "integer", "minimum": 1, "maximum": 20}},
    "required": ["answer", "words"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def demo_engine(demo_model_dir, tmp_path_factory):
    adapters_dir = tmp_path_factory.mktemp("demo-adapters")
    with tarfile.open(demo_model_dir / "adapters.tar.gz") as archive:
        archive.extractall(adapters_dir, filter="data")
    engine = Engine(demo_model_dir, dtype="float32", enable_lora=True, max_rolling_batch_size=8,
                    adapters_from_model_dir=False)
    for name in ADAPTER_NAMES:
        engine.register_adapter(name, adapters_dir / name)
    return engine


def test_every_adapter_answers_in_the_schema(demo_engine):
    adapters = [None, *ADAPTER_NAMES]
    structured = StructuredOutput("json_schema", json.dumps(SCHEMA), source="test")
    results = demo_engine.generate([DEMO_PROMPTS[0]] * len(adapters),
                                   SamplingParams(max_new_tokens=60, structured=structured), adapters)
    for result in results:
        jsonschema.validate(json.loads(result.text), SCHEMA)
    [choice] = demo_engine.generate([DEMO_PROMPTS[0]], SamplingParams(
        max_new_tokens=10, structured=StructuredOutput("choice", json.dumps(["yes", "no"]))), ["es"])
    assert choice.text in ("yes", "no")
