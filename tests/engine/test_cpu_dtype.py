"""dtype=auto on CPU: bf16 where the CPU multiplies bf16 natively (AMX / AVX-512 bf16), fp32 elsewhere."""

from __future__ import annotations

import pytest
import torch

from lora_serving.handler import Engine, cpu_dtype
from lora_serving.handler.config import Config
from lora_serving.handler.runner.device import resolve_dtype


@pytest.fixture
def fresh_check(monkeypatch):
    """The cached CPU check recomputed under this test's environment and flags, and again after it."""
    cpu_dtype.native_bf16.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    cpu_dtype.native_bf16.cache_clear()


def auto_on_cpu() -> torch.dtype:
    return resolve_dtype(Config(model_id="unused", dtype="auto"), torch.device("cpu"))


@pytest.mark.parametrize("flags,expected", [
    ({"avx2", "fma"}, torch.float32),
    ({"avx2", "avx512f", "avx512_bf16"}, torch.bfloat16),
    ({"avx512f", "amx_tile", "amx_bf16"}, torch.bfloat16),
])
def test_auto_follows_the_cpu_flags(fresh_check, flags, expected):
    fresh_check.setattr(cpu_dtype, "cpu_flags", lambda: frozenset(flags))
    fresh_check.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert auto_on_cpu() == expected


def test_auto_is_fp32_where_onednn_takes_no_bf16(fresh_check):
    fresh_check.setattr(cpu_dtype, "cpu_flags", lambda: frozenset({"amx_bf16", "avx512_bf16"}))
    fresh_check.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert auto_on_cpu() == torch.float32


def test_the_switch_keeps_fp32(fresh_check):
    fresh_check.setenv("LORA_SERVING_CPU_BF16", "off")
    assert auto_on_cpu() == torch.float32


def test_explicit_dtypes_are_kept_and_the_engine_resolves_auto_by_this_machine(fresh_check, tiny_models):
    for name, dtype in (("float32", torch.float32), ("bf16", torch.bfloat16)):
        assert resolve_dtype(Config(model_id="unused", dtype=name), torch.device("cpu")) == dtype
    engine = Engine(tiny_models.get("llama", "llama"), dtype="auto")
    try:
        has_bf16 = (bool(cpu_dtype.cpu_flags() & cpu_dtype.NATIVE_BF16_FLAGS)
                    and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        assert engine.dtype == (torch.bfloat16 if has_bf16 else torch.float32)
    finally:
        engine.close()
