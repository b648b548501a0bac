"""Per row of fp32 logits on CPU, by a C kernel (kernels/cpu_logits.c): the index of the first maximum (torch's
argmax), the maximum and log(sum(exp(logits - maximum))), so that the sampler gets a greedy token and any token's
log-probability without torch's log_softmax, which writes a vocabulary-wide copy of the logits for the one value
per row it is asked for.

`serves(logits)` says whether the kernel takes these logits (fp32 on CPU, unit stride along the vocabulary, the
library built; $LORA_SERVING_CPU_LOGITS=off keeps torch's ops, which benchmarks compare with).
"""

from __future__ import annotations

import ctypes

import torch

from . import cpu_native

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


def serves(logits: torch.Tensor) -> bool:
    return (logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2
            and logits.stride(1) == 1 and cpu_native.available_unless("LORA_SERVING_CPU_LOGITS"))


def row_summaries(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(argmax int64 [R], maximum fp32 [R], log-sum-exp about the maximum fp32 [R]) of logits [R, V], which
    `serves`. A row's log-softmax at token t is logits[t] - maximum - log_sum."""
    if not serves(logits):
        raise ValueError(f"the kernel takes 2-D fp32 CPU logits with unit stride along the vocabulary, got "
                         f"{tuple(logits.shape)} {logits.dtype} on {logits.device}")
    rows, vocab = logits.shape
    indices = torch.empty(rows, dtype=torch.int64)
    maxima = torch.empty(rows, dtype=torch.float32)
    log_sums = torch.empty(rows, dtype=torch.float32)
    if rows and vocab:
        cpu_native.library().logits_row_summaries(
            logits.data_ptr(), rows, vocab, logits.stride(0), indices.data_ptr(), maxima.data_ptr(),
            log_sums.data_ptr(), torch.get_num_threads())
    return indices, maxima, log_sums
