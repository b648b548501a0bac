"""The hardening tests run against the same real servers as tests/server (imported from there, not copied),
and share the checks below: an answer is a JSON error, nothing changed on disk, the server still serves."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import httpx

from tests.server.conftest import client, lora_server, server_adapters, server_base  # noqa: F401  (reused fixtures)


def assert_json_error(response: httpx.Response, status: int, *fragments: str) -> str:
    """The response has `status`, a JSON body with an error message, and the message holds each fragment."""
    assert response.status_code == status, f"{response.status_code}: {response.text[:500]}"
    body = response.json()
    error = body["error"]
    message = error["message"] if isinstance(error, dict) else error
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def assert_still_serving(client: httpx.Client) -> None:
    assert client.get("/ping").status_code == 200
    answer = client.post("/invocations", json={"inputs": "still serving?", "parameters": {"max_new_tokens": 2}})
    assert answer.status_code == 200, answer.text


def token_ids(answer: dict) -> list[int]:
    """The generated token ids of an LMI answer asked with `details`."""
    return [token["id"] for token in answer["details"]["tokens"]]


def adapter_names(client: httpx.Client) -> set[str]:
    return {adapter["name"] for adapter in client.get("/adapters", params={"limit": 1000}).json()["adapters"]}


def paths_under(root: Path) -> dict[str, tuple[int, int]]:
    """Every file (with its size and mtime) and directory under `root`: equal snapshots mean nothing was
    written, left behind or removed, not even an empty staging directory. (A directory's own mtime is left
    out: it changes whenever an entry is made and removed again inside it.)"""
    return {str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns) if path.is_file() else None
            for path in sorted(root.rglob("*"))}


def adapter_archive(archive: Path, adapter_dir: Path, extra_entries=(), arcname: str = "adapter") -> Path:
    """A tar.gz of a real adapter under `arcname/`, followed by the given (TarInfo, payload) entries (from
    tests/storage/storage_helpers.py), hostile ones included."""
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(adapter_dir, arcname=arcname)
        for info, payload in extra_entries:
            if payload is not None:
                info.size = len(payload)
            tar.addfile(info, None if payload is None else io.BytesIO(payload))
    return archive
