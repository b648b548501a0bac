"""A hostile or broken `adapters.tar.gz` in the model directory ends start-up with the reason (docs/STORAGE.md:
start-up lets storage errors end the process), before the model loads, with nothing written outside the
model directory and no partly unpacked `adapters/` left behind."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.hardening.conftest import adapter_archive, paths_under
from tests.server.conftest import LORA_PROPERTIES, lmi_model_dir, start_server
from tests.server.test_entrypoint import free_port, launch
from tests.storage.storage_helpers import file_entry
from tests.storage.test_storage_archive import HOSTILE_ENTRIES

MAX_ARCHIVE_BYTES = 1_000_000
# Start-up fails while unpacking, before the model loads: the time is mostly importing torch.
PROCESS_EXIT_SECONDS = 90


def model_with_archive(server_base, tmp_path: Path, write_archive) -> Path:
    """`write_archive(path)` writes the model directory's adapters.tar.gz."""
    (tmp_path / "outside").mkdir()
    model_dir = lmi_model_dir(server_base, tmp_path / "model", {
        **LORA_PROPERTIES, "option.cache_dir": str(tmp_path / "cache"),
        "option.max_archive_bytes": str(MAX_ARCHIVE_BYTES)})
    write_archive(model_dir / "adapters.tar.gz")
    return model_dir


def assert_start_up_refused(model_dir: Path, root: Path, *fragments: str) -> None:
    before = paths_under(root)
    with pytest.raises(RuntimeError) as failure:
        start_server(model_dir)
    for fragment in fragments:
        assert fragment in str(failure.value)
    assert not (model_dir / "adapters").exists()
    assert paths_under(root) == before


@pytest.mark.parametrize("case", sorted(HOSTILE_ENTRIES))
def test_hostile_entries_end_start_up(server_base, server_adapters, tmp_path, case):
    entries, _ = HOSTILE_ENTRIES[case]
    model_dir = model_with_archive(server_base, tmp_path, lambda archive: adapter_archive(
        archive, server_adapters["a1"], entries, arcname="a1"))
    assert_start_up_refused(model_dir, tmp_path, "start-up failed: refusing entry", "adapters.tar.gz")
    assert not Path("/tmp/evil.txt").exists()


def test_a_bomb_ends_start_up_at_the_configured_bound(server_base, server_adapters, tmp_path):
    bomb = [file_entry("a1/zeros.bin", bytes(4 * MAX_ARCHIVE_BYTES))]
    model_dir = model_with_archive(server_base, tmp_path, lambda archive: adapter_archive(
        archive, server_adapters["a1"], bomb, arcname="a1"))
    assert_start_up_refused(model_dir, tmp_path, f"max_total_bytes={MAX_ARCHIVE_BYTES}")


def test_a_truncated_archive_ends_start_up(server_base, server_adapters, tmp_path):
    def truncated(archive: Path) -> None:
        adapter_archive(archive, server_adapters["a1"], arcname="a1")
        archive.write_bytes(archive.read_bytes()[:-8])

    model_dir = model_with_archive(server_base, tmp_path, truncated)
    assert_start_up_refused(model_dir, tmp_path, "is truncated, corrupt")


def test_the_process_exits_1_naming_the_entry(server_base, server_adapters, tmp_path):
    entries, _ = HOSTILE_ENTRIES["dot-dot path"]
    model_dir = model_with_archive(server_base, tmp_path, lambda archive: adapter_archive(
        archive, server_adapters["a1"], entries, arcname="a1"))
    started = time.monotonic()
    process = launch(["--model-dir", str(model_dir), "--host", "127.0.0.1", "--port", str(free_port())], {})
    output, _ = process.communicate(timeout=PROCESS_EXIT_SECONDS)
    assert process.returncode == 1, output
    assert "refusing entry '../outside/evil.txt'" in output
    assert time.monotonic() - started < PROCESS_EXIT_SECONDS
    assert list((tmp_path / "outside").iterdir()) == []
