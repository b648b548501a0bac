"""Adapter management for the server: check the name, turn the `src` into a local directory (downloading
or unpacking it, see docs/STORAGE.md), then register it with the engine.

Every method blocks (file and network I/O): the routes call them with asyncio.to_thread.
"""

from __future__ import annotations

from pathlib import Path

from lora_serving.handler.storage.adapter_source import resolve_adapter_source
from lora_serving.handler import Engine
from lora_serving.handler.errors import LoraNotEnabledError
from lora_serving.handler.hub import HubSettings
from lora_serving.handler.lora.names import validate_adapter_name


class AdapterManager:
    def __init__(
        self,
        engine: Engine,
        *,
        cache_dir: Path,
        allowed_roots: list[Path],
        s3_client,
        max_archive_bytes: int,
        hub: HubSettings | None = None,
    ) -> None:
        self._engine = engine
        self._cache_dir = cache_dir
        self._allowed_roots = allowed_roots
        self._s3_client = s3_client
        self._hub = hub
        self._max_archive_bytes = max_archive_bytes

    def register(self, name: str, src: str, *, preload: bool = True, pin: bool = False) -> None:
        # Checked before anything is downloaded or unpacked for an engine that cannot use it.
        if not self._engine.config.enable_lora:
            raise LoraNotEnabledError("LoRA is not enabled (set option.enable_lora=true)")
        validate_adapter_name(name)
        path = self._resolve(src)
        # Listed with the src the client wrote, not the cache directory it was downloaded into.
        self._engine.register_adapter(name, path, pin=pin, preload=preload, source=src)

    def register_local(self, name: str, path: Path) -> None:
        """A start-up adapter, already on local disk; skipped if the engine registered it itself."""
        if name not in {info.name for info in self._engine.list_adapters()}:
            self._engine.register_adapter(name, path, preload=False)

    def update(self, name: str, *, src: str | None = None, pin: bool | None = None) -> None:
        path = self._resolve(src) if src else None
        self._engine.update_adapter(name, path, pin=pin, source=src)

    def unregister(self, name: str) -> None:
        self._engine.unregister_adapter(name)

    def describe(self, name: str) -> dict:
        return self._description(self._engine.get_adapter(name))

    def list(self) -> list[dict]:
        return [self._description(info) for info in self._engine.list_adapters()]

    def _resolve(self, src: str) -> Path:
        return resolve_adapter_source(src, allowed_roots=self._allowed_roots, cache_dir=self._cache_dir,
                                      client=self._s3_client, hub=self._hub, max_total_bytes=self._max_archive_bytes)

    def _description(self, info) -> dict:
        # DJL's fields (name, src, pin) first, then what this engine knows beyond them.
        return {
            "name": info.name,
            "src": info.source,
            "pin": info.pinned,
            "tier": info.tier,
            "ranks": info.ranks,
            "load_seconds": info.load_seconds,
            "tokens_served": info.tokens_served,
            "content_hash": info.content_hash,
        }
