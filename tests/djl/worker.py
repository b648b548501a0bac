"""DJL Serving's real Python worker (`djl_python_engine.py` from ../shared/third_party/djl-serving), started
and connected to the way PyProcess.java and Connection.java do it.

Start: the command line of Connection.getPythonStartCmd for one local worker (unix socket), the environment
of PyEnv.getEnvironmentVars (PYTHONPATH gains the engine directory and the model directory), the model
directory as working directory. The worker counts as started when a line of its stdout or stderr contains
"Python engine started." (PyProcess.ReaderThread), within two minutes; then the socket is connected.
Every Output the worker sends is decoded (wire.OutputDecoder) on a reader thread and handed to
`on_output`, as Connection.RequestHandler hands it to its response callback and response future.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tests.djl.wire import OutputDecoder, WorkerOutput, encode_input

STARTED_LINE = "Python engine started."
STARTUP_TIMEOUT_SECONDS = 120  # PyProcess: latch.await(2, TimeUnit.MINUTES)
REPO_ROOT = Path(__file__).resolve().parents[2]


def djl_serving_dir() -> Path | None:
    """The reference copy: $DJL_SERVING_DIR, else ../shared/third_party/djl-serving beside the repository."""
    candidates = [os.environ.get("DJL_SERVING_DIR"), REPO_ROOT.parent / "shared" / "third_party" / "djl-serving"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "engines/python/setup/djl_python_engine.py").is_file():
            return Path(candidate)
    return None


class WorkerProcess:
    """One Python worker process and its socket connection."""

    def __init__(self, djl_dir: Path, model_dir: Path, sock_dir: Path, *, entry_point: str, async_mode: bool,
                 on_output: Callable[[WorkerOutput], None], extra_env: dict[str, str] | None = None) -> None:
        self.engine_dir = djl_dir / "engines/python/setup"
        self.model_dir = model_dir
        self.sock_name = str(sock_dir / "djl_sock.19000")
        self.entry_point = entry_point
        self.async_mode = async_mode
        self._on_output = on_output
        self._extra_env = extra_env or {}
        self.log_lines: list[str] = []
        self._started = threading.Event()
        self._exited = threading.Event()
        self._sock: socket.socket | None = None
        self._send_lock = threading.Lock()
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        """Connection.getPythonStartCmd, the local (non-MPI) form, for a CPU model (device id -1)."""
        return [
            sys.executable, str(self.engine_dir / "djl_python_engine.py"),
            "--sock-type", "unix",
            "--sock-name", self.sock_name,
            "--model-dir", str(self.model_dir.resolve()),
            "--entry-point", self.entry_point,
            "--device-id", "-1",
            "--cluster-size", "1",
            "--recommended-entry-point", "",
            "--log-level", "info",
            "--async-mode" if self.async_mode else "--no-async-mode",
        ]

    def environment(self) -> dict[str, str]:
        """PyEnv.getEnvironmentVars: the caller's PYTHONPATH (here: the project), then the engine cache
        directory, then the model directory."""
        env = {**os.environ, **self._extra_env}
        python_path = [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        env["PYTHONPATH"] = os.pathsep.join([*python_path, str(self.engine_dir), str(self.model_dir.resolve())])
        return env

    def start(self) -> None:
        self.process = subprocess.Popen(self.command(), env=self.environment(), cwd=self.model_dir,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        readers = [threading.Thread(target=self._read_lines, args=(stream,), daemon=True)
                   for stream in (self.process.stdout, self.process.stderr)]
        for reader in readers:
            reader.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while not self._started.is_set():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the Python worker did not print 'Python engine started.' (PyProcess waits "
                                   "for it before connecting); its output:\n" + self.output())
            self._started.wait(0.1)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(self.sock_name)
        threading.Thread(target=self._read_outputs, daemon=True).start()

    def send(self, properties: dict[str, str | None], content: list[tuple[str, bytes]]) -> None:
        data = encode_input(properties, content)
        with self._send_lock:
            self._sock.sendall(data)

    def is_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None and not self._exited.is_set()

    def output(self) -> str:
        return "".join(self.log_lines[-200:])

    def stop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
        if self.process is not None and self.process.poll() is None:
            self.process.kill()  # PyProcess.stopPythonProcess: destroyForcibly
            self.process.wait(30)

    def _read_lines(self, stream) -> None:
        for line in stream:
            self.log_lines.append(line)
            if STARTED_LINE in line:
                self._started.set()

    def _read_outputs(self) -> None:
        decoder = OutputDecoder()
        try:
            while True:
                data = self._sock.recv(1 << 16)
                if not data:
                    break
                for output in decoder.feed(data):
                    self._on_output(output)
        except OSError:
            pass
        finally:
            self._exited.set()
            self._on_output(None)  # Connection.RequestHandler.channelInactive
