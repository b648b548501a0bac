"""The one rule for adapter names: a name becomes a directory name, a URL path segment and a metric label."""

from __future__ import annotations

import re

from lora_serving.handler.errors import InvalidAdapterError

MAX_ADAPTER_NAME_LENGTH = 128
# ASCII only, and never a leading '.' (hidden files, '..').
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def validate_adapter_name(name: str) -> str:
    """Return `name` if it is a safe adapter name, else raise InvalidAdapterError saying why."""
    if not isinstance(name, str) or not name:
        raise InvalidAdapterError("adapter name is empty")
    if len(name) > MAX_ADAPTER_NAME_LENGTH:
        raise InvalidAdapterError(
            f"adapter name {name[:32]!r}... is {len(name)} characters long, over {MAX_ADAPTER_NAME_LENGTH}"
        )
    if not _ADAPTER_NAME.fullmatch(name):
        raise InvalidAdapterError(
            f"adapter name {name!r} is invalid: use ASCII letters, digits, '-', '_' and '.', and do not start with '.'"
        )
    return name
