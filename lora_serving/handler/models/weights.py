"""Reading a Hugging Face checkpoint's tensors straight from its safetensors files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from lora_serving.handler.errors import ModelLoadError

INDEX_FILE = "model.safetensors.index.json"


class CheckpointTensors:
    """Name -> tensor access over a model directory's safetensors files, loaded lazily: the shards its
    `model.safetensors.index.json` names, else every `*.safetensors` file there. Repos that carry another
    format's copy beside the shards (Mistral's `consolidated.safetensors`) must not have it read as well."""

    def __init__(self, model_dir: str | Path) -> None:
        files = _weight_files(Path(model_dir))
        if not files:
            raise ModelLoadError(f"no *.safetensors files in {model_dir}")
        self._handles = [safe_open(str(path), framework="pt") for path in files]
        self._file_of: dict[str, int] = {}
        for index, handle in enumerate(self._handles):
            for name in handle.keys():
                self._file_of[name] = index

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def get(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        if name not in self._file_of:
            raise ModelLoadError(f"checkpoint has no tensor {name!r}")
        return self._handles[self._file_of[name]].get_tensor(name).to(dtype)

    def get_part(self, name: str, dtype: torch.dtype, rows: slice | None = None,
                 columns: slice | None = None) -> torch.Tensor:
        """Rows and/or columns of a 2-D tensor (rows of a 1-D one), read without loading the rest: a
        tensor-parallel rank holds only its shard."""
        if rows is None and columns is None:
            return self.get(name, dtype)
        if name not in self._file_of:
            raise ModelLoadError(f"checkpoint has no tensor {name!r}")
        part = self._handles[self._file_of[name]].get_slice(name)
        rows = rows or slice(None)
        return (part[rows] if columns is None else part[rows, columns]).to(dtype)

    def get_optional(self, name: str, dtype: torch.dtype) -> torch.Tensor | None:
        return self.get(name, dtype) if name in self else None


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / INDEX_FILE
    if not index.is_file():
        return sorted(model_dir.glob("*.safetensors"))
    try:
        shards = shards_named_by_index(index)
    except ValueError as error:
        raise ModelLoadError(str(error)) from None
    missing = [shard for shard in shards if not (model_dir / shard).is_file()]
    if missing:
        raise ModelLoadError(f"{index} names shards that are not in {model_dir}: {', '.join(missing[:3])}")
    return [model_dir / shard for shard in shards]


def shards_named_by_index(index: Path) -> list[str]:
    """The shard files a safetensors index maps tensors to, each beside the index; ValueError otherwise."""
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{index.name} is not a safetensors index ({error})") from None
    if any(not isinstance(shard, str) or "/" in shard or shard.startswith(".") for shard in shards):
        raise ValueError(f"{index.name} names a shard outside its own directory")
    return shards
