"""LoRA ops for many unmerged adapters in one batch: Triton kernels on CUDA, a C kernel and torch on CPU; and the C
kernels for the base model's projections at one to four rows (cpu_matvec.py) and for decode attention
(cpu_attention.py) on CPU.

See docs/KERNELS.md. Imports only torch (and triton, lazily, on the first CUDA call).
"""

from . import cpu_attention
from .cpu_matvec import PackedMatvec
from .cpu_native import enabled as cpu_kernel_enabled
from .group import LoraGroup
from .layout import allocate_lora_buffers, allocate_lora_group_buffers, is_rank_major
from .metadata import LoraBatchMeta
from .ops import add_lora, add_lora_packed, triton_available

__all__ = [
    "LoraBatchMeta",
    "LoraGroup",
    "PackedMatvec",
    "add_lora",
    "add_lora_packed",
    "cpu_attention",
    "cpu_kernel_enabled",
    "allocate_lora_buffers",
    "allocate_lora_group_buffers",
    "is_rank_major",
    "triton_available",
]
