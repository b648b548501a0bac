"""What a LoRA adapter looks like on disk."""

from __future__ import annotations

from pathlib import Path

from lora_serving.handler.storage.errors import InvalidAdapterError

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # in order of preference


def adapter_weights_file(directory: Path) -> Path | None:
    for file_name in ADAPTER_WEIGHTS_FILES:
        if (directory / file_name).is_file():
            return directory / file_name
    return None


def is_adapter_dir(directory: Path) -> bool:
    return (directory / ADAPTER_CONFIG_FILE).is_file() and adapter_weights_file(directory) is not None


def require_adapter_dir(directory: Path, described_as: str) -> Path:
    """Return `directory` if it holds an adapter, else raise InvalidAdapterError naming what is missing."""
    if not directory.is_dir():
        raise InvalidAdapterError(f"{described_as} is not a directory")
    if not (directory / ADAPTER_CONFIG_FILE).is_file():
        raise InvalidAdapterError(f"{described_as} is not a LoRA adapter: it has no {ADAPTER_CONFIG_FILE}")
    if adapter_weights_file(directory) is None:
        raise InvalidAdapterError(
            f"{described_as} is not a LoRA adapter: it has neither {' nor '.join(ADAPTER_WEIGHTS_FILES)}"
        )
    return directory


def find_adapter_root(unpacked_dir: Path, described_as: str) -> Path:
    """The adapter inside an unpacked archive: its files at the top, or inside one folder
    (what `tar czf a1.tar.gz a1/` produces)."""
    if is_adapter_dir(unpacked_dir):
        return unpacked_dir
    visible = [entry for entry in unpacked_dir.iterdir() if not entry.name.startswith(".")]
    if len(visible) == 1 and visible[0].is_dir() and is_adapter_dir(visible[0]):
        return visible[0]
    raise InvalidAdapterError(
        f"{described_as} holds no LoRA adapter: expected {ADAPTER_CONFIG_FILE} and "
        f"{' or '.join(ADAPTER_WEIGHTS_FILES)} at its top level or inside a single folder"
    )
