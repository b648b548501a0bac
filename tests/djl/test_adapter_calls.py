"""DJL's adapter calls through the real worker, in each mode, as PyAdapter.java sends them: name, alias
and src as properties, preload and pin as content items; DJL's start-up registration of
`<model_dir>/adapters/*` done once, by DJL."""

from __future__ import annotations

import pytest

from tests.djl.conftest import PROMPT, front_end_fixture, generate, token_ids

front_end_rolling_batch = front_end_fixture("rolling_batch")
front_end_async = front_end_fixture("async")
front_end_plain = front_end_fixture("plain")


@pytest.fixture(params=["rolling_batch", "async", "plain"])
def front_end(request):
    return request.getfixturevalue(f"front_end_{request.param}")


def call(front_end, handler: str, name: str, src=None, alias=None, **options: str):
    properties = {"name": name, "alias": alias}
    if handler != "unregister_adapter":
        properties["src"] = src
    response = front_end.adapter_call(handler, properties, options).wait()
    if front_end.async_mode:
        # One encoded item: its data is the message, an error its code and error.
        return response.code, (response.json()["error"] if response.code >= 300 else response.body.decode())
    return response.code, response.message


def test_start_up_adapters_are_registered_once_by_djl(front_end, expected):
    # DJL's own registration of adapters/a1 and adapters/a2 succeeded (the worker would have failed
    # "Failed to register adapter" otherwise), and the handler did not register them a second time.
    # In async mode DJL does not wait for the registrations' answers; a request naming one waits for it.
    for name in ("a1", "a2"):
        assert token_ids(front_end.submit(generate(PROMPT, name)).wait().json()) == expected(PROMPT, name)
    log = front_end.worker.output()
    for name in ("a1", "a2"):
        assert log.count(f"registered adapter {name} ") == 1
        assert log.index(f"registered adapter {name} ") > log.index("engine serving DJL in"), \
            "registered while the engine started, not by DJL's call"


def test_register_use_update_unregister(front_end, server_adapters, expected):
    a2 = str(server_adapters["a2"])
    assert call(front_end, "register_adapter", "djl-a2", a2, preload="true", pin="false") == \
        (200, "Adapter djl-a2 registered")
    assert token_ids(front_end.submit(generate(PROMPT, "djl-a2")).wait().json()) == expected(PROMPT, "a2")
    # The same registration again changes nothing; the same name from other files is a conflict.
    assert call(front_end, "register_adapter", "djl-a2", a2) == (200, "Adapter djl-a2 registered")
    code, message = call(front_end, "register_adapter", "djl-a2", str(server_adapters["a1"]))
    assert code == 409 and "already registered" in message
    assert call(front_end, "update_adapter", "djl-a2", a2, alias="tenant-7", pin="true") == \
        (200, "Adapter tenant-7 updated")
    assert call(front_end, "unregister_adapter", "djl-a2") == (200, "Adapter djl-a2 unregistered")
    refused = front_end.submit(generate(PROMPT, "djl-a2")).wait()
    assert refused.code == 400 and "Adapter djl-a2 is not registered" in refused.body.decode()
    code, message = call(front_end, "unregister_adapter", "djl-a2")
    assert code == 404 and "djl-a2" in message


def test_bad_adapter_calls_name_the_problem(front_end, server_adapters, tmp_path):
    code, message = call(front_end, "register_adapter", "ghost", str(tmp_path / "missing"))
    assert code == 400 and "is not a local adapter directory" in message
    code, message = call(front_end, "register_adapter", "lazy", str(server_adapters["a1"]), preload="false",
                         pin="true")
    assert code == 400 and "cannot be pinned" in message
    code, message = call(front_end, "register_adapter", "odd", str(server_adapters["a1"]), pin="maybe")
    assert code == 400 and "pin='maybe'" in message
    code, message = call(front_end, "update_adapter", "nobody", str(server_adapters["a1"]))
    assert code == 404 and "nobody" in message
