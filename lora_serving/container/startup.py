"""Start-up (SPEC section 2): configuration, the model (local, downloaded from S3 or the Hub, or the demo), the
adapters the model directory brings, the engine and its loop. Runs in a thread while the server already
answers /ping with 503; any error here ends the process with its message.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

from lora_serving.container.adapter_layout import ADAPTERS_ARCHIVE, ADAPTERS_DIR, find_startup_adapters
from lora_serving.container.adapter_manager import AdapterManager
from lora_serving.container.metrics import ServerMetrics
from lora_serving.container.runtime import Runtime
from lora_serving.handler.storage.s3 import is_s3_url, make_s3_client
from lora_serving.handler.storage.s3_cache import download_s3_prefix
from lora_serving.handler import Config, Engine
from lora_serving.handler.engine_loop import EngineLoop
from lora_serving.handler.errors import ConfigError
from lora_serving.handler.generation_runner import GenerationRunner
from lora_serving.handler.hub import HubSettings, fetch_model_for, is_hub_id, served_model_name
from lora_serving.handler.lora.resolver_fetch import make_adapter_resolver

logger = logging.getLogger(__name__)


def load_runtime(model_dir: Path, env: Mapping[str, str], event_loop: asyncio.AbstractEventLoop,
                 metrics: ServerMetrics, on_fatal_error: Callable[[str], None] | None = None) -> Runtime:
    """`on_fatal_error(message)`: the engine stopped for good after start-up (a tensor-parallel rank died)."""
    config = Config.load(model_dir, env)
    cache_dir = config.cache_path
    if not _model_configured(model_dir, config):
        from lora_serving.container.demo.build import (
            ensure_demo_model,  # the demo's training code is not needed otherwise
        )

        logger.warning("no model in %s and no option.model_id / HF_MODEL_ID: serving the demo model", model_dir)
        model_dir = ensure_demo_model(cache_dir)
        config = Config.load(model_dir, env)
    s3_client = make_s3_client()
    hub = HubSettings.from_env(env)
    model_name = served_model_name(config.model_id)
    local_dir = _local_model_dir(config, hub, cache_dir, s3_client)
    config = dataclasses.replace(config, model_id=str(local_dir))

    startup_adapters: dict[str, Path] = {}
    if config.enable_lora:
        startup_adapters = find_startup_adapters(local_dir, cache_dir=cache_dir, archive=config.adapters_url or None,
                                                 client=s3_client, max_total_bytes=config.max_archive_bytes)
    elif (local_dir / ADAPTERS_ARCHIVE).exists() or (local_dir / ADAPTERS_DIR).is_dir() or config.adapters_url:
        logger.warning("%s brings adapters but option.enable_lora is false: they are not served", local_dir)

    engine = Engine(config=config)
    try:
        return _serve(engine, config, model_dir, local_dir, cache_dir, s3_client, hub, startup_adapters, event_loop,
                      metrics, model_name, on_fatal_error)
    except BaseException:
        engine.close()  # the other tensor-parallel ranks, if any, must not outlive a failed start
        raise


def _serve(engine: Engine, config: Config, model_dir: Path, local_dir: Path, cache_dir: Path, s3_client,
           hub: HubSettings, startup_adapters: dict[str, Path], event_loop: asyncio.AbstractEventLoop, metrics: ServerMetrics,
           model_name: str, on_fatal_error: Callable[[str], None] | None) -> Runtime:
    """The adapters the model directory brings, the engine loop and the runner around a loaded engine."""
    adapter_dirs = {path.parent for path in startup_adapters.values()}
    adapters = AdapterManager(
        engine,
        cache_dir=cache_dir,
        # Where clients may register local adapters from: the model directories and the operator's roots.
        allowed_roots=list(dict.fromkeys([model_dir, local_dir, *adapter_dirs,
                                          *(Path(root) for root in config.adapter_source_roots)])),
        s3_client=s3_client,
        max_archive_bytes=config.max_archive_bytes,
        hub=hub,
    )
    for name, path in startup_adapters.items():
        adapters.register_local(name, path)
    if config.enable_lora:
        logger.info("adapters: %s", ", ".join(info.name for info in engine.list_adapters()) or "none")

    resolver = make_adapter_resolver(engine, config, hub=hub, s3_client=s3_client)
    if resolver is not None:
        logger.info("adapters not registered are looked up on first use at %s (at most %d kept, "
                    "option.max_disk_loras)", resolver.location, config.max_disk_loras)
    engine_loop = EngineLoop(engine, event_loop, on_fatal_error)
    engine_loop.start()
    metrics.watch_engine(engine, resolver)
    runner = GenerationRunner(engine_loop, on_first_token=metrics.time_to_first_token.observe,
                              on_next_token=metrics.inter_token_latency.observe, resolver=resolver)
    return Runtime(config=config, engine=engine, engine_loop=engine_loop, runner=runner, adapters=adapters,
                   model_name=model_name, resolver=resolver)


def _model_configured(model_dir: Path, config: Config) -> bool:
    # Config.load makes the model directory itself the model when nothing else is configured.
    return config.model_id != str(model_dir) or (model_dir / "config.json").is_file()


def _local_model_dir(config: Config, hub: HubSettings, cache_dir: Path, s3_client) -> Path:
    model_id = config.model_id
    if is_s3_url(model_id):
        logger.info("fetching %s into %s", model_id, cache_dir)
        return download_s3_prefix(model_id, cache_dir, client=s3_client)
    path = Path(model_id)
    if path.is_dir():
        return path
    if is_hub_id(model_id):
        return fetch_model_for(config, hub)
    raise ConfigError("model_id", model_id, "is neither a local directory, an s3:// URL nor a Hugging Face Hub id "
                      "(org/name)")
