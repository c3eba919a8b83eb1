"""Triton kernels of rewardserve, one op per file, each beside its PyTorch reference.

Shared here: `cast_rn`, the rounding cast every kernel uses to leave fp32.
"""

import triton
import triton.language as tl


@triton.jit
def cast_rn(x, dtype: tl.constexpr, SOFT_BF16: tl.constexpr):
    """Round fp32 x to `dtype` to nearest, ties to even, as torch does.

    On a GPU a plain cast already rounds to nearest even. Triton's CPU interpreter truncates
    fp32 -> bf16 instead, so with SOFT_BF16 (launchers set it for CPU tensors) the rounding is done
    on the fp32 bits first; the cast that follows is then exact. NaN passes through unchanged.
    """
    if SOFT_BF16:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            r = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
            x = tl.where(x != x, x, r)
    return x.to(dtype)
