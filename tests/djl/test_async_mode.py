"""lora_serving.handler.model under the real DJL worker in async mode (`option.async_mode=true`, what LMI's vLLM
container makes of `rolling_batch=auto`), driven as AsyncRequestManager.java drives it: requests arrive
concurrently with their `request_tracking_id`, answers come back as one Output each or, for streams, one
Output per token."""

from __future__ import annotations

import asyncio
import json

from tests.djl.conftest import (
    OTHER_PROMPT,
    PROMPT,
    djl_model_dir,
    front_end_fixture,
    generate,
    streamed_ids,
    token_ids,
)
from tests.djl.front_end import ClientRequest

front_end = front_end_fixture("async")


def test_concurrent_requests_mixing_adapters_and_streams(front_end, expected):
    cases = [(prompt, adapter, stream) for prompt in (PROMPT, OTHER_PROMPT) for adapter in ("a1", None, "a2")
             for stream in (False, True)]
    for prompt, adapter, _ in cases:
        expected(prompt, adapter)
    responses = [front_end.submit(generate(prompt, adapter, stream=stream)) for prompt, adapter, stream in cases]
    for (prompt, adapter, stream), response in zip(cases, responses):
        response.wait()
        assert response.code == 200
        if stream:
            assert response.properties["Content-Type"] == "application/jsonlines"
            assert streamed_ids(response.json_lines()) == expected(prompt, adapter)
        else:
            assert response.properties["Content-Type"] == "application/json"
            assert token_ids(response.json()) == expected(prompt, adapter)
    assert front_end.num_active_async == 0


def test_a_stream_is_one_output_per_token(front_end, expected):
    response = front_end.submit(generate(PROMPT, "a1", stream=True)).wait()
    records = [json.loads(chunk) for chunk in response.chunks]
    assert len(records) == len(expected(PROMPT, "a1"))
    assert streamed_ids(records) == expected(PROMPT, "a1")
    assert records[-1]["details"]["finish_reason"] == "length"


def test_bad_requests_fail_alone(front_end, expected):
    good = front_end.submit(generate(PROMPT, "a2", 24, stream=True))
    bad = [front_end.submit(ClientRequest({"Content-Type": "application/json"}, body)) for body in (
        b"not json", json.dumps({"inputs": PROMPT, "adapters": "nope"}).encode(),
        json.dumps({"inputs": PROMPT, "stream": "yes"}).encode())]
    for response, message in zip(bad, ("not valid JSON", "Adapter nope is not registered", "'stream' must be")):
        response.wait()
        assert response.code == 400
        assert message in response.json()["error"]
    assert streamed_ids(good.wait().json_lines()) == expected(PROMPT, "a2", 24)


def test_the_adapter_header_wins_and_chat_works(front_end, expected):
    response = front_end.submit(generate(PROMPT, "a1", **{"X-Amzn-SageMaker-Adapter-Identifier": "a2"})).wait()
    assert token_ids(response.json()) == expected(PROMPT, "a2")
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    chunks = front_end.submit(ClientRequest.json(body)).wait().json_lines()
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] <= 4


MANY_TOKENS = 240


def test_a_dropped_stream_frees_its_sequence(djl_python_importable, server_base, server_adapters, tmp_path):
    """The worker closes a stream's generator early when it drops the request: the engine must abort it.
    Run in this process, through the handler's own async entry points and djl_python's Input."""
    from djl_python import Input

    from lora_serving.handler.djl.services import AsyncService

    model_dir = djl_model_dir(server_base, server_adapters, tmp_path / "model", "async")

    async def scenario():
        service = await AsyncService.start({"model_id": str(model_dir), "model_dir": str(model_dir),
                                            "dtype": "fp32", "enable_lora": "true", "max_model_len": "256",
                                            "cpu_kv_cache_mb": "64", "device_id": "-1"})
        client_request = generate(PROMPT, None, MANY_TOKENS, stream=True)
        request = Input()
        request.properties = dict(client_request.properties)
        request.content.add(key="data", value=client_request.data)
        stream = await service.handle(request)
        first = await stream.__anext__()
        assert first.properties["Content-Type"] == "application/jsonlines"
        assert service.engine.has_unfinished_requests()
        await stream.aclose()
        for _ in range(500):
            if not service.engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.01)
        assert not service.engine.has_unfinished_requests()
        stats = service.engine.stats()
        assert stats.num_running == 0 and stats.num_free_kv_blocks == stats.num_kv_blocks
        assert stats.generated_tokens < MANY_TOKENS // 2  # stopped, not run to its end
        service.stop()

    asyncio.run(scenario())
