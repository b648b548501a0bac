"""Hostile registrations through the real server, on both register routes (SageMaker's `POST /adapters` JSON
body and DJL's `POST /models/{m}/adapters?name=&src=`): archives with escaping, linked or special entries,
bombs and truncated gzip; sources outside the allowed roots; unsafe names. Each is refused with a 4xx JSON
error naming the problem, writes nothing anywhere, leaves no adapter registered, and the server serves on.

tests/storage checks the same refusals at the function level; this checks what reaches the client."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.hardening.conftest import (
    adapter_archive,
    adapter_names,
    assert_json_error,
    assert_still_serving,
    paths_under,
)
from tests.server.conftest import LORA_PROPERTIES, lmi_model_dir, start_server
from tests.storage.storage_helpers import file_entry
from tests.storage.test_storage_archive import HOSTILE_ENTRIES

MAX_ARCHIVE_BYTES = 1_000_000


@pytest.fixture(scope="module")
def workspace(server_base, server_adapters, tmp_path_factory):
    """A server whose allowed roots are its model directory; `outside/` next to it must stay untouched."""
    root = tmp_path_factory.mktemp("hostile-sources")
    (root / "outside").mkdir()
    model_dir = lmi_model_dir(server_base, root / "model", {
        **LORA_PROPERTIES, "option.cache_dir": str(root / "cache"),
        "option.max_archive_bytes": str(MAX_ARCHIVE_BYTES)}, server_adapters)
    (model_dir / "uploaded").mkdir()
    live = start_server(model_dir)
    with live.client() as client:
        # A good archive first: the route works, and the unpacked-archives folder exists before the hostile ones.
        good = adapter_archive(model_dir / "uploaded" / "good.tar.gz", server_adapters["a1"])
        assert client.post("/adapters", json={"name": "good", "src": str(good)}).status_code == 200
        yield root, model_dir, client
    live.stop()


def register(client, route: str, name: str, src: str):
    if route == "sagemaker":
        return client.post("/adapters", json={"name": name, "src": src})
    return client.post("/models/model/adapters", params={"name": name, "src": src})


def assert_refused_leaving_nothing(workspace, route: str, name: str, src: str, status: int, *fragments: str,
                                   absolute_targets: tuple[Path, ...] = ()) -> None:
    root, _, client = workspace
    before = paths_under(root)
    existed = [target.exists() for target in absolute_targets]
    assert_json_error(register(client, route, name, src), status, *fragments)
    assert paths_under(root) == before, "a refused registration changed files"
    assert [target.exists() for target in absolute_targets] == existed
    assert name not in adapter_names(client)
    assert_still_serving(client)


ROUTES = ["sagemaker", "djl"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", sorted(HOSTILE_ENTRIES))
def test_hostile_archive_entries_are_refused(workspace, server_adapters, route, case):
    entries, _ = HOSTILE_ENTRIES[case]
    archive = workspace[1] / "uploaded" / f"{route}-{case.replace(' ', '-')}.tar.gz"
    adapter_archive(archive, server_adapters["a2"], entries)
    assert_refused_leaving_nothing(workspace, route, "hostile", str(archive), 400, "refusing entry",
                                   absolute_targets=(Path("/tmp/evil.txt"),))


@pytest.mark.parametrize("route", ROUTES)
def test_a_decompression_bomb_is_refused_by_the_configured_bound(workspace, server_adapters, route):
    archive = adapter_archive(workspace[1] / "uploaded" / f"{route}-bomb.tar.gz", server_adapters["a2"],
                              [file_entry("adapter/zeros.bin", bytes(4 * MAX_ARCHIVE_BYTES))])
    assert archive.stat().st_size < MAX_ARCHIVE_BYTES / 10
    assert_refused_leaving_nothing(workspace, route, "bomb", str(archive), 400,
                                   f"max_total_bytes={MAX_ARCHIVE_BYTES}")


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("cut", ["half", "trailer"])
def test_a_truncated_gzip_is_refused(workspace, server_adapters, route, cut):
    whole = adapter_archive(workspace[1] / "uploaded" / "whole.tar.gz", server_adapters["a2"]).read_bytes()
    archive = workspace[1] / "uploaded" / f"{route}-{cut}.tar.gz"
    archive.write_bytes(whole[: len(whole) // 2] if cut == "half" else whole[:-8])
    assert_refused_leaving_nothing(workspace, route, "cut", str(archive), 400, "is truncated, corrupt")


def outside_sources(root: Path, model_dir: Path) -> dict[str, tuple[str, int, str]]:
    """src -> (expected status, fragment of the message)."""
    (model_dir / "uploaded" / "link-to-etc").unlink(missing_ok=True)
    (model_dir / "uploaded" / "link-to-etc").symlink_to("/etc")
    leaky = model_dir / "uploaded" / "leaky"
    if not leaky.exists():
        shutil.copytree(model_dir / "adapters" / "a1", leaky)
        (leaky / "adapter_model.safetensors").unlink()
        (leaky / "adapter_model.safetensors").symlink_to(root / "outside" / "secret")
        (root / "outside" / "secret").write_bytes(b"not for clients")
    outside = "outside the allowed local roots"
    return {
        "/etc/passwd": (400, outside),
        "/etc": (400, outside),
        "/": (400, outside),
        f"{model_dir}/../../../../../etc/passwd": (400, outside),
        f"{model_dir}/uploaded/link-to-etc": (400, outside),
        str(root / "outside" / "secret"): (400, outside),
        str(leaky): (400, "a link to"),
        "../../etc/passwd": (400, "must be an absolute path"),
        "etc/passwd": (400, "must be an absolute path"),
        "file:///etc/passwd": (400, "must be an absolute path"),
        "~/.ssh/id_rsa": (400, "must be an absolute path"),
        "": (400, "src"),
        f"{model_dir}/uploaded/nothing-here": (404, "does not exist"),
        f"{model_dir}/config.json": (400, "neither a directory nor"),
        f"{model_dir}/uploaded/\x00nul": (400, "adapter src"),
        f"{model_dir}/uploaded/{'x' * 5000}": (400, "adapter src"),
        f"{model_dir}/uploaded/{'deep/' * 1000}adapter": (400, "adapter src"),
    }


@pytest.mark.parametrize("route", ROUTES)
def test_sources_outside_the_allowed_roots_are_refused(workspace, route):
    root, model_dir, _ = workspace
    for src, (status, fragment) in outside_sources(root, model_dir).items():
        assert_refused_leaving_nothing(workspace, route, "outsider", src, status, fragment)


BAD_NAMES = ["../escape", "a/b", "a\\b", "a b", "ünïcode", ".hidden", "a1\n", "x" * 129, "", "%2e%2e", "a;rm -rf"]


@pytest.mark.parametrize("route", ROUTES)
def test_unsafe_adapter_names_are_refused(workspace, server_adapters, route):
    _, model_dir, _ = workspace
    src = str(model_dir / "adapters" / "a1")
    for name in BAD_NAMES:
        assert_refused_leaving_nothing(workspace, route, name, src, 400, "name")
