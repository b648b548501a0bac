"""Errors the engine raises to its callers; the HTTP layer maps each class to one status code."""

from __future__ import annotations


class EngineError(Exception):
    """Base class: a problem the caller can act on, with a message that names it."""


class ConfigError(EngineError, ValueError):
    """A configuration value that cannot be used; names the key."""

    def __init__(self, key: str, value: object, reason: str) -> None:
        self.key = key
        self.value = value
        super().__init__(f"option.{key}={value!r}: {reason}")


class InvalidRequestError(EngineError, ValueError):
    """A request that can never be served as asked (bad parameters, too long for the model or cache)."""


class ModelLoadError(EngineError):
    """The model directory cannot be loaded (missing files, unsupported architecture)."""


class AdapterError(EngineError):
    """Base class for adapter problems."""


class LoraNotEnabledError(AdapterError):
    """An adapter operation on an engine started without option.enable_lora."""


class AdapterNotFoundError(AdapterError, KeyError):
    """The named adapter is not registered."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class AdapterExistsError(AdapterError):
    """An adapter of that name is already registered."""


class AdapterCapacityError(AdapterError):
    """No room to hold another adapter (e.g. every slot pinned)."""


class InvalidAdapterError(AdapterError, ValueError):
    """The adapter's files cannot be served exactly by this engine; the message says why."""


class RankFailedError(Exception):
    """A tensor-parallel rank died or stopped answering: the engine cannot serve any more, and the process
    must exit with this message. Not an EngineError: nothing a caller can fix by sending something else."""

    def __init__(self, message: str, rank: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank
