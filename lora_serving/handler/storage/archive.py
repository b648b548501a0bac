"""Unpacking untrusted tar / tar.gz archives (adapters.tar.gz, adapter sources).

An archive may not write outside its target, create links, devices or FIFOs, expand past a
bound, or leave a half-unpacked directory behind: it is unpacked into a temporary directory
beside the target, which is renamed into place only once every entry has been checked and
written. Adapters are plain files and folders, so every other kind of entry is refused.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import os
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import BinaryIO

from lora_serving.handler.storage.safe_paths import UnsafeNameError, relative_parts
from lora_serving.handler.storage.errors import ArchiveTooLargeError, CorruptArchiveError, UnsafeSourceError

# Generous enough for dozens of rank-64 adapters of a 70B model, small enough that a hostile
# archive cannot fill the disk; the container passes its own configured bounds.
DEFAULT_MAX_TOTAL_BYTES = 32 * 2**30
DEFAULT_MAX_MEMBERS = 10_000

TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")

_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK_BYTES = 1 << 20


def is_tar_archive_name(name: str) -> bool:
    return name.lower().endswith(TAR_SUFFIXES)


def archive_digest(path: str | Path) -> str:
    """The sha256 of an archive file: the identity of its content."""
    with open(path, "rb") as archive:
        return hashlib.file_digest(archive, "sha256").hexdigest()


def safe_extract_tar(
    archive_path: str | Path,
    target_dir: str | Path,
    *,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_members: int = DEFAULT_MAX_MEMBERS,
) -> Path:
    """Unpack a tar or tar.gz archive into `target_dir`, which must not exist yet; return it.

    `max_total_bytes` bounds the uncompressed size, counted on the decompressed stream as it is
    read (file contents, tar headers and pax records alike), so no header can understate it.
    `max_members` bounds the number of entries. On any failure nothing is left behind.

    Raises UnsafeSourceError (absolute path, '..', link, device, FIFO, entry overwriting
    another), ArchiveTooLargeError, CorruptArchiveError (truncated, corrupt, not a tar), and
    FileExistsError when `target_dir` exists (also when another process placed it first).
    """
    archive_path, target_dir = Path(archive_path), Path(target_dir)
    if target_dir.exists() or target_dir.is_symlink():
        raise FileExistsError(errno.EEXIST, "unpack target already exists", str(target_dir))
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target_dir.parent, prefix=f".{target_dir.name}.unpacking-"))
    try:
        _extract_checked(archive_path, staging, max_total_bytes, max_members)
        staging.chmod(0o755)
        _rename_into_place(staging, target_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target_dir


class _OverLimit(Exception):
    pass


class _CountingReader:
    """Passes the decompressed stream to tarfile, counting it and stopping at the bound."""

    def __init__(self, stream: BinaryIO, limit: int):
        self._stream = stream
        self._limit = limit
        self.bytes_read = 0

    def read(self, size: int = -1) -> bytes:
        # Never one unbounded read: that alone could decompress a bomb into memory.
        if size < 0 or size > _CHUNK_BYTES:
            size = _CHUNK_BYTES
        data = self._stream.read(size)
        self.bytes_read += len(data)
        if self.bytes_read > self._limit:
            raise _OverLimit
        return data


def _extract_checked(archive_path: Path, staging: Path, max_total_bytes: int, max_members: int) -> None:
    current_entry = None
    with archive_path.open("rb") as raw:
        is_gzip = raw.read(2) == _GZIP_MAGIC
        raw.seek(0)
        reader = _CountingReader(gzip.GzipFile(fileobj=raw, mode="rb") if is_gzip else raw, max_total_bytes)
        try:
            # Stream mode ("r|"): entries are read strictly in order and never seeked back to.
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                content_bytes = 0
                for count, member in enumerate(tar, start=1):
                    current_entry = member.name
                    if count > max_members:
                        raise ArchiveTooLargeError(
                            f"{archive_path} has more than max_members={max_members} entries "
                            f"(stopped at entry {member.name!r})"
                        )
                    content_bytes += _extract_member(tar, member, staging, archive_path, content_bytes, max_total_bytes)
            # Read to the end so gzip checks its length and CRC trailer: a truncated or altered
            # archive whose tar part happens to end cleanly is still refused.
            while reader.read(_CHUNK_BYTES):
                pass
        except _OverLimit:
            raise ArchiveTooLargeError(
                f"{archive_path} unpacks to more than max_total_bytes={max_total_bytes} bytes "
                f"(stopped at entry {current_entry!r})"
            ) from None
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
            last = f"last entry read: {current_entry!r}" if current_entry is not None else "no entry read"
            raise CorruptArchiveError(
                f"{archive_path} is truncated, corrupt or not a tar / tar.gz archive ({last}): {error}"
            ) from error


def _extract_member(
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    staging: Path,
    archive_path: Path,
    content_bytes: int,
    max_total_bytes: int,
) -> int:
    """Check one entry and write it under `staging`; return the number of content bytes written."""
    where = f"entry {member.name!r} in {archive_path}"
    try:
        parts = relative_parts(member.name)
    except UnsafeNameError as reason:
        raise UnsafeSourceError(f"refusing {where}: {reason}") from None
    if member.issym() or member.islnk():
        kind = "symbolic" if member.issym() else "hard"
        raise UnsafeSourceError(f"refusing {where}: {kind} link to {member.linkname!r} (links are not allowed)")
    if member.ischr() or member.isblk() or member.isfifo():
        kind = "character device" if member.ischr() else "block device" if member.isblk() else "FIFO"
        raise UnsafeSourceError(f"refusing {where}: {kind} entries are not allowed")
    if member.issparse() or not (member.isreg() or member.isdir()):
        raise UnsafeSourceError(f"refusing {where}: unsupported entry type {member.type!r}")
    try:
        # The standard library's own policy, as a second opinion behind the checks above.
        tarfile.data_filter(member, str(staging))
    except tarfile.FilterError as error:
        raise UnsafeSourceError(f"refusing {where}: {error}") from None

    destination = staging.joinpath(*parts)
    try:
        if member.isdir():
            destination.mkdir(parents=True, exist_ok=True)
            return 0
        if not parts:
            raise UnsafeSourceError(f"refusing {where}: a file entry must name a file")
        if content_bytes + member.size > max_total_bytes:
            raise ArchiveTooLargeError(
                f"{where} ({member.size} bytes) takes the unpacked size over max_total_bytes={max_total_bytes}"
            )
        destination.parent.mkdir(parents=True, exist_ok=True)
        source = tar.extractfile(member)
        # "x": an entry that would overwrite an earlier one is refused rather than trusted.
        with open(destination, "xb") as out:
            shutil.copyfileobj(source, out, _CHUNK_BYTES)
    except (FileExistsError, NotADirectoryError):
        raise UnsafeSourceError(f"refusing {where}: it would overwrite an earlier entry") from None
    return member.size


def _rename_into_place(staging: Path, target_dir: Path) -> None:
    try:
        os.rename(staging, target_dir)
    except OSError as error:
        if error.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(errno.EEXIST, "unpack target already exists", str(target_dir)) from error
        raise
