"""DJL's adapter calls: `register_adapter`, `update_adapter`, `unregister_adapter`.

What DJL sends (PyAdapter.java): the properties `name`, `alias` (null unless the management call had the
`X-Amzn-SageMaker-Adapter-Alias` header) and `src` (unregister: name and alias only), and the
registration's options as content items: every query parameter of the management call, `preload` and
`pin` among them. DJL checks that `src` is a local path (it refuses URLs) and, with
`option.enable_lora`, registers every entry of `<model_dir>/adapters/` this way itself before the first
request, which is why the handler does not register them on its own.

Registering a name again from the same directory answers success and changes nothing (pinning it if
asked), so that a repeated start-up registration is harmless; from another directory it is a conflict.
Messages name the adapter by its alias, as DJL's do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lora_serving.handler.engine import Engine
from lora_serving.handler.errors import AdapterNotFoundError, InvalidAdapterError, InvalidRequestError
from lora_serving.handler.api.sagemaker import adapter_registered, adapter_unregistered, adapter_updated


@dataclass(frozen=True, slots=True)
class AdapterCall:
    name: str
    alias: str
    src: str | None
    preload: bool | None
    pin: bool | None

    @classmethod
    def read(cls, inputs) -> AdapterCall:
        name = inputs.get_property("name")
        if not name:
            raise InvalidRequestError("the adapter call has no 'name'")
        return cls(name=name, alias=inputs.get_property("alias") or name, src=inputs.get_property("src"),
                   preload=_option(inputs, "preload"), pin=_option(inputs, "pin"))


def _option(inputs, key: str) -> bool | None:
    """A registration option: DJL sends it as a content item; a property is read too, for other callers."""
    value = inputs.get_as_string(key) if inputs.contains_key(key) else inputs.get_property(key)
    if value is None:
        return None
    text = value.strip().lower()
    if text not in ("true", "false"):
        raise InvalidRequestError(f"the adapter option {key}={value!r} must be true or false")
    return text == "true"


class DjlAdapters:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def register(self, call: AdapterCall) -> str:
        path = _local_directory(call.src)
        if call.preload is False and call.pin:
            raise InvalidRequestError(f"adapter {call.alias}: an adapter that is not preloaded cannot be pinned "
                                      "(preload=false, pin=true)")
        existing = self._registered(call.name)
        if existing is not None and Path(existing.path).resolve() == path.resolve():
            if call.pin and not existing.pinned:
                self._engine.update_adapter(call.name, pin=True)
            return adapter_registered(call.alias)
        self._engine.register_adapter(call.name, path, pin=bool(call.pin),
                                      preload=call.preload is not False)
        return adapter_registered(call.alias)

    def update(self, call: AdapterCall) -> str:
        existing = self._engine.get_adapter(call.name)
        path = _local_directory(call.src) if call.src else None
        if path is not None and Path(existing.path).resolve() == path.resolve():
            path = None  # the same files: only the options change
        self._engine.update_adapter(call.name, path, pin=call.pin)
        return adapter_updated(call.alias)

    def unregister(self, call: AdapterCall) -> str:
        self._engine.unregister_adapter(call.name)
        return adapter_unregistered(call.alias)

    def _registered(self, name: str):
        try:
            return self._engine.get_adapter(name)
        except AdapterNotFoundError:
            return None


def _local_directory(src: str | None) -> Path:
    if not src:
        raise InvalidRequestError("the adapter call has no 'src'")
    path = Path(src)
    if not path.is_dir():
        raise InvalidAdapterError(f"{src} is not a local adapter directory (DJL registers local adapters only)")
    return path
