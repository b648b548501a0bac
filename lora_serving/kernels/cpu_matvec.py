"""x @ W.T (+ b) for one to four rows of x, read by a C kernel (kernels/cpu_matvec.c) from the weight that
handler/models/projection.py packed for oneDNN.

Why: a decode step at batch 1 is a chain of matrix-vector products whose floor is reading the weights once.
At one row oneDNN's inner product read them at 13-24 GB/s where a copy moves 28 GB/s on a 2-core AVX2 VM; the
kernel at 21-35 GB/s (1.3-1.7x faster at one row, 1.2-1.6x at two; docs/BENCHMARKS.md, "CPU decode kernels").
It reads the packed weight in place, so nothing is stored twice.

The packed tensor is opaque to torch and its layout is oneDNN's choice (by CPU, shape and version), so
`PackedMatvec.for_weight` reads the packed bytes and takes the kernel only when they hold the weight exactly
in a layout the kernel reads: [out / b][in][b] for some b in 64, 32, 16, 8. Otherwise, where the kernels do not
build, or with $LORA_SERVING_CPU_MATVEC=off (benchmarks compare the two), oneDNN serves every row count.
"""

from __future__ import annotations

import ctypes

import torch

from . import cpu_native

BLOCK_ROWS = (64, 32, 16, 8)
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


def enabled() -> bool:
    return cpu_native.available_unless("LORA_SERVING_CPU_MATVEC")


class PackedMatvec:
    """The kernel's call on one packed weight (and bias): `matvec(x)` for x [rows <= max_rows, in] fp32."""

    def __init__(self, address: int, block: int, out_features: int, in_features: int,
                 bias: torch.Tensor | None, keep_alive: torch.Tensor) -> None:
        self.out_features = out_features
        self.max_rows = cpu_native.library().matvec_max_rows()
        bias = None if bias is None else bias.contiguous()
        self._keep = (keep_alive, bias)  # the kernel reads them through the pointers below
        self._fixed = (_PTR(address), _I64(out_features), _I64(in_features), _I64(block))
        self._bias = None if bias is None else _PTR(bias.data_ptr())

    @classmethod
    def for_weight(cls, weight: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> "PackedMatvec | None":
        """The kernel's call on `packed` (oneDNN's packed form of fp32 `weight`), or None when it cannot read it."""
        if not enabled() or weight.dtype != torch.float32 or (bias is not None and bias.dtype != torch.float32):
            return None
        block = packed_block_rows(weight, packed)
        if block is None:
            return None
        return cls(torch.ops.mkldnn.data_ptr(packed), block, weight.shape[0], weight.shape[1], bias, packed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.stride(1) != 1:
            x = x.contiguous()
        rows = x.shape[0]
        y = torch.empty(rows, self.out_features, dtype=torch.float32)
        cpu_native.library().packed_matvec_f32(*self._fixed, _PTR(x.data_ptr()), _I64(x.stride(0)), _I64(rows),
                                               self._bias, _PTR(y.data_ptr()), _I64(y.stride(0)),
                                               ctypes.c_int(torch.get_num_threads()))
        return y


def packed_block_rows(weight: torch.Tensor, packed: torch.Tensor) -> int | None:
    """b such that `packed` holds `weight` [out, in] as [ceil(out / b)][in][b] (the last block padded), else None."""
    try:
        address, num_bytes = torch.ops.mkldnn.data_ptr(packed), torch.ops.mkldnn._nbytes(packed)
    except (AttributeError, RuntimeError):  # ops this torch build lacks, or not a oneDNN tensor
        return None
    out_features, in_features = weight.shape
    for block in BLOCK_ROWS:
        num_blocks = -(-out_features // block)
        if num_bytes != num_blocks * block * in_features * 4:
            continue
        raw = torch.frombuffer((ctypes.c_float * (num_bytes // 4)).from_address(address), dtype=torch.float32)
        as_read = raw.view(num_blocks, in_features, block)
        # The first column decides cheaply; the whole weight proves it.
        if not torch.equal(as_read[0, 0, : min(block, out_features)], weight[:block, 0]):
            continue
        if torch.equal(as_read.transpose(1, 2).reshape(num_blocks * block, in_features)[:out_features], weight):
            return block
    return None
