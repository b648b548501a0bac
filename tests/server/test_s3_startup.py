"""The model and adapters from S3, through moto's S3 server on 127.0.0.1 (the real S3 protocol), found by
the container only through boto3's own AWS_ENDPOINT_URL_S3: an `s3://` option.model_id with
adapters.tar.gz in the prefix, a separate `option.adapters_url`, and adapters registered from S3."""

from __future__ import annotations

import tarfile
from pathlib import Path

from tests.adapters import peft_greedy
from tests.server.conftest import LORA_PROPERTIES, start_server
from tests.storage.storage_helpers import tree_snapshot

PROMPT = "the old dog reads a book"


def upload_dir(s3_client, directory: Path, bucket: str, prefix: str) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            s3_client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(directory)}")


def pack(archive: Path, adapters: dict[str, Path]) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        for name, adapter_dir in adapters.items():
            tar.add(adapter_dir, arcname=name)
    return archive


def properties_dir(directory: Path, properties: dict[str, str]) -> Path:
    """A SageMaker model directory holding only serving.properties, as LMI users point it at S3."""
    directory.mkdir(parents=True)
    (directory / "serving.properties").write_text("".join(f"{key}={value}\n" for key, value in properties.items()))
    return directory


def greedy_ids(client, adapter: str) -> list[int]:
    response = client.post("/invocations", json={"inputs": PROMPT, "adapters": adapter,
                                                 "parameters": {"max_new_tokens": 6, "details": True}})
    assert response.status_code == 200, response.text
    return [token["id"] for token in response.json()["details"]["tokens"]]


def test_model_prefix_and_adapters_archive_from_s3_are_served_and_cached(s3, server_base, server_adapters,
                                                                          tmp_path):
    s3.create_bucket(Bucket="models")
    upload_dir(s3, server_base, "models", "tiny-llama")
    s3.upload_file(str(pack(tmp_path / "adapters.tar.gz", server_adapters)), "models", "tiny-llama/adapters.tar.gz")
    cache = tmp_path / "cache"
    model_dir = properties_dir(tmp_path / "opt-ml-model", {**LORA_PROPERTIES, "option.model_id": "s3://models/tiny-llama/",
                                                           "option.cache_dir": str(cache)})

    live = start_server(model_dir)
    try:
        with live.client() as client:
            assert {adapter["name"] for adapter in client.get("/adapters").json()["adapters"]} == {"a1", "a2"}
            prompt_ids = live.runtime.engine.tokenize(PROMPT)
            assert greedy_ids(client, "a2") == peft_greedy(server_base, server_adapters["a2"], prompt_ids, 6)
    finally:
        live.stop()
    downloaded = cache / "s3-prefixes"
    before = tree_snapshot(downloaded)

    second = start_server(model_dir)
    try:
        with second.client() as client:
            assert client.post("/invocations", json={"inputs": PROMPT, "adapters": "a1"}).status_code == 200
    finally:
        second.stop()
    assert tree_snapshot(downloaded) == before  # nothing downloaded or unpacked again


def test_adapters_url_and_registration_from_s3(s3, server_base, server_adapters, tmp_path):
    s3.create_bucket(Bucket="models")
    s3.create_bucket(Bucket="adapters")
    upload_dir(s3, server_base, "models", "base")
    s3.upload_file(str(pack(tmp_path / "startup.tar.gz", {"first": server_adapters["a1"]})), "adapters",
                   "startup/adapters.tar.gz")
    s3.upload_file(str(pack(tmp_path / "one.tar.gz", {"a2": server_adapters["a2"]})), "adapters", "single/a2.tar.gz")
    upload_dir(s3, server_adapters["a1"], "adapters", "dirs/a1")
    model_dir = properties_dir(tmp_path / "opt-ml-model", {
        **LORA_PROPERTIES, "option.model_id": "s3://models/base", "option.cache_dir": str(tmp_path / "cache"),
        "option.adapters_url": "s3://adapters/startup/adapters.tar.gz"})

    live = start_server(model_dir)
    try:
        with live.client() as client:
            prompt_ids = live.runtime.engine.tokenize(PROMPT)
            a1_ids = peft_greedy(server_base, server_adapters["a1"], prompt_ids, 6)
            assert greedy_ids(client, "first") == a1_ids

            from_archive = client.post("/adapters", json={"name": "from-archive", "src": "s3://adapters/single/a2.tar.gz"})
            assert from_archive.status_code == 200, from_archive.text
            assert greedy_ids(client, "from-archive") == peft_greedy(server_base, server_adapters["a2"], prompt_ids, 6)

            from_prefix = client.post("/models/base/adapters", params={"name": "from-prefix", "src": "s3://adapters/dirs/a1/"})
            assert from_prefix.status_code == 200, from_prefix.text
            assert greedy_ids(client, "from-prefix") == a1_ids

            missing = client.post("/adapters", json={"name": "nope", "src": "s3://adapters/absent.tar.gz"})
            assert missing.status_code == 404
            assert "absent.tar.gz" in missing.json()["error"]
    finally:
        live.stop()
