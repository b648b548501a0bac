"""x @ W.T (+ b) for the few rows of x of a decode step, read by a C kernel (kernels/cpu_matvec.c) from the weight that
handler/models/projection.py packed for oneDNN, fp32 or bf16.

Why: a decode step at batch 1 is a chain of matrix-vector products whose floor is reading the weights once.
At one row oneDNN's inner product read them at 13-24 GB/s where a copy moves 28 GB/s on a 2-core AVX2 VM; the
kernel at 21-35 GB/s (1.3-1.7x faster at one row, 1.2-1.6x at two; docs/BENCHMARKS.md, "CPU decode kernels").
It reads the packed weight in place, so nothing is stored twice.

bf16 weights (packed by oneDNN where the CPU multiplies bf16 natively) go to the kernel's bf16 form: fp32 sums,
one rounding to bf16 at the end, bias added before it, as oneDNN does. On a CPU with AMX it multiplies with tiles,
whose B operand is oneDNN's bf16 packing as it stands, so one tile multiply serves 16 rows at once: up to 64 rows a
call, in chunks of 16 that reread the block's weight from the core's cache, so that a decode batch still reads the
weight from memory once (oneDNN's inner product read it slower at every decode batch size; docs/BENCHMARKS.md).
Elsewhere AVX-512 bf16 dot products (one instruction per row per 64 bytes, which on a core with one 512-bit unit
left three or four rows short of the memory's speed), else fp32 FMAs on the widened halves.

The packed tensor is opaque to torch and its layout is oneDNN's choice (by CPU, shape and version), so
`PackedMatvec.for_weight` reads the packed bytes and takes the kernel only when they hold the weight exactly
in a layout the kernel reads: for fp32 [out / b][in][b] for some b in 64, 32, 16, 8; for bf16 (packed for
CPUs with bf16 dot products) [out / b][in' / 2][b][2], pairs of inputs side by side, in' the input width oneDNN
padded with zeros (checked bit for bit, padding included). Otherwise, where the kernels do not build, or with
$LORA_SERVING_CPU_MATVEC=off (benchmarks compare the two), oneDNN serves every row count.
"""

from __future__ import annotations

import ctypes

import torch

from . import cpu_native

BLOCK_ROWS = (64, 32, 16, 8)
BF16_BLOCK_ROWS = (64, 32, 16)  # the bf16 form reads 16 outputs per vector
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


def enabled() -> bool:
    return cpu_native.available_unless("LORA_SERVING_CPU_MATVEC")


class PackedMatvec:
    """The kernel's call on one packed weight (and bias): `matvec(x)` for x [rows <= max_rows, in] of the weight's
    dtype (fp32 or bf16), giving that dtype."""

    # bf16: AMX tile multiplies where the CPU and OS allow them, else AVX-512 bf16 dot products (or fp32 FMAs on the
    # widened words). False takes the second route even where AMX is there; tests check both on such a CPU.
    allow_tiles = True

    def __init__(self, address: int, block: int, out_features: int, in_features: int,
                 bias: torch.Tensor | None, keep_alive: torch.Tensor, *, dtype: torch.dtype = torch.float32,
                 padded_in: int | None = None) -> None:
        self.out_features = out_features
        self.dtype = dtype
        library = cpu_native.library()
        self._vector_rows = library.matvec_max_rows()
        self._tile_rows = library.matvec_bf16_tile_rows(padded_in) if dtype == torch.bfloat16 else 0
        # The bf16 form adds the bias in fp32 before its one rounding: an fp32 copy of it (out_features floats).
        bias = None if bias is None else bias.to(torch.float32).contiguous()
        self._keep = (keep_alive, bias)  # the kernel reads them through the pointers below
        if dtype == torch.bfloat16:
            self._function = cpu_native.library().packed_matvec_bf16
            self._fixed = (_PTR(address), _I64(out_features), _I64(in_features), _I64(padded_in), _I64(block))
        else:
            self._function = cpu_native.library().packed_matvec_f32
            self._fixed = (_PTR(address), _I64(out_features), _I64(in_features), _I64(block))
        self._bias = None if bias is None else _PTR(bias.data_ptr())

    @classmethod
    def for_weight(cls, weight: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> "PackedMatvec | None":
        """The kernel's call on `packed` (oneDNN's packed form of fp32 or bf16 `weight`), or None when it cannot
        read it."""
        if not enabled() or (bias is not None and bias.dtype not in (torch.float32, weight.dtype)):
            return None
        address = torch.ops.mkldnn.data_ptr
        if weight.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32):
            block = packed_block_rows(weight, packed)
            if block is not None:
                return cls(address(packed), block, weight.shape[0], weight.shape[1], bias, packed)
        elif weight.dtype == torch.bfloat16:
            layout = packed_pair_layout(weight, packed)
            if layout is not None:
                block, padded_in = layout
                return cls(address(packed), block, weight.shape[0], weight.shape[1], bias, packed,
                           dtype=torch.bfloat16, padded_in=padded_in)
        return None

    @property
    def max_rows(self) -> int:
        """Up to how many rows one call multiplies: more where tiles serve (each 16 rows of x one tile multiply per
        16 outputs and 32 inputs), a few where each row costs instructions of its own."""
        return self._tile_rows if self._tile_rows and self.allow_tiles else self._vector_rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.dtype:  # the kernel would read its bytes as the weight's dtype
            raise ValueError(f"the projection's weight is {self.dtype}, its input {x.dtype}")
        if x.stride(1) != 1:
            x = x.contiguous()
        rows = x.shape[0]
        y = torch.empty(rows, self.out_features, dtype=self.dtype)
        if not 0 < rows <= self.max_rows:  # the kernel's scratch holds max_rows rows (and tiles need one)
            if rows == 0:
                return y
            raise ValueError(f"the kernel multiplies up to {self.max_rows} rows, got {rows}")
        # Plain ints: the library's argtypes convert them (a decode step makes ~120 of these calls).
        if self.dtype == torch.bfloat16:
            self._function(*self._fixed, x.data_ptr(), x.stride(0), rows, self._bias, y.data_ptr(), self.out_features,
                           torch.get_num_threads(), int(self.allow_tiles))
        else:
            self._function(*self._fixed, x.data_ptr(), x.stride(0), rows, self._bias, y.data_ptr(), self.out_features,
                           torch.get_num_threads())
        return y


