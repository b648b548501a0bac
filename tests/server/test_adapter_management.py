"""Adapter management over HTTP: DJL's routes (with and without the /models/{m} prefix) and SageMaker's
`POST /adapters` / `DELETE /adapters/{name}`; sources in the model directory, as a .tar.gz, refused outside
the allowed roots; status codes 400 / 404 / 409 / 507."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import pytest

from tests.server.conftest import BASE_PROPERTIES, lmi_model_dir, start_server


@pytest.fixture(scope="module")
def model_dir(lora_server) -> Path:
    return Path(lora_server.runtime.config.model_id)


@pytest.fixture(scope="module")
def expected_a1(client):
    """a1's greedy answer, to recognise a1's weights registered under another name."""
    response = client.post("/invocations", json={"inputs": "the blue bird", "adapters": "a1",
                                                 "parameters": {"max_new_tokens": 6}})
    return response.json()["generated_text"]


def generate_with(client, adapter: str):
    return client.post("/invocations", json={"inputs": "the blue bird", "adapters": adapter,
                                             "parameters": {"max_new_tokens": 6}})


def copy_adapter(server_adapters, model_dir: Path, name: str, source: str = "a1") -> Path:
    target = model_dir / "uploaded" / name
    if not target.exists():
        shutil.copytree(server_adapters[source], target)
    return target


def test_list_and_describe_the_start_up_adapters(client):
    for path in ("/adapters", "/models/model/adapters"):
        response = client.get(path)
        assert response.status_code == 200
        names = {adapter["name"] for adapter in response.json()["adapters"]}
        assert {"a1", "a2"} <= names
    described = client.get("/models/model/adapters/a2").json()
    assert len(described) == 1
    assert described[0]["name"] == "a2" and described[0]["pin"] is False
    assert described[0]["tier"] in ("device", "host", "disk")
    assert described[0]["src"].endswith("adapters/a2")


def test_djl_register_use_update_unregister(client, model_dir, server_adapters, expected_a1):
    src = copy_adapter(server_adapters, model_dir, "djl1")
    response = client.post("/models/model/adapters", params={"name": "djl1", "src": str(src)})
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "Adapter djl1 registered"}
    assert generate_with(client, "djl1").json()["generated_text"] == expected_a1

    response = client.post("/models/model/adapters/djl1/update", params={"pin": "true"})
    assert response.json() == {"status": "Adapter djl1 updated"}
    assert client.get("/adapters/djl1").json()[0]["pin"] is True
    client.post("/adapters/djl1/update", params={"pin": "false"})

    response = client.delete("/models/model/adapters/djl1")
    assert response.json() == {"status": "Adapter djl1 unregistered"}
    assert "djl1" not in {adapter["name"] for adapter in client.get("/adapters").json()["adapters"]}
    refused = generate_with(client, "djl1")
    assert refused.status_code == 400 and refused.json()["error"] == "Adapter djl1 is not registered"


def test_sagemaker_register_from_a_tar_gz_and_delete(client, model_dir, server_adapters, expected_a1):
    archive = model_dir / "uploaded" / "sm1.tar.gz"
    archive.parent.mkdir(exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(server_adapters["a1"], arcname="sm1")
    response = client.post("/adapters", json={"name": "sm1", "src": str(archive), "pin": False})
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "Adapter sm1 registered"}
    assert generate_with(client, "sm1").json()["generated_text"] == expected_a1
    assert client.delete("/adapters/sm1").json() == {"status": "Adapter sm1 unregistered"}


def test_list_pages(client):
    first = client.get("/adapters", params={"limit": 1}).json()
    assert len(first["adapters"]) == 1
    second = client.get("/adapters", params={"limit": 1, "next_page_token": first["nextPageToken"]}).json()
    assert second["adapters"][0]["name"] != first["adapters"][0]["name"]


def test_registration_errors(client, model_dir, server_adapters):
    src = copy_adapter(server_adapters, model_dir, "dup")
    duplicate = client.post("/adapters", json={"name": "a1", "src": str(src)})
    assert duplicate.status_code == 409 and "already registered" in duplicate.json()["error"]

    bad_name = client.post("/adapters", json={"name": "../escape", "src": str(src)})
    assert bad_name.status_code == 400 and "adapter name '../escape' is invalid" in bad_name.json()["error"]

    empty = client.post("/adapters", json={"name": "", "src": str(src)})
    assert empty.status_code == 400 and "name" in empty.json()["error"]

    outside = client.post("/adapters", json={"name": "x1", "src": "/etc"})
    assert outside.status_code == 400 and "outside the allowed local roots" in outside.json()["error"]

    missing = client.post("/adapters", json={"name": "x2", "src": str(model_dir / "uploaded" / "nothing")})
    assert missing.status_code == 404 and "does not exist" in missing.json()["error"]

    not_an_adapter = client.post("/adapters", json={"name": "x3", "src": str(model_dir)})
    assert not_an_adapter.status_code == 400 and "not a LoRA adapter" in not_an_adapter.json()["error"]

    no_src = client.post("/adapters", params={"name": "x4"})
    assert no_src.status_code == 400 and "src: Field required" in no_src.json()["error"]


@pytest.mark.parametrize("method,path", [
    ("GET", "/adapters/ghost"),
    ("DELETE", "/adapters/ghost"),
    ("POST", "/models/model/adapters/ghost/update"),
])
def test_an_unknown_adapter_is_404(client, method, path):
    response = client.request(method, path)
    assert response.status_code == 404
    assert response.json()["error"] == "Adapter ghost is not registered"


def test_pinning_more_adapters_than_slots_is_507(client, model_dir, server_adapters):
    # max_loras is 2 and one slot must stay free for unpinned adapters: one pinned content at most.
    first = client.post("/adapters", json={"name": "p1", "src": str(copy_adapter(server_adapters, model_dir, "p1")),
                                           "pin": True})
    assert first.status_code == 200, first.text
    try:
        second = client.post("/adapters", json={"name": "p2", "pin": True,
                                                "src": str(copy_adapter(server_adapters, model_dir, "p2", "a2"))})
        assert second.status_code == 507
        assert "cannot pin another adapter" in second.json()["error"]
    finally:
        client.delete("/adapters/p1")
    assert client.get("/ping").status_code == 200


@pytest.fixture(scope="module")
def base_only_server(server_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("base-only")
    live = start_server(lmi_model_dir(server_base, root / "model", BASE_PROPERTIES))
    yield live
    live.stop()


def test_without_lora_adapter_requests_are_400(base_only_server, server_adapters):
    with base_only_server.client() as client:
        register = client.post("/adapters", json={"name": "a1", "src": str(server_adapters["a1"])})
        assert register.status_code == 400 and "LoRA is not enabled" in register.json()["error"]
        generate = client.post("/invocations", json={"inputs": "x", "adapters": "a1"})
        assert generate.status_code == 400 and "LoRA is not enabled" in generate.json()["error"]
        assert client.get("/adapters").status_code == 400
        assert [model["id"] for model in client.get("/v1/models").json()["data"]] == ["model"]
        assert client.post("/invocations", json={"inputs": "x"}).status_code == 200
