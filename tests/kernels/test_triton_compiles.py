"""Compile the Triton kernels for real GPUs (sm_80, sm_90) without one.

The interpreter enforces none of a GPU's rules (tl.dot block sizes, operand dtypes, pointer
casts) and gets bf16 dots wrong; compiling to a cubin with Triton's bundled ptxas checks them here.
"""

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lora_serving.kernels import triton_path  # noqa: E402
from lora_serving.kernels.triton_expand import lora_expand_kernel  # noqa: E402
from lora_serving.kernels.triton_shrink import lora_shrink_kernel  # noqa: E402

POINTERS = {"shrunk_ptr": "*fp32", "slice_table": "*i64", "sorted_token_ids": "*i64", "tiles": "*i32"}


def _signature(kernel, weight_dtype: str, constexprs: dict) -> dict:
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("x_ptr", "y_ptr"):
            signature[name] = f"*{weight_dtype}"
        elif name in POINTERS:
            signature[name] = POINTERS[name]
        elif name.startswith("stride"):
            signature[name] = "i64"
        else:
            signature[name] = "i32"
    return signature


def _compile(kernel, weight_dtype, constexprs, capability):
    if not hasattr(kernel, "arg_names"):
        pytest.skip("the kernels were imported in interpreter mode")
    source = ASTSource(kernel, _signature(kernel, weight_dtype, constexprs), constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32))


@pytest.mark.parametrize("capability", [80, 90])
def test_kernels_compile_to_tensor_core_code(capability):
    blocks = dict(BLOCK_T=16, BLOCK_R=triton_path.BLOCK_R)
    shrink = _compile(
        lora_shrink_kernel,
        "bf16",
        dict(RANKS_INT64=False, ATOMIC=True, BLOCK_H=triton_path.BLOCK_H, **blocks),
        capability,
    )
    expand = _compile(lora_expand_kernel, "bf16", dict(RANKS_INT64=True, BLOCK_O=triton_path.BLOCK_O, **blocks), capability)
    assert "mma" in shrink.asm["ptx"] and "mma" in expand.asm["ptx"]


def test_fp32_prefill_tiles_compile():
    blocks = dict(BLOCK_T=64, BLOCK_R=triton_path.BLOCK_R)
    _compile(lora_shrink_kernel, "fp32", dict(RANKS_INT64=True, ATOMIC=False, BLOCK_H=triton_path.BLOCK_H, **blocks), 90)
    _compile(lora_expand_kernel, "fp32", dict(RANKS_INT64=False, BLOCK_O=triton_path.BLOCK_O, **blocks), 90)
