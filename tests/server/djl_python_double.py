"""A test double of djl_python's `Input` and `Output`, following their documented surface (djl-serving's
engines/python/setup/djl_python): what DJL's Java front end hands a Python handler, and what it reads back.

Input: properties (str -> str; a batch has `batch_size` and `batch_NNN_<name>` keys) and content (an
ordered list of key -> bytes; a batch's keys are `batch_NNN_<name>`), read with get_properties,
get_property (case-insensitive), is_empty, is_batch, get_batches, get_as_bytes / get_as_string / get_as_json.
Output: code, message, properties and content; add(value, key, batch_index) stores str as UTF-8, bytes as
they are and anything else as JSON, under `batch_<index>.<key>` when batch_index is given; error(msg, code)
sets the code and a JSON body {"code", "message", "error"}.
"""

from __future__ import annotations

import json
import sys
import types


class Input:
    def __init__(self, properties: dict[str, str] | None = None, content: list[tuple[str, bytes]] | None = None):
        self.properties = dict(properties or {})
        self.content = list(content or [])

    def get_properties(self) -> dict[str, str]:
        return self.properties

    def get_property(self, key: str) -> str | None:
        return next((value for name, value in self.properties.items() if name.lower() == key.lower()), None)

    def is_empty(self) -> bool:
        return not self.content

    def is_batch(self) -> bool:
        return "batch_size" in self.properties

    def get_batches(self) -> list[Input]:
        if not self.is_batch():
            return [self]
        batches = [Input() for _ in range(int(self.properties["batch_size"]))]
        for name, value in self.properties.items():
            if name.startswith("batch_") and name != "batch_size":
                batches[int(name[6:9])].properties[name[10:]] = value
        for name, value in self.content:
            batches[int(name[6:9])].content.append((name[10:], value))
        return batches

    def get_as_bytes(self, key: str | None = None) -> bytes | None:
        if not self.content:
            return None
        if key is not None:
            return dict(self.content)[key]
        return dict(self.content).get("data", self.content[0][1])

    def get_as_string(self, key: str | None = None) -> str:
        return self.get_as_bytes(key).decode("utf-8")

    def get_as_json(self, key: str | None = None):
        return json.loads(self.get_as_string(key))


class Output:
    def __init__(self, code: int = 200, message: str = "OK"):
        self.code = code
        self.message = message
        self.properties: dict[str, str] = {}
        self.content: list[tuple[str | None, bytes]] = []

    def add_property(self, key: str, value: str) -> Output:
        self.properties[key] = value
        return self

    def add(self, value, key: str | None = None, batch_index: int | None = None) -> Output:
        if batch_index is not None:
            key = f"batch_{batch_index}.{key or ''}"
        if isinstance(value, str):
            value = value.encode("utf-8")
        elif not isinstance(value, (bytes, bytearray)):
            value = json.dumps(value).encode("utf-8")
        self.content.append((key, bytes(value)))
        return self

    def add_as_json(self, value, key: str | None = None, batch_index: int | None = None) -> Output:
        return self.add(json.dumps(value), key=key, batch_index=batch_index)

    def error(self, error: str, code: int = 424, message: str = "prediction failure") -> Output:
        self.code = code
        self.message = message
        self.add_property("content-type", "application/json")
        return self.add_as_json({"code": code, "message": message, "error": error})


def as_module() -> types.ModuleType:
    module = types.ModuleType("djl_python")
    module.Input = Input
    module.Output = Output
    return module


def install(monkeypatch) -> None:
    """Make `import djl_python` find this double (and forget any handler module imported without it)."""
    monkeypatch.setitem(sys.modules, "djl_python", as_module())
    monkeypatch.delitem(sys.modules, "handler.model", raising=False)


def batch(bodies: list[bytes], item_properties: list[dict[str, str]] | None = None) -> Input:
    """A batch as DJL builds it: `batch_size`, then `batch_NNN_`-prefixed properties and content."""
    properties = {"batch_size": str(len(bodies))}
    for index, extra in enumerate(item_properties or [{}] * len(bodies)):
        properties[f"batch_{index:03d}_Content-Type"] = "application/json"
        properties.update({f"batch_{index:03d}_{name}": value for name, value in extra.items()})
    return Input(properties, [(f"batch_{index:03d}_data", body) for index, body in enumerate(bodies)])
