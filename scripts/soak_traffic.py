"""The soak's request mix: one async function per kind of request, each sending one request and judging
its answer. Greedy kinds must answer exactly the reference; sampled ones must complete; disconnecting ones
leave early on purpose; invalid ones must get a 4xx JSON error. Nothing may get a 5xx or hang."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from soak_reference import Expected

ADAPTER_HEADER = "X-Amzn-SageMaker-Adapter-Identifier"
# Longer than any valid answer takes under load; a request that takes longer counts as hung.
REQUEST_TIMEOUT_SECONDS = 120.0


@dataclass(frozen=True)
class Case:
    """A greedy request the reference answers: its prompt (or chat sentence), adapter ("" = base), answer."""

    prompt: str
    adapter: str
    expected: Expected


@dataclass
class Outcome:
    status: int | None  # None: no HTTP answer
    seconds: float
    ok: bool
    problem: str = ""
    counts_latency: bool = True  # a whole, valid answer


@dataclass
class Traffic:
    """What every request kind needs: the client, the greedy cases and the limits they were computed with."""

    client: httpx.AsyncClient
    cases: list[Case]
    chat_cases: list[Case]  # empty when the model has no chat template
    base_model_name: str
    max_new_tokens: int


Kind = Callable[[Traffic, random.Random], Awaitable[Outcome]]


def _not_ok(response: httpx.Response, started: float, problem: str = "") -> Outcome:
    return Outcome(response.status_code, time.perf_counter() - started, False,
                   problem or f"status {response.status_code}: {response.text[:200]}")


def _compare(response: httpx.Response, started: float, expected: list[Expected], got_ids: list[list[int]] | None,
             got_texts: list[str | None]) -> Outcome:
    for index, want in enumerate(expected):
        if got_ids is not None and tuple(got_ids[index]) != want.token_ids:
            return _not_ok(response, started, f"token ids {got_ids[index]} != reference {list(want.token_ids)}")
        if got_texts[index] != want.text:
            return _not_ok(response, started, f"text {got_texts[index]!r} != reference {want.text!r}")
    return Outcome(200, time.perf_counter() - started, True)


def _token_ids(answer: dict) -> list[int]:
    return [token["id"] for token in answer["details"]["tokens"]]


def _lmi_parameters(traffic: Traffic, **extra) -> dict:
    return {"max_new_tokens": traffic.max_new_tokens, **extra}


async def lmi(traffic: Traffic, rng: random.Random) -> Outcome:
    """/invocations, one input, the adapter in the body as a string or a list of one."""
    case = rng.choice(traffic.cases)
    adapters = case.adapter if rng.random() < 0.5 else [case.adapter]
    started = time.perf_counter()
    response = await traffic.client.post("/invocations", json={
        "inputs": case.prompt, "adapters": adapters, "parameters": _lmi_parameters(traffic, details=True)})
    if response.status_code != 200:
        return _not_ok(response, started)
    answer = response.json()
    return _compare(response, started, [case.expected], [_token_ids(answer)], [answer["generated_text"]])


async def lmi_batch(traffic: Traffic, rng: random.Random) -> Outcome:
    """/invocations with a list of inputs and one adapter each, mixed in one request."""
    cases = [rng.choice(traffic.cases) for _ in range(rng.randint(2, 4))]
    started = time.perf_counter()
    response = await traffic.client.post("/invocations", json={
        "inputs": [case.prompt for case in cases], "adapters": [case.adapter for case in cases],
        "parameters": _lmi_parameters(traffic, details=True)})
    if response.status_code != 200:
        return _not_ok(response, started)
    answers = response.json()
    return _compare(response, started, [case.expected for case in cases], [_token_ids(a) for a in answers],
                    [answer["generated_text"] for answer in answers])


async def lmi_header(traffic: Traffic, rng: random.Random) -> Outcome:
    """/invocations with the adapter in SageMaker's header."""
    case = rng.choice(traffic.cases)
    started = time.perf_counter()
    response = await traffic.client.post("/invocations", headers={ADAPTER_HEADER: case.adapter} if case.adapter else {},
                                         json={"inputs": case.prompt, "parameters": _lmi_parameters(traffic)})
    if response.status_code != 200:
        return _not_ok(response, started)
    return _compare(response, started, [case.expected], None, [response.json()["generated_text"]])


