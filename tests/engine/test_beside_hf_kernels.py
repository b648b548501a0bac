"""The engine beside Hugging Face's `kernels` distribution, whose import name is a common word: transformers
imports it whenever it is installed (from modeling_utils, since 5.25 as a dependency of its own). Run from the
repository root, where `python -m lora_serving` and the tests start and where the working directory comes
first on sys.path, so that nothing of ours may answer to a top-level name another distribution owns."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

PARITY_BESIDE_HF_KERNELS = """
import importlib.metadata, json, sys
from pathlib import Path

import kernels
installed = Path(importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py"))
assert Path(kernels.__file__).resolve() == installed.resolve(), kernels.__file__

from lora_serving.handler import Engine, SamplingParams
from tests.models import reference_greedy

model_dir = Path(sys.argv[1])
prompt = [0] + list(range(5, 40))
engine = Engine(model_dir, dtype="float32")
[result] = engine.generate([prompt], SamplingParams(max_new_tokens=16))
print(json.dumps({"engine": result.token_ids, "transformers": reference_greedy(model_dir, prompt, 16),
                  "transformers_took_hf_kernels": sys.modules["kernels"] is kernels
                                                  and "transformers.integrations.hub_kernels" in sys.modules}))
"""


def hf_kernels_installed() -> bool:
    try:
        return importlib.metadata.version("kernels") is not None
    except importlib.metadata.PackageNotFoundError:
        return False


# scripts/setup --test installs transformers[kernels] (HF's kernels at the version this transformers wants), so
# the suite's own environments always run this; a bare image (scripts/gpu_check's) may not have it.
@pytest.mark.skipif(not hf_kernels_installed(), reason="HF's kernels is not installed here (scripts/setup --test "
                                                       "installs it)")
def test_engine_matches_transformers_with_hf_kernels_importable(tiny_models):
    model_dir = tiny_models.get("llama", "llama")
    result = subprocess.run([sys.executable, "-c", PARITY_BESIDE_HF_KERNELS, str(model_dir)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(answer["engine"]) == 16 and answer["engine"] == answer["transformers"]
    assert answer["transformers_took_hf_kernels"]
