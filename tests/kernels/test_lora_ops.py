"""add_lora / add_lora_packed against the fp32 reference, on the torch path and the Triton path.

Without a GPU the Triton kernels run in the interpreter, in one subprocess (see lora_checks.py),
so their cases are few and tiny; the cheap torch path covers the whole grid.
"""

import pytest
import torch

from lora_serving import kernels
from lora_serving.kernels import torch_path
from tests.kernels.lora_checks import SPECIAL_CHECKS, check_matches_reference, torch_cases, triton_checks
from tests.kernels.lora_kernel_cases import Case, make_batch

ON_GPU = torch.cuda.is_available()
TRITON_CHECKS = triton_checks(ON_GPU)


# The torch path serves decode-sized segments with the C kernel (fp32, rank-major buffers) or, switched off
# or unavailable, with embedding_bag calls: both run the grid.
CPU_KERNEL = pytest.mark.parametrize("cpu_kernel", ["auto", "off"], ids=["c_kernel", "embedding_bag"],
                                     indirect=True)


@pytest.fixture
def cpu_kernel(request, monkeypatch):
    monkeypatch.setenv("LORA_CPU_KERNEL", request.param)
    return request.param


@CPU_KERNEL
@pytest.mark.parametrize("case", torch_cases(), ids=str)
def test_torch_path_matches_reference(case, cpu_kernel):
    check_matches_reference(case, "torch", "cpu")


@CPU_KERNEL
@pytest.mark.parametrize("case", [case for case in torch_cases() if case.tokens > 1], ids=str)
def test_torch_path_with_gemm_route_for_segments_of_a_few_tokens(case, cpu_kernel, monkeypatch):
    # At test sizes every segment would take the embedding_bag route; lower the thresholds so the
    # GEMM route (consecutive and gathered) runs too, alone and beside the bags in one call.
    monkeypatch.setattr(torch_path, "GEMM_MIN_TOKEN_FEATURES_CONSECUTIVE", 300)
    monkeypatch.setattr(torch_path, "GEMM_MIN_TOKEN_FEATURES_GATHERED", 300)
    monkeypatch.setattr(torch_path, "C_KERNEL_GEMM_MIN_TOKEN_FEATURES_CONSECUTIVE", 300)
    check_matches_reference(case, "torch", "cpu")


@CPU_KERNEL
@pytest.mark.parametrize("name", sorted(SPECIAL_CHECKS))
def test_torch_path(name, cpu_kernel):
    SPECIAL_CHECKS[name]("torch", "cpu")


@pytest.mark.parametrize("check_id", list(TRITON_CHECKS))
def test_triton_path(check_id, interpreted_triton_results):
    if interpreted_triton_results is None:
        TRITON_CHECKS[check_id]("cuda")
    elif interpreted_triton_results[check_id] is not None:
        pytest.fail(interpreted_triton_results[check_id], pytrace=False)


def test_rejects_mismatched_shapes():
    batch = make_batch(Case(7, 64, (64,), "8", "uniform"))
    a, b, slots, ranks = batch.lora_a[0], batch.lora_b[0], batch.token_slots, batch.slot_ranks[0]
    with pytest.raises(ValueError, match="y must be"):
        kernels.add_lora(batch.y[:, :32], batch.x, a, b, slots, ranks)
    with pytest.raises(ValueError, match="do not fit"):
        kernels.add_lora(batch.y, batch.x[:, :32], a, b, slots, ranks)
    with pytest.raises(ValueError, match="meta was built for 3 tokens"):
        kernels.add_lora(batch.y, batch.x, a, b, slots, ranks, kernels.LoraBatchMeta.build(slots[:3], batch.num_slots))
    with pytest.raises(ValueError, match="on meta"):
        meta_elsewhere = kernels.LoraBatchMeta.build(slots, batch.num_slots, device="meta")
        kernels.add_lora(batch.y, batch.x, a, b, slots, ranks, meta_elsewhere)
