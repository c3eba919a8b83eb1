"""Triton for the kernel files, when it is installed, and `cast_rn`, the rounding cast every kernel
uses to leave fp32.

Triton is a CUDA-path dependency: the CPU path runs each op's PyTorch reference, which lives in the
same file as its kernel. So the op files import `jit`, `triton` and `tl` from here; without Triton,
`jit` returns a placeholder whose launch raises, and everything else in the file still imports.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # the HF and CPU paths need no Triton
    triton = tl = None


class TritonMissing:
    """Stands in for a @jit kernel where Triton is not installed; launching it says why."""

    def __init__(self, name: str):
        self.name = name

    def __getitem__(self, grid):
        raise RuntimeError(f"Triton is not installed: the kernel {self.name} runs on the CUDA path only "
                           "(pip install triton)")

    __call__ = __getitem__


def jit(fn):
    return TritonMissing(fn.__name__) if triton is None else triton.jit(fn)


@jit
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
