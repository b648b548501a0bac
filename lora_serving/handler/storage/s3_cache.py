"""Local copies of S3 prefixes and objects in the cache directory, downloaded once.

Layout under `cache_dir`:
    s3-prefixes/<bucket>-<name>-<hash of url>/            a prefix mirrored in place (models)
    s3-prefixes/<...>.manifest.json, <...>.lock           what has landed there, and its lock
    s3-snapshots/<bucket>-<name>-<hash of listing>/       a prefix frozen at one listing (adapters)
    s3-objects/<hash of url and etag>/<file name>         single objects (tarballs)

A prefix directory counts as complete only when its manifest says so and lists exactly the keys,
sizes and ETags S3 lists now. Files land under temporary names and are renamed into place, and
the manifest is marked complete only after the last one landed, so an interrupted download is
resumed rather than mistaken for a finished one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

from lora_serving.handler.storage.s3 import (
    DOWNLOADING_INFIX,
    S3Object,
    S3Url,
    download_s3_object_to_file,
    head_s3_object,
    list_s3_prefix,
    make_s3_client,
    parse_s3_url,
)
from lora_serving.handler.storage.safe_paths import UnsafeNameError, relative_parts
from lora_serving.handler.storage.errors import BadSourceError, UnsafeSourceError

log = logging.getLogger(__name__)

_NOT_IN_DIR_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def download_s3_prefix(url: str, cache_dir: str | Path, *, client=None) -> Path:
    """Mirror every object under the s3:// prefix `url` into the cache; return the local directory.

    The directory is keyed by the URL and updated in place: when S3's listing changed, only the
    objects whose ETag or size changed are fetched again, and objects gone from S3 are removed.
    A trailing slash on `url` is optional.
    """
    prefix = parse_s3_url(url).as_prefix()
    client = client or make_s3_client()
    listing = list_s3_prefix(client, prefix)
    target = Path(cache_dir) / "s3-prefixes" / _dir_name(prefix, _digest(str(prefix)))
    _sync_prefix(client, prefix, listing, target)
    return target


def download_s3_prefix_snapshot(url: str, cache_dir: str | Path, *, client=None) -> Path:
    """Like download_s3_prefix, but into a directory keyed by the listing itself (keys, sizes,
    ETags): once complete it never changes, and new content under the same URL lands in a new
    directory. Used for adapters, so that a re-registered adapter never reuses stale files."""
    prefix = parse_s3_url(url).as_prefix()
    client = client or make_s3_client()
    listing = list_s3_prefix(client, prefix)
    listing_text = "".join(f"{obj.key}\t{obj.size}\t{obj.etag}\n" for obj in sorted(listing, key=lambda o: o.key))
    target = Path(cache_dir) / "s3-snapshots" / _dir_name(prefix, _digest(str(prefix), listing_text))
    _sync_prefix(client, prefix, listing, target)
    return target


def download_s3_object(url: str, cache_dir: str | Path, *, client=None) -> Path:
    """Download one object (e.g. `s3://bucket/adapters.tar.gz`) into the cache; return the file.

    The file sits in a directory keyed by URL and ETag, so a second call for unchanged content
    costs one HEAD request and no download.
    """
    location = parse_s3_url(url)
    try:
        parts = relative_parts(location.key)
    except UnsafeNameError as reason:
        raise UnsafeSourceError(f"refusing {location}: unsafe object key ({reason})") from None
    if not parts or location.key.endswith("/"):
        raise BadSourceError(f"{location} names a prefix, not an object")
    client = client or make_s3_client()
    obj = head_s3_object(client, location)
    destination = Path(cache_dir) / "s3-objects" / _digest(str(location), obj.etag, str(obj.size)) / parts[-1]
    if _holds(destination, obj.size):
        return destination
    log.info("downloading %s (%d bytes) to %s", location, obj.size, destination)
    download_s3_object_to_file(client, location.bucket, obj, destination)
    return destination


def _sync_prefix(client, prefix: S3Url, listing: list[S3Object], target: Path) -> None:
    wanted = {_local_relative_path(prefix, obj): obj for obj in listing}
    manifest_path = target.with_name(target.name + ".manifest.json")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Two processes starting on the same cache (e.g. several workers) must not download into the
    # same directory at once; the second waits and then finds the work done.
    with _exclusive_lock(target.with_name(target.name + ".lock")):
        recorded, complete = _read_manifest(manifest_path)
        landed = {
            path: entry
            for path, entry in recorded.items()
            if path in wanted and entry == _manifest_entry(wanted[path]) and _holds(target / path, entry["size"])
        }
        if complete and landed.keys() == wanted.keys() == recorded.keys():
            return
        target.mkdir(exist_ok=True)
        _remove_interrupted_downloads(target)
        for gone in recorded.keys() - wanted.keys():
            (target / gone).unlink(missing_ok=True)
        missing = [path for path in wanted if path not in landed]
        log.info(
            "downloading %d of %d objects (%d bytes) from %s to %s",
            len(missing),
            len(wanted),
            sum(wanted[path].size for path in missing),
            prefix,
            target,
        )
        _write_manifest(manifest_path, prefix, landed, complete=False)
        for path in missing:
            download_s3_object_to_file(client, prefix.bucket, wanted[path], target / path)
            landed[path] = _manifest_entry(wanted[path])
            # Recorded after each file so a restart after a crash resumes instead of starting over.
            _write_manifest(manifest_path, prefix, landed, complete=False)
        _write_manifest(manifest_path, prefix, landed, complete=True)


def _local_relative_path(prefix: S3Url, obj: S3Object) -> str:
    location = S3Url(prefix.bucket, obj.key)
    try:
        parts = relative_parts(obj.key[len(prefix.key) :])
    except UnsafeNameError as reason:
        raise UnsafeSourceError(
            f"refusing {location}: unsafe object key ({reason}) would escape the download directory"
        ) from None
    if not parts:
        raise UnsafeSourceError(f"refusing {location}: the object key names no file below {prefix}")
    return "/".join(parts)


def _manifest_entry(obj: S3Object) -> dict:
    return {"etag": obj.etag, "size": obj.size}


def _read_manifest(path: Path) -> tuple[dict[str, dict], bool]:
    try:
        manifest = json.loads(path.read_text())
        objects = dict(manifest["objects"])
        # Its paths decide which files get deleted, so a damaged manifest must not point outside.
        for relative_path in objects:
            relative_parts(relative_path)
        return objects, manifest["complete"] is True
    except (OSError, ValueError, KeyError, TypeError):
        # Missing, unreadable or damaged: nothing is known to have landed, every file is fetched again.
        return {}, False


def _write_manifest(path: Path, prefix: S3Url, objects: dict[str, dict], *, complete: bool) -> None:
    text = json.dumps({"source": str(prefix), "complete": complete, "objects": objects}, indent=1, sort_keys=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


def _remove_interrupted_downloads(directory: Path) -> None:
    for leftover in directory.rglob(f".*{DOWNLOADING_INFIX}*"):
        if leftover.is_file():
            leftover.unlink()


def _holds(path: Path, size: int) -> bool:
    return path.is_file() and path.stat().st_size == size


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _dir_name(prefix: S3Url, digest: str) -> str:
    """`<bucket>-<last prefix folder>-<digest>`: readable for an operator, unique by the digest."""
    last_folder = prefix.key.rstrip("/").rsplit("/", 1)[-1]
    readable = _NOT_IN_DIR_NAME.sub("_", f"{prefix.bucket}-{last_folder}".strip("-"))[:80]
    return f"{readable}-{digest}"


def _digest(*texts: str) -> str:
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:20]
