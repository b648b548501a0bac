"""`option.adapter_resolver` for the DJL handler, which has no S3 or archive code of its own (DJL downloads its
model itself; container/ holds the rest): an adapter from the Hub (`hf://org/` -> repo org/<name>) or a local
directory (`<dir>/<name>/`, which must stay inside `<dir>`, links included).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from lora_serving.handler.config import Config
from lora_serving.handler.errors import AdapterError, ConfigError, InvalidAdapterError
from lora_serving.handler.hub import HubContentError, HubError, HubRepoNotFoundError, HubSettings, fetch_adapter
from lora_serving.handler.lora.resolver import AdapterResolver, Fetch, ResolverLocation, missing


def make_handler_resolver(engine, config: Config, hub: HubSettings) -> AdapterResolver | None:
    if not config.adapter_resolver or not config.enable_lora:
        return None
    location = ResolverLocation.parse(config.adapter_resolver)
    if location.kind == "s3":
        raise ConfigError("adapter_resolver", config.adapter_resolver,
                          "the DJL handler resolves adapters from hf://org/ or a local directory; s3:// is the "
                          "container's server's (python -m lora_serving.container.serve)")
    cache_dir = Path(config.cache_dir).expanduser() if config.cache_dir else Path.home() / ".cache" / "lora-serving"
    return AdapterResolver(engine, location, handler_fetch(location, hub, config.max_archive_bytes),
                           cache_dir / "resolved-adapters", max_resolved=config.max_disk_loras)


def handler_fetch(location: ResolverLocation, hub: HubSettings, max_total_bytes: int) -> Fetch:
    def fetch(name: str, directory: Path) -> Path:
        if location.kind == "hf":
            return _from_hub(location, name, dataclasses.replace(hub, cache_dir=directory / "hub"), max_total_bytes)
        return _from_local_dir(location, name)

    return fetch


def _from_hub(location: ResolverLocation, name: str, hub: HubSettings, max_total_bytes: int) -> Path:
    try:
        return fetch_adapter(f"{location.base}/{name}", "", hub, max_total_bytes=max_total_bytes)
    except HubRepoNotFoundError:
        raise missing(location, name) from None
    except HubContentError as error:
        raise InvalidAdapterError(str(error)) from None
    except HubError as error:  # unreachable, access denied
        raise AdapterError(str(error)) from None


def _from_local_dir(location: ResolverLocation, name: str) -> Path:
    root = Path(location.base)
    path = root / name
    if not path.exists() and not path.is_symlink():
        raise missing(location, name)
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise InvalidAdapterError(f"adapter {name}: {path} resolves to {resolved}, outside {root}")
    if not resolved.is_dir():
        raise InvalidAdapterError(f"adapter {name}: {path} is not a directory")
    for parent, dir_names, file_names in os.walk(resolved):
        for entry_name in dir_names + file_names:
            entry = Path(parent) / entry_name
            if entry.is_symlink() and not entry.resolve().is_relative_to(root):
                raise InvalidAdapterError(f"adapter {name}: {entry} links outside {root}")
    return resolved
