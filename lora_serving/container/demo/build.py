"""Build the demo's LMI model directory once per recipe, and find it in the cache afterwards.

The model directory holds config.json + model.safetensors (the base model), the tokenizer files,
serving.properties and adapters.tar.gz (one top-level folder per adapter, as PEFT saved it).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from lora_serving.container.demo.adapters import train_adapter
from lora_serving.container.demo.base_model import train_base_model
from lora_serving.container.demo.packing import pack_adapters, write_serving_properties
from lora_serving.container.demo.recipe import (
    ADAPTERS,
    SEED,
    SERVING_PROPERTIES,
    TOKENIZER_CORPUS_LINES,
    TOKENIZER_VOCAB_SIZE,
)
from lora_serving.container.demo.tokenizer import build_tokenizer
from lora_serving.container.demo.training import single_cpu_thread
from lora_serving.container.demo.training_data import tokenizer_corpus

logger = logging.getLogger(__name__)

# The model directory's name, the same for every build: the server names the base model after it.
DEMO_MODEL_DIR_NAME = "demo-model"
# Written next to the model directory last of all: a build without it is never used.
BUILD_COMPLETE_MARKER = "BUILD_COMPLETE"


def ensure_demo_model(cache_dir: Path) -> Path:
    """Return the demo model directory under cache_dir, building it first if it is not there yet.

    The model lives in `cache_dir/demo-<hash of the builder's source>/demo-model/`. Safe against crashes
    and concurrent callers: the build goes into a staging directory that is renamed into place (atomic)
    and only then marked complete, under a lock that makes a second process wait for the first one's
    build instead of starting its own.
    """
    cache_dir = Path(cache_dir)
    build_root = cache_dir / f"demo-{builder_fingerprint()}"
    marker = build_root / BUILD_COMPLETE_MARKER
    if marker.exists():
        return build_root / DEMO_MODEL_DIR_NAME
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(cache_dir / f"{build_root.name}.lock"):
        if marker.exists():
            return build_root / DEMO_MODEL_DIR_NAME
        _remove_unfinished_builds(build_root)
        staging_root = Path(tempfile.mkdtemp(prefix=f"{build_root.name}.building-", dir=cache_dir))
        staging_root.chmod(0o755)  # mkdtemp makes it private; the finished model is for any reader
        started = time.monotonic()
        logger.info("Building the demo model into %s (about a minute on one CPU core)", build_root)
        try:
            (staging_root / DEMO_MODEL_DIR_NAME).mkdir()
            build_demo_model(staging_root / DEMO_MODEL_DIR_NAME)
            os.rename(staging_root, build_root)
        except BaseException:
            shutil.rmtree(staging_root, ignore_errors=True)
            raise
        build_seconds = time.monotonic() - started
        marker.write_text(f"built in {build_seconds:.1f} s\n")
        logger.info("Built the demo model in %.1f s", build_seconds)
    return build_root / DEMO_MODEL_DIR_NAME


def build_demo_model(out_dir: Path) -> None:
    """Write the demo's model directory into out_dir, an existing empty directory. Deterministic."""
    out_dir = Path(out_dir)
    with single_cpu_thread():
        with _logged_stage("tokenizer"):
            tokenizer = build_tokenizer(
                out_dir,
                vocab_size=TOKENIZER_VOCAB_SIZE,
                extra_text=tokenizer_corpus(TOKENIZER_CORPUS_LINES, seed=SEED),
                seed=SEED,
            )
        with _logged_stage("base model"):
            base_model = train_base_model(tokenizer)
            base_model.save_pretrained(out_dir)
        with tempfile.TemporaryDirectory() as adapters_root:
            for recipe in ADAPTERS:
                with _logged_stage(f"adapter {recipe.name}"):
                    peft_model = train_adapter(base_model, tokenizer, recipe)
                    peft_model.save_pretrained(Path(adapters_root) / recipe.name)
            pack_adapters(Path(adapters_root), out_dir / "adapters.tar.gz")
    write_serving_properties(out_dir, SERVING_PROPERTIES)


def builder_fingerprint() -> str:
    """A hash of this package's source: a changed recipe gets a new directory, never a stale cache."""
    digest = hashlib.sha256()
    for source in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()[:12]


@contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    with lock_path.open("w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


@contextmanager
def _logged_stage(stage: str) -> Iterator[None]:
    started = time.monotonic()
    yield
    logger.info("Demo model: %s ready in %.1f s", stage, time.monotonic() - started)


def _remove_unfinished_builds(build_root: Path) -> None:
    """Remove what a crashed build left: staging directories, or a renamed one never marked complete."""
    for staging_root in build_root.parent.glob(f"{build_root.name}.building-*"):
        shutil.rmtree(staging_root)
    if build_root.exists():
        shutil.rmtree(build_root)