async def _stream_records(traffic: Traffic, path: str, body: dict, *, sse: bool):
    """(response, records, whether the stream ended with OpenAI's [DONE]) of a streamed answer."""
    records, done = [], False
    async with traffic.client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return response, records, done
        async for line in response.aiter_lines():
            if sse:
                if not line.startswith("data:"):
                    continue
                line = line.removeprefix("data:").strip()
                if line == "[DONE]":
                    done = True
                    continue
            if line.strip():
                records.append(json.loads(line))
    return response, records, done


def _lmi_stream(output_formatter: str) -> Kind:
    async def lmi_stream(traffic: Traffic, rng: random.Random) -> Outcome:
        case = rng.choice(traffic.cases)
        started = time.perf_counter()
        response, records, _ = await _stream_records(traffic, "/invocations", {
            "inputs": case.prompt, "adapters": case.adapter, "stream": True,
            "parameters": _lmi_parameters(traffic, details=True, output_formatter=output_formatter)},
            sse=output_formatter == "sse")
        if response.status_code != 200:
            return _not_ok(response, started)
        if not records or "generated_text" not in records[-1] or "error" in records[-1]:
            return _not_ok(response, started, f"the stream ended without a whole answer: {records[-1:]}")
        ids = [record["token"]["id"] for record in records if record["token"]["id"] >= 0]
        return _compare(response, started, [case.expected], [ids], [records[-1]["generated_text"]])

    return lmi_stream


async def openai_completion(traffic: Traffic, rng: random.Random) -> Outcome:
    case = rng.choice(traffic.cases)
    started = time.perf_counter()
    response = await traffic.client.post("/v1/completions", json={
        "model": case.adapter or traffic.base_model_name, "prompt": case.prompt, "temperature": 0,
        "max_tokens": traffic.max_new_tokens})
    if response.status_code != 200:
        return _not_ok(response, started)
    return _compare(response, started, [case.expected], None, [response.json()["choices"][0]["text"]])


async def openai_chat_stream(traffic: Traffic, rng: random.Random) -> Outcome:
    case = rng.choice(traffic.chat_cases)
    started = time.perf_counter()
    response, records, done = await _stream_records(traffic, "/v1/chat/completions", {
        "model": case.adapter or traffic.base_model_name, "messages": [{"role": "user", "content": case.prompt}],
        "temperature": 0, "max_tokens": traffic.max_new_tokens, "stream": True}, sse=True)
    if response.status_code != 200:
        return _not_ok(response, started)
    if not done or not records or records[-1]["choices"][0]["finish_reason"] not in ("stop", "length"):
        return _not_ok(response, started, f"the stream ended without a whole answer: {records[-1:]}")
    text = "".join(record["choices"][0]["delta"].get("content") or "" for record in records)
    return _compare(response, started, [case.expected], None, [text])


async def tgi_generate(traffic: Traffic, rng: random.Random) -> Outcome:
    case = rng.choice(traffic.cases)
    started = time.perf_counter()
    response = await traffic.client.post("/generate", json={"inputs": case.prompt, "parameters": {
        "adapter_id": case.adapter, "max_new_tokens": traffic.max_new_tokens, "details": True}})
    if response.status_code != 200:
        return _not_ok(response, started)
    answer = response.json()
    return _compare(response, started, [case.expected], [_token_ids(answer)], [answer["generated_text"]])


async def tgi_stream(traffic: Traffic, rng: random.Random) -> Outcome:
    case = rng.choice(traffic.cases)
    started = time.perf_counter()
    response, records, _ = await _stream_records(traffic, "/generate_stream", {"inputs": case.prompt, "parameters": {
        "adapter_id": case.adapter, "max_new_tokens": traffic.max_new_tokens}}, sse=True)
    if response.status_code != 200:
        return _not_ok(response, started)
    if not records or records[-1].get("generated_text") is None:
        return _not_ok(response, started, f"the stream ended without a whole answer: {records[-1:]}")
    return _compare(response, started, [case.expected], [[record["token"]["id"] for record in records]],
                    [records[-1]["generated_text"]])


async def sampled(traffic: Traffic, rng: random.Random) -> Outcome:
    """Sampling: no reference to equal, but a whole answer."""
    case = rng.choice(traffic.cases)
    started = time.perf_counter()
    response = await traffic.client.post("/invocations", json={
        "inputs": case.prompt, "adapters": case.adapter, "parameters": _lmi_parameters(
            traffic, do_sample=True, temperature=0.9, top_p=0.9, top_k=20, seed=rng.randrange(2**32), details=True)})
    if response.status_code != 200:
        return _not_ok(response, started)
    reason = response.json()["details"]["finish_reason"]
    if reason not in ("length", "eos_token"):
        return _not_ok(response, started, f"finish_reason {reason}")
    return Outcome(200, time.perf_counter() - started, True)


