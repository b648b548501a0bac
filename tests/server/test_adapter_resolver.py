"""option.adapter_resolver over real HTTP, with S3 on moto's server: adapters no one registered are fetched on
first use (an S3 folder, a .tar.gz, a local directory), shared by concurrent first requests (the S3 reads are
counted), kept within option.max_disk_loras (least recently requested evicted first, pinned and start-up
adapters kept), and names that are missing, unsafe or broken are answered without harming other requests."""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import botocore.exceptions
import pytest

from lora_serving.container import startup
from lora_serving.handler.storage.s3 import make_s3_client
from tests.adapters import peft_greedy
from tests.server.conftest import LORA_PROPERTIES, lmi_model_dir, start_server
from tests.server.test_s3_startup import pack, upload_dir
from tests.storage.conftest import S3CallCounter

PROMPT = "the old dog reads a book"
NEW_TOKENS = 6


@pytest.fixture
def counted_server_s3(s3, monkeypatch):
    """The server's own S3 client, with a counter of the calls it sends."""
    client = make_s3_client()
    counter = S3CallCounter(client)
    monkeypatch.setattr(startup, "make_s3_client", lambda: client)
    return counter


def resolver_server(tmp_path, server_base, start_up_adapters, **properties):
    model_dir = lmi_model_dir(server_base, tmp_path / "model",
                              {**LORA_PROPERTIES, "option.cache_dir": str(tmp_path / "cache"), **properties},
                              start_up_adapters)
    return start_server(model_dir)


def lmi_ids(client, adapter: str, via: str = "body") -> list[int]:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": NEW_TOKENS, "details": True}}
    headers = {}
    if via == "header":
        headers["X-Amzn-SageMaker-Adapter-Identifier"] = adapter
    else:
        body["adapters"] = adapter
    response = client.post("/invocations", json=body, headers=headers)
    assert response.status_code == 200, response.text
    return [token["id"] for token in response.json()["details"]["tokens"]]


def registered(client) -> set[str]:
    return {adapter["name"] for adapter in client.get("/adapters").json()["adapters"]}


