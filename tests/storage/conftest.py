"""A real S3 protocol server (moto's) on 127.0.0.1 for the storage tests, reached through
boto3's own endpoint setting, AWS_ENDPOINT_URL_S3, exactly as the container would be."""

from __future__ import annotations

import collections
import urllib.request

import boto3
import pytest
from moto.server import ThreadedMotoServer

from lora_serving.handler.storage.s3 import make_s3_client

_AWS_SETTINGS_TO_CLEAR = ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE")


@pytest.fixture(scope="session")
def moto_endpoint():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    """Dummy credentials and no trace of the machine's own AWS configuration."""
    for name in _AWS_SETTINGS_TO_CLEAR:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="session")
def s3_admin(moto_endpoint):
    """A client for arranging test data, built once: it names the server and keys itself."""
    return boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    ).client("s3", endpoint_url=moto_endpoint)


@pytest.fixture
def s3(moto_endpoint, s3_admin, aws_env, monkeypatch):
    """The arranging client, on a freshly reset server; the code under test finds the same
    server only through AWS_ENDPOINT_URL_S3."""
    urllib.request.urlopen(urllib.request.Request(f"{moto_endpoint}/moto-api/reset", method="POST")).close()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_endpoint)
    return s3_admin


class S3CallCounter:
    """Counts the S3 operations a client sends, by name (GetObject, HeadObject, ListObjectsV2)."""

    def __init__(self, client):
        self.client = client
        self.calls = collections.Counter()
        client.meta.events.register("before-call.s3", self._count)

    def _count(self, model, **kwargs):
        self.calls[model.name] += 1

    def reset(self):
        self.calls.clear()


@pytest.fixture
def counted_client(s3):
    """A client of the code under test (made by lora_serving.handler.storage.s3) with a counter of its calls."""
    client = make_s3_client()
    return client, S3CallCounter(client)
