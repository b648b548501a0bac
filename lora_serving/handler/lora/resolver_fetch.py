"""`option.adapter_resolver` for the server and the DJL handler alike: how a name becomes a local adapter
directory, from S3, the Hub or a local directory, through the same `resolve_adapter_source` (and so the same
safety rules and errors) as a registration through the management API. Resolution itself (sharing, misses, the
disk bound) is resolver.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lora_serving.handler.config import Config
from lora_serving.handler.hub import HF_URL_SCHEME, HubSettings
from lora_serving.handler.lora.resolver import AdapterResolver, Fetch, Fetched, ResolverLocation, missing
from lora_serving.handler.storage.adapter_source import resolve_adapter_source
from lora_serving.handler.storage.errors import SourceNotFoundError
from lora_serving.handler.storage.s3 import make_s3_client

RESOLVED_ADAPTERS_DIR = "resolved-adapters"


def make_adapter_resolver(engine, config: Config, *, hub: HubSettings, s3_client=None) -> AdapterResolver | None:
    """None when option.adapter_resolver is not set; ConfigError naming the key when it is malformed.
    `s3_client`: the caller's, shared with its other downloads; an s3:// resolver makes one when it is None."""
    if not config.adapter_resolver or not config.enable_lora:
        return None
    location = ResolverLocation.parse(config.adapter_resolver)
    if location.kind == "s3" and s3_client is None:
        s3_client = make_s3_client()
    fetch = resolver_fetch(location, s3_client=s3_client, hub=hub, max_total_bytes=config.max_archive_bytes)
    return AdapterResolver(engine, location, fetch, config.cache_path / RESOLVED_ADAPTERS_DIR,
                           max_resolved=config.max_disk_loras)


def resolver_fetch(location: ResolverLocation, *, s3_client, hub: HubSettings, max_total_bytes: int) -> Fetch:
    def fetch(name: str, directory: Path) -> Fetched:
        # The Hub's cache for this adapter lives in its own directory too, so that eviction frees it.
        own_hub = dataclasses.replace(hub, cache_dir=directory / "hub")
        for src in candidate_sources(location, name):
            try:
                path = resolve_adapter_source(src, allowed_roots=[location.base] if location.kind == "local" else [],
                                              cache_dir=directory, client=s3_client, hub=own_hub,
                                              max_total_bytes=max_total_bytes)
            except SourceNotFoundError:
                continue
            return Fetched(path, src)
        raise missing(location, name)

    return fetch


def candidate_sources(location: ResolverLocation, name: str) -> list[str]:
    """Where `name` may be, in the order looked at: its folder, then its archive (a Hub repo is one place).
    `name` has passed validate_adapter_name, so it holds no '/' and cannot leave the location."""
    if location.kind == "hf":
        return [f"{HF_URL_SCHEME}{location.base}/{name}"]
    base = location.base if location.kind == "s3" else location.base.rstrip("/") + "/"
    return [f"{base}{name}/" if location.kind == "s3" else f"{base}{name}", f"{base}{name}.tar.gz"]
