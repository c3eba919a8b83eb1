"""swiglu: Triton kernel vs the PyTorch reference, and the reference vs HF LlamaMLP.

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
Tolerances: the reference (= HF) rounds silu(gate) and then the product to the model dtype, the
kernel rounds once from fp32. silu and the product are well conditioned, so the difference is
relative: at most ~1.5 ulps, hence rtol = 2 eps(dtype); atol only covers results near zero.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from rewardserve.kernels.swiglu import silu_mul_, swiglu_torch, swiglu_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {  # dtype: (atol, rtol)
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1e-5, 2 * torch.finfo(torch.bfloat16).eps),  # 1.6e-2
    torch.float16: (1e-5, 2 * torch.finfo(torch.float16).eps),  # 2.0e-3
}
DTYPES = list(TOL)
# (T, I): I = 4099 > 2048 takes several column blocks per row
SHAPES = [(1, 1), (7, 3), (7, 17), (127, 96), (3, 257), (2, 896), (1, 1023), (2, 4099)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_matches_reference(shape, dtype):
    T, inter = shape
    g = torch.Generator().manual_seed(0)
    gate_up = (torch.randn(T, 2 * inter, generator=g) * 3).to(DEVICE, dtype)
    out = swiglu_triton(gate_up)
    ref = swiglu_torch(gate_up)
    assert out.shape == (T, inter) and out.dtype == ref.dtype == dtype
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)


def test_strided_rows_and_leading_dims():
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(5, 80, generator=g).to(DEVICE)
    gate_up = wide[:, :34]  # rows with stride 80
    torch.testing.assert_close(swiglu_triton(gate_up), swiglu_torch(gate_up), atol=1e-5, rtol=1e-5)
    batched = torch.randn(2, 3, 34, generator=g).to(DEVICE)
    out = swiglu_triton(batched)
    assert out.shape == (2, 3, 17)
    torch.testing.assert_close(out, swiglu_torch(batched), atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # numpy, in the interpreter: exp(1000) = inf
def test_extreme_gates():
    """silu(-big) = -0, silu(+big) = big: exp overflowing to inf gives no NaN."""
    gate = torch.tensor([[-1000.0, -100.0, -20.0, 0.0, 20.0, 100.0]])
    up = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    gate_up = torch.cat([gate, up], -1).to(DEVICE)
    out = swiglu_triton(gate_up)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, swiglu_torch(gate_up), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reference_matches_hf(dtype):
    """swiglu_torch on the fused gate/up output is HF LlamaMLP's act(gate_proj(x)) * up_proj(x), bit for bit."""
    torch.manual_seed(2)
    config = LlamaConfig(hidden_size=48, intermediate_size=96, num_attention_heads=4, hidden_act="silu")
    mlp = LlamaMLP(config).to(dtype).eval()
    x = torch.randn(9, 48).to(dtype)
    with torch.no_grad():
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        act = swiglu_torch(torch.cat([gate, up], -1))
        assert torch.equal(act, mlp.act_fn(gate) * up)
        assert torch.equal(mlp.down_proj(act), mlp(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cpu_version_is_bit_identical_to_reference(shape, dtype):
    """What CPUs run: the reference's two roundings, in place in the gate half of its input."""
    T, inter = shape
    g = torch.Generator().manual_seed(2)
    gate_up = (torch.randn(T, 2 * inter, generator=g) * 3).to(dtype)
    ref = swiglu_torch(gate_up)
    out = silu_mul_(*gate_up.clone().chunk(2, dim=-1))  # halves of one tensor, in place in the gate half
    assert out.shape == ref.shape and out.dtype == dtype
    assert torch.equal(out, ref)
    # held apart, as the CPU chunks do (compared with the reference math on the same layout: torch's
    # vectorised and scalar exp can differ by an ulp, and which elements take which depends on layout)
    gate, up = (half.contiguous() for half in gate_up.chunk(2, dim=-1))
    ref_apart, up_before = F.silu(gate) * up, up.clone()
    apart = silu_mul_(gate, up)
    assert apart.data_ptr() == gate.data_ptr() and torch.equal(apart, ref_apart) and torch.equal(up, up_before)
