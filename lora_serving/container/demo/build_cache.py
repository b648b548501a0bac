"""Build a directory once per cache key, and find it in the cache afterwards: the demo model's rule, and the
tests' real-model builds (tests/real_model.py).

A build lives in `cache_dir/<key>/<dir_name>/`. Safe against crashes and concurrent callers: the build goes
into a staging directory that is renamed into place (atomic) and only then marked complete, under a lock that
makes a second process wait for the first one's build instead of starting its own.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

logger = logging.getLogger(__name__)

# Written next to the built directory last of all: a build without it is never used.
BUILD_COMPLETE_MARKER = "BUILD_COMPLETE"


def build_once(cache_dir: Path, key: str, dir_name: str, build: Callable[[Path], None], what: str) -> Path:
    """Return `cache_dir/key/dir_name`, calling `build(empty_dir)` first if no complete build is there.

    `key` names what was built (a hash of the recipe, say): a changed recipe gets a new key, never a stale
    cache. `what` names the build in the log.
    """
    cache_dir = Path(cache_dir)
    build_root = cache_dir / key
    marker = build_root / BUILD_COMPLETE_MARKER
    if marker.exists():
        return build_root / dir_name
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(cache_dir / f"{key}.lock"):
        if marker.exists():
            return build_root / dir_name
        _remove_unfinished_builds(build_root)
        staging_root = Path(tempfile.mkdtemp(prefix=f"{key}.building-", dir=cache_dir))
        staging_root.chmod(0o755)  # mkdtemp makes it private; the finished build is for any reader
        started = time.monotonic()
        logger.info("Building %s into %s", what, build_root)
        try:
            (staging_root / dir_name).mkdir()
            build(staging_root / dir_name)
            os.rename(staging_root, build_root)
        except BaseException:
            shutil.rmtree(staging_root, ignore_errors=True)
            raise
        build_seconds = time.monotonic() - started
        marker.write_text(f"built in {build_seconds:.1f} s\n")
        logger.info("Built %s in %.1f s", what, build_seconds)
    return build_root / dir_name


@contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    with lock_path.open("w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _remove_unfinished_builds(build_root: Path) -> None:
    """Remove what a crashed build left: staging directories, or a renamed one never marked complete."""
    for staging_root in build_root.parent.glob(f"{build_root.name}.building-*"):
        shutil.rmtree(staging_root)
    if build_root.exists():
        shutil.rmtree(build_root)
