"""rope: Triton kernel vs the PyTorch reference, and reference + tables vs HF's Llama rotary code.

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
Tolerances: the reference (= HF) rounds x*cos, rotate_half(x)*sin and their sum to the model dtype;
the kernel computes in fp32 and rounds once. The two intermediate roundings are relative to the
terms, not to the (possibly cancelling) result, so the honest bound is in ulps of max|x|:
atol = 2 eps(dtype) * max|x|, plus rtol = 2 eps(dtype) for the final rounding. In fp32 both paths
agree to a few ulps (FMA contraction on a GPU).
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from rewardserve.kernels.rope import rope_cpu, rope_tables, rope_torch, rope_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MAX_POS = 4096
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (T, Hq, Hk, D): GQA (Hq != Hk), non-power-of-two head counts, D/2 not a power of two (D = 6, 96)
SHAPES = [(1, 1, 1, 64), (7, 4, 2, 64), (7, 3, 1, 128), (127, 2, 1, 64), (3, 5, 3, 6), (2, 14, 2, 96)]


def _tol(dtype, x):
    if dtype == torch.float32:
        return 1e-5, 1e-5
    eps = torch.finfo(dtype).eps
    return 2 * eps * max(1.0, x.abs().max().item()), 2 * eps


def _tables(D):
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    return (t.to(DEVICE) for t in rope_tables(inv_freq, MAX_POS))


def _qk(T, n_q, n_k, D, dtype, seed=0):
    """q and k as strided views of one fused qkv projection output, like the model makes them."""
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(T, (n_q + 2 * n_k) * D, generator=g) * 2).to(DEVICE, dtype)
    q = qkv[:, : n_q * D].view(T, n_q, D)
    k = qkv[:, n_q * D : (n_q + n_k) * D].view(T, n_k, D)
    positions = torch.randint(0, MAX_POS, (T,), generator=g).to(DEVICE)
    return q, k, positions


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_matches_reference(shape, dtype):
    T, n_q, n_k, D = shape
    cos, sin = _tables(D)
    q, k, positions = _qk(T, n_q, n_k, D, dtype)
    q_out, k_out = rope_triton(q, k, cos, sin, positions)
    q_ref, k_ref = rope_torch(q, k, cos, sin, positions)
    assert q_out.shape == q.shape and k_out.shape == k.shape
    assert q_out.dtype == k_out.dtype == dtype
    for out, ref, x in ((q_out, q_ref, q), (k_out, k_ref, k)):
        atol, rtol = _tol(dtype, x)
        torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)


def test_contiguous_inputs_and_table_scaling():
    """Plain contiguous q/k and scaled tables (attention_scaling != 1, as YaRN has)."""
    T, n_q, n_k, D = 6, 2, 2, 64
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    cos, sin = (t.to(DEVICE) for t in rope_tables(inv_freq, 64, attention_scaling=1.25))
    g = torch.Generator().manual_seed(5)
    q = torch.randn(T, n_q, D, generator=g).to(DEVICE)
    k = torch.randn(T, n_k, D, generator=g).to(DEVICE)
    positions = torch.tensor([0, 1, 2, 0, 1, 63]).to(DEVICE)
    for out, ref in zip(rope_triton(q, k, cos, sin, positions), rope_torch(q, k, cos, sin, positions)):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # position 0 is the identity
    torch.testing.assert_close(rope_triton(q, k, cos, sin, positions)[0][0], q[0] * 1.25, atol=1e-6, rtol=1e-6)


ROPE_CONFIGS = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "llama3": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
    },
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64},
}


def _hf_rotary(kind, head_dim=64, max_positions=512):
    config = LlamaConfig(
        hidden_size=2 * head_dim, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=max_positions, rope_parameters=dict(ROPE_CONFIGS[kind]),
    )
    return LlamaRotaryEmbedding(config)


def _packed_positions():
    """Positions of three packed sequences (lengths 5, 300, 11), plus the last table row."""
    return torch.cat([torch.arange(5), torch.arange(300), torch.arange(11), torch.tensor([511])])


@pytest.mark.parametrize("kind", list(ROPE_CONFIGS))
def test_tables_bit_identical_to_hf(kind):
    rotary = _hf_rotary(kind)
    cos, sin = rope_tables(rotary.inv_freq, 512, rotary.attention_scaling)
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (512, 64)
    positions = _packed_positions()
    x = torch.zeros(1, positions.numel(), 128)
    hf_cos, hf_sin = rotary(x, positions[None])  # (1, T, D) float32
    assert torch.equal(cos[positions], hf_cos[0])
    assert torch.equal(sin[positions], hf_sin[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["default", "yarn"])
def test_reference_matches_hf(kind, dtype):
    """rope_torch on packed (T, heads, D) equals HF's apply_rotary_pos_emb on (1, heads, T, D), bit for bit."""
    rotary = _hf_rotary(kind)
    cos, sin = rope_tables(rotary.inv_freq, 512, rotary.attention_scaling)
    positions = _packed_positions()
    T = positions.numel()
    g = torch.Generator().manual_seed(7)
    q = torch.randn(T, 4, 64, generator=g).to(dtype)
    k = torch.randn(T, 2, 64, generator=g).to(dtype)
    hf_cos, hf_sin = rotary(q, positions[None])  # already cast to the model dtype, as in HF
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], hf_cos, hf_sin)
    q_out, k_out = rope_torch(q, k, cos, sin, positions)
    assert torch.equal(q_out, hf_q[0].transpose(0, 1))
    assert torch.equal(k_out, hf_k[0].transpose(0, 1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("gathered", [False, True], ids=["tables", "per-token"])
def test_cpu_version_is_bit_identical_to_reference(shape, dtype, gathered):
    """What CPUs run: same roundings as the reference, so equal bit for bit, from the tables and
    positions or from per-token tables gathered once per batch (positions=None)."""
    T, n_q, n_k, D = shape
    cos, sin = (t.cpu() for t in _tables(D))
    q, k, positions = (t.cpu() for t in _qk(T, n_q, n_k, D, dtype, seed=3))
    q_in, k_in = q.clone(), k.clone()
    args = (cos[positions], sin[positions], None) if gathered else (cos, sin, positions)
    for out, ref in zip(rope_cpu(q, k, *args), rope_torch(q, k, cos, sin, positions)):
        assert out.dtype == dtype and out.shape == ref.shape
        assert torch.equal(out, ref)
    assert torch.equal(q, q_in) and torch.equal(k, k_in)  # inputs untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_compiled_in_place_version_is_bit_identical_to_reference(shape, dtype):
    """The C++ rope the packed CPU model runs (beside the attention kernel): in place on strided views
    of the fused qkv, equal bit for bit to the reference, v's columns untouched."""
    from rewardserve.kernels.attention_cpu import load_rope
    from tests.conftest import KERNEL_TOOL, attention_kernel_builds, require_tool

    require_tool(attention_kernel_builds(), KERNEL_TOOL)
    rope = load_rope()
    T, n_q, n_k, D = shape
    cos, sin = (t.cpu() for t in _tables(D))
    q, k, positions = (t.cpu() for t in _qk(T, n_q, n_k, D, dtype, seed=4))
    qkv = q._base
    v_before = qkv[:, (n_q + n_k) * D:].clone()
    want_q, want_k = rope_torch(q, k, cos, sin, positions)
    got_q, got_k = rope(q, k, cos[positions], sin[positions])
    assert got_q.data_ptr() == q.data_ptr() and got_k.data_ptr() == k.data_ptr()
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    assert torch.equal(qkv[:, (n_q + n_k) * D:], v_before)


def test_compiled_rope_refuses_what_it_cannot_do():
    from rewardserve.kernels.attention_cpu import load_rope
    from tests.conftest import KERNEL_TOOL, attention_kernel_builds, require_tool

    require_tool(attention_kernel_builds(), KERNEL_TOOL)
    rope = load_rope()
    cos, sin = (t.cpu() for t in _tables(8))
    q, k, positions = (t.cpu() for t in _qk(5, 2, 1, 8, torch.float32))
    c, s = cos[positions], sin[positions]
    with pytest.raises(TypeError, match="fp32 or bf16"):
        rope(q.half(), k.half(), c, s)
    with pytest.raises(ValueError, match="inconsistent shapes"):
        rope(q, k, c[:4], s[:4])
    with pytest.raises(ValueError, match="contiguous heads"):
        rope(q.transpose(1, 2).contiguous().transpose(1, 2), k, c, s)
