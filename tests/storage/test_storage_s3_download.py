"""Model download from an s3:// prefix and single-object download, against moto's S3 server."""

from __future__ import annotations

import json
import socket
import time

import botocore.exceptions
import pytest

from lora_serving.handler.storage.s3 import make_s3_client, parse_s3_url, s3_errors_as_storage_errors
from lora_serving.handler.storage.s3_cache import download_s3_object, download_s3_prefix
from lora_serving.handler.storage.errors import (
    BadSourceError,
    SourceAccessDeniedError,
    SourceNotFoundError,
    StorageError,
    StorageUnreachableError,
    UnsafeSourceError,
)
from tests.storage.storage_helpers import tree_snapshot

BUCKET = "models-bucket"
MODEL_FILES = {
    "config.json": b'{"architectures": ["LlamaForCausalLM"]}',
    "model-00001-of-00002.safetensors": b"a" * 3000,
    "model-00002-of-00002.safetensors": b"b" * 2000,
    "tokenizer/tokenizer.json": b'{"version": "1.0"}',
    "tokenizer/nested/special_tokens_map.json": b"{}",
}


@pytest.fixture
def model_in_s3(s3):
    s3.create_bucket(Bucket=BUCKET)
    for name, body in MODEL_FILES.items():
        s3.put_object(Bucket=BUCKET, Key=f"llama/tiny/{name}", Body=body)
    # Must not be picked up: a sibling whose name starts like the prefix, and a console folder marker.
    s3.put_object(Bucket=BUCKET, Key="llama/tiny-old/config.json", Body=b"{}")
    s3.put_object(Bucket=BUCKET, Key="llama/tiny/empty-folder/", Body=b"")
    return s3


def local_files(directory):
    return {str(path.relative_to(directory)): path.read_bytes() for path in directory.rglob("*") if path.is_file()}


@pytest.mark.parametrize("url", ["s3://models-bucket/llama/tiny/", "s3://models-bucket/llama/tiny"])
def test_prefix_downloads_every_object_with_its_relative_path(model_in_s3, tmp_path, url):
    model_dir = download_s3_prefix(url, tmp_path / "cache")

    assert local_files(model_dir) == MODEL_FILES
    assert model_dir.is_relative_to(tmp_path / "cache")


def test_second_start_downloads_nothing(model_in_s3, tmp_path, counted_client):
    client, counter = counted_client
    first = download_s3_prefix("s3://models-bucket/llama/tiny/", tmp_path, client=client)
    assert counter.calls["GetObject"] == len(MODEL_FILES)
    before = tree_snapshot(first)

    counter.reset()
    second = download_s3_prefix("s3://models-bucket/llama/tiny/", tmp_path, client=client)

    assert second == first
    assert counter.calls["GetObject"] == 0 and counter.calls["HeadObject"] == 0
    assert tree_snapshot(second) == before  # not one file rewritten


def test_changed_object_is_downloaded_again_and_only_it(model_in_s3, tmp_path, counted_client):
    client, counter = counted_client
    model_dir = download_s3_prefix("s3://models-bucket/llama/tiny/", tmp_path, client=client)
    before = tree_snapshot(model_dir)
    model_in_s3.put_object(Bucket=BUCKET, Key="llama/tiny/config.json", Body=b'{"changed": true}')
    model_in_s3.put_object(Bucket=BUCKET, Key="llama/tiny/generation_config.json", Body=b"{}")
    model_in_s3.delete_object(Bucket=BUCKET, Key="llama/tiny/tokenizer/nested/special_tokens_map.json")

    counter.reset()
    download_s3_prefix("s3://models-bucket/llama/tiny/", tmp_path, client=client)

    assert counter.calls["GetObject"] == 2
    assert (model_dir / "config.json").read_bytes() == b'{"changed": true}'
    assert (model_dir / "generation_config.json").read_bytes() == b"{}"
    assert not (model_dir / "tokenizer/nested/special_tokens_map.json").exists()
    after = tree_snapshot(model_dir)
    for unchanged in (
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "tokenizer/tokenizer.json",
    ):
        assert after[unchanged] == before[unchanged]


def test_interrupted_download_is_resumed_not_taken_as_complete(model_in_s3, tmp_path, counted_client):
    client, counter = counted_client
    model_dir = download_s3_prefix("s3://models-bucket/llama/tiny/", tmp_path, client=client)
    manifest_path = model_dir.with_name(model_dir.name + ".manifest.json")
    # What a crash leaves: one file never renamed into place, its temporary still there, and a
    # manifest not marked complete that records only what had landed.
    manifest = json.loads(manifest_path.read_text())
    del manifest["objects"]["model-00002-of-00002.safetensors"]
    manifest["complete"] = False
    manifest_path.write_text(json.dumps(manifest))
    (model_dir / "model-00002-of-00002.safetensors").unlink()
    leftover = model_dir / ".model-00002-of-00002.safetensors.downloading-0badf00d"
    leftover.write_bytes(b"b" * 100)

    counter.reset()
    download_s3_prefix("s3://models-bucket/llama/tiny/", tmp_path, client=client)

    assert counter.calls["GetObject"] == 1
    assert local_files(model_dir) == MODEL_FILES
    assert json.loads(manifest_path.read_text())["complete"] is True


