"""The CPU kernels in C (kernels/cpu_lora.c; cpu_matvec.c, cpu_attention.c and cpu_logits.c for the modules of those
names): compiled on first use with the system's C compiler into one library, called through ctypes. This module
builds and loads it and holds the LoRA kernel's calls.

Why C and not torch ops: at decode each adapter serves one or two tokens, so the LoRA math is a few hundred
tiny matrix-vector products a step. Torch's fastest expression of that (two embedding_bag calls per shrink
and expand, kernels/torch_path.py) spends more on per-call dispatch and on summing rank-wide rows than on
the bytes it reads (docs/BENCHMARKS.md, Multi-LoRA); one C pass per slot does the whole projection.

The library is built once per (sources, compiler, CPU) into a cache directory ($LORA_SERVING_KERNEL_CACHE, else
$XDG_CACHE_HOME/lora-serving/kernels, else ~/.cache/...; the temporary directory when that cannot be written)
and takes under a second to compile (0.8 s here). Where no compiler works the torch path's embedding_bag route
serves LoRA instead (and oneDNN every projection, torch decode attention), with one warning; $LORA_CPU_KERNEL=off
chooses that LoRA route on purpose (benchmarks compare the two).
"""

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(name) for name in ("cpu_lora.c", "cpu_matvec.c", "cpu_attention.c",
                                                                    "cpu_logits.c"))
HEADERS = tuple(Path(__file__).with_name(name)
                for name in ("cpu_vec.h", "cpu_amx.h", "cpu_attention_tiles.h", "cpu_attention_amx.h"))
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
# The element types the kernels take (for bf16 they widen to fp32 as they read and sum in fp32).
KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def enabled() -> bool:
    """Whether the torch path should use the kernel: $LORA_CPU_KERNEL is not "off" and it builds and loads."""
    return available_unless("LORA_CPU_KERNEL")


def available_unless(switch: str) -> bool:
    """Whether the library builds and loads here and the environment variable `switch` does not turn its
    user off ("off", "0", "false" or "no"; benchmarks compare each kernel with the route it replaces)."""
    if os.environ.get(switch, "auto").lower() in ("off", "0", "false", "no"):
        return False
    return library() is not None


@functools.cache
def library():
    """The loaded kernel library, or None (logged once) when it cannot be built here."""
    try:
        return _load(_build())
    except Exception as error:  # no compiler, a read-only disk, an odd libc: the torch route still serves
        logger.warning("the CPU kernels are unavailable (%s): the slower embedding_bag route serves LoRA, oneDNN "
                       "every projection and torch decode attention", error)
        return None


class _Items(ctypes.Structure):
    _fields_ = [("num_items", _I64), ("item_slots", _PTR), ("item_starts", _PTR), ("item_counts", _PTR),
                ("token_ids", _PTR)]


class _Buffers(ctypes.Structure):
    _fields_ = [("a_rows", _PTR), ("a_width", _I64), ("max_rank", _I64), ("num_slices", _I64), ("b_rows", _PTR),
                ("out_widths", _PTR), ("out_offsets", _PTR), ("slice_ranks", _PTR), ("ranks_are_int64", _I64),
                ("a_compact", _PTR), ("compact_ranks", _PTR), ("is_bf16", _I64)]


class Call:
    """A step's work items for the kernel (shared by every module of one hidden size), as the struct it reads."""

    def __init__(self, items: torch.Tensor, token_ids: torch.Tensor) -> None:
        self.items = items  # [3, n] int64: slot, start in token_ids, count (<= token_block())
        self.token_ids = token_ids
        self._struct = _Items(items.shape[1], items[0].data_ptr(), items[1].data_ptr(), items[2].data_ptr(),
                              token_ids.data_ptr())
        self.address = ctypes.addressof(self._struct)


