"""vLLM's own serving benchmark client (`vllm bench serve`, i.e. vllm.benchmarks.serve) against our server,
on both OpenAI routes, with adapters as `model`: every request must succeed and stream every token.

It runs from vLLM's venv (.venv-vllm at the repository root, made by scripts/bench_vs_vllm.py --setup), which
CI does not have: there the test skips, saying so."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.server.test_entrypoint import REPO_ROOT

VLLM_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"
HIDE_DIR = REPO_ROOT / ".venv-vllm" / "hide-cuda-vision"
PROMPTS, OUTPUT_LEN = 8, 8

pytestmark = pytest.mark.skipif(not VLLM_PYTHON.exists(),
                                reason=f"{VLLM_PYTHON.parent.parent} (vLLM's venv: scripts/bench_vs_vllm.py --setup) "
                                       "is not here, so vLLM's benchmark client cannot run")


@pytest.mark.parametrize("backend, endpoint", [("openai", "/v1/completions"),
                                               ("openai-chat", "/v1/chat/completions")])
def test_vllm_bench_serve_gets_every_token_from_our_server(lora_server, server_base, tmp_path, backend, endpoint):
    result_file = tmp_path / "result.json"
    completed = subprocess.run(
        [str(VLLM_PYTHON), str(REPO_ROOT / "scripts" / "bench_serving.py"), "--client", str(result_file), "--",
         "--backend", backend, "--base-url", lora_server.url, "--endpoint", endpoint, "--model", "model",
         "--tokenizer", str(server_base), "--dataset-name", "random", "--random-input-len", "16",
         "--random-output-len", str(OUTPUT_LEN), "--num-prompts", str(PROMPTS), "--max-concurrency", str(PROMPTS),
         "--ignore-eos", "--seed", "0", "--disable-tqdm", "--lora-modules", "a1", "a2"],
        env={**os.environ, "PYTHONPATH": str(HIDE_DIR)}, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(result_file.read_text())
    assert result["completed"] == PROMPTS and result["failed"] == 0
    # The client counts the tokens from the usage chunk that stream_options.include_usage asks for.
    assert result["total_output_tokens"] == PROMPTS * OUTPUT_LEN
