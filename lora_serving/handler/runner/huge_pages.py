"""The model's weights and KV cache in transparent huge pages (2 MB) on Linux CPUs.

Why: a decode step streams every weight once, and its reads cross a 4 KB page every 4 KB: in a virtual
machine each TLB miss is a two-level page walk (the guest's tables, then the host's), which on a 2-core
VM left the projections' reads well under the memory's speed (docs/BENCHMARKS.md, "Huge pages").
With 2 MB pages the same bytes take 512 times fewer TLB entries.

How, touching only the engine's own memory (nothing process-wide):
- weights, already written when the model loads: each 2 MB-aligned window that holds part of a weight is
  marked MADV_HUGEPAGE and collapsed into a huge page now (MADV_COLLAPSE, Linux 6.1+). A window may also
  hold a neighbour's bytes (the allocator puts small weights side by side); collapsing moves them into the
  huge page unchanged.
- the KV cache: allocated untouched, marked MADV_HUGEPAGE, then zeroed, so that the zeroing faults in huge
  pages rather than 4 KB ones.
Where the kernel refuses (THP "never", an older kernel, a window partly unmapped) that window keeps 4 KB pages;
nothing else changes. $LORA_SERVING_HUGE_PAGES=off leaves every page as the allocator made it (benchmarks compare).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_serving.handler.models.projection import Projection

logger = logging.getLogger(__name__)

MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25
THP_SETTINGS = Path("/sys/kernel/mm/transparent_hugepage")


@dataclass
class Advice:
    windows: int = 0
    huge: int = 0  # windows the kernel made (or will fault in as) huge pages

    @property
    def huge_bytes(self) -> int:
        return self.huge * huge_page_size()


def enabled() -> bool:
    """Linux with transparent huge pages not turned off, madvise reachable, and the switch not "off"."""
    if os.environ.get("LORA_SERVING_HUGE_PAGES", "auto").lower() in ("off", "0", "false", "no"):
        return False
    return _libc() is not None and huge_page_size() > 0


@functools.cache
def huge_page_size() -> int:
    """The kernel's PMD-sized huge page (2 MB on x86-64), or 0 where transparent huge pages are off or absent."""
    try:
        if "[never]" in (THP_SETTINGS / "enabled").read_text():
            return 0
        return int((THP_SETTINGS / "hpage_pmd_size").read_text())
    except (OSError, ValueError):
        return 0


@functools.cache
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise.restype = ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


def windows(ranges: list[tuple[int, int]]) -> list[int]:
    """The start of each huge-page-aligned window that holds part of one of the (address, bytes) ranges."""
    size = huge_page_size()
    starts = set()
    for address, num_bytes in ranges:
        if num_bytes > 0:
            starts.update(range(address // size * size, address + num_bytes, size))
    return sorted(starts)


def advise(ranges: list[tuple[int, int]], *, collapse: bool) -> Advice:
    """Marks the windows of `ranges` for huge pages; `collapse` (memory already written) also makes them huge
    pages now. A window the kernel refuses is left as it was."""
    advice = Advice()
    if not enabled():
        return advice
    libc, size = _libc(), huge_page_size()
    for start in windows(ranges):
        advice.windows += 1
        if libc.madvise(start, size, MADV_HUGEPAGE) != 0:
            continue
        if not collapse or libc.madvise(start, size, MADV_COLLAPSE) == 0:
            advice.huge += 1
    return advice


def tensor_range(tensor: torch.Tensor) -> tuple[int, int]:
    return tensor.data_ptr(), tensor.nbytes


def weight_ranges(model) -> list[tuple[int, int]]:
    """(address, bytes) of a model's CPU weights: its layers' projections (their packed or plain weight) and
    tensors, found in the layers' attributes (lists and the model-family objects they hold included), the
    embedding table and the LM head."""
    ranges: list[tuple[int, int]] = []
    seen: set[int] = {id(model)}

    def visit(value) -> None:
        if id(value) in seen:
            return
        seen.add(id(value))
        if isinstance(value, Projection):
            ranges.append(value.storage_range())
        elif isinstance(value, torch.Tensor):
            if value.device.type == "cpu" and not value.is_sparse:
                ranges.append(tensor_range(value))
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
        elif type(value).__module__.startswith("lora_serving.handler.models") and hasattr(value, "__dict__"):
            for item in vars(value).values():
                visit(item)

    for layer in model.layers:
        visit(layer)
    visit(model.embed_tokens)
    visit(model.lm_head)
    return ranges


def collapse_weights(model) -> Advice:
    """The model's CPU weights collapsed into huge pages (logged)."""
    advice = advise(weight_ranges(model), collapse=True)
    if advice.windows:
        logger.info("huge pages: %d of %d MB of weight windows collapsed", advice.huge_bytes >> 20,
                    (advice.windows * huge_page_size()) >> 20)
    return advice


def zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU tensor whose pages are huge ones where the kernel allows: marked before the zeroing, which is
    its first touch (torch.zeros writes its zeros into 4 KB pages as it allocates)."""
    tensor = torch.empty(shape, dtype=dtype)
    advise([tensor_range(tensor)], collapse=False)
    return tensor.zero_()
