"""Start-up adapters: `<model_dir>/adapters/<name>/`, unpacked first from adapters.tar.gz."""

from __future__ import annotations

import errno
import tarfile
import tempfile
from pathlib import Path

import pytest

from lora_serving.container import adapter_layout
from lora_serving.container.adapter_layout import discover_adapters, find_startup_adapters, unpack_adapters_archive
from lora_serving.handler.storage.errors import InvalidAdapterError, StorageError, UnsafeSourceError
from tests.storage.storage_helpers import (
    file_entry,
    special_entry,
    tar_directory,
    tar_with_entries,
    tree_snapshot,
    write_adapter,
)


def adapters_tree(root: Path, names=("a1", "a2")) -> Path:
    for seed, name in enumerate(names):
        write_adapter(root / name, seed=seed)
    return root


def test_discover_finds_adapter_folders_and_skips_the_rest(tmp_path):
    adapters = adapters_tree(tmp_path / "adapters", names=("a1", "b.v2"))
    legacy = adapters / "legacy-bin"
    legacy.mkdir()
    (legacy / "adapter_config.json").write_text("{}")
    (legacy / "adapter_model.bin").write_bytes(b"torch pickle")
    (adapters / "no-weights").mkdir()
    (adapters / "no-weights" / "adapter_config.json").write_text("{}")
    write_adapter(adapters / ".hidden")
    write_adapter(adapters / "bad name")
    (adapters / "notes.txt").write_text("not a folder")

    found = discover_adapters(adapters)

    assert found == {"a1": adapters / "a1", "b.v2": adapters / "b.v2", "legacy-bin": legacy}


def test_discover_without_adapters_dir_is_empty(tmp_path):
    assert discover_adapters(tmp_path / "absent") == {}


@pytest.mark.parametrize("wrapped", [False, True], ids=["top-level-folders", "under-adapters-folder"])
def test_archive_in_model_dir_unpacks_into_adapters_dir(tmp_path, wrapped):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    source = tmp_path / "src"
    adapters_tree(source / "adapters" if wrapped else source)
    tar_directory(model_dir / "adapters.tar.gz", source)

    unpacked = unpack_adapters_archive(model_dir, cache_dir=tmp_path / "cache")

    assert unpacked == model_dir / "adapters"
    assert discover_adapters(unpacked) == {"a1": unpacked / "a1", "a2": unpacked / "a2"}
    assert sorted(path.name for path in model_dir.iterdir()) == ["adapters", "adapters.tar.gz"]


def test_second_start_does_not_unpack_again_and_a_changed_archive_replaces(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    tar_directory(model_dir / "adapters.tar.gz", adapters_tree(tmp_path / "v1"))
    first = unpack_adapters_archive(model_dir, cache_dir=tmp_path / "cache")
    before = tree_snapshot(first)

    assert unpack_adapters_archive(model_dir, cache_dir=tmp_path / "cache") == first
    assert tree_snapshot(first) == before

    tar_directory(model_dir / "adapters.tar.gz", adapters_tree(tmp_path / "v2", names=("a3",)))
    again = unpack_adapters_archive(model_dir, cache_dir=tmp_path / "cache")

    assert again == first
    assert list(discover_adapters(again)) == ["a3"]
    assert not any(path.name.startswith(".adapters.unpacking-") for path in model_dir.iterdir())


def test_read_only_model_dir_unpacks_into_the_cache(tmp_path, monkeypatch):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    tar_directory(model_dir / "adapters.tar.gz", adapters_tree(tmp_path / "src"))
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp_on_read_only_model_dir(*args, dir=None, **kwargs):
        # What mkdir answers under a read-only mount (SageMaker's /opt/ml/model); the tests run
        # as root, for whom permission bits alone would not make a directory read-only.
        if dir is not None and Path(dir) == model_dir:
            raise OSError(errno.EROFS, "Read-only file system", str(dir))
        return real_mkdtemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(adapter_layout.tempfile, "mkdtemp", mkdtemp_on_read_only_model_dir)

    unpacked = unpack_adapters_archive(model_dir, cache_dir=tmp_path / "cache")

    assert unpacked.is_relative_to(tmp_path / "cache")
    assert sorted(discover_adapters(unpacked)) == ["a1", "a2"]
    assert sorted(path.name for path in model_dir.iterdir()) == ["adapters.tar.gz"]
    before = tree_snapshot(unpacked)
    assert unpack_adapters_archive(model_dir, cache_dir=tmp_path / "cache") == unpacked
    assert tree_snapshot(unpacked) == before


def test_adapters_archive_from_s3(s3, tmp_path):
    archive = tar_directory(tmp_path / "adapters.tar.gz", adapters_tree(tmp_path / "src"))
    s3.create_bucket(Bucket="adapters-bucket")
    s3.upload_file(str(archive), "adapters-bucket", "llama/adapters.tar.gz")
    model_dir = tmp_path / "model"
    model_dir.mkdir()

    found = find_startup_adapters(
        model_dir, cache_dir=tmp_path / "cache", archive="s3://adapters-bucket/llama/adapters.tar.gz"
    )

    assert sorted(found) == ["a1", "a2"]
    assert (found["a1"] / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "src" / "a1" / "adapter_model.safetensors"
    ).read_bytes()


def test_startup_adapters_without_archive_come_from_adapters_dir(tmp_path):
    model_dir = tmp_path / "model"
    adapters_tree(model_dir / "adapters")

    assert sorted(find_startup_adapters(model_dir, cache_dir=tmp_path / "cache")) == ["a1", "a2"]
    assert find_startup_adapters(tmp_path / "cache", cache_dir=tmp_path / "cache") == {}


def test_hostile_adapters_archive_is_refused_and_leaves_nothing(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    tar_with_entries(
        model_dir / "adapters.tar.gz",
        [
            file_entry("a1/adapter_config.json", b"{}"),
            special_entry("a1/adapter_model.safetensors", tarfile.SYMTYPE, linkname="/etc/passwd"),
        ],
    )

    with pytest.raises(UnsafeSourceError, match=r"'a1/adapter_model\.safetensors'.*symbolic link"):
        unpack_adapters_archive(model_dir, cache_dir=tmp_path / "cache")
    assert sorted(path.name for path in model_dir.iterdir()) == ["adapters.tar.gz"]


def test_archive_without_adapters_is_refused(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    tar_with_entries(model_dir / "adapters.tar.gz", [file_entry("readme.txt", b"no adapters here")])

    with pytest.raises(InvalidAdapterError, match="holds no adapters"):
        unpack_adapters_archive(model_dir, cache_dir=tmp_path / "cache")
    assert sorted(path.name for path in model_dir.iterdir()) == ["adapters.tar.gz"]


def test_archive_beside_a_hand_made_adapters_dir_is_a_clear_error(tmp_path):
    model_dir = tmp_path / "model"
    adapters_tree(model_dir / "adapters", names=("mine",))
    tar_directory(model_dir / "adapters.tar.gz", adapters_tree(tmp_path / "src"))

    with pytest.raises(StorageError, match=r"adapters and the adapters archive .*adapters\.tar\.gz exist; keep only"):
        unpack_adapters_archive(model_dir, cache_dir=tmp_path / "cache")
    assert list(discover_adapters(model_dir / "adapters")) == ["mine"]
