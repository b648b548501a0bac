"""Registration sources: local directories and archives inside the allowed roots, s3:// adapter
directories and archives."""

from __future__ import annotations

import pytest

from lora_serving.handler.storage.adapter_source import resolve_adapter_source
from lora_serving.handler.storage.errors import (
    BadSourceError,
    InvalidAdapterError,
    SourceNotFoundError,
    UnsafeSourceError,
)
from tests.storage.storage_helpers import file_entry, tar_directory, tar_with_entries, write_adapter

BUCKET = "adapters-bucket"


@pytest.fixture
def roots(tmp_path):
    """An allowed root holding adapters, a cache, and a directory outside every allowed root."""
    allowed, cache, outside = tmp_path / "allowed", tmp_path / "cache", tmp_path / "outside"
    for directory in (allowed, cache, outside):
        directory.mkdir()
    return allowed, cache, outside


def resolve(src, allowed, cache, **kwargs):
    return resolve_adapter_source(str(src), allowed_roots=[allowed], cache_dir=cache, **kwargs)


def test_local_adapter_dir_inside_an_allowed_root(roots):
    allowed, cache, _ = roots
    adapter = write_adapter(allowed / "a1")

    assert resolve(adapter, allowed, cache) == adapter.resolve()


def test_symlinked_root_and_links_that_stay_inside_are_accepted(roots, tmp_path):
    allowed, cache, _ = roots
    real = write_adapter(allowed / "real")
    (allowed / "alias").symlink_to(real)
    (tmp_path / "root-link").symlink_to(allowed)

    assert resolve(allowed / "alias", allowed, cache) == real.resolve()
    assert resolve(real, tmp_path / "root-link", cache) == real.resolve()


@pytest.mark.parametrize("src", ["/etc/passwd", "/etc", "/"])
def test_paths_outside_the_roots_are_refused(roots, src):
    allowed, cache, _ = roots
    with pytest.raises(UnsafeSourceError, match=f"adapter src '{src}' resolves to .*outside the allowed local roots"):
        resolve(src, allowed, cache)


def test_dot_dot_escape_is_refused(roots):
    allowed, cache, outside = roots
    write_adapter(outside / "a1")

    with pytest.raises(UnsafeSourceError, match="outside the allowed local roots"):
        resolve(f"{allowed}/../outside/a1", allowed, cache)
    with pytest.raises(UnsafeSourceError, match="outside the allowed local roots"):
        resolve(f"{allowed}/../../../../../../etc/passwd", allowed, cache)


def test_symlink_inside_a_root_pointing_outside_is_refused(roots):
    allowed, cache, outside = roots
    write_adapter(outside / "secret")
    (allowed / "innocent").symlink_to(outside / "secret")

    with pytest.raises(UnsafeSourceError, match=f"resolves to {outside / 'secret'}, outside"):
        resolve(allowed / "innocent", allowed, cache)


def test_adapter_file_linking_outside_is_refused(roots):
    allowed, cache, outside = roots
    adapter = write_adapter(allowed / "a1")
    (outside / "stolen.safetensors").write_bytes(b"secret")
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.safetensors").symlink_to(outside / "stolen.safetensors")

    with pytest.raises(UnsafeSourceError, match=r"adapter_model\.safetensors, a link to .*outside"):
        resolve(adapter, allowed, cache)


def test_no_roots_means_no_local_sources(roots):
    allowed, cache, _ = roots
    adapter = write_adapter(allowed / "a1")

    with pytest.raises(UnsafeSourceError, match="none configured"):
        resolve_adapter_source(str(adapter), allowed_roots=[], cache_dir=cache)


def test_relative_and_empty_sources_are_refused(roots):
    allowed, cache, _ = roots
    with pytest.raises(BadSourceError, match="must be an absolute path, an s3:// URL or an hf://org/name Hub repo"):
        resolve("adapters/a1", allowed, cache)
    with pytest.raises(BadSourceError, match="empty"):
        resolve("", allowed, cache)


def test_missing_local_path_is_not_found(roots):
    allowed, cache, _ = roots
    with pytest.raises(SourceNotFoundError, match="does not exist"):
        resolve(allowed / "absent", allowed, cache)


@pytest.mark.parametrize("name", ["nul\x00byte", "x" * 5000, "deep/" * 1000 + "a1"], ids=["nul", "long-name", "long-path"])
def test_paths_the_os_cannot_use_are_bad_sources(roots, name):
    allowed, cache, _ = roots
    with pytest.raises(BadSourceError, match="is not a usable local path"):
        resolve(f"{allowed}/{name}", allowed, cache)


def test_directory_without_adapter_files_is_invalid(roots):
    allowed, cache, _ = roots
    (allowed / "empty").mkdir()
    config_only = allowed / "config-only"
    config_only.mkdir()
    (config_only / "adapter_config.json").write_text("{}")

    with pytest.raises(InvalidAdapterError, match="has no adapter_config.json"):
        resolve(allowed / "empty", allowed, cache)
    with pytest.raises(InvalidAdapterError, match="neither adapter_model.safetensors nor adapter_model.bin"):
        resolve(config_only, allowed, cache)


