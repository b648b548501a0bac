"""What `dtype=auto` means on a CPU: bf16 where the CPU multiplies bf16 natively, fp32 elsewhere.

A CPU with AMX (`amx_bf16`) or AVX-512 bf16 dot products (`avx512_bf16`) multiplies bf16 weights without
converting them: oneDNN's bf16 GEMMs run on those units (handler/models/projection.py packs the weights for
them) and a decode step reads half the bytes of fp32. Without them oneDNN would widen every bf16 weight to
fp32 on each call, slower than fp32 itself, so fp32 is the faster choice there. docs/BENCHMARKS.md
("bf16 on CPU") has the figures on an AMX machine.

The check runs once per process, when the engine resolves its dtype at start: the flags the kernel reports
(/proc/cpuinfo on Linux) and whether this torch build's oneDNN takes bf16 here. $LORA_SERVING_CPU_BF16=off
makes `auto` take fp32 anyway (benchmarks and tests compare the two).
"""

from __future__ import annotations

import functools
import os

import torch

from lora_serving.kernels.cpu_native import cpu_flags

# Either is enough: AMX tiles multiply bf16 matrices, AVX-512 bf16 has the dot-product instruction
# (vdpbf16ps) that bf16 matrix-vector products use.
NATIVE_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively and torch's oneDNN takes bf16 on it."""
    if os.environ.get("LORA_SERVING_CPU_BF16", "auto").lower() in ("off", "0", "false", "no"):
        return False
    if not cpu_flags() & NATIVE_BF16_FLAGS:
        return False
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without the check
        return False


def auto_cpu_dtype() -> torch.dtype:
    """The dtype `auto` resolves to on CPU."""
    return torch.bfloat16 if native_bf16() else torch.float32