class Weights:
    """One fused projection's rank-major buffers as the kernel reads them; bind() adds the slot ranks (they may
    come as new tensors with each call of add_lora_packed, and are fixed for the engine's prepared groups)."""

    def __init__(self, a_rows: torch.Tensor, b_rows: tuple, max_rank: int, hidden: int) -> None:
        if len(b_rows) > max_slices():
            raise ValueError(f"the kernel takes up to {max_slices()} slices, got {len(b_rows)}")
        if a_rows.dtype not in KERNEL_DTYPES or any(b.dtype != a_rows.dtype for b in b_rows):
            raise ValueError(f"the kernel takes fp32 or bf16 buffers of one dtype, got {a_rows.dtype} and "
                             f"{[b.dtype for b in b_rows]}")
        self.hidden = hidden
        self.dtype = a_rows.dtype
        self.num_slots = a_rows.shape[0] // hidden
        widths = torch.tensor([b.shape[1] for b in b_rows], dtype=torch.int64)
        offsets = torch.cumsum(widths, 0) - widths
        b_pointers = (_PTR * len(b_rows))(*[b.data_ptr() for b in b_rows])
        self.a_rows = a_rows
        self._keep = (b_rows, widths, offsets, b_pointers)
        self.num_slices = len(b_rows)
        self._fields = (a_rows.data_ptr(), a_rows.shape[1], max_rank, len(b_rows), ctypes.addressof(b_pointers),
                        widths.data_ptr(), offsets.data_ptr())

    def bind(self, slot_ranks_slices, compact: "CompactA | None" = None) -> "Buffers":
        """These buffers with the slices' ranks (as ranks_supported accepts), read in place at each call, and
        optionally a compact copy of A that the kernel reads for the slots it is current for."""
        return Buffers(self, slot_ranks_slices, compact)


class CompactA:
    """A second copy of a group's A in which each slot's rows are as wide as the sum of its slices' ranks, not
    slices x max_rank (the kernel's a_compact): a rank-8 adapter under max_rank 16 reads half the bytes. The
    copy of a slot is made by Buffers.compact_slot after its weights and ranks are written, and the kernel reads
    it only while the slot's ranks equal those it was made at (compact_ranks, all 0 until then)."""

    def __init__(self, weights: Weights) -> None:
        self.a_compact = torch.zeros_like(weights.a_rows)
        self.compact_ranks = torch.zeros(weights.num_slots, weights.num_slices, dtype=torch.int64)


class Buffers:
    """Weights bound to slot ranks (and a CompactA or not): the second argument of add()."""

    def __init__(self, weights: Weights, slot_ranks_slices, compact: CompactA | None = None) -> None:
        pointers = (_PTR * len(slot_ranks_slices))(*[ranks.data_ptr() for ranks in slot_ranks_slices])
        self.weights, self.compact = weights, compact
        self._keep = (pointers, tuple(slot_ranks_slices))
        self._struct = _Buffers(*weights._fields, ctypes.addressof(pointers),
                                int(slot_ranks_slices[0].dtype == torch.int64),
                                compact.a_compact.data_ptr() if compact else None,
                                compact.compact_ranks.data_ptr() if compact else None,
                                int(weights.dtype == torch.bfloat16))
        self.address = ctypes.addressof(self._struct)

    def compact_slot(self, slot: int) -> None:
        """Copies slot's A into the compact copy at its current ranks (after its weights and ranks are written)."""
        num_slots = self.weights.num_slots
        if not 0 <= slot < num_slots:
            raise ValueError(f"slot {slot} is outside [0, {num_slots})")
        library().lora_compact_slot(self.address, self.weights.hidden, slot)


def ranks_supported(slot_ranks_slices) -> bool:
    """The kernel reads each slice's ranks in place: contiguous CPU int32/int64 tensors of one dtype."""
    dtype = slot_ranks_slices[0].dtype
    return dtype in (torch.int32, torch.int64) and all(
        r.dtype == dtype and r.device.type == "cpu" and r.is_contiguous() for r in slot_ranks_slices)


def add(y: torch.Tensor, x: torch.Tensor, call: Call, buffers: Buffers) -> None:
    """y[t] += the LoRA delta of each token in call's items; x [T, H] and y [T, O] with unit column stride, of the
    buffers' dtype (fp32 or bf16)."""
    dtype = buffers.weights.dtype
    if x.dtype != dtype or y.dtype != dtype:
        raise ValueError(f"x and y must be {dtype} as the adapter buffers are, got {x.dtype} and {y.dtype}")
    arguments = (call.address, buffers.address, x.data_ptr(), x.stride(0), x.shape[1], y.data_ptr(), y.stride(0),
                 torch.get_num_threads())
    if dtype == torch.float32:
        library().lora_add_f32(*arguments)
    elif library().lora_add_bf16(*arguments) != 0:
        raise MemoryError("LoRA kernel: no memory for its bf16 scratch rows")


@functools.cache
def token_block() -> int:
    return library().lora_token_block()


@functools.cache
def max_slices() -> int:
    return library().lora_max_slices()


