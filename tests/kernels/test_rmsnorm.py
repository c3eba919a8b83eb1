"""rmsnorm: Triton kernel vs the PyTorch reference, and the reference vs HF LlamaRMSNorm.

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
Tolerances: kernel and reference round at the same places (residual add, normalized value, product
with the weight), so they differ only where the fp32 sum of squares (different reduction order) or
rsqrt moves a value across a rounding boundary: at most a 1-ulp flip of the normalized value, which
the weight product can turn into ~2 ulps of the output. Hence rtol = 2 eps(dtype), and such flips
must stay rare in bf16/fp16 (<= 1% of elements; a missing or misplaced rounding flips far more). The residual
stream is a single exact-then-rounded add in both, so it must match bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from rewardserve.kernels.rmsnorm import rmsnorm_cpu, rmsnorm_torch, rmsnorm_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6
TOL = {  # dtype: (atol, rtol)
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1e-2, 2 * torch.finfo(torch.bfloat16).eps),  # 2 ulps: 1.6e-2
    torch.float16: (1e-3, 2 * torch.finfo(torch.float16).eps),  # 2 ulps: 2.0e-3
}
DTYPES = list(TOL)
SHAPES = [(1, 1), (7, 3), (7, 17), (3, 96), (2, 257), (5, 896), (1, 1023), (127, 64), (4, 14, 64), (3, 2, 128)]


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2
    residual = torch.randn(shape, generator=g) * 2
    weight = 1 + 0.5 * torch.randn(shape[-1], generator=g)
    return (t.to(DEVICE, dtype) for t in (x, residual, weight))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_triton_matches_reference(shape, dtype, with_residual):
    x, residual, weight = _inputs(shape, dtype)
    residual = residual if with_residual else None
    out, new_res = rmsnorm_triton(x, weight, EPS, residual)
    ref_out, ref_res = rmsnorm_torch(x, weight, EPS, residual)
    assert out.shape == x.shape and out.dtype == ref_out.dtype == dtype
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
    if dtype != torch.float32:  # same rounding points: all but rare elements bit-identical
        assert (out != ref_out).sum().item() <= 1 + out.numel() // 100
    if with_residual:
        assert new_res.dtype == dtype and torch.equal(new_res, ref_res)
    else:
        assert new_res is x and ref_res is x


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_qk_views(dtype):
    """Qwen3 q/k-norm reads q and k straight out of the fused qkv projection, (T, heads, D) strided."""
    T, n_q, n_k, D = 5, 4, 2, 64
    qkv, _, weight = _inputs((T, (n_q + 2 * n_k) * D), dtype, seed=1)
    weight = weight[:D]
    q = qkv[:, : n_q * D].view(T, n_q, D)
    k = qkv[:, n_q * D : (n_q + n_k) * D].view(T, n_k, D)
    assert not q.is_contiguous()
    atol, rtol = TOL[dtype]
    for t in (q, k):
        out, _ = rmsnorm_triton(t, weight, EPS)
        torch.testing.assert_close(out, rmsnorm_torch(t.contiguous(), weight, EPS)[0], atol=atol, rtol=rtol)


def test_fp32_weight_on_bf16_activations():
    """HF promotes weight * x: an fp32 weight on bf16 activations gives an fp32 output."""
    x, residual, weight = _inputs((3, 40), torch.bfloat16, seed=2)
    weight = weight.float()
    out, new_res = rmsnorm_triton(x, weight, EPS, residual)
    ref_out, ref_res = rmsnorm_torch(x, weight, EPS, residual)
    assert out.dtype == ref_out.dtype == torch.float32 and new_res.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    assert torch.equal(new_res, ref_res)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(7, 96), (5, 3, 64)], ids=str)
def test_reference_matches_hf(shape, dtype):
    """The reference is HF's LlamaRMSNorm after HF's `residual + hidden_states`, bit for bit."""
    x, residual, weight = (t.cpu() for t in _inputs(shape, dtype, seed=3))
    norm = LlamaRMSNorm(shape[-1], eps=EPS).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
        hf_residual = residual + x
        hf_out = norm(hf_residual)
        out, new_res = rmsnorm_torch(x, weight, EPS, residual)
        assert torch.equal(new_res, hf_residual)
        assert torch.equal(out, hf_out)
        out, new_res = rmsnorm_torch(x, weight, EPS)
        assert new_res is x and torch.equal(out, norm(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_cpu_version_matches_reference(shape, dtype, with_residual):
    """What CPUs run: the residual stream bit for bit; the output within the kernel tolerances
    (only the reduction order of the sum of squares differs), flips rare; inputs untouched."""
    x, residual, weight = (t.cpu() for t in _inputs(shape, dtype, seed=4))
    residual = residual if with_residual else None
    x_in = x.clone()
    out, new_res = rmsnorm_cpu(x, weight, EPS, residual)
    ref_out, ref_res = rmsnorm_torch(x, weight, EPS, residual)
    assert out.dtype == dtype and out.shape == x.shape
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
    assert (out != ref_out).sum().item() <= 1 + out.numel() // 100
    assert torch.equal(new_res, ref_res) and torch.equal(x, x_in)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [s for s in SHAPES if len(s) == 2], ids=str)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_compiled_fused_version_keeps_the_cpu_versions_roundings(shape, dtype, with_residual):
    """The C++ RMSNorm the packed CPU model runs (beside the attention kernel): the residual stream bit
    for bit, the output within the kernel tolerances of the reference (only the sum of squares is
    summed in another order; in bf16 the same two roundings, so flips stay rare), inputs untouched,
    and rows read through a row stride (a slice of a wider tensor)."""
    from rewardserve.kernels.attention_cpu import load_rmsnorm
    from tests.conftest import KERNEL_TOOL, attention_kernel_builds, require_tool

    require_tool(attention_kernel_builds(), KERNEL_TOOL)
    fused = load_rmsnorm()
    x, residual, weight = (t.cpu() for t in _inputs(shape, dtype, seed=5))
    residual = residual if with_residual else None
    wide = torch.cat([x, torch.full_like(x, 7.0)], -1)  # x as a strided view: row stride 2 H
    for rows in (x, wide[:, : shape[-1]]):
        before = rows.clone()
        out, stream = fused(rows, weight, EPS, residual)
        ref_out, ref_stream = rmsnorm_torch(rows, weight, EPS, residual)
        assert out.dtype == dtype and out.shape == rows.shape and out.is_contiguous()
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
        if dtype == torch.bfloat16:
            assert (out != ref_out).sum().item() <= 1 + out.numel() // 100
        assert torch.equal(stream, ref_stream) and torch.equal(rows, before)
        if residual is None:
            assert stream is rows


def test_compiled_fused_rmsnorm_rows_do_not_depend_on_their_batch():
    """A row's output is the same bits alone, first, or deep in a large batch (threads split rows)."""
    from rewardserve.kernels.attention_cpu import load_rmsnorm
    from tests.conftest import KERNEL_TOOL, attention_kernel_builds, require_tool

    require_tool(attention_kernel_builds(), KERNEL_TOOL)
    fused = load_rmsnorm()
    x, residual, weight = (t.cpu() for t in _inputs((300, 896), torch.float32, seed=6))
    out, stream = fused(x, weight, EPS, residual)
    for r in (0, 1, 150, 299):
        alone, alone_stream = fused(x[r : r + 1], weight, EPS, residual[r : r + 1])
        assert torch.equal(alone, out[r : r + 1]) and torch.equal(alone_stream, stream[r : r + 1])


def test_compiled_fused_rmsnorm_hands_other_layouts_to_the_cpu_version():
    """3-D views (Qwen3's q/k-norm), fp16, and a weight of another dtype take `rmsnorm_cpu`, unchanged;
    the packed CPU model runs the fused version where the kernel builds."""
    from rewardserve.kernels.attention_cpu import load_rmsnorm
    from rewardserve.models.packed import Ops
    from tests.conftest import KERNEL_TOOL, attention_kernel_builds, require_tool

    require_tool(attention_kernel_builds(), KERNEL_TOOL)
    fused = load_rmsnorm()
    x, residual, weight = (t.cpu() for t in _inputs((4, 14, 64), torch.float32, seed=7))
    for args in ((x, weight[:64], EPS), (x[0].half(), weight.half(), EPS, residual[0].half()),
                 (x[0].bfloat16(), weight.float(), EPS)):
        got, want = fused(*args), rmsnorm_cpu(*args)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    ops = Ops(torch.device("cpu"))
    assert ops.rmsnorm is not rmsnorm_cpu
    out, _ = ops.rmsnorm(x[0], weight[:64], EPS)
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(out, rmsnorm_torch(x[0], weight[:64], EPS)[0], atol=atol, rtol=rtol)
