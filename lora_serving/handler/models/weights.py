"""Reading a Hugging Face checkpoint's tensors straight from its safetensors files."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from lora_serving.handler.errors import ModelLoadError


class CheckpointTensors:
    """Name -> tensor access over every `*.safetensors` file of a model directory, loaded lazily."""

    def __init__(self, model_dir: str | Path) -> None:
        files = sorted(Path(model_dir).glob("*.safetensors"))
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
