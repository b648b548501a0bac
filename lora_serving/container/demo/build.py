"""Build the demo's LMI model directory once per recipe, and find it in the cache afterwards.

The model directory holds config.json + model.safetensors (the base model), the tokenizer files,
serving.properties and adapters.tar.gz (one top-level folder per adapter, as PEFT saved it).
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from lora_serving.container.demo.adapters import train_adapter
from lora_serving.container.demo.base_model import train_base_model
# The marker is imported from here by callers that check a build.
from lora_serving.container.demo.build_cache import BUILD_COMPLETE_MARKER, build_once  # noqa: F401
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


def ensure_demo_model(cache_dir: Path) -> Path:
    """Return the demo model directory under cache_dir, building it first if it is not there yet.

    The model lives in `cache_dir/demo-<hash of the builder's source>/demo-model/`, built once (build_once's
    rules: atomic, crash-safe, one build for concurrent callers).
    """
    # build_demo_model looked up at build time, so that tests may replace it.
    return build_once(cache_dir, f"demo-{builder_fingerprint()}", DEMO_MODEL_DIR_NAME,
                      lambda out_dir: build_demo_model(out_dir), "the demo model (about a minute on one CPU core)")


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
def _logged_stage(stage: str) -> Iterator[None]:
    started = time.monotonic()
    yield
    logger.info("Demo model: %s ready in %.1f s", stage, time.monotonic() - started)