def test_first_use_from_s3_folder_and_archive_one_download_and_bounded_disk(
        s3, counted_server_s3, server_base, server_adapters, tmp_path):
    s3.create_bucket(Bucket="tenants")
    upload_dir(s3, server_adapters["a1"], "tenants", "lora/t-folder")
    upload_dir(s3, server_adapters["a1"], "tenants", "lora/t-third")
    upload_dir(s3, server_adapters["a2"], "tenants", "lora/t-fourth")
    s3.upload_file(str(pack(tmp_path / "t.tar.gz", {"t-archive": server_adapters["a2"]})), "tenants",
                   "lora/t-archive.tar.gz")
    live = resolver_server(tmp_path, server_base, {"start-up": server_adapters["a1"]},
                           **{"option.adapter_resolver": "s3://tenants/lora/", "option.max_disk_loras": "2"})
    resolved_dir = tmp_path / "cache" / "resolved-adapters"
    try:
        with live.client() as client:
            prompt_ids = live.runtime.engine.tokenize(PROMPT)
            a1_ids = peft_greedy(server_base, server_adapters["a1"], prompt_ids, NEW_TOKENS)
            a2_ids = peft_greedy(server_base, server_adapters["a2"], prompt_ids, NEW_TOKENS)
            assert registered(client) == {"start-up"}
            counted_server_s3.reset()

            # Eight first requests at once, over three APIs, for one cold adapter: one listing, one read per file.
            def first_request(index: int) -> list[int] | int:
                if index % 3 == 1:
                    answer = client.post("/v1/completions", json={"model": "t-folder", "prompt": PROMPT,
                                                                  "max_tokens": NEW_TOKENS, "temperature": 0})
                    return answer.status_code
                if index % 3 == 2:
                    answer = client.post("/generate", json={"inputs": PROMPT, "parameters": {
                        "adapter_id": "t-folder", "max_new_tokens": NEW_TOKENS}})
                    return answer.status_code
                return lmi_ids(client, "t-folder")

            # A slow listing holds the fetch open while all eight arrive.
            slow_listing = lambda **_: time.sleep(0.5)  # noqa: E731
            counted_server_s3.client.meta.events.register("before-call.s3.ListObjectsV2", slow_listing)
            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(first_request, range(8)))
            counted_server_s3.client.meta.events.unregister("before-call.s3.ListObjectsV2", slow_listing)
            assert answers == [a1_ids if index % 3 == 0 else 200 for index in range(8)]
            assert counted_server_s3.calls["ListObjectsV2"] == 1
            files = sum(1 for path in server_adapters["a1"].iterdir() if path.is_file())
            assert counted_server_s3.calls["GetObject"] == files  # each file once (PEFT's README.md too)
            assert lmi_ids(client, "t-folder") == a1_ids
            assert counted_server_s3.calls["ListObjectsV2"] == 1  # registered now: not looked up again

            # The .tar.gz form, named by the SageMaker header; then it is listed and metered like any adapter.
            assert lmi_ids(client, "t-archive", via="header") == a2_ids
            described = client.get("/adapters/t-archive").json()[0]
            assert described["tokens_served"] >= NEW_TOKENS and described["tier"] in {"device", "host"}
            # Listed with the URL each was found at, as if registered with that src, not the cache directory.
            assert described["src"] == "s3://tenants/lora/t-archive.tar.gz"
            listed = {adapter["name"]: adapter["src"] for adapter in client.get("/adapters").json()["adapters"]}
            assert listed["t-folder"] == "s3://tenants/lora/t-folder/"
            assert {"t-folder", "t-archive"} <= {model["id"] for model in client.get("/v1/models").json()["data"]}

            # Two resolved adapters at most: t-folder is requested again, so t-archive is the least recent.
            assert lmi_ids(client, "t-folder") == a1_ids
            assert lmi_ids(client, "t-third") == a1_ids
            assert registered(client) == {"start-up", "t-folder", "t-third"}
            assert sorted(path.name for path in resolved_dir.iterdir()) == ["t-folder", "t-third"]

            # Pinned through the management API, t-folder stays although it is the least recent now.
            assert client.post("/adapters/t-folder/update", params={"pin": "true"}).status_code == 200
            assert lmi_ids(client, "t-fourth") == a2_ids
            assert registered(client) == {"start-up", "t-folder", "t-fourth"}
            metrics = client.get("/metrics").text
            assert "lora_serving_adapters_evicted_total 2.0" in metrics
            assert "lora_serving_adapters_resolved_total 4.0" in metrics

            # Evicted, then asked for again: fetched again and served.
            counted_server_s3.reset()
            assert lmi_ids(client, "t-archive") == a2_ids
            assert counted_server_s3.calls["GetObject"] == 1
            # A resolved adapter can be unregistered like any other; the next request resolves it again.
            assert client.delete("/adapters/t-archive").status_code == 200
            assert lmi_ids(client, "t-archive") == a2_ids
            assert "start-up" in registered(client)
    finally:
        live.stop()


