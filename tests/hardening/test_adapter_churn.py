"""Adapters registered, updated to other files and unregistered every second while clients send requests
naming them (scripts/soak.py --churn-every), against `python -m lora_serving` with the prefix cache, chunked
prefill (a small step budget), two device slots and two host places for four adapters: every answer is the
one of the version registered when the request was accepted, nothing 5xx's, nothing is held at the end. The
script's own checks decide: exit 0 and PASS. (A prefix cache keyed by adapter name instead of content fails
about 40% of the churned requests here.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.adapters import make_peft_adapter
from tests.server.conftest import LORA_PROPERTIES, lmi_model_dir

REPO_ROOT = Path(__file__).resolve().parents[2]
SOAK_SECONDS = 15


def test_churning_adapters_never_serve_a_stale_version(server_base, server_adapters, tmp_path):
    # k/v adapters: the same prompt under two versions has other K/V, which the prefix cache must tell apart.
    adapters = {**server_adapters,
                "kv": make_peft_adapter(server_base, tmp_path / "kv", r=8, alpha=16, targets=["k_proj", "v_proj"],
                                        seed=34, weight_scale=2.0)}
    model_dir = lmi_model_dir(server_base, tmp_path / "model", {
        **LORA_PROPERTIES, "option.cache_dir": str(tmp_path / "cache"), "option.block_size": "4",
        "option.num_kv_blocks": "256", "option.max_num_batched_tokens": "24", "option.max_cpu_loras": "2"},
        adapters)
    completed = subprocess.run(
        [sys.executable, "scripts/soak.py", "--model-dir", str(model_dir), "--clients", "8",
         "--duration", str(SOAK_SECONDS), "--warmup", "4", "--max-new-tokens", "10", "--churn-every", "1",
         "--churn-names", "2"],
        cwd=REPO_ROOT, env={**os.environ, "SOAK_SERVER_LOG": str(tmp_path / "server.log")},
        capture_output=True, text=True, timeout=SOAK_SECONDS + 240)
    report = completed.stdout + completed.stderr[-3000:]
    assert completed.returncode == 0, report
    assert "\nPASS" in completed.stdout, report
    for kind in ("churn lmi", "churn stream", "churn: register", "churn: update", "churn: unregister"):
        assert f"| {kind} " in completed.stdout, report
