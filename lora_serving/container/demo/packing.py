"""Files of the SageMaker LMI model directory that are not the model itself."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path


def write_serving_properties(model_dir: Path, properties: dict[str, str]) -> None:
    lines = [f"{key}={value}" for key, value in properties.items()]
    (model_dir / "serving.properties").write_text("\n".join(lines) + "\n")


def pack_adapters(adapters_root: Path, archive: Path) -> None:
    """Pack each `adapters_root/<name>/` into `archive` as a top-level folder `<name>/`.

    Members are sorted and carry no times or owners: the archive depends on the adapters' files alone.
    """
    with archive.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as compressed:
        with tarfile.open(fileobj=compressed, mode="w") as tar:
            for adapter_dir in sorted(path for path in adapters_root.iterdir() if path.is_dir()):
                tar.addfile(_member(adapter_dir.name, tarfile.DIRTYPE, 0o755))
                for file in sorted(path for path in adapter_dir.iterdir() if path.is_file()):
                    data = file.read_bytes()
                    member = _member(f"{adapter_dir.name}/{file.name}", tarfile.REGTYPE, 0o644)
                    member.size = len(data)
                    tar.addfile(member, io.BytesIO(data))


def _member(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type = kind
    member.mode = mode
    return member