def library_built_with(flags: tuple[str, ...]):
    """The kernels compiled with other flags than the engine's and loaded (cached as the engine's build is): the
    tests run the forms other CPUs get, AVX2 only or no -march at all, on this one."""
    return _load(_build(flags))


def _build(flags: tuple[str, ...] = FLAGS) -> Path:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    sources = [path.read_bytes() for path in SOURCES + HEADERS]
    key = hashlib.sha256(b"\0".join([*sources, version.encode(), " ".join(flags).encode(), _cpu_identity()]))
    name = f"cpu_kernels-{key.hexdigest()[:16]}.so"
    if (_cache_dir() / name).is_file():
        return _cache_dir() / name
    target = _writable_cache_dir() / name
    if target.is_file():
        return target
    # Compile beside the target and rename: processes starting together never load a half-written file.
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        command = [compiler, *flags, "-o", str(built), *map(str, SOURCES), "-lm"]
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {completed.stderr.strip()[-500:]}")
        os.replace(built, target)
    return target


def _load(path: Path):
    torch.get_num_threads()  # torch (and its libgomp) is loaded: the kernel binds to the same OpenMP runtime
    lib = ctypes.CDLL(str(path))
    lib.lora_add_f32.restype = None
    lib.lora_add_bf16.restype = ctypes.c_int
    for lora_add in (lib.lora_add_f32, lib.lora_add_bf16):
        lora_add.argtypes = [_PTR, _PTR, _PTR, _I64, _I64, _PTR, _I64, ctypes.c_int]
    lib.lora_token_block.restype = ctypes.c_int
    lib.lora_max_slices.restype = ctypes.c_int
    lib.lora_compact_slot.restype = None
    lib.lora_compact_slot.argtypes = [_PTR, _I64, _I64]
    lib.packed_matvec_f32.restype = None
    lib.packed_matvec_f32.argtypes = [_PTR, _I64, _I64, _I64, _PTR, _I64, _I64, _PTR, _PTR, _I64, ctypes.c_int]
    lib.packed_matvec_bf16.restype = None
    lib.packed_matvec_bf16.argtypes = [_PTR, _I64, _I64, _I64, _I64, _PTR, _I64, _I64, _PTR, _PTR, _I64, ctypes.c_int,
                                       ctypes.c_int]
    lib.matvec_max_rows.restype = ctypes.c_int
    lib.matvec_bf16_tile_rows.restype = ctypes.c_int
    lib.matvec_bf16_tile_rows.argtypes = [_I64]
    for attention in (lib.paged_decode_attention_f32, lib.paged_decode_attention_bf16,
                      lib.paged_decode_attention_bf16_vectors):
        attention.restype = ctypes.c_int
        attention.argtypes = [_I64, _PTR, _I64, _I64, _I64, _I64, _I64, _PTR, _PTR, _I64, _I64, _PTR, _I64, _PTR, _PTR,
                              ctypes.c_float, _PTR, ctypes.c_int]
    lib.logits_row_summaries.restype = None
    lib.logits_row_summaries.argtypes = [_PTR, _I64, _I64, _I64, _PTR, _PTR, _PTR, ctypes.c_int]
    lib.attention_tiles_serve_here.restype = ctypes.c_int
    lib.attention_tiles_serve_here.argtypes = [_I64, _I64]
    lib.attention_exp_f32.restype = None
    lib.attention_exp_f32.argtypes = [_PTR, _PTR, _I64]
    lib.attention_vector_lanes.restype = ctypes.c_int
    return lib


def _cache_dir() -> Path:
    configured = os.environ.get("LORA_SERVING_KERNEL_CACHE")
    if configured:
        return Path(configured)
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "lora-serving" / "kernels"


def _writable_cache_dir() -> Path:
    """The cache directory, or one under the temporary directory when it cannot be written (a read-only home)."""
    for candidate in (_cache_dir(), Path(tempfile.gettempdir()) / f"lora-serving-kernels-{os.getuid()}"):
        try:
            candidate.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(candidate, os.W_OK):
            return candidate
    raise RuntimeError(f"no writable directory to build the kernel in ({_cache_dir()} and the temporary directory)")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them; empty where /proc/cpuinfo is not there to read."""
    try:
        line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return frozenset()
    return frozenset(line.split(":", 1)[1].split())


def _cpu_identity() -> bytes:
    """-march=native builds for this CPU: a cache shared by machines must not hand one's build to another."""
    return (platform.machine() + (" ".join(sorted(cpu_flags())) or platform.processor())).encode()
