"""An HTTP relay in front of moto's S3 server, for code under test that runs in another process (DJL's worker),
whose S3 client a test cannot hook as it hooks its own: every request is passed on to moto as it came, counted
by S3 operation, and may be held back a while or answered with an S3 error first.

The process under test reaches it only through boto3's own endpoint setting (AWS_ENDPOINT_URL_S3).
"""

from __future__ import annotations

import collections
import http.client
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Hop-by-hop headers, and those the relay sets itself (the length of what it sends, its own Date and Server).
_NOT_PASSED_ON = {"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server"}


class S3Relay:
    def __init__(self, upstream: str) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.calls: collections.Counter[str] = collections.Counter()  # by operation, e.g. "GetObject"
        self._lock = threading.Lock()
        self._delays: dict[str, float] = {}
        self._failing_prefixes: set[str] = set()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _RelayHandler)
        self._server.daemon_threads = True
        self._server.relay = self
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-relay", daemon=True)

    def __enter__(self) -> S3Relay:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        self._server.server_close()

    def delay(self, operation: str, seconds: float) -> None:
        """Hold each `operation` request back `seconds` before passing it on."""
        self._delays[operation] = seconds

    def fail_keys(self, bucket: str, prefix: str) -> None:
        """Answer every read of a key under `prefix` with S3's 500 InternalError instead of passing it on."""
        self._failing_prefixes.add(f"/{bucket}/{prefix}")

    def heal(self) -> None:
        self._failing_prefixes.clear()

    def reset(self) -> None:
        with self._lock:
            self.calls.clear()

    def counted(self) -> dict[str, int]:
        with self._lock:
            return dict(self.calls)

    def admit(self, method: str, target: str) -> bool:
        """Count the request; False when it is to be answered with an error instead of passed on."""
        path, _, query = target.partition("?")
        operation = _operation(method, path, urllib.parse.parse_qs(query))
        with self._lock:
            self.calls[operation] += 1
        time.sleep(self._delays.get(operation, 0.0))
        return not any(urllib.parse.unquote(path).startswith(prefix) for prefix in self._failing_prefixes)


def _operation(method: str, path: str, query: dict) -> str:
    has_key = "/" in path.strip("/")
    if method == "GET" and not has_key:
        return "ListObjectsV2" if query.get("list-type") == ["2"] else "ListObjects"
    return {"GET": "GetObject", "HEAD": "HeadObject", "PUT": "PutObject", "DELETE": "DeleteObject"}.get(
        method, method)


class _RelayHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._relay()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def _relay(self) -> None:
        relay: S3Relay = self.server.relay
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        if not relay.admit(self.command, self.path):
            error = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>InternalError</Code>"
                     b"<Message>the test's relay fails this key</Message></Error>")
            self._answer(500, "Internal Server Error", [("Content-Type", "application/xml")], error)
            return
        connection = http.client.HTTPConnection(*relay.upstream, timeout=60)
        try:
            headers = {key: value for key, value in self.headers.items() if key.lower() not in _NOT_PASSED_ON}
            connection.request(self.command, self.path, body=body, headers=headers)
            upstream = connection.getresponse()
            data = upstream.read()
            passed = [(key, value) for key, value in upstream.getheaders() if key.lower() not in _NOT_PASSED_ON]
            if self.command == "HEAD":  # no body: the length is the object's, as moto said
                passed += [(key, value) for key, value in upstream.getheaders() if key.lower() == "content-length"]
            self._answer(upstream.status, upstream.reason, passed, data)
        finally:
            connection.close()

    def _answer(self, status: int, reason: str, headers: list[tuple[str, str]], data: bytes) -> None:
        self.send_response(status, reason)
        for key, value in headers:
            self.send_header(key, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass  # quiet: the counts are what the tests read
