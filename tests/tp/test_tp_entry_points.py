"""TP=2 through `python -m lora_serving` over real HTTP, and through the DJL handler under DJL's real worker."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx

from tests.djl.conftest import (  # noqa: F401  (fixtures, reused)
    NEW_TOKENS,
    PROMPT,
    djl_dir,
    djl_model_dir,
    expected,
    generate,
    running_worker,
    token_ids,
)
from tests.server.conftest import LORA_PROPERTIES, lmi_model_dir, server_adapters, server_base  # noqa: F401
from tests.server.test_entrypoint import free_port, launch, wait_until_healthy

# Start-up of two ranks (each imports torch and transformers) and the exit after a rank dies.
START_SECONDS = 120
FAILURE_BOUND_SECONDS = 15


def child_pids(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def test_python_m_container_serves_at_tp2_and_exits_naming_a_dead_rank(server_base, server_adapters, expected,
                                                                       tmp_path):
    model_dir = lmi_model_dir(server_base, tmp_path / "model", LORA_PROPERTIES, server_adapters)
    port = free_port()
    process = launch(["--model-dir", str(model_dir), "--host", "127.0.0.1", "--port", str(port)],
                     {"SM_NUM_GPUS": "2", "OPTION_CACHE_DIR": str(tmp_path / "cache")})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(process, url, START_SECONDS)
        prompts, adapters = [PROMPT, "hi"], ["a1", "a2"]
        answer = httpx.post(f"{url}/invocations", json={"inputs": prompts, "adapters": adapters, "parameters": {
            "max_new_tokens": NEW_TOKENS, "details": True}}, timeout=60)
        assert answer.status_code == 200
        assert [token_ids(each) for each in answer.json()] == [expected(prompt, adapter, NEW_TOKENS)
                                                               for prompt, adapter in zip(prompts, adapters)]
        [rank_1] = [pid for pid in child_pids(process.pid)]
        os.kill(rank_1, signal.SIGKILL)
        killed_at = time.monotonic()
        ping = None
        while process.poll() is None and time.monotonic() - killed_at < FAILURE_BOUND_SECONDS:
            try:
                ping = httpx.get(f"{url}/ping", timeout=2)
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        output, _ = process.communicate(timeout=FAILURE_BOUND_SECONDS)
        assert process.returncode == 1, output[-3000:]
        assert "exiting: tensor-parallel rank 1 (of 2) exited with status -9" in output
        if ping is not None and ping.status_code != 200:  # caught between the failure and the exit
            assert "rank 1" in ping.json()["error"]
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_djl_handler_serves_at_tp2_and_its_worker_exits_naming_a_dead_rank(djl_dir, server_base, server_adapters,
                                                                          expected, tmp_path):
    model_dir = djl_model_dir(server_base, server_adapters, tmp_path / "model", "rolling_batch",
                              tensor_parallel_degree="2")
    with running_worker(djl_dir, model_dir, tmp_path) as front_end:
        for adapter in (None, "a1"):
            answer = front_end.submit(generate(PROMPT, adapter)).wait()
            assert answer.code == 200, answer.body
            assert token_ids(answer.json()) == expected(PROMPT, adapter, NEW_TOKENS)
        worker = front_end.worker.process
        [rank_1] = child_pids(worker.pid)
        os.kill(rank_1, signal.SIGKILL)  # while idle: DJL sends nothing until the next request
        assert worker.wait(FAILURE_BOUND_SECONDS) == 1
        assert "exiting the worker: tensor-parallel rank 1 (of 2) exited with status -9" in front_end.worker.output()

