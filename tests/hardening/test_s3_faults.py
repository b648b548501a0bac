"""S3 that cannot be reached, or answers only errors: start-up ends with a message naming the endpoint and
the location after the bounded retries (3 attempts, docs/STORAGE.md); a registration from S3 is answered 503,
and the server serves on. Found only through boto3's own AWS_ENDPOINT_URL_S3, as in tests/storage."""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.hardening.conftest import adapter_names, assert_json_error, assert_still_serving
from tests.server.conftest import LORA_PROPERTIES, lmi_model_dir, start_server
from tests.server.test_entrypoint import free_port, launch
from tests.server.test_s3_startup import properties_dir
from tests.storage.conftest import aws_env  # noqa: F401  (dummy credentials, none of the machine's)

# Importing torch takes most of it; the retries themselves take seconds (standard mode's backoff is capped).
PROCESS_EXIT_SECONDS = 90
S3_ATTEMPTS = 3


class FailingS3(ThreadingHTTPServer):
    """An S3 endpoint on 127.0.0.1 that answers every request 500 InternalError, and counts them."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _InternalErrorHandler)
        self.requests: list[str] = []
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _InternalErrorHandler(BaseHTTPRequestHandler):
    BODY = b"<Error><Code>InternalError</Code><Message>We encountered an internal error.</Message></Error>"

    def _fail(self) -> None:
        self.server.requests.append(f"{self.command} {self.path}")
        self.send_response(500)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(self.BODY)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(self.BODY)

    do_GET = do_HEAD = do_PUT = do_POST = _fail

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def failing_s3(aws_env, monkeypatch):
    server = FailingS3()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", server.url)
    yield server
    server.close()


@pytest.fixture
def unreachable_s3(aws_env, monkeypatch):
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")
    return f"http://127.0.0.1:{port}"


def run_to_exit(model_dir: Path) -> tuple[int, str, float]:
    started = time.monotonic()
    process = launch(["--model-dir", str(model_dir), "--host", "127.0.0.1", "--port", str(free_port())], {})
    output, _ = process.communicate(timeout=PROCESS_EXIT_SECONDS)
    return process.returncode, output, time.monotonic() - started


def s3_model_dir(tmp_path: Path) -> Path:
    return properties_dir(tmp_path / "opt-ml-model", {**LORA_PROPERTIES, "option.model_id": "s3://models/tiny/",
                                                      "option.cache_dir": str(tmp_path / "cache")})


def test_unreachable_s3_ends_start_up_naming_endpoint_and_model(unreachable_s3, tmp_path):
    returncode, output, seconds = run_to_exit(s3_model_dir(tmp_path))
    assert returncode == 1, output
    assert f"cannot reach S3 at {unreachable_s3} for s3://models/tiny/ after {S3_ATTEMPTS} attempts" in output
    assert seconds < PROCESS_EXIT_SECONDS


def test_s3_answering_500_ends_start_up_after_bounded_retries(failing_s3, tmp_path):
    returncode, output, seconds = run_to_exit(s3_model_dir(tmp_path))
    assert returncode == 1, output
    assert f"S3 at {failing_s3.url} kept failing for s3://models/tiny/" in output
    assert "InternalError (HTTP 500)" in output
    assert len(failing_s3.requests) == S3_ATTEMPTS, failing_s3.requests
    assert seconds < PROCESS_EXIT_SECONDS


def test_an_adapters_url_on_failing_s3_ends_start_up(failing_s3, server_base, tmp_path):
    model_dir = lmi_model_dir(server_base, tmp_path / "model", {
        **LORA_PROPERTIES, "option.cache_dir": str(tmp_path / "cache"),
        "option.adapters_url": "s3://adapters/adapters.tar.gz"})
    # The HEAD request's 500 has no body, so no S3 error code to show.
    with pytest.raises(RuntimeError, match=r"kept failing for s3://adapters/adapters\.tar\.gz \(2 retries\)"):
        start_server(model_dir)
    assert len(failing_s3.requests) == S3_ATTEMPTS


@pytest.mark.parametrize("src", ["s3://adapters/a1/", "s3://adapters/a1.tar.gz"])
def test_registering_from_failing_s3_is_503_and_the_server_serves_on(failing_s3, server_base, server_adapters,
                                                                      tmp_path, src):
    live = start_server(lmi_model_dir(server_base, tmp_path / "model", {
        **LORA_PROPERTIES, "option.cache_dir": str(tmp_path / "cache")}, server_adapters))
    try:
        with live.client() as client:
            response = client.post("/adapters", json={"name": "from-s3", "src": src})
            assert_json_error(response, 503, f"S3 at {failing_s3.url} kept failing for {src}")
            assert len(failing_s3.requests) == S3_ATTEMPTS
            assert "from-s3" not in adapter_names(client)
            assert_still_serving(client)
    finally:
        live.stop()
