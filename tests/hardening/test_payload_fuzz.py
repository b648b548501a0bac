"""Payload fuzzing of every route through the real server: hypothesis builds bodies that are mostly right
with some fields replaced by junk (wrong types, huge or odd numbers, NaN, unicode, nested junk), random JSON,
bytes that are no JSON, empty bodies, odd content types, adapter headers and query parameters.

Whatever is sent: no 5xx (except 507 where the management API promises it: no device slot left to pin),
every error a JSON body, no hang (a per-request timeout), no request left running in the engine, and the
server still healthy after each case. Bounded and deterministic: a fixed number of derandomized examples."""

from __future__ import annotations

import json
import time
from urllib.parse import urlencode

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.server.conftest import LORA_PROPERTIES, lmi_model_dir, start_server

REQUEST_TIMEOUT_SECONDS = 30
IDLE_TIMEOUT_SECONDS = 10
# A short model length bounds any valid generation the fuzzer makes to a few dozen tokens.
MAX_MODEL_LEN = 48
# No "explain" phase: on a failure it parses the source around the deeply nested bodies and trips over them.
FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ---- values ---------------------------------------------------------------------------------------------

ODD_NUMBERS = st.sampled_from([0, -1, 2**31, 2**63, 2**64, 10**30, -(10**30), 1e-300, 5e-324, 1e300, -0.0,
                               float("nan"), float("inf")])
# Lone surrogates come from real clients too: JavaScript slicing an emoji in half.
ODD_STRINGS = st.sampled_from(["", " ", "a1", "model", "\x00", "\ud83e", "half \ud83e emoji", "\udc00x",
                               "\u202e", "../..", "/etc/passwd", "ñandú 🦙", "x" * 3000, "null", "\n\n"])
STRINGS = st.one_of(ODD_STRINGS, st.text(max_size=20))
SCALARS = st.one_of(ODD_NUMBERS, ODD_STRINGS, st.none(), st.booleans(), st.integers(),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
JUNK = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(STRINGS, inner, max_size=3),
                    max_leaves=8)


def body_of(required: dict[str, st.SearchStrategy], optional: dict[str, st.SearchStrategy] | None = None):
    """A plausible object (the required fields and some optional ones), as often with one field replaced
    by junk, removed, or joined by a junk key: the one wrong thing the validation must catch. Nested
    bodies mutate their own fields, so the wrong thing can be at any depth."""
    optional = optional or {}
    plausible = st.fixed_dictionaries(required, optional=optional)
    names = st.sampled_from(sorted({*required, *optional}))
    replaced = st.builds(lambda body, name, junk: {**body, name: junk}, plausible, names, JUNK)
    removed = st.builds(lambda body, name: {key: value for key, value in body.items() if key != name},
                        plausible, names)
    extra = st.builds(lambda body, name, junk: {**body, name: junk}, plausible, STRINGS, JUNK)
    return st.one_of(plausible, replaced, removed, extra)


PROMPT = st.one_of(st.sampled_from(["the red cat", "one two three", "hello", "ñandú 🦙"]), ODD_STRINGS)
ADAPTER_NAMES = st.sampled_from(["a1", "a2", "", "nope"])
ADAPTER = st.one_of(ADAPTER_NAMES, ODD_STRINGS)
SMALL_COUNT = st.integers(1, 6)
PROBABILITY = st.floats(0, 1)
SEED = st.one_of(st.integers(0, 2**32), st.sampled_from([2**64 - 1, 2**64]))
LMI_PARAMETERS = body_of({"max_new_tokens": SMALL_COUNT}, {
    "do_sample": st.booleans(), "temperature": st.one_of(st.floats(0, 3), st.sampled_from([1e-300, 5e-324])),
    "top_k": SMALL_COUNT, "top_p": PROBABILITY, "seed": SEED, "repetition_penalty": st.floats(0.5, 2),
    "stop": st.lists(PROMPT, max_size=2), "stop_sequences": PROMPT, "details": st.booleans(),
    "decoder_input_details": st.booleans(), "return_full_text": st.booleans(), "ignore_eos_token": st.booleans(),
    "top_n_tokens": st.integers(0, 2), "output_formatter": st.sampled_from(["json", "jsonlines", "sse", "csv"]),
})
MESSAGES = st.lists(body_of({"role": st.sampled_from(["user", "system", "assistant"]), "content": PROMPT}),
                    min_size=1, max_size=3)
