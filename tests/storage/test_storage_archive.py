"""Safe unpacking of tar / tar.gz archives: ordinary archives unpack, hostile ones are refused
with a message naming the entry, and a refused archive leaves nothing behind."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest

from lora_serving.handler.storage.archive import safe_extract_tar
from lora_serving.handler.storage.errors import ArchiveTooLargeError, CorruptArchiveError, UnsafeSourceError
from tests.storage.storage_helpers import file_entry, special_entry, tar_directory, tar_with_entries, write_adapter


@pytest.fixture
def workspace(tmp_path):
    """`archives/` for inputs, `unpack/` as the target's parent, and `outside/` next to it that
    no archive may touch."""
    for name in ("archives", "unpack", "outside"):
        (tmp_path / name).mkdir()
    return tmp_path


def assert_nothing_left(workspace):
    assert list((workspace / "unpack").iterdir()) == [], "a refused archive left files behind"
    assert list((workspace / "outside").iterdir()) == [], "an archive wrote outside its target"


def test_adapter_folder_unpacks_with_its_contents(workspace):
    source = write_adapter(workspace / "src" / "a1")
    (source / "nested").mkdir()
    (source / "nested" / "README.md").write_text("notes")
    archive = tar_directory(workspace / "archives" / "a1.tar.gz", workspace / "src")

    target = safe_extract_tar(archive, workspace / "unpack" / "a1-unpacked")

    for relative in ("a1/adapter_config.json", "a1/adapter_model.safetensors", "a1/nested/README.md"):
        assert (target / relative).read_bytes() == (workspace / "src" / relative).read_bytes()
    assert [path.name for path in (workspace / "unpack").iterdir()] == ["a1-unpacked"]  # no staging left
    assert oct(target.stat().st_mode & 0o777) == oct(0o755)


def test_uncompressed_tar_unpacks_too(workspace):
    archive = workspace / "archives" / "plain.tar"
    with tarfile.open(archive, "w") as tar:
        info, payload = file_entry("a/b.txt", b"hello")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))

    target = safe_extract_tar(archive, workspace / "unpack" / "t")

    assert (target / "a" / "b.txt").read_bytes() == b"hello"


def test_existing_target_is_not_touched(workspace):
    archive = tar_with_entries(workspace / "archives" / "x.tar.gz", [file_entry("x.txt")])
    existing = workspace / "unpack" / "t"
    existing.mkdir()
    (existing / "keep.txt").write_text("keep")

    with pytest.raises(FileExistsError):
        safe_extract_tar(archive, existing)
    assert [path.name for path in existing.iterdir()] == ["keep.txt"]


HOSTILE_ENTRIES = {
    "absolute path": ([file_entry("/tmp/evil.txt")], r"entry '/tmp/evil\.txt'.*absolute path"),
    "dot-dot path": ([file_entry("../outside/evil.txt")], r"entry '\.\./outside/evil\.txt'.*'\.\.' path component"),
    "dot-dot deep inside": (
        [file_entry("a1/ok.txt"), file_entry("a1/../../outside/evil.txt")],
        r"entry 'a1/\.\./\.\./outside/evil\.txt'.*'\.\.'",
    ),
    "symlink outside": (
        [special_entry("a1/adapter_model.safetensors", tarfile.SYMTYPE, linkname="/etc/passwd")],
        r"entry 'a1/adapter_model\.safetensors'.*symbolic link to '/etc/passwd'",
    ),
    "symlink then write through it": (
        [special_entry("a1/out", tarfile.SYMTYPE, linkname="../../outside"), file_entry("a1/out/evil.txt")],
        r"entry 'a1/out'.*symbolic link to '\.\./\.\./outside'",
    ),
    "hard link outside": (
        [special_entry("a1/weights", tarfile.LNKTYPE, linkname="../outside/secret")],
        r"entry 'a1/weights'.*hard link to '\.\./outside/secret'",
    ),
    "character device": (
        [special_entry("a1/null", tarfile.CHRTYPE)],
        r"entry 'a1/null'.*character device entries are not allowed",
    ),
    "block device": ([special_entry("a1/disk", tarfile.BLKTYPE)], r"entry 'a1/disk'.*block device"),
    "fifo": ([special_entry("a1/pipe", tarfile.FIFOTYPE)], r"entry 'a1/pipe'.*FIFO entries are not allowed"),
    "overwriting an earlier entry": (
        [file_entry("a1/adapter_config.json", b"{}"), file_entry("a1/adapter_config.json", b'{"evil": 1}')],
        r"entry 'a1/adapter_config\.json'.*overwrite an earlier entry",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_ENTRIES))
def test_hostile_entry_is_refused_and_nothing_is_left(workspace, case):
    entries, message = HOSTILE_ENTRIES[case]
    # A harmless entry first, so a refusal has something to clean up.
    archive = tar_with_entries(workspace / "archives" / "hostile.tar.gz", [file_entry("first.txt"), *entries])

    with pytest.raises(UnsafeSourceError, match=message):
        safe_extract_tar(archive, workspace / "unpack" / "target")

    assert_nothing_left(workspace)


def test_decompression_bomb_is_refused_by_size(workspace):
    archive = tar_with_entries(workspace / "archives" / "bomb.tar.gz", [file_entry("a1/zeros.bin", bytes(4_000_000))])
    assert archive.stat().st_size < 10_000  # a few KB on disk

    with pytest.raises(ArchiveTooLargeError, match=r"max_total_bytes=1000000"):
        safe_extract_tar(archive, workspace / "unpack" / "target", max_total_bytes=1_000_000)

    assert_nothing_left(workspace)


def test_bomb_in_tar_headers_is_stopped_while_streaming(workspace):
    # A pax header is metadata that tarfile reads into memory, not a file with a size to check
    # beforehand: only counting the decompressed stream catches it.
    info, payload = file_entry("a1/small.txt", b"x")
    info.pax_headers = {"comment": "z" * 3_000_000}
    archive = workspace / "archives" / "pax-bomb.tar.gz"
    with tarfile.open(archive, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))

    with pytest.raises(ArchiveTooLargeError, match=r"unpacks to more than max_total_bytes=1000000"):
        safe_extract_tar(archive, workspace / "unpack" / "target", max_total_bytes=1_000_000)

    assert_nothing_left(workspace)


def test_too_many_entries_is_refused(workspace):
    archive = tar_with_entries(
        workspace / "archives" / "many.tar.gz", [file_entry(f"f{index}.txt", b"") for index in range(50)]
    )

    with pytest.raises(ArchiveTooLargeError, match=r"more than max_members=10 entries.*'f10\.txt'"):
        safe_extract_tar(archive, workspace / "unpack" / "target", max_members=10)

    assert_nothing_left(workspace)


def test_truncated_gzip_is_refused(workspace):
    full = tar_with_entries(
        workspace / "archives" / "full.tar.gz",
        [file_entry("a1/one.bin", bytes(range(256)) * 400), file_entry("a1/two.bin", bytes(range(256)) * 400)],
    ).read_bytes()
    archive = workspace / "archives" / "truncated.tar.gz"
    archive.write_bytes(full[: len(full) // 2])

    with pytest.raises(CorruptArchiveError, match=r"truncated\.tar\.gz is truncated, corrupt"):
        safe_extract_tar(archive, workspace / "unpack" / "target")

    assert_nothing_left(workspace)


def test_gzip_missing_only_its_trailer_is_refused(workspace):
    # The tar part is complete; only gzip's length and CRC check can tell the file was cut.
    full = tar_with_entries(workspace / "archives" / "full.tar.gz", [file_entry("a1/x.txt", b"x" * 100)]).read_bytes()
    archive = workspace / "archives" / "no-trailer.tar.gz"
    archive.write_bytes(full[:-8])

    with pytest.raises(CorruptArchiveError):
        safe_extract_tar(archive, workspace / "unpack" / "target")

    assert_nothing_left(workspace)


@pytest.mark.parametrize(
    "content",
    [b"not an archive at all, just text" * 40, gzip.compress(b"gzip of something that is not a tar" * 40), b""],
    ids=["text", "gzip-of-text", "empty"],
)
def test_non_tar_content_is_refused(workspace, content):
    archive = workspace / "archives" / "fake.tar.gz"
    archive.write_bytes(content)

    with pytest.raises(CorruptArchiveError, match=r"fake\.tar\.gz is truncated, corrupt or not a tar"):
        safe_extract_tar(archive, workspace / "unpack" / "target")

    assert_nothing_left(workspace)
