"""Real servers for the HTTP tests: uvicorn on 127.0.0.1 (a port the OS picks), in a thread, serving a
copy of the tiny test model laid out as an LMI model directory, with PEFT adapters made by PEFT itself.
One server per test module (module-scoped fixtures), not one per test."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn

from lora_serving.container.app import create_app
from lora_serving.container.runtime import Runtime
from tests.adapters import make_peft_adapter
from tests.storage.conftest import aws_env, moto_endpoint, s3, s3_admin  # noqa: F401  (moto fixtures, reused)

STARTUP_TIMEOUT_SECONDS = 180
# Two adapters of different ranks and module sets, so that a batch mixing them mixes ranks.
SERVER_ADAPTER_SPECS = {
    "a1": dict(r=4, alpha=8, targets=["q_proj", "v_proj"]),
    "a2": dict(r=8, alpha=16),
}
BASE_PROPERTIES = {
    "option.dtype": "fp32",
    "option.max_model_len": "256",
    "option.cpu_kv_cache_mb": "64",
    "option.max_rolling_batch_size": "16",
}
LORA_PROPERTIES = {**BASE_PROPERTIES, "option.enable_lora": "true", "option.max_loras": "2",
                   "option.max_cpu_loras": "4", "option.max_lora_rank": "16"}


@dataclass
class LiveServer:
    url: str
    app: object
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def runtime(self) -> Runtime:
        return self.app.state.server.runtime

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def start_server(model_dir: Path, env: dict[str, str] | None = None) -> LiveServer:
    """Start a server and wait until /ping answers 200; raise with the start-up error if it fails."""
    app = create_app(model_dir, env or {})
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    live = LiveServer(f"http://127.0.0.1:{sock.getsockname()[1]}", app, server, thread)
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    with httpx.Client(base_url=live.url, timeout=5) as client:
        while time.monotonic() < deadline:
            if app.state.server.startup_error:
                live.stop()
                raise RuntimeError(app.state.server.startup_error)
            try:
                if client.get("/ping").status_code == 200:
                    return live
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    live.stop()
    raise TimeoutError(f"the server did not become healthy within {STARTUP_TIMEOUT_SECONDS} s")


def lmi_model_dir(base_dir: Path, out_dir: Path, properties: dict[str, str],
                  adapters: dict[str, Path] | None = None) -> Path:
    """An LMI model directory: the base model's files, serving.properties, and `adapters/<name>/`."""
    shutil.copytree(base_dir, out_dir)
    (out_dir / "serving.properties").write_text("".join(f"{key}={value}\n" for key, value in properties.items()))
    for name, adapter_dir in (adapters or {}).items():
        shutil.copytree(adapter_dir, out_dir / "adapters" / name)
    return out_dir


@pytest.fixture(scope="session")
def server_base(tiny_models) -> Path:
    return tiny_models.get("llama", "llama")


@pytest.fixture(scope="session")
def server_adapters(server_base, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("server-adapters")
    return {name: make_peft_adapter(server_base, root / name, seed=10 + index, **spec)
            for index, (name, spec) in enumerate(SERVER_ADAPTER_SPECS.items())}


@pytest.fixture(scope="module")
def lora_server(server_base, server_adapters, tmp_path_factory):
    """The tiny model with adapters a1 and a2 in `adapters/`, LoRA enabled."""
    root = tmp_path_factory.mktemp("lora-server")
    model_dir = lmi_model_dir(server_base, root / "model", {**LORA_PROPERTIES, "option.cache_dir": str(root / "cache")},
                              server_adapters)
    live = start_server(model_dir)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(lora_server):
    with lora_server.client() as client:
        yield client