LMI_BODY = st.one_of(
    body_of({"inputs": PROMPT, "parameters": LMI_PARAMETERS},
            {"stream": st.booleans(), "adapters": ADAPTER}),
    body_of({"inputs": st.lists(PROMPT, min_size=1, max_size=3), "parameters": LMI_PARAMETERS},
            {"adapters": st.lists(ADAPTER, max_size=3)}),
    body_of({"messages": MESSAGES, "max_tokens": SMALL_COUNT},
            {"temperature": st.floats(0, 2), "stream": st.booleans(), "adapters": ADAPTER, "seed": SEED}),
)
OPENAI_SAMPLING = {"model": ADAPTER, "temperature": st.one_of(st.floats(0, 2), st.just(1e-300)),
                   "top_p": PROBABILITY, "seed": SEED, "stop": PROMPT, "stream": st.booleans(), "n": st.integers(1, 2),
                   "top_k": SMALL_COUNT, "ignore_eos": st.booleans(), "presence_penalty": st.floats(-1, 1)}
COMPLETION_BODY = body_of({"prompt": st.one_of(PROMPT, st.lists(PROMPT, max_size=2)), "max_tokens": SMALL_COUNT},
                          {**OPENAI_SAMPLING, "logprobs": st.integers(0, 2), "echo": st.booleans(),
                           "best_of": st.integers(1, 2)})
CHAT_BODY = body_of({"messages": MESSAGES, "max_tokens": SMALL_COUNT},
                    {**OPENAI_SAMPLING, "logprobs": st.booleans(), "max_completion_tokens": SMALL_COUNT,
                     "stream_options": st.just({"include_usage": True})})
TGI_BODY = body_of({"inputs": PROMPT, "parameters": st.one_of(LMI_PARAMETERS, body_of({"max_new_tokens": SMALL_COUNT}, {
    "adapter_id": ADAPTER, "best_of": st.integers(1, 2), "truncate": SMALL_COUNT, "details": st.booleans(),
    "watermark": st.booleans(), "typical_p": PROBABILITY}))}, {"stream": st.booleans()})
SOURCES = st.sampled_from(["{model}/adapters/a1", "{model}/adapters", "{model}", "/etc/passwd", "relative/a1",
                           "{model}/nothing.tar.gz", "{model}/\x00", "{model}/" + "x" * 300,
                           "{model}/" + "x/" * 3000, "{model}/../../../etc"])
REGISTRATION_BODY = body_of({"name": st.sampled_from(["fuzzed", "a1", "x.y-z_1"]), "src": SOURCES},
                            {"preload": st.booleans(), "pin": st.booleans()})
QUERY = st.dictionaries(st.sampled_from(["adapter", "name", "src", "pin", "preload", "limit", "next_page_token"]),
                        st.one_of(ADAPTER_NAMES, SOURCES, st.sampled_from(["true", "false", "0", "-1", "9" * 30]),
                                  st.text(max_size=10)), max_size=3)
HEADERS = st.fixed_dictionaries({}, optional={
    "Content-Type": st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded",
                                     "multipart/form-data; boundary=x", "application/json; charset=latin-1", "}{"]),
    # Printable ASCII without surrounding spaces: what HTTP lets a client send at all.
    "X-Amzn-SageMaker-Adapter-Identifier": st.one_of(ADAPTER_NAMES, st.text(st.characters(min_codepoint=32,
                                                                                    max_codepoint=126),
                                                                      max_size=20).map(str.strip)),
})


def encoded(bodies: st.SearchStrategy) -> st.SearchStrategy:
    """The body as sent: its JSON (NaN and Infinity included, as Python writes them), or broken bytes."""
    as_json = bodies.map(lambda body: json.dumps(body).encode())
    deeply_nested = st.integers(500, 50_000).map(lambda depth: b'{"inputs": ' + b"[" * depth + b"]" * depth + b"}")
    broken = st.one_of(st.binary(max_size=40), st.just(b""), as_json.map(lambda raw: raw[: len(raw) // 2]),
                       as_json.map(lambda raw: raw + b"}"), JUNK.map(lambda junk: json.dumps(junk).encode()),
                       deeply_nested)
    return st.one_of(as_json, as_json, as_json, broken)


# ---- the server and the check of one case ---------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_server(server_base, server_adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    live = start_server(lmi_model_dir(server_base, root / "model", {
        **LORA_PROPERTIES, "option.cache_dir": str(root / "cache"), "option.max_model_len": str(MAX_MODEL_LEN)},
        server_adapters))
    with httpx.Client(base_url=live.url, timeout=REQUEST_TIMEOUT_SECONDS) as client:
        yield live, client
    live.stop()


