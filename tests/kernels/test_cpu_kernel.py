"""The CPU LoRA kernel (lora_serving/kernels/cpu_lora.c through lora_serving/kernels/cpu_native.py) against the fp32
reference.

test_lora_ops.py runs the whole torch-path grid with the kernel on (fp32 cases take it) and off (the
embedding_bag route); these tests make sure the kernel is what served, and cover what only it has: work
items of one slot split over threads, its build and its fallback.
"""

import logging
import os

import pytest
import torch

from lora_serving import kernels
from lora_serving.kernels import cpu_native, torch_path
from lora_serving.kernels.reference import add_lora_packed_reference
from tests.kernels.lora_checks import torch_cases
from tests.kernels.lora_kernel_cases import Case, make_batch, tolerance

# The kernel reads rank-major buffers (lora_serving/kernels/layout.py), in fp32 or bf16.
FP32_CASES = [case for case in torch_cases() if case.dtype == torch.float32 and case.rank_major]
BF16_CASES = [case for case in torch_cases() if case.dtype == torch.bfloat16 and case.rank_major]


@pytest.fixture
def kernel_calls(monkeypatch):
    """How many times the C kernel ran."""
    calls = []
    original = cpu_native.add

    def counting_add(*args, **kwargs):
        calls.append(args[2].items.shape[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(cpu_native, "add", counting_add)
    return calls


def test_the_kernel_builds_and_loads_on_this_machine():
    # CI and the serving image have a C compiler; without one every CPU LoRA call would silently take the
    # slower route, so its absence is a failure here, not a skip.
    assert cpu_native.library() is not None
    assert kernels.cpu_kernel_enabled()


@pytest.mark.parametrize("case", FP32_CASES, ids=str)
def test_the_kernel_serves_fp32_rank_major_buffers_and_matches_the_reference(case, kernel_calls):
    batch = make_batch(case)
    expected = add_lora_packed_reference(batch.y, batch.x, batch.lora_a, batch.lora_b, batch.token_slots,
                                         batch.slot_ranks)
    y_before = batch.y.clone()
    kernels.add_lora_packed(batch.y, batch.x, batch.lora_a, batch.lora_b, batch.token_slots, batch.slot_ranks)
    torch.testing.assert_close(batch.y, expected, **tolerance(torch.float32))
    no_adapter = batch.token_slots < 0
    assert torch.equal(batch.y[no_adapter], y_before[no_adapter])
    has_lora = bool((batch.token_slots >= 0).any())
    long_segment = (case.popularity in ("same", "huge_segment")
                    and case.tokens * case.hidden >= torch_path.C_KERNEL_GEMM_MIN_TOKEN_FEATURES_CONSECUTIVE)
    assert kernel_calls or not has_lora or long_segment, "the fp32 case did not reach the C kernel"


@pytest.mark.parametrize("case", BF16_CASES, ids=str)
def test_the_kernel_serves_bf16_buffers_summing_in_fp32_and_rounding_once(case, kernel_calls):
    batch = make_batch(case)
    expected = add_lora_packed_reference(batch.y, batch.x, batch.lora_a, batch.lora_b, batch.token_slots,
                                         batch.slot_ranks)
    y_before = batch.y.clone()
    kernels.add_lora_packed(batch.y, batch.x, batch.lora_a, batch.lora_b, batch.token_slots, batch.slot_ranks)
    assert batch.y.dtype == torch.bfloat16
    has_lora = bool((batch.token_slots >= 0).any())
    long_segment = (case.popularity in ("same", "huge_segment")
                    and case.tokens * case.hidden >= torch_path.C_KERNEL_GEMM_MIN_TOKEN_FEATURES_CONSECUTIVE)
    assert kernel_calls or not has_lora or long_segment, "the bf16 case did not reach the C kernel"
    no_adapter = batch.token_slots < 0
    assert torch.equal(batch.y[no_adapter], y_before[no_adapter])
    if kernel_calls and not long_segment:
        # The fp32 reference of the same bf16 operands rounded once to bf16: within half a unit (2^-9 relative),
        # far inside the bf16 tolerance of the torch routes, which round each partial product.
        torch.testing.assert_close(batch.y.float(), expected, rtol=2**-8, atol=1e-3)
    else:
        torch.testing.assert_close(batch.y.float(), expected, **tolerance(torch.bfloat16))


def test_one_slots_tokens_split_into_work_items_on_several_threads(kernel_calls):
    # 3 slots interleaved over 40 tokens (never consecutive): each slot's ~13 tokens become several work items
    # of up to token_block() tokens, which the threads share; ranks differ per slice and per slot.
    case = Case(40, 96, (64, 32, 32), "mixed", "uniform", num_slots=3, shared_a=True)
    batch = make_batch(case, seed=5)
    batch.token_slots = torch.arange(40) % 3
    expected = add_lora_packed_reference(batch.y, batch.x, batch.lora_a, batch.lora_b, batch.token_slots,
                                         batch.slot_ranks)
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            y = batch.y.clone()
            kernels.add_lora_packed(y, batch.x, batch.lora_a, batch.lora_b, batch.token_slots, batch.slot_ranks)
            results.append(y)
    finally:
        torch.set_num_threads(threads)
    assert kernel_calls and min(kernel_calls) > 3, kernel_calls  # more items than slots
    for y in results:
        torch.testing.assert_close(y, expected, **tolerance(torch.float32))
        assert torch.equal(y, results[0]), "a token's sum must not depend on the thread count"


def test_views_of_x_and_y_with_row_strides(kernel_calls):
    # The engine passes x as a slice of a wider tensor (q/k/v split, attention output views): row strides
    # larger than the width must be honoured, and y's columns outside the projection left alone.
    case = Case(9, 64, (96,), "mixed", "zipf", shared_a=True)
    batch = make_batch(case, seed=3)
    wide_x = torch.randn(9, 64 + 17)
    wide_x[:, 5 : 5 + 64] = batch.x
    wide_y = torch.randn(9, 96 + 11)
    wide_y[:, 4 : 4 + 96] = batch.y
    before = wide_y.clone()
    expected = add_lora_packed_reference(batch.y, batch.x, batch.lora_a, batch.lora_b, batch.token_slots,
                                         batch.slot_ranks)
    kernels.add_lora_packed(wide_y[:, 4 : 4 + 96], wide_x[:, 5 : 5 + 64], batch.lora_a, batch.lora_b,
                            batch.token_slots, batch.slot_ranks)
    assert kernel_calls
    torch.testing.assert_close(wide_y[:, 4 : 4 + 96], expected, **tolerance(torch.float32))
    assert torch.equal(wide_y[:, :4], before[:, :4]) and torch.equal(wide_y[:, 100:], before[:, 100:])


def test_switched_off_the_embedding_bag_route_serves(monkeypatch, kernel_calls):
    monkeypatch.setenv("LORA_CPU_KERNEL", "off")
    batch = make_batch(Case(7, 64, (64, 32), "mixed", "uniform", shared_a=True))
    expected = add_lora_packed_reference(batch.y, batch.x, batch.lora_a, batch.lora_b, batch.token_slots,
                                         batch.slot_ranks)
    kernels.add_lora_packed(batch.y, batch.x, batch.lora_a, batch.lora_b, batch.token_slots, batch.slot_ranks)
    assert not kernel_calls
    torch.testing.assert_close(batch.y, expected, **tolerance(torch.float32))


def test_without_a_compiler_a_warning_names_it_and_the_torch_route_serves(monkeypatch, tmp_path, caplog,
                                                                          kernel_calls):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("LORA_SERVING_KERNEL_CACHE", str(tmp_path / "cache"))
    cpu_native.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="lora_serving.kernels.cpu_native"):
            batch = make_batch(Case(7, 64, (64,), "8", "uniform", shared_a=True))
            expected = add_lora_packed_reference(batch.y, batch.x, batch.lora_a, batch.lora_b, batch.token_slots,
                                                 batch.slot_ranks)
            kernels.add_lora_packed(batch.y, batch.x, batch.lora_a, batch.lora_b, batch.token_slots,
                                    batch.slot_ranks)
        assert not kernel_calls
        torch.testing.assert_close(batch.y, expected, **tolerance(torch.float32))
        assert "CPU kernels are unavailable" in caplog.text and "no-such-compiler" in caplog.text
    finally:
        cpu_native.library.cache_clear()


def test_the_build_is_cached_and_shared_by_processes(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_SERVING_KERNEL_CACHE", str(tmp_path))
    first = cpu_native._build()
    assert first.parent == tmp_path and first.is_file()
    mtime = first.stat().st_mtime_ns
    assert cpu_native._build() == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no scratch left behind


def test_an_unusable_cache_directory_builds_under_the_temporary_directory(monkeypatch, tmp_path):
    # A path under a regular file cannot be made by anyone, root included (a read-only home, in effect).
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("LORA_SERVING_KERNEL_CACHE", str(blocker / "kernels"))
    monkeypatch.setattr(cpu_native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    built = cpu_native._build()
    assert built.parent == tmp_path / "tmp" / f"lora-serving-kernels-{os.getuid()}" and built.is_file()
    assert cpu_native._build() == built  # found there the next time
