"""The demo cache's rules, with a stand-in for the minute-long build: a directory is used only once
marked complete, a crash leaves nothing that is used later, and concurrent callers build once."""

from __future__ import annotations

import threading
import time

import pytest

from lora_serving.container.demo import build
from lora_serving.container.demo.build import (
    BUILD_COMPLETE_MARKER,
    DEMO_MODEL_DIR_NAME,
    builder_fingerprint,
    ensure_demo_model,
)


@pytest.fixture
def builds(monkeypatch) -> list:
    """Replace the real build with one that writes a config.json; records each build's directory."""
    build_dirs = []

    def fake_build(out_dir):
        build_dirs.append(out_dir)
        time.sleep(0.2)  # long enough for a concurrent caller to arrive during the build
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(build, "build_demo_model", fake_build)
    return build_dirs


def test_builds_into_a_staging_directory_then_marks_the_result(tmp_path, builds):
    build_root = tmp_path / f"demo-{builder_fingerprint()}"
    model_dir = ensure_demo_model(tmp_path)
    assert model_dir == build_root / DEMO_MODEL_DIR_NAME
    assert builds[0].name == DEMO_MODEL_DIR_NAME and builds[0].parent.parent == tmp_path
    assert builds[0].parent != build_root
    assert (model_dir / "config.json").is_file()
    assert (build_root / BUILD_COMPLETE_MARKER).is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == [build_root.name, f"{build_root.name}.lock"]


def test_build_never_marked_complete_is_redone(tmp_path, builds):
    unfinished = tmp_path / f"demo-{builder_fingerprint()}"
    (unfinished / DEMO_MODEL_DIR_NAME).mkdir(parents=True)
    (unfinished / DEMO_MODEL_DIR_NAME / "model.safetensors").write_text("half written")
    stale_staging = tmp_path / f"{unfinished.name}.building-crashed"
    stale_staging.mkdir()

    model_dir = ensure_demo_model(tmp_path)
    assert model_dir == unfinished / DEMO_MODEL_DIR_NAME
    assert len(builds) == 1
    assert not (model_dir / "model.safetensors").exists()
    assert not stale_staging.exists()


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def failing_build(out_dir):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("out of disk")

    monkeypatch.setattr(build, "build_demo_model", failing_build)
    with pytest.raises(RuntimeError, match="out of disk"):
        ensure_demo_model(tmp_path)
    assert [path.suffix for path in tmp_path.iterdir()] == [".lock"]


def test_concurrent_callers_build_once(tmp_path, builds):
    results = []
    threads = [threading.Thread(target=lambda: results.append(ensure_demo_model(tmp_path))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1
    assert len(set(results)) == 1 and len(results) == 3
