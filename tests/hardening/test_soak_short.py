"""A short run of scripts/soak.py (the 10-minute one is in docs/BENCHMARKS.md): 8 clients for 20 s against
`python -m lora_serving` on the tiny model, three adapters for two device slots (adapters change slots under
load) and a KV cache small enough to preempt. The script's own checks decide: exit 0 and PASS."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.adapters import make_peft_adapter
from tests.server.conftest import LORA_PROPERTIES, lmi_model_dir

REPO_ROOT = Path(__file__).resolve().parents[2]
SOAK_SECONDS = 20


def test_a_short_soak_passes_every_check(server_base, server_adapters, tmp_path):
    adapters = {**server_adapters, "a3": make_peft_adapter(server_base, tmp_path / "a3", r=16, alpha=16,
                                                           targets=["k_proj", "o_proj", "down_proj"], seed=33)}
    model_dir = lmi_model_dir(server_base, tmp_path / "model", {
        **LORA_PROPERTIES, "option.cache_dir": str(tmp_path / "cache"), "option.block_size": "4",
        "option.num_kv_blocks": "40"}, adapters)
    completed = subprocess.run(
        [sys.executable, "scripts/soak.py", "--model-dir", str(model_dir), "--clients", "8",
         "--duration", str(SOAK_SECONDS), "--warmup", "5", "--max-new-tokens", "12"],
        cwd=REPO_ROOT, env={**os.environ, "SOAK_SERVER_LOG": str(tmp_path / "server.log")},
        capture_output=True, text=True, timeout=SOAK_SECONDS + 240)
    report = completed.stdout + completed.stderr[-3000:]
    assert completed.returncode == 0, report
    assert "\nPASS" in completed.stdout, report
    for kind in ("lmi batch", "lmi jsonlines", "tgi stream", "invalid"):
        assert f"| {kind} " in completed.stdout, report
