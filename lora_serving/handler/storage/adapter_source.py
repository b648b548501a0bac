"""Turning the `src` of an adapter registration into a local adapter directory.

`src` comes from a client of the management API (`POST /adapters`, `POST /models/{m}/adapters`),
so it is untrusted: local paths must stay inside the operator's allowed roots, archives are
unpacked safely, and whatever is downloaded lands in a directory keyed by its content, so that
re-registering a name with new content never picks up the old files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from lora_serving.handler.storage.adapter_files import find_adapter_root, require_adapter_dir
from lora_serving.handler.storage.archive import (
    DEFAULT_MAX_MEMBERS,
    DEFAULT_MAX_TOTAL_BYTES,
    archive_digest,
    is_tar_archive_name,
    safe_extract_tar,
)
from lora_serving.handler.storage.s3 import is_s3_url
from lora_serving.handler.storage.s3_cache import download_s3_object, download_s3_prefix_snapshot
from lora_serving.handler.storage.errors import (
    BadSourceError,
    InvalidAdapterError,
    SourceAccessDeniedError,
    SourceNotFoundError,
    StorageUnreachableError,
    UnsafeSourceError,
)
from lora_serving.handler.hub import (
    HF_URL_SCHEME,
    HubAccessError,
    HubContentError,
    HubError,
    HubRepoNotFoundError,
    HubSettings,
    fetch_adapter,
    parse_hf_url,
)


def resolve_adapter_source(
    src: str,
    *,
    allowed_roots: Iterable[str | Path],
    cache_dir: str | Path,
    client=None,
    hub: HubSettings | None = None,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_members: int = DEFAULT_MAX_MEMBERS,
) -> Path:
    """The local directory holding the adapter named by `src`, downloading or unpacking it first.

    `src` is one of: an absolute local directory or `.tar.gz` / `.tgz` / `.tar` file, which must
    resolve (symlinks followed) inside one of `allowed_roots`; an `s3://bucket/prefix/` adapter
    directory; an `s3://bucket/key.tar.gz` archive; `hf://org/name[@revision]`, a Hub repo (`hub`: the Hub
    settings, from the environment when None), of which only adapter_config.json and adapter_model.safetensors
    are fetched, within `max_total_bytes`. A directory must hold adapter_config.json and
    adapter_model.safetensors (or .bin) itself; an archive may also wrap them in one folder.

    Raises SourceNotFoundError, UnsafeSourceError (outside the allowed roots, unsafe archive),
    InvalidAdapterError (no adapter there), BadSourceError (anything else wrong with `src`),
    ArchiveTooLargeError, CorruptArchiveError, SourceAccessDeniedError, StorageUnreachableError.
    Blocking: call it from a worker thread in an async server.
    """
    cache_dir = Path(cache_dir)
    if not isinstance(src, str) or not src.strip():
        raise BadSourceError("adapter src is empty")
    bounds = {"max_total_bytes": max_total_bytes, "max_members": max_members}
    if is_s3_url(src):
        if is_tar_archive_name(src):
            archive = download_s3_object(src, cache_dir, client=client)
            return _unpacked_adapter(archive, src, cache_dir, bounds)
        return require_adapter_dir(download_s3_prefix_snapshot(src, cache_dir, client=client), src)
    if src.startswith(HF_URL_SCHEME):
        return require_adapter_dir(_hub_adapter(src, hub or HubSettings.from_env(os.environ), max_total_bytes), src)

    local = _inside_allowed_roots(src, [Path(root).resolve() for root in allowed_roots])
    if local.is_dir():
        return require_adapter_dir(local, src)
    if local.is_file() and is_tar_archive_name(local.name):
        return _unpacked_adapter(local, src, cache_dir, bounds)
    raise BadSourceError(f"adapter src {src!r} is neither a directory nor a .tar.gz / .tgz / .tar archive")


def _hub_adapter(src: str, hub: HubSettings, max_total_bytes: int) -> Path:
    """The Hub's failures as the storage errors the HTTP layer answers for every other source."""
    try:
        repo_id, revision = parse_hf_url(src)
    except ValueError as error:
        raise BadSourceError(f"adapter src: {error}") from None
    try:
        return fetch_adapter(repo_id, revision, hub, max_total_bytes=max_total_bytes)
    except HubRepoNotFoundError as error:
        raise SourceNotFoundError(str(error)) from None
    except HubAccessError as error:
        raise SourceAccessDeniedError(str(error)) from None
    except HubContentError as error:
        raise BadSourceError(str(error)) from None
    except HubError as error:  # unreachable, or offline without it in the cache
        raise StorageUnreachableError(str(error)) from None


def _inside_allowed_roots(src: str, roots: list[Path]) -> Path:
    """`src` with symlinks resolved, refused unless it and every link inside it stay in `roots`."""
    path = Path(src)
    if not path.is_absolute():
        raise BadSourceError(f"adapter src {src!r} must be an absolute path, an s3:// URL or an hf://org/name Hub repo")
    # Containment is checked before existence, so the answer does not reveal which paths
    # outside the roots exist.
    try:
        resolved = path.resolve()
        inside = _is_inside(resolved, roots)
        exists = inside and resolved.exists()
    except (OSError, ValueError) as error:  # a NUL byte, a name or path longer than the OS takes
        reason = error.strerror if isinstance(error, OSError) else str(error)  # strerror: without the long name
        raise BadSourceError(f"adapter src {src[:200]!r} is not a usable local path: {reason}") from None
    if not inside:
        allowed = ", ".join(str(root) for root in roots) or "none configured"
        raise UnsafeSourceError(
            f"adapter src {src!r} resolves to {resolved}, outside the allowed local roots ({allowed})"
        )
    if not exists:
        raise SourceNotFoundError(f"adapter src {src!r} does not exist")
    if resolved.is_dir():
        _refuse_links_leaving(resolved, roots, src)
    return resolved


def _refuse_links_leaving(directory: Path, roots: list[Path], src: str) -> None:
    # A directory inside the roots could still hand out /etc/shadow as its weights file.
    for parent, dir_names, file_names in os.walk(directory):
        for name in dir_names + file_names:
            entry = Path(parent) / name
            if entry.is_symlink() and not _is_inside(entry.resolve(), roots):
                raise UnsafeSourceError(
                    f"adapter src {src!r} contains {entry}, a link to {entry.resolve()} outside the allowed local roots"
                )


def _is_inside(path: Path, roots: list[Path]) -> bool:
    return any(path.is_relative_to(root) for root in roots)


def _unpacked_adapter(archive: Path, src: str, cache_dir: Path, bounds: dict) -> Path:
    unpacked = cache_dir / "adapter-archives" / archive_digest(archive)
    if not unpacked.is_dir():
        # FileExistsError: another registration unpacked the same content concurrently.
        with contextlib.suppress(FileExistsError):
            safe_extract_tar(archive, unpacked, **bounds)
    try:
        return find_adapter_root(unpacked, f"adapter archive {src!r}")
    except InvalidAdapterError:
        shutil.rmtree(unpacked, ignore_errors=True)
        raise
