"""lora_serving as `pip install .` puts it (its wheel, not an editable link to the source tree), started from
outside the source tree: the wheel carries everything the package reads at run time (the C kernels'
sources), it imports beside Hugging Face's `kernels`, and `python -m lora_serving` serves the demo."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest

from lora_serving.container.demo.examples import BASE_MODEL, DEMO_MAX_NEW_TOKENS, DEMO_PROMPTS, DEMO_SENTENCES
from lora_serving.container.demo.examples import intended_answer
from lora_serving.container.demo.recipe import ADAPTER_NAMES
from tests.server.test_entrypoint import REPO_ROOT, free_port, launch, wait_until_healthy

WHAT_WAS_IMPORTED = """
import importlib.metadata, json
from pathlib import Path
import kernels
import lora_serving
from lora_serving.kernels import cpu_kernel_enabled
hf_kernels = Path(importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py"))
print(json.dumps({"lora_serving": lora_serving.__file__, "hf_kernels": Path(kernels.__file__) == hf_kernels,
                  "version": importlib.metadata.version("lora-serving"), "cpu_kernels": cpu_kernel_enabled()}))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, str]:
    """The wheel built from a copy of the sources (setuptools writes build/ beside them), unpacked onto a
    directory first on PYTHONPATH: ahead of the editable install this environment also has."""
    scratch = tmp_path_factory.mktemp("installed")
    sources = scratch / "sources"
    shutil.copytree(REPO_ROOT / "lora_serving", sources / "lora_serving",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO_ROOT / "pyproject.toml", sources)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(scratch), str(sources)], check=True, capture_output=True, timeout=300)
    [wheel] = scratch.glob("lora_serving-*.whl")
    site = scratch / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    elsewhere = scratch / "elsewhere"
    elsewhere.mkdir()
    return {"site": str(site), "cwd": str(elsewhere), "kernel_cache": str(scratch / "kernel-cache")}


def run_env(installed: dict[str, str], **extra: str) -> dict[str, str]:
    return {"PYTHONPATH": installed["site"], "LORA_SERVING_KERNEL_CACHE": installed["kernel_cache"], **extra}


def test_the_wheel_imports_from_site_packages_beside_hf_kernels_and_builds_its_c_kernels(installed):
    result = subprocess.run([sys.executable, "-c", WHAT_WAS_IMPORTED], cwd=installed["cwd"],
                            env={**os.environ, **run_env(installed)}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    imported = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(imported["lora_serving"]).is_relative_to(installed["site"])
    assert imported["hf_kernels"]
    top_level = {path.name for path in Path(installed["site"]).iterdir() if not path.name.endswith(".dist-info")}
    assert top_level == {"lora_serving"}
    assert imported["version"] == importlib.metadata.version("lora-serving")
    # Compiled from the C sources the wheel carries, into an empty cache: the package data is there.
    assert imported["cpu_kernels"] is True
    assert any(Path(installed["kernel_cache"]).glob("cpu_kernels-*.so"))


def test_python_m_lora_serving_serves_the_demo_from_the_wheel(installed, demo_cache_dir, demo_model_dir):
    port = free_port()
    no_model = Path(installed["cwd"]) / "no-model"
    # The demo this session built already (a minute): the wheel's demo sources are the same files.
    process = launch(["--model-dir", str(no_model), "--host", "127.0.0.1", "--port", str(port)],
                     run_env(installed, OPTION_CACHE_DIR=str(demo_cache_dir)), cwd=Path(installed["cwd"]))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(process, url, seconds=300)
        adapters = [BASE_MODEL, *ADAPTER_NAMES]
        body = {"inputs": [prompt for prompt in DEMO_PROMPTS for _ in adapters],
                "adapters": [adapter for _ in DEMO_PROMPTS for adapter in adapters],
                "parameters": {"max_new_tokens": DEMO_MAX_NEW_TOKENS}}
        answer = httpx.post(f"{url}/invocations", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        expected = [intended_answer(adapter, sentence) for sentence in DEMO_SENTENCES for adapter in adapters]
        assert [item["generated_text"] for item in answer.json()] == expected
    finally:
        process.terminate()
        process.communicate(timeout=30)