def packed_block_rows(weight: torch.Tensor, packed: torch.Tensor) -> int | None:
    """b such that `packed` holds fp32 `weight` [out, in] as [ceil(out / b)][in][b] (the last block padded), else
    None."""
    raw = _packed_bytes(packed)
    if raw is None:
        return None
    out_features, in_features = weight.shape
    for block in BLOCK_ROWS:
        num_blocks = -(-out_features // block)
        if raw.numel() != num_blocks * block * in_features * 4:
            continue
        as_read = raw.view(torch.float32).view(num_blocks, in_features, block)
        # The first column decides cheaply; the whole weight proves it.
        if not torch.equal(as_read[0, 0, : min(block, out_features)], weight[:block, 0]):
            continue
        if torch.equal(as_read.transpose(1, 2).reshape(num_blocks * block, in_features)[:out_features], weight):
            return block
    return None


def packed_pair_layout(weight: torch.Tensor, packed: torch.Tensor) -> tuple[int, int] | None:
    """(b, in') such that `packed` holds bf16 `weight` [out, in] as [ceil(out / b)][in' / 2][b][2], in' >= in even
    and the padding (inputs from in on, the last block's extra rows) zero, else None. Compared bit for bit."""
    raw = _packed_bytes(packed)
    if raw is None:
        return None
    out_features, in_features = weight.shape
    bits = weight.view(torch.int16)
    for block in BF16_BLOCK_ROWS:
        num_blocks = -(-out_features // block)
        padded_in, remainder = divmod(raw.numel() // 2, num_blocks * block)
        if remainder or raw.numel() % 2 or padded_in % 2 or not in_features <= padded_in:
            continue
        as_read = raw.view(torch.int16).view(num_blocks, padded_in // 2, block, 2)
        if not torch.equal(as_read[0, 0, : min(block, out_features), 0], bits[:block, 0]):
            continue
        rows = as_read.permute(0, 2, 1, 3).reshape(num_blocks * block, padded_in)
        if (torch.equal(rows[:out_features, :in_features], bits)
                and not rows[:, in_features:].any() and not rows[out_features:].any()):
            return block, padded_in
    return None


def _packed_bytes(packed: torch.Tensor) -> torch.Tensor | None:
    """The bytes of a oneDNN tensor, read in place (uint8), or None for a tensor that is not one."""
    try:
        address, num_bytes = torch.ops.mkldnn.data_ptr(packed), torch.ops.mkldnn._nbytes(packed)
    except (AttributeError, RuntimeError):  # ops this torch build lacks, or not a oneDNN tensor
        return None
    return torch.frombuffer((ctypes.c_uint8 * num_bytes).from_address(address), dtype=torch.uint8)
