"""The engine: rolling batching over a paged KV cache, with unmerged multi-LoRA.

Public API: `Engine(model_dir, **options)`, `SamplingParams`, `Config`.

Importing the package sets how torch's idle OpenMP workers wait, unless the environment says (or torch is
already loaded, when it is too late): they spin for a short while (GOMP_SPINCOUNT), then sleep
(OMP_WAIT_POLICY=PASSIVE). Spinning for long (OpenMP's default) takes the CPU from every other thread of the
process (an HTTP server's, DJL's worker's) and from anything sharing the cores: on 2 cores, 8 concurrent
clients of the server got 19 tokens/s with long-spinning workers and 700 with sleeping ones; DJL's rolling-
batch loop 17 and 132. Sleeping at once makes every parallel op wake them (a futex across cores, 70 us on a
VM): a decode step runs a few hundred such ops, and a short spin bridges the gaps between them
(docs/BENCHMARKS.md, "Threads").
"""

import os
import sys

# Spin iterations before sleeping: a short spin bridges the gaps between one step's
# ops; libgomp's own default is 300,000 when no policy is set.
GOMP_SPINCOUNT = "10000"

if "torch" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ.setdefault("GOMP_SPINCOUNT", GOMP_SPINCOUNT)
# False when torch was loaded first with no policy set: OpenMP then spins for milliseconds after each op (the
# engine warns once, on a CPU).
OPENMP_WAIT_CHOSEN = "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ

from lora_serving.handler.config import Config  # noqa: E402
from lora_serving.handler.engine import Engine  # noqa: E402
from lora_serving.handler.sequence import (  # noqa: E402
    FinishReason,
    GenerationResult,
    RequestOutput,
    SamplingParams,
    TokenOutput,
)

__all__ = ["Config", "Engine", "FinishReason", "GenerationResult", "RequestOutput", "SamplingParams", "TokenOutput"]
