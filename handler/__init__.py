"""The engine: rolling batching over a paged KV cache, with unmerged multi-LoRA.

Public API: `Engine(model_dir, **options)`, `SamplingParams`, `Config`.

Importing the package makes torch's idle OpenMP workers sleep instead of spin (OMP_WAIT_POLICY=PASSIVE,
unless the environment sets it or torch is already loaded, when it is too late): spinning workers take the
CPU from every other thread of the process (an HTTP server's, DJL's worker's) and from anything sharing the
cores. Measured on 2 cores: 8 concurrent clients of the server got 19 tokens/s with spinning workers and 700
with sleeping ones; DJL's rolling-batch loop 17 and 132 (docs/BENCHMARKS.md).
"""

import os
import sys

if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from handler.config import Config  # noqa: E402
from handler.engine import Engine  # noqa: E402
from handler.sequence import FinishReason, GenerationResult, RequestOutput, SamplingParams, TokenOutput  # noqa: E402

__all__ = ["Config", "Engine", "FinishReason", "GenerationResult", "RequestOutput", "SamplingParams", "TokenOutput"]