def check_case(fuzz_server, method: str, path: str, *, content: bytes = b"", headers=None, params=None) -> None:
    live, client = fuzz_server
    if params:
        # Encoded here, not by httpx, so that a lone surrogate goes out as the bytes a hostile client would send.
        path += "?" + urlencode(params, errors="surrogatepass")
    with client.stream(method, path, content=content, headers=headers or {}) as response:
        body = response.read()
    allowed_5xx = {507} if "/adapters" in path else set()
    assert response.status_code < 500 or response.status_code in allowed_5xx, (response.status_code, body[:300])
    if response.status_code >= 400 and method != "HEAD":  # a HEAD answer has no body
        assert isinstance(json.loads(body)["error"], (str, dict)), body[:300]
    assert b"internal error" not in body, body[:300]  # a streamed answer's failure after its 200
    assert client.get("/ping").status_code == 200
    deadline = time.monotonic() + IDLE_TIMEOUT_SECONDS
    while live.runtime.engine.has_unfinished_requests():
        assert time.monotonic() < deadline, "a request was left running"
        time.sleep(0.01)


# ---- the fuzz tests -------------------------------------------------------------------------------------

@FUZZ
@given(path=st.sampled_from(["/invocations", "/predictions/model", "/predictions/ünï"]), content=encoded(LMI_BODY),
       headers=HEADERS, params=QUERY)
def test_fuzz_lmi_routes(fuzz_server, path, content, headers, params):
    check_case(fuzz_server, "POST", path, content=content, headers=headers, params=params)


@FUZZ
@given(route=st.sampled_from([("/v1/completions", COMPLETION_BODY), ("/v1/chat/completions", CHAT_BODY)]),
       data=st.data(), headers=HEADERS)
def test_fuzz_openai_routes(fuzz_server, route, data, headers):
    path, bodies = route
    check_case(fuzz_server, "POST", path, content=data.draw(encoded(bodies)), headers=headers)


@FUZZ
@given(path=st.sampled_from(["/generate", "/generate_stream", "/"]), content=encoded(TGI_BODY), headers=HEADERS,
       params=QUERY)
def test_fuzz_tgi_routes(fuzz_server, path, content, headers, params):
    check_case(fuzz_server, "POST", path, content=content, headers=headers, params=params)


def with_model_dir(fuzz_server, content: bytes, params: dict[str, str]) -> tuple[bytes, dict[str, str]]:
    """Sources name the server's own model directory as `{model}`."""
    model_dir = fuzz_server[0].runtime.config.model_id
    return (content.replace(b"{model}", model_dir.encode()),
            {key: value.replace("{model}", model_dir) for key, value in params.items()})


@FUZZ
@given(path=st.sampled_from(["/adapters", "/models/model/adapters"]), data=st.data(), headers=HEADERS)
def test_fuzz_adapter_registration(fuzz_server, path, data, headers):
    # SageMaker's JSON body, or DJL's query parameters with no body.
    if data.draw(st.booleans()):
        content, params = data.draw(encoded(REGISTRATION_BODY)), {}
    else:
        content, params = b"", data.draw(REGISTRATION_BODY.map(lambda body: {
            key: value if isinstance(value, str) else json.dumps(value) for key, value in body.items()}))
    content, params = with_model_dir(fuzz_server, content, params)
    check_case(fuzz_server, "POST", path, content=content, params=params, headers=headers)


ADAPTER_ROUTES = [("GET", "{prefix}/adapters"), ("GET", "{prefix}/adapters/{name}"),
                  ("POST", "{prefix}/adapters/{name}/update"), ("DELETE", "{prefix}/adapters/{name}")]


@FUZZ
@given(route=st.sampled_from(ADAPTER_ROUTES), prefix=st.sampled_from(["", "/models/model", "/models/x%20y"]),
       name=st.one_of(ADAPTER_NAMES, st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF,
                                                           exclude_characters="/?#%"), min_size=1, max_size=12)),
       params=QUERY, headers=HEADERS)
def test_fuzz_adapter_management(fuzz_server, route, prefix, name, params, headers):
    method, template = route
    _, params = with_model_dir(fuzz_server, b"", params)
    check_case(fuzz_server, method, template.format(prefix=prefix, name=name), params=params, headers=headers)


@FUZZ
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
       path=st.sampled_from(["/ping", "/metrics", "/v1/models", "/invocations", "/adapters", "/nowhere", "/v1/x",
                             "/models/m/adapters/a1/update", "/predictions/", "//", "/%ff"]),
       content=encoded(JUNK), headers=HEADERS)
def test_fuzz_any_method_on_any_route(fuzz_server, method, path, content, headers):
    check_case(fuzz_server, method, path, content=content, headers=headers)
