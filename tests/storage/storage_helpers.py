"""Builders for the storage tests: PEFT-like adapter folders and tar archives, hostile ones included."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file


def write_adapter(directory: Path, *, rank: int = 4, hidden: int = 16, seed: int = 0) -> Path:
    """A small adapter as PEFT saves it: adapter_config.json and adapter_model.safetensors."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "tiny-llama",
    }
    (directory / "adapter_config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(seed)
    prefix = "base_model.model.model.layers.0.self_attn"
    tensors = {
        f"{prefix}.{module}.lora_{part}.weight": rng.standard_normal(shape).astype(np.float32)
        for module in ("q_proj", "v_proj")
        for part, shape in (("A", (rank, hidden)), ("B", (hidden, rank)))
    }
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory


def tar_directory(archive: Path, source_dir: Path, *, arcname: str = ".") -> Path:
    """`tar czf archive -C source_dir arcname`, as a user would build it."""
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source_dir, arcname=arcname)
    return archive


def tar_with_entries(archive: Path, entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    """A tar.gz holding exactly the given entries; a bytes payload sets the entry's size."""
    with tarfile.open(archive, "w:gz") as tar:
        for info, payload in entries:
            if payload is None:
                tar.addfile(info)
            else:
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return archive


def file_entry(name: str, payload: bytes = b"data") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), payload


def special_entry(name: str, entry_type: bytes, *, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = entry_type
    info.linkname = linkname
    return info, None


def tree_snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Relative path -> (inode, mtime_ns) of every file: unchanged only if nothing was rewritten."""
    return {
        str(path.relative_to(directory)): (path.stat().st_ino, path.stat().st_mtime_ns)
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }
