"""`python -m lora_serving` as the Dockerfile starts it, and what it serves when no model is configured."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import types
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import LORA_PROPERTIES, lmi_model_dir, start_server

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(args: list[str], env: dict[str, str], cwd: Path = REPO_ROOT) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lora_serving", *args], cwd=cwd, env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_until_healthy(process: subprocess.Popen, url: str, seconds: float = 120) -> None:
    """Until `url`/ping answers 200; fails with the server's output if it exits first, or after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(process.stdout.read() if process.poll() is not None else "no answer in time")


def test_python_m_container_listens_on_sagemaker_bind_to_port(server_base, server_adapters, tmp_path):
    """The repository's example serving.properties, unchanged, with adapters in the model directory."""
    model_dir = lmi_model_dir(server_base, tmp_path / "model", {}, server_adapters)
    shutil.copy(REPO_ROOT / "serving.properties", model_dir / "serving.properties")
    port = free_port()
    process = launch(["--model-dir", str(model_dir), "--host", "127.0.0.1"],
                     {"SAGEMAKER_BIND_TO_PORT": str(port), "OPTION_MAX_MODEL_LEN": "128",
                      "OPTION_CPU_KV_CACHE_MB": "16"})
    try:
        wait_until_healthy(process, f"http://127.0.0.1:{port}")
        answer = httpx.post(f"http://127.0.0.1:{port}/invocations", json={"inputs": ["hello", "hi"],
                                                                          "adapters": ["a1", "a2"]}, timeout=30)
        assert answer.status_code == 200 and len(answer.json()) == 2
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    # A graceful stop; uvicorn re-raises the SIGTERM it caught, so the exit status says so.
    assert "Application shutdown complete" in output
    assert process.returncode in (0, -signal.SIGTERM), output


def test_a_bad_configuration_value_ends_the_process_naming_the_key(tiny_models, tmp_path):
    model_dir = lmi_model_dir(tiny_models.get("llama", "llama"), tmp_path / "model", {"option.dtype": "fp64"})
    process = launch(["--model-dir", str(model_dir), "--host", "127.0.0.1", "--port", str(free_port())], {})
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 1
    assert "option.dtype='fp64'" in output


@pytest.fixture
def demo_stand_in(server_base, server_adapters, tmp_path, monkeypatch):
    """The demo's layout (serving.properties with LoRA, adapters.tar.gz) on the tiny model, standing in for the
    minute-long real build, which tests/demo covers."""
    demo_dir = lmi_model_dir(server_base, tmp_path / "demo", LORA_PROPERTIES)
    with tarfile.open(demo_dir / "adapters.tar.gz", "w:gz") as archive:
        for name, adapter_dir in server_adapters.items():
            archive.add(adapter_dir, arcname=name)
    built_into = []
    stand_in = types.ModuleType("lora_serving.container.demo.build")
    stand_in.ensure_demo_model = lambda cache_dir: built_into.append(cache_dir) or demo_dir
    monkeypatch.setitem(sys.modules, "lora_serving.container.demo.build", stand_in)
    return built_into


def test_without_a_model_the_demo_is_built_and_served(demo_stand_in, tmp_path):
    live = start_server(tmp_path / "no-such-model-dir", {"OPTION_CACHE_DIR": str(tmp_path / "cache")})
    try:
        assert demo_stand_in == [tmp_path / "cache"]
        with live.client() as client:
            names = {adapter["name"] for adapter in client.get("/adapters").json()["adapters"]}
            assert names == {"a1", "a2"}
            response = client.post("/invocations", json={"inputs": ["one", "two"], "adapters": ["a1", "a2"]})
            assert response.status_code == 200
    finally:
        live.stop()


def test_a_configured_model_is_never_replaced_by_the_demo(demo_stand_in, tmp_path):
    with pytest.raises(RuntimeError, match="option.model_id='/nowhere/model'"):
        start_server(tmp_path / "no-such-model-dir", {"OPTION_MODEL_ID": "/nowhere/model"})
    assert demo_stand_in == []


def test_the_sagemaker_multi_adapter_example_environment_starts_the_container(server_base, server_adapters, tmp_path):
    """The environment of SageMaker's multi-tenant LoRA example, as its users set it (SPEC section 1)."""
    env = {"OPTION_ROLLING_BATCH": "lmi-dist", "OPTION_MAX_ROLLING_BATCH_SIZE": "32", "OPTION_DTYPE": "fp16",
           "OPTION_ENABLE_LORA": "true", "OPTION_GPU_MEMORY_UTILIZATION": "0.8", "OPTION_MAX_LORA_RANK": "64",
           "OPTION_MAX_CPU_LORAS": "4", "OPTION_TRUST_REMOTE_CODE": "true"}
    model_dir = lmi_model_dir(server_base, tmp_path / "model",
                              {"option.max_model_len": "128", "option.cpu_kv_cache_mb": "16"}, server_adapters)
    live = start_server(model_dir, env)
    try:
        with live.client() as client:
            response = client.post("/invocations", json={"inputs": ["one", "two"], "adapters": ["a1", "a2"]})
            assert response.status_code == 200, response.text
    finally:
        live.stop()
