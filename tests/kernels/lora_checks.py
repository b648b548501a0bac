"""The checks of add_lora / add_lora_packed against the fp32 reference, for either backend.

Run by test_lora_ops.py: in process for the torch path (and for Triton on a GPU), and, for the
Triton path on a machine without a GPU, by `python -m tests.kernels.lora_checks` in a subprocess
that sets TRITON_INTERPRET=1 before anything imports triton (see run_interpreted_triton_checks).
"""

import itertools
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import torch

from lora_serving import kernels
from lora_serving.kernels.reference import add_lora_packed_reference, add_lora_reference
from tests.kernels.lora_kernel_cases import POPULARITIES, Case, make_batch, tolerance

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
SIZES = (64, 96, 128)


def torch_cases() -> list[Case]:
    """The whole grid (T x popularity x rank), H/O, slices, dtype and layout cycling through it."""
    cases = []
    grid = itertools.product((1, 7, 133), POPULARITIES, ("1", "8", "16", "64", "mixed"))
    for index, (tokens, popularity, ranks) in enumerate(grid):
        cases.append(
            Case(
                tokens,
                SIZES[index % 3],
                (SIZES[(index + 1) % 3],) if index % 4 else (SIZES[index % 3], 64, 64),
                ranks,
                popularity,
                dtype=(F32, F16, BF16)[index % 3],
                no_adapter_tokens=index % 2 == 1,
                rank_major=index % 5 != 0,
                shared_a=index % 4 == 0 and index % 5 != 0,
            )
        )
    return cases


def triton_cases(on_gpu: bool) -> list[Case]:
    """Interpreter-sized: every rank, T, H/O size, popularity, slice count, layout and dtype once."""
    cases = [
        Case(7, 64, (64,), "1", "uniform"),
        Case(7, 96, (96,), "8", "zipf"),
        Case(7, 128, (128,), "16", "distinct"),
        Case(7, 64, (96,), "64", "same", dtype=F16),
        Case(7, 128, (64,), "mixed", "uniform", no_adapter_tokens=True),
        Case(1, 96, (128,), "16", "same"),
        Case(1, 128, (64,), "8", "uniform", dtype=F16),
        Case(133, 64, (64,), "mixed", "zipf", no_adapter_tokens=True),
        Case(133, 64, (96,), "16", "distinct"),
        Case(133, 96, (64,), "8", "huge_segment", dtype=F16),
        Case(133, 64, (64,), "64", "same"),
        Case(7, 64, (128, 64, 64), "mixed", "uniform", no_adapter_tokens=True),
        Case(133, 128, (96, 64, 64), "mixed", "zipf", dtype=F16),
        Case(7, 64, (64, 96), "mixed", "zipf", no_adapter_tokens=True, shared_a=True),
        Case(7, 96, (64,), "mixed", "zipf", rank_major=False),
        Case(133, 64, (64, 96), "mixed", "huge_segment", no_adapter_tokens=True, rank_major=False),
    ]
    if on_gpu:  # the interpreter's tl.dot is wrong for bf16; a GPU is not
        cases += [Case(c.tokens, c.hidden, c.out_features, c.ranks, c.popularity, dtype=BF16) for c in cases]
    return cases


def check_matches_reference(case: Case, backend: str, device: str) -> None:
    batch = make_batch(case, device)
    expected = add_lora_packed_reference(
        batch.y, batch.x, batch.lora_a, batch.lora_b, batch.token_slots, batch.slot_ranks
    )
    y_before = batch.y.clone()
    meta = kernels.LoraBatchMeta.build(batch.token_slots, batch.num_slots)
    if len(batch.lora_a) == 1:
        kernels.add_lora(
            batch.y, batch.x, batch.lora_a[0], batch.lora_b[0], batch.token_slots, batch.slot_ranks[0], meta,
            backend=backend,
        )
    else:
        kernels.add_lora_packed(
            batch.y, batch.x, batch.lora_a, batch.lora_b, batch.token_slots, batch.slot_ranks, meta, backend=backend
        )
    torch.testing.assert_close(batch.y.float().cpu(), expected.cpu(), **tolerance(case.dtype))
    no_adapter = batch.token_slots < 0
    assert torch.equal(batch.y[no_adapter], y_before[no_adapter]), "tokens without an adapter must be untouched"