def test_object_key_escaping_the_target_is_refused(s3, tmp_path):
    s3.create_bucket(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key="llama/tiny/config.json", Body=b"{}")
    s3.put_object(Bucket=BUCKET, Key="llama/tiny/../../../escape.txt", Body=b"x")

    with pytest.raises(UnsafeSourceError, match=r"llama/tiny/\.\./\.\./\.\./escape\.txt.*'\.\.'"):
        download_s3_prefix("s3://models-bucket/llama/tiny/", tmp_path / "cache")
    assert not list(tmp_path.rglob("escape.txt"))


def test_missing_bucket_is_not_found_naming_the_bucket(s3, tmp_path):
    with pytest.raises(SourceNotFoundError, match="bucket 'no-such-bucket' does not exist"):
        download_s3_prefix("s3://no-such-bucket/llama/", tmp_path)


def test_empty_prefix_is_not_found(model_in_s3, tmp_path):
    with pytest.raises(SourceNotFoundError, match=r"no objects under s3://models-bucket/llama/absent/"):
        download_s3_prefix("s3://models-bucket/llama/absent", tmp_path)


def test_single_object_download_and_reuse(model_in_s3, tmp_path, counted_client):
    client, counter = counted_client
    path = download_s3_object("s3://models-bucket/llama/tiny/config.json", tmp_path, client=client)
    assert path.name == "config.json" and path.read_bytes() == MODEL_FILES["config.json"]

    counter.reset()
    assert download_s3_object("s3://models-bucket/llama/tiny/config.json", tmp_path, client=client) == path
    assert counter.calls["GetObject"] == 0

    model_in_s3.put_object(Bucket=BUCKET, Key="llama/tiny/config.json", Body=b'{"new": 1}')
    changed = download_s3_object("s3://models-bucket/llama/tiny/config.json", tmp_path, client=client)
    assert changed != path and changed.read_bytes() == b'{"new": 1}'
    assert path.read_bytes() == MODEL_FILES["config.json"]  # the old copy is never rewritten


def test_missing_object_is_not_found_naming_the_key(model_in_s3, tmp_path):
    with pytest.raises(SourceNotFoundError, match=r"s3://models-bucket/llama/adapters\.tar\.gz does not exist"):
        download_s3_object("s3://models-bucket/llama/adapters.tar.gz", tmp_path)


@pytest.mark.parametrize("url", ["s3://models-bucket/llama/", "https://example.com/x.tar.gz", "s3:///key"])
def test_single_object_url_must_name_an_object(tmp_path, aws_env, url):
    with pytest.raises(BadSourceError):
        download_s3_object(url, tmp_path)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_endpoint_fails_fast_with_a_clear_error(aws_env, monkeypatch, tmp_path):
    port = closed_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")

    started = time.monotonic()
    with pytest.raises(StorageUnreachableError) as raised:
        download_s3_prefix("s3://models-bucket/llama/tiny/", tmp_path)
    elapsed = time.monotonic() - started

    message = str(raised.value)
    assert f"127.0.0.1:{port}" in message and "s3://models-bucket/llama/tiny/" in message
    assert "3 attempts" in message
    assert elapsed < 30, f"a dead endpoint took {elapsed:.1f}s to fail"
    assert list(tmp_path.iterdir()) == []  # nothing that could pass for a download


def test_endpoint_that_never_answers_times_out(aws_env, monkeypatch, tmp_path):
    # Accepts connections (the kernel's backlog does) but never answers a request.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{silent.getsockname()[1]}")
        client = make_s3_client(max_attempts=2, connect_timeout=1, read_timeout=1)

        started = time.monotonic()
        with pytest.raises(StorageUnreachableError, match="Read timeout"):
            download_s3_object("s3://models-bucket/adapters.tar.gz", tmp_path, client=client)
        assert time.monotonic() - started < 30


def test_missing_credentials_are_a_clear_access_error(s3, monkeypatch, tmp_path):
    s3.create_bucket(Bucket=BUCKET)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")

    with pytest.raises(
        SourceAccessDeniedError, match=r"cannot read s3://models-bucket/llama/: no usable AWS credentials"
    ):
        download_s3_prefix("s3://models-bucket/llama", tmp_path)


@pytest.fixture(scope="module")
def offline_client():
    return make_s3_client()


@pytest.mark.parametrize(
    "code, status, expected",
    [
        ("AccessDenied", 403, SourceAccessDeniedError),
        ("InvalidAccessKeyId", 403, SourceAccessDeniedError),
        ("InternalError", 500, StorageUnreachableError),
        ("SlowDown", 503, StorageUnreachableError),
        ("NoSuchKey", 404, SourceNotFoundError),
        ("InvalidRequest", 400, StorageError),
    ],
)
def test_s3_error_answers_map_to_storage_errors(offline_client, code, status, expected):
    # Answers moto's server cannot be made to give; the mapping is the same for every operation.
    answer = {"Error": {"Code": code, "Message": "from S3"}, "ResponseMetadata": {"HTTPStatusCode": status}}
    location = parse_s3_url("s3://models-bucket/llama/config.json")

    expected_message = rf"s3://models-bucket/llama/config\.json.*{code}.*from S3"
    with (
        pytest.raises(expected, match=expected_message) as raised,
        s3_errors_as_storage_errors(offline_client, location),
    ):
        raise botocore.exceptions.ClientError(answer, "GetObject")
    assert type(raised.value) is expected
