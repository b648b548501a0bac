"""Starting under DJL: importing the handler leaves the process's logging alone (DJL's Java side waits for
the worker's INFO line "Python engine started."), and a worker whose init fails says why."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.djl.conftest import djl_model_dir, running_worker
from tests.djl.worker import REPO_ROOT

IMPORT_AND_CHECK = """
import logging, sys
logging.basicConfig(stream=sys.stdout, format="%(levelname)s::%(message)s", level=logging.INFO)
root = logging.getLogger()
before = (root.level, list(root.handlers), logging.root.manager.disable)
import os
assert "OMP_WAIT_POLICY" not in os.environ and "torch" not in sys.modules
import lora_serving.handler.model
after = (root.level, list(root.handlers), logging.root.manager.disable)
assert before == after, (before, after)
logging.info("still heard")
# Set before torch loaded OpenMP: idle OpenMP workers must sleep, not spin, beside DJL's threads.
assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
"""


def test_importing_the_handler_leaves_logging_alone_and_quiets_openmp(djl_python_importable):
    result = subprocess.run([sys.executable, "-c", IMPORT_AND_CHECK], cwd=REPO_ROOT, capture_output=True, text=True,
                            env={"PYTHONPATH": f"{REPO_ROOT}:{djl_python_importable}", "PATH": "/usr/bin:/bin"},
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "INFO::still heard" in result.stdout


@pytest.mark.parametrize("mode", ["rolling_batch", "async", "plain"])
def test_a_bad_option_fails_the_init_call_naming_it(djl_dir, server_base, tmp_path, mode):
    model_dir = djl_model_dir(server_base, {}, tmp_path / "model", mode, max_loras="0")
    with pytest.raises(RuntimeError, match="Failed to initialize model") as failure:
        with running_worker(djl_dir, model_dir, tmp_path):
            pass
    assert "option.max_loras=0" in str(failure.value)
