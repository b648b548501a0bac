"""x @ W.T (+ b) for the model's projections, in the form that multiplies fastest on their device.

On CPU with fp32 weights, each weight is repacked once at load into oneDNN's blocked layout and
multiplied with oneDNN's inner product (the prepacked linear that torch's own CPU compiler emits).
Measured on a 2-core AVX2 VM with torch 2.13, against MKL's sgemm on the plain weight: at 32 rows
(a decode batch) 1.3x faster for the q/k/v projection and 1.6x for the 32000-wide LM head, at 1 row
1.8x for the LM head; prefills go through in pieces of a bounded set of sizes (onednn_pieces). The packed
copy replaces the plain weight, the same size (an LM head tied to the embedding table needs both), but
oneDNN keeps some state per input shape, which those sizes bound. One to four rows (decodes at small batch sizes, where the step is bound by
reading the weights) go instead to a C kernel that reads the packed weight in place
(kernels/cpu_matvec.py): oneDNN's fixed cost per call made it 1.3-1.7x slower at one row.

bf16 weights are packed for oneDNN too where the CPU multiplies bf16 itself (AMX, AVX-512 bf16:
handler/cpu_dtype.py): there oneDNN's bf16 inner product runs on those units (on SmolLM2's shapes 2-4x
torch's plain bf16 matmul on an AMX Xeon), and decode-sized row counts go to the C kernel's bf16 form, which
reads oneDNN's pair-interleaved layout in place: up to 64 rows with AMX tiles (a tile multiply takes 16 rows at the
cost of one), else up to four with bf16 dot products.

Without oneDNN (or for other dtypes, or on GPUs, where cuBLAS picks its own kernels) the plain weight
is used. There MKL is markedly slower for a few activation rows against a wide weight when called as
`linear(x, W)` than as `W @ x.T` (1.4-3.5x for the LM head at 2..64 rows), so that order is taken for
decode-sized batches. Either way the product is the same; only the summation order inside the GEMM,
hence fp32 rounding, differs, as between any two GEMM implementations.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from lora_serving.handler import compiled_ops
from lora_serving.handler.cpu_dtype import native_bf16
from lora_serving.kernels import PackedMatvec

# Up to this many rows the weight-major call is used on CPU: the decode regime (one row per sequence).
WEIGHT_MAJOR_MAX_ROWS = 64
# oneDNN (through torch's ideep) keeps state per input shape that it does not give back: 1..64 rows on
# the five projection shapes of bench_engine's model held ~180 MB for good, while ~2000 distinct row counts
# held several GB. So it only ever sees a bounded set of row counts: up to 64 rows (decodes) as they come, and
# more (prefills) in pieces of 64 * 2^k rows, the largest that fit, up to ONEDNN_MAX_ROWS, with the last
# remainder under 64 in one piece. Pieces of 64 rows alone cost 1.5-3x whole GEMMs at a 4096-token prefill step.
ONEDNN_SMALL_ROWS = 64
ONEDNN_MAX_ROWS = 4096
# A oneDNN call costs ~45 us however small the product (MKL's ~15 us): weights below this many elements
# (a toy model's) multiplied as fast or faster through MKL on 2 cores, so they are not packed.
ONEDNN_MIN_WEIGHT_ELEMENTS = 2**17
# oneDNN tunes the packed layout for a batch size; from 8 rows up the hint changed little (measured).
PACK_FOR_ROWS = 32


class Projection:
    """One projection's weight (and bias), called as `projection(x)`: x [T, in] -> [T, out], contiguous."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, use_onednn: bool = True) -> None:
        self.out_features = weight.shape[0]
        self.bias = bias
        self._packed = _pack_for_onednn(weight) if use_onednn and onednn_usable_for(weight) else None
        self._matvec = None if self._packed is None else PackedMatvec.for_weight(weight, self._packed, bias)
        self.weight = weight if self._packed is None else None
        self.key = compiled_ops.register_projection(self)

    @property
    def backend(self) -> str:
        return "onednn" if self._packed is not None else "dense"

    @property
    def matvec_rows(self) -> int:
        """Up to how many rows the C kernel multiplies (0: it does not serve this projection)."""
        return 0 if self._matvec is None else self._matvec.max_rows

    def storage_range(self) -> tuple[int, int]:
        """(address, bytes) of the weight as multiplied: oneDNN's packed copy, else the plain weight."""
        if self._packed is not None:
            return torch.ops.mkldnn.data_ptr(self._packed), torch.ops.mkldnn._nbytes(self._packed)
        return self.weight.data_ptr(), self.weight.nbytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None and torch.compiler.is_compiling():
            # Traced by the compiled decode step (handler/runner/compiled_decode.py): one opaque op in its graph.
            return torch.ops.lora_serving.project(x, self.key)
        return self.eager(x)

    def eager(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None:
            return _dense_project(x, self.weight, self.bias)
        rows = x.shape[0]
        if self._matvec is not None and rows <= self._matvec.max_rows:
            return self._matvec(x)
        if rows <= ONEDNN_SMALL_ROWS:
            return self._onednn(x)
        out = torch.empty(rows, self.out_features, dtype=x.dtype, device=x.device)
        start = 0
        for piece in onednn_pieces(rows):
            out[start : start + piece] = self._onednn(x[start : start + piece])
            start += piece
        return out

    def _onednn(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")


def onednn_pieces(rows: int) -> list[int]:
    """The row counts oneDNN multiplies `rows` rows in: 64 * 2^k each (the largest that fits, at most
    ONEDNN_MAX_ROWS), then what is left under 64 in one."""
    pieces = []
    while rows >= ONEDNN_SMALL_ROWS:
        piece = min(ONEDNN_MAX_ROWS, ONEDNN_SMALL_ROWS << ((rows // ONEDNN_SMALL_ROWS).bit_length() - 1))
        pieces.append(piece)
        rows -= piece
    return pieces + [rows] if rows else pieces


def onednn_usable_for(weight: torch.Tensor) -> bool:
    if weight.device.type != "cpu" or weight.numel() < ONEDNN_MIN_WEIGHT_ELEMENTS:
        return False
    if weight.dtype == torch.bfloat16:
        # Only where the CPU multiplies bf16 itself (AMX tiles, AVX-512 bf16 dot products): elsewhere oneDNN
        # would convert every weight to fp32 on each call.
        return native_bf16() and _onednn_works(torch.bfloat16)
    return weight.dtype == torch.float32 and _onednn_works(torch.float32)


@functools.cache
def _onednn_works(dtype: torch.dtype) -> bool:
    """Whether this torch build has oneDNN's prepacked linear and it computes x @ W.T correctly here."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(24, 16, generator=generator).to(dtype)
        x = torch.randn(3, 16, generator=generator).to(dtype)
        out = torch.ops.mkldnn._linear_pointwise(x, _pack_for_onednn(weight), None, "none", [], "")
        tolerance = 1e-4 if dtype == torch.float32 else 2e-2  # bf16: the output's own rounding (8 bits)
        expected = F.linear(x.float(), weight.float())
        return bool(out.dtype == dtype and torch.allclose(out.float(), expected, rtol=tolerance, atol=tolerance))
    except (AttributeError, RuntimeError):  # an op missing from this build, or refused on this CPU
        return False


def _pack_for_onednn(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_FOR_ROWS)


def _dense_project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    rows = x.shape[0]
    if x.device.type != "cpu" or not 1 < rows <= WEIGHT_MAJOR_MAX_ROWS:
        return F.linear(x, weight, bias)
    if bias is None:
        out_t = torch.mm(weight, x.t())
    else:
        out_t = torch.addmm(bias[:, None], weight, x.t())
    return out_t.t().contiguous()