def test_local_archive_unpacks_into_the_cache_by_content(roots, tmp_path):
    allowed, cache, _ = roots
    write_adapter(tmp_path / "v1" / "a1", seed=1)
    write_adapter(tmp_path / "v2" / "a1", seed=2)
    archive = tar_directory(allowed / "a1.tar.gz", tmp_path / "v1")  # wrapped in one folder, a1/

    first = resolve(archive, allowed, cache)
    assert first.is_relative_to(cache)
    assert (first / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "v1/a1/adapter_model.safetensors"
    ).read_bytes()
    assert resolve(archive, allowed, cache) == first

    tar_directory(archive, tmp_path / "v2" / "a1")  # new content, files at the top level
    second = resolve(archive, allowed, cache)
    assert second != first
    assert (second / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "v2/a1/adapter_model.safetensors"
    ).read_bytes()
    assert (first / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "v1/a1/adapter_model.safetensors"
    ).read_bytes()


def test_local_archive_without_an_adapter_is_invalid_and_not_kept(roots):
    allowed, cache, _ = roots
    archive = tar_with_entries(allowed / "x.tar.gz", [file_entry("a/readme.txt"), file_entry("b/readme.txt")])

    with pytest.raises(InvalidAdapterError, match="holds no LoRA adapter"):
        resolve(archive, allowed, cache)
    assert not any(path.is_file() for path in cache.rglob("*"))


def test_other_local_files_are_refused(roots):
    allowed, cache, _ = roots
    (allowed / "weights.zip").write_bytes(b"PK")
    with pytest.raises(BadSourceError, match="neither a directory nor a .tar.gz"):
        resolve(allowed / "weights.zip", allowed, cache)


def upload_dir(s3, directory, prefix):
    for path in directory.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(directory)}")


def test_s3_archive_source(s3, roots, tmp_path):
    _, cache, _ = roots
    s3.create_bucket(Bucket=BUCKET)
    archive = tar_directory(tmp_path / "a1.tar.gz", write_adapter(tmp_path / "src" / "a1"), arcname="a1")
    s3.upload_file(str(archive), BUCKET, "tenants/a1.tar.gz")

    resolved = resolve_adapter_source(f"s3://{BUCKET}/tenants/a1.tar.gz", allowed_roots=[], cache_dir=cache)

    assert resolved.is_relative_to(cache)
    assert (resolved / "adapter_config.json").read_bytes() == (tmp_path / "src/a1/adapter_config.json").read_bytes()


@pytest.mark.parametrize("trailing_slash", ["/", ""])
def test_s3_directory_source_and_reregistration_with_new_content(s3, roots, tmp_path, trailing_slash):
    _, cache, _ = roots
    s3.create_bucket(Bucket=BUCKET)
    upload_dir(s3, write_adapter(tmp_path / "v1", seed=1), "tenants/a1")
    src = f"s3://{BUCKET}/tenants/a1{trailing_slash}"

    first = resolve_adapter_source(src, allowed_roots=[], cache_dir=cache)
    assert (first / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "v1/adapter_model.safetensors"
    ).read_bytes()
    assert resolve_adapter_source(src, allowed_roots=[], cache_dir=cache) == first

    upload_dir(s3, write_adapter(tmp_path / "v2", seed=2), "tenants/a1")
    second = resolve_adapter_source(src, allowed_roots=[], cache_dir=cache)

    assert second != first
    assert (second / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "v2/adapter_model.safetensors"
    ).read_bytes()
    assert (first / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "v1/adapter_model.safetensors"
    ).read_bytes()


def test_s3_directory_without_adapter_is_invalid(s3, roots):
    _, cache, _ = roots
    s3.create_bucket(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key="tenants/a1/adapter_config.json", Body=b"{}")

    with pytest.raises(InvalidAdapterError, match="s3://adapters-bucket/tenants/a1/ is not a LoRA adapter"):
        resolve_adapter_source(f"s3://{BUCKET}/tenants/a1/", allowed_roots=[], cache_dir=cache)


def test_missing_s3_sources_are_not_found(s3, roots):
    _, cache, _ = roots
    s3.create_bucket(Bucket=BUCKET)
    with pytest.raises(SourceNotFoundError, match="tenants/a9.tar.gz does not exist"):
        resolve_adapter_source(f"s3://{BUCKET}/tenants/a9.tar.gz", allowed_roots=[], cache_dir=cache)
    with pytest.raises(SourceNotFoundError, match="no objects under s3://adapters-bucket/tenants/a9/"):
        resolve_adapter_source(f"s3://{BUCKET}/tenants/a9", allowed_roots=[], cache_dir=cache)
