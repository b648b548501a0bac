"""The weights and KV cache in transparent huge pages (handler/runner/huge_pages.py), read back from the kernel's
own account of the process's mappings (/proc/self/smaps)."""

import mmap

import pytest
import torch

from lora_serving.handler import Engine
from lora_serving.handler.runner import huge_pages

MB = 2**20


def huge_kb_at(address: int) -> int:
    """AnonHugePages (kB) of the mapping that holds `address`."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            first = line.split()[0]
            if "-" in first and ":" not in first:
                start, end = (int(part, 16) for part in first.split("-"))
                inside = start <= address < end
            elif inside and first == "AnonHugePages:":
                return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.fixture
def huge_pages_here():
    if not huge_pages.enabled():
        pytest.skip("no transparent huge pages here (not Linux, THP off, or the switch off)")


def test_written_memory_is_collapsed_into_huge_pages_with_its_values(huge_pages_here):
    # A fresh anonymous mapping (not the allocator's heap, which earlier tests' collapses may have left huge).
    memory = mmap.mmap(-1, 16 * MB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    weight = torch.frombuffer(memory, dtype=torch.float32)
    weight.copy_(torch.randn(weight.numel(), generator=torch.Generator().manual_seed(0)))
    before = weight.clone()
    assert huge_kb_at(weight.data_ptr() + 8 * MB) == 0
    advice = huge_pages.advise([huge_pages.tensor_range(weight)], collapse=True)
    assert advice.windows >= 8 and advice.huge >= 7  # the ends may share a window with unmapped memory
    assert huge_kb_at(weight.data_ptr() + 8 * MB) >= 14 * 1024
    assert torch.equal(weight, before)
    del weight
    memory.close()


def test_zeros_fault_in_huge_pages(huge_pages_here):
    cache = huge_pages.zeros((32 * MB // 2,), torch.bfloat16)
    assert huge_kb_at(cache.data_ptr() + 16 * MB) >= 14 * 1024
    assert cache.dtype == torch.bfloat16 and not cache.any()


def test_the_switch_leaves_pages_as_they_are(monkeypatch):
    monkeypatch.setenv("LORA_SERVING_HUGE_PAGES", "off")
    weight = torch.randn(8 * MB // 4)
    assert huge_pages.advise([huge_pages.tensor_range(weight)], collapse=True) == huge_pages.Advice()


def test_windows_cover_each_range_once():
    size = huge_pages.huge_page_size() or pytest.skip("no huge pages here")
    assert huge_pages.windows([(size + 5, 10), (size + 100, size), (7 * size - 1, 2), (0, 0)]) == [
        size, 2 * size, 6 * size, 7 * size]


def test_an_engine_backs_every_weight_it_multiplies(tiny_models, huge_pages_here, monkeypatch):
    """Every projection, the embedding table and the LM head are in the ranges the engine collapses, and the
    windows it collapsed hold huge pages."""
    advised = []
    inner = huge_pages.advise
    monkeypatch.setattr(huge_pages, "advise", lambda ranges, collapse: advised.append((ranges, collapse))
                        or inner(ranges, collapse=collapse))
    engine = Engine(tiny_models.get("llama", "llama"), dtype="float32", max_rolling_batch_size=4)
    model = engine.runner.model
    (cache, marked), (weights, collapsed) = advised
    assert collapsed and not marked and cache == [huge_pages.tensor_range(engine.runner.kv_cache)]
    expected = [layer.qkv for layer in model.layers] + [layer.gate_up for layer in model.layers] + [model.lm_head]
    for projection in expected:
        assert projection.storage_range() in weights
    assert huge_pages.tensor_range(model.embed_tokens) in weights
    assert huge_kb_at(weights[0][0]) > 0
