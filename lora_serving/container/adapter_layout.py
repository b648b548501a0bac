"""The adapters a model directory brings at start-up: `<model_dir>/adapters/<name>/`, unpacked
first from `adapters.tar.gz` (in the model directory, or at an s3:// URL) when there is one."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from lora_serving.handler.storage.adapter_files import is_adapter_dir
from lora_serving.handler.storage.archive import (
    DEFAULT_MAX_MEMBERS,
    DEFAULT_MAX_TOTAL_BYTES,
    archive_digest,
    safe_extract_tar,
)
from lora_serving.handler.storage.s3 import is_s3_url
from lora_serving.handler.storage.s3_cache import download_s3_object
from lora_serving.handler.storage.errors import InvalidAdapterError, SourceNotFoundError, StorageError
from lora_serving.handler.errors import InvalidAdapterError as InvalidAdapterNameError
from lora_serving.handler.lora.names import validate_adapter_name

log = logging.getLogger(__name__)

ADAPTERS_ARCHIVE = "adapters.tar.gz"
ADAPTERS_DIR = "adapters"
# Written inside an unpacked adapters directory before it is renamed into place, so its presence
# means "complete", and its digest says from which archive.
UNPACKED_STAMP = ".unpacked-from.json"

_READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


def discover_adapters(adapters_dir: str | Path) -> dict[str, Path]:
    """Every `<adapters_dir>/<name>/` holding an adapter, by name; other entries are skipped
    (with a warning, except hidden ones). A missing directory means no adapters."""
    adapters_dir = Path(adapters_dir)
    if not adapters_dir.is_dir():
        return {}
    adapters = {}
    for entry in sorted(adapters_dir.iterdir()):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        if not is_adapter_dir(entry):
            log.warning("skipping %s: it holds no adapter_config.json with adapter weights", entry)
            continue
        try:
            adapters[validate_adapter_name(entry.name)] = entry
        except InvalidAdapterNameError as error:
            log.warning("skipping %s: %s", entry, error)
    return adapters


def unpack_adapters_archive(
    model_dir: str | Path,
    *,
    cache_dir: str | Path,
    archive: str | Path | None = None,
    client=None,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_members: int = DEFAULT_MAX_MEMBERS,
) -> Path | None:
    """Unpack the adapters archive into an adapters directory and return that directory, or
    return None when there is no archive.

    `archive` is a local path or an s3:// URL; by default `<model_dir>/adapters.tar.gz` if it
    exists. The archive may hold `<name>/` folders at its top level or inside one `adapters/`
    folder. The result goes to `<model_dir>/adapters/`, or, when the model directory is
    read-only (as SageMaker mounts /opt/ml/model), to a directory under `cache_dir`. An
    unchanged archive (same sha256) is not unpacked again; a changed one replaces the earlier
    unpacking. Raises StorageError subclasses (see archive.safe_extract_tar), InvalidAdapterError
    when the archive holds no adapter, and StorageError when `<model_dir>/adapters/` already
    exists but did not come from an archive.
    """
    model_dir, cache_dir = Path(model_dir), Path(cache_dir)
    archive_path = _local_archive(model_dir, cache_dir, archive, client)
    if archive_path is None:
        return None
    digest = archive_digest(archive_path)
    in_model_dir = model_dir / ADAPTERS_DIR
    in_cache = cache_dir / "unpacked-adapters" / hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:20]
    for candidate in (in_model_dir, in_cache):
        if _stamped_digest(candidate) == digest:
            return candidate
    if in_model_dir.exists() and _stamped_digest(in_model_dir) is None:
        raise StorageError(f"both {in_model_dir} and the adapters archive {archive_path} exist; keep only one of them")

    target, staging = in_model_dir, _staging_dir_beside(in_model_dir)
    if staging is None:
        log.info("%s is read-only; unpacking %s under %s instead", model_dir, archive_path.name, in_cache)
        in_cache.parent.mkdir(parents=True, exist_ok=True)
        target, staging = in_cache, _staging_dir_beside(in_cache)
        if staging is None:
            raise StorageError(f"cannot unpack {archive_path}: neither {model_dir} nor {in_cache.parent} is writable")
    try:
        unpacked = safe_extract_tar(
            archive_path, staging / "unpacked", max_total_bytes=max_total_bytes, max_members=max_members
        )
        adapters_root = _adapters_root(unpacked)
        if not discover_adapters(adapters_root):
            raise InvalidAdapterError(
                f"{archive_path} holds no adapters: expected <name>/adapter_config.json with "
                f"adapter_model.safetensors or adapter_model.bin, at its top level or under adapters/"
            )
        (adapters_root / UNPACKED_STAMP).write_text(json.dumps({"archive": str(archive_path), "sha256": digest}))
        if target.exists():
            os.rename(target, staging / "replaced")
        os.rename(adapters_root, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("unpacked %s into %s", archive_path, target)
    return target


def find_startup_adapters(
    model_dir: str | Path,
    *,
    cache_dir: str | Path,
    archive: str | Path | None = None,
    client=None,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_members: int = DEFAULT_MAX_MEMBERS,
) -> dict[str, Path]:
    """The adapters to register at start-up: unpack the archive if there is one, then discover."""
    unpacked = unpack_adapters_archive(
        model_dir,
        cache_dir=cache_dir,
        archive=archive,
        client=client,
        max_total_bytes=max_total_bytes,
        max_members=max_members,
    )
    return discover_adapters(unpacked if unpacked is not None else Path(model_dir) / ADAPTERS_DIR)


def _local_archive(model_dir: Path, cache_dir: Path, archive: str | Path | None, client) -> Path | None:
    if archive is None:
        default = model_dir / ADAPTERS_ARCHIVE
        return default if default.is_file() else None
    if is_s3_url(str(archive)):
        return download_s3_object(str(archive), cache_dir, client=client)
    if not Path(archive).is_file():
        raise SourceNotFoundError(f"adapters archive {archive} does not exist")
    return Path(archive)


def _stamped_digest(adapters_dir: Path) -> str | None:
    try:
        return json.loads((adapters_dir / UNPACKED_STAMP).read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _staging_dir_beside(target: Path) -> Path | None:
    """A fresh private directory next to `target`, or None when its parent is read-only."""
    try:
        return Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.unpacking-"))
    except OSError as error:
        if error.errno in _READ_ONLY_ERRNOS:
            return None
        raise


def _adapters_root(unpacked: Path) -> Path:
    """The unpacked tree itself, or its single `adapters/` folder when the archive wraps
    everything in one (`tar czf adapters.tar.gz adapters/`)."""
    visible = [entry for entry in unpacked.iterdir() if not entry.name.startswith(".")]
    if len(visible) == 1 and visible[0].name == ADAPTERS_DIR and visible[0].is_dir() and not is_adapter_dir(visible[0]):
        return visible[0]
    return unpacked