async def leaves_mid_stream(traffic: Traffic, rng: random.Random) -> Outcome:
    """Reads the first token line of a long streamed answer, then closes the connection."""
    case = rng.choice(traffic.cases)
    started = time.perf_counter()
    async with traffic.client.stream("POST", "/invocations", json={
            "inputs": case.prompt, "adapters": case.adapter, "stream": True,
            "parameters": {"max_new_tokens": 4 * traffic.max_new_tokens, "ignore_eos_token": True}}) as response:
        if response.status_code != 200:
            await response.aread()
            return _not_ok(response, started)
        async for line in response.aiter_lines():
            if line:
                break
    return Outcome(200, time.perf_counter() - started, True, counts_latency=False)


async def leaves_before_answer(traffic: Traffic, rng: random.Random) -> Outcome:
    """Gives up on a long whole answer after a fraction of a second (the answer, if it came, is fine too)."""
    case = rng.choice(traffic.cases)
    started = time.perf_counter()
    try:
        response = await traffic.client.post("/invocations", timeout=rng.uniform(0.05, 0.5), json={
            "inputs": case.prompt, "adapters": case.adapter,
            "parameters": {"max_new_tokens": 4 * traffic.max_new_tokens, "ignore_eos_token": True}})
    except httpx.TimeoutException:
        return Outcome(None, time.perf_counter() - started, True, counts_latency=False)
    if response.status_code != 200:
        return _not_ok(response, started)
    return Outcome(200, time.perf_counter() - started, True, counts_latency=False)


INVALID_REQUESTS = [
    ("/invocations", {"inputs": ""}),
    ("/invocations", {"inputs": "x", "adapters": "no-such-adapter"}),
    ("/invocations", {"inputs": ["a", "b"], "adapters": ["no-such-adapter"]}),
    ("/invocations", {"inputs": "x", "parameters": {"max_new_tokens": "5"}}),
    ("/invocations", {"inputs": "x", "parameters": {"do_sample": True, "seed": 2**64}}),
    ("/invocations", b'{"inputs": "x",'),
    ("/invocations", b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
    ("/v1/completions", {"model": "no-such-adapter", "prompt": "x"}),
    ("/v1/chat/completions", {"messages": []}),
    ("/generate", {"inputs": "x", "parameters": {"adapter_id": "no-such-adapter"}}),
    ("/adapters", {"name": "../escape", "src": "/etc/passwd"}),
]


async def invalid(traffic: Traffic, rng: random.Random) -> Outcome:
    path, body = rng.choice(INVALID_REQUESTS)
    started = time.perf_counter()
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = await traffic.client.post(path, content=content, headers={"Content-Type": "application/json"})
    try:
        has_error = bool(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        has_error = False
    if not (400 <= response.status_code < 500 and has_error):
        return _not_ok(response, started, f"{path}: status {response.status_code}: {response.text[:200]}")
    return Outcome(response.status_code, time.perf_counter() - started, True, counts_latency=False)


def request_deck(with_chat: bool, extra: list[tuple[str, Kind, int]] = ()) -> list[tuple[str, Kind]]:
    """Every kind of request, named, as many times as its share (`extra`: more kinds, with their shares): a
    client deals its requests from a shuffled deck, so even a short run sends every kind."""
    mix = [("lmi", lmi, 3), ("lmi batch", lmi_batch, 2), ("lmi header", lmi_header, 1),
           ("lmi jsonlines", _lmi_stream("jsonlines"), 2), ("lmi sse", _lmi_stream("sse"), 1),
           ("openai completion", openai_completion, 1), ("tgi generate", tgi_generate, 1),
           ("tgi stream", tgi_stream, 1), ("sampled", sampled, 1), ("leaves mid-stream", leaves_mid_stream, 1),
           ("leaves before answer", leaves_before_answer, 1), ("invalid", invalid, 1)]
    if with_chat:
        mix.append(("openai chat stream", openai_chat_stream, 1))
    mix.extend(extra)
    return [(name, kind) for name, kind, copies in mix for _ in range(copies)]


async def one_request(traffic: Traffic, kind: Kind, rng: random.Random) -> Outcome:
    """Runs one request; a transport failure, a hang or an unreadable answer is an outcome too."""
    started = time.perf_counter()
    try:
        return await kind(traffic, rng)
    except httpx.TimeoutException:
        return Outcome(None, time.perf_counter() - started, False, "timed out: the server hung")
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as error:
        return Outcome(None, time.perf_counter() - started, False, f"{type(error).__name__}: {error}")