def test_missing_unsafe_and_broken_names_fail_alone(s3, counted_server_s3, server_base, server_adapters, tmp_path):
    s3.create_bucket(Bucket="tenants")
    upload_dir(s3, server_adapters["a1"], "tenants", "lora/good")
    s3.put_object(Bucket="tenants", Key="lora/broken.tar.gz", Body=b"not a gzip archive")
    live = resolver_server(tmp_path, server_base, {}, **{"option.adapter_resolver": "s3://tenants/lora"})
    try:
        with live.client() as client:
            prompt_ids = live.runtime.engine.tokenize(PROMPT)
            a1_ids = peft_greedy(server_base, server_adapters["a1"], prompt_ids, NEW_TOKENS)
            counted_server_s3.reset()

            missing = client.post("/invocations", json={"inputs": PROMPT, "adapters": "nobody"})
            assert missing.status_code == 404
            assert "nobody" in missing.json()["error"] and "s3://tenants/lora/" in missing.json()["error"]
            looked_up = sum(counted_server_s3.calls.values())
            assert looked_up >= 1
            # Remembered: a flood of the same bad name costs no more S3 calls, on every API.
            openai = client.post("/v1/completions", json={"model": "nobody", "prompt": PROMPT, "max_tokens": 2})
            assert openai.status_code == 404 and "nobody" in openai.json()["error"]["message"]
            tgi = client.post("/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "nobody"}})
            assert tgi.status_code == 404 and "nobody" in tgi.json()["error"]
            for _ in range(5):
                assert client.post("/invocations", json={"inputs": PROMPT, "adapters": "nobody"}).status_code == 404
            assert sum(counted_server_s3.calls.values()) == looked_up

            # Unsafe names are refused before any lookup.
            for name in ("../good", "lora/good", ".hidden", "a" * 200):
                answer = client.post("/invocations", json={"inputs": PROMPT, "adapters": name})
                assert answer.status_code == 400, (name, answer.text)
                assert "adapter name" in answer.json()["error"]
            assert sum(counted_server_s3.calls.values()) == looked_up

            # A broken archive is its requests' error, while a good adapter resolved at the same time is served.
            with ThreadPoolExecutor(2) as pool:
                broken = pool.submit(client.post, "/invocations", json={"inputs": PROMPT, "adapters": "broken"})
                good = pool.submit(lmi_ids, client, "good")
                assert good.result() == a1_ids
                assert broken.result().status_code == 400
                assert "broken" in broken.result().json()["error"]
            # Not remembered as missing: once the archive is fixed, the next request is served.
            s3.upload_file(str(pack(tmp_path / "fixed.tar.gz", {"broken": server_adapters["a1"]})), "tenants",
                           "lora/broken.tar.gz")
            assert lmi_ids(client, "broken") == a1_ids

            # A download that fails (the connection to S3 drops on every read of the adapter's files): 503 for that
            # request; the next one, with S3 back, is served.
            upload_dir(s3, server_adapters["a2"], "tenants", "lora/flaky")

            def connection_drops(params, **_):
                if params.get("Key", "").startswith("lora/flaky/"):
                    raise botocore.exceptions.EndpointConnectionError(endpoint_url="s3 under test")

            counted_server_s3.client.meta.events.register("before-parameter-build.s3.GetObject", connection_drops)
            failed = client.post("/invocations", json={"inputs": PROMPT, "adapters": "flaky"})
            counted_server_s3.client.meta.events.unregister("before-parameter-build.s3.GetObject", connection_drops)
            assert failed.status_code == 503 and "lora/flaky/" in failed.json()["error"]
            assert lmi_ids(client, "flaky") == peft_greedy(server_base, server_adapters["a2"], prompt_ids, NEW_TOKENS)
            metrics = client.get("/metrics").text
            assert "lora_serving_adapter_resolver_misses_total 1.0" in metrics
            assert "lora_serving_adapter_resolver_failures_total 2.0" in metrics
    finally:
        live.stop()


def test_a_local_directory_resolver_keeps_adapters_inside_it(server_base, server_adapters, tmp_path):
    tenants = tmp_path / "tenants"
    tenants.mkdir()
    (tenants / "here").symlink_to(server_adapters["a2"])  # a link leaving the directory
    pack(tenants / "packed.tar.gz", {"packed": server_adapters["a2"]})
    shutil.copytree(server_adapters["a1"], tenants / "local-one")
    live = resolver_server(tmp_path, server_base, {}, **{"option.adapter_resolver": str(tenants)})
    try:
        with live.client() as client:
            prompt_ids = live.runtime.engine.tokenize(PROMPT)
            assert lmi_ids(client, "local-one") == peft_greedy(server_base, server_adapters["a1"], prompt_ids,
                                                              NEW_TOKENS)
            assert lmi_ids(client, "packed") == peft_greedy(server_base, server_adapters["a2"], prompt_ids,
                                                           NEW_TOKENS)
            listed = {adapter["name"]: adapter["src"] for adapter in client.get("/adapters").json()["adapters"]}
            assert listed == {"local-one": str(tenants.resolve() / "local-one"),
                              "packed": str(tenants.resolve() / "packed.tar.gz")}
            escaping = client.post("/invocations", json={"inputs": PROMPT, "adapters": "here"})
            assert escaping.status_code == 400 and "outside the allowed local roots" in escaping.json()["error"]
            assert client.post("/invocations", json={"inputs": PROMPT, "adapters": "absent"}).status_code == 404
            assert (tenants / "local-one" / "adapter_config.json").is_file()  # the operator's files are left alone
    finally:
        live.stop()


def test_a_malformed_resolver_is_a_start_up_error_naming_the_key(server_base, tmp_path):
    with pytest.raises(RuntimeError, match="adapter_resolver"):
        resolver_server(tmp_path, server_base, {}, **{"option.adapter_resolver": "relative/dir"})