def check_one_meta_serves_modules_with_different_ranks(backend: str, device: str) -> None:
    # The per-step plans are cached on the meta; a module with another rank pattern or another
    # hidden size must not be served a plan built for a previous module.
    first = make_batch(Case(7, 64, (96,), "mixed", "uniform", no_adapter_tokens=True), device, seed=1)
    second = make_batch(Case(7, 128, (64,), "mixed", "uniform", no_adapter_tokens=True), device, seed=2)
    second.token_slots = first.token_slots
    assert not torch.equal(first.slot_ranks[0], second.slot_ranks[0])
    meta = kernels.LoraBatchMeta.build(first.token_slots, first.num_slots)
    for _ in range(2):
        for batch in (first, second):
            expected = add_lora_reference(
                batch.y, batch.x, batch.lora_a[0], batch.lora_b[0], batch.token_slots, batch.slot_ranks[0]
            )
            kernels.add_lora(
                batch.y, batch.x, batch.lora_a[0], batch.lora_b[0], batch.token_slots, batch.slot_ranks[0], meta,
                backend=backend,
            )
            torch.testing.assert_close(batch.y.float().cpu(), expected.cpu(), **tolerance(F32))


def check_rank_zero_and_no_adapter_leave_y_untouched(backend: str, device: str) -> None:
    batch = make_batch(Case(7, 64, (64,), "16", "uniform"), device)
    batch.slot_ranks[0][:] = 0  # no slot's adapter targets this module, and its rows are NaN
    batch.lora_a[0].fill_(float("nan"))
    batch.lora_b[0].fill_(float("nan"))
    batch.token_slots[:3] = -1
    y_before = batch.y.clone()
    kernels.add_lora(
        batch.y, batch.x, batch.lora_a[0], batch.lora_b[0], batch.token_slots, batch.slot_ranks[0], backend=backend
    )
    assert torch.equal(batch.y, y_before)


def check_int32_ranks_and_meta_built_on_the_fly(backend: str, device: str) -> None:
    batch = make_batch(Case(7, 96, (64, 64), "mixed", "zipf"), device)
    ranks = [slot_ranks.to(torch.int32) for slot_ranks in batch.slot_ranks]
    expected = add_lora_packed_reference(batch.y, batch.x, batch.lora_a, batch.lora_b, batch.token_slots, ranks)
    kernels.add_lora_packed(batch.y, batch.x, batch.lora_a, batch.lora_b, batch.token_slots, ranks, backend=backend)
    torch.testing.assert_close(batch.y.float().cpu(), expected.cpu(), **tolerance(F32))


SPECIAL_CHECKS = {
    check.__name__.removeprefix("check_"): check
    for check in (
        check_one_meta_serves_modules_with_different_ranks,
        check_rank_zero_and_no_adapter_leave_y_untouched,
        check_int32_ranks_and_meta_built_on_the_fly,
    )
}


def triton_checks(on_gpu: bool) -> dict:
    """Check id -> a callable taking the device: every check the Triton path must pass."""
    checks = {f"reference[{case}]": _bind_case(case) for case in triton_cases(on_gpu)}
    checks.update({name: _bind_check(check) for name, check in SPECIAL_CHECKS.items()})
    return checks


def _bind_case(case):
    return lambda device: check_matches_reference(case, "triton", device)


def _bind_check(check):
    return lambda device: check("triton", device)


def run_interpreted_triton_checks() -> dict:
    """Run every Triton check in a fresh interpreter process; check id -> None or the failure text.

    A subprocess because TRITON_INTERPRET only works when set before triton is first imported,
    and in a whole-suite run other modules (torch._dynamo, via transformers) import it earlier.
    """
    repo_root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="1")
    completed = subprocess.run(
        [sys.executable, "-m", "tests.kernels.lora_checks"], cwd=repo_root, env=env, capture_output=True, text=True
    )
    if completed.returncode != 0:
        raise RuntimeError(f"the interpreted Triton checks crashed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _main() -> None:
    results = {}
    for check_id, check in triton_checks(on_gpu=False).items():
        try:
            check("cpu")
            results[check_id] = None
        except Exception:
            results[check_id] = traceback.format_exc(limit=-4)
    print(json.dumps(results))


if __name__ == "__main__":
    _main()
