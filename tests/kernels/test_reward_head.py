"""reward_head: Triton kernel vs the PyTorch reference, and the reference vs HF LlamaRMSNorm + nn.Linear.

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
Tolerances: kernel and reference round the pooled row at the same places and accumulate the
projection in fp32, so they differ by fp32 summation order (~1e-6 relative) plus, rarely, a 1-ulp
flip of one normalized element where the fp32 rstd differs in its last bit. One flip moves a score
by at most ulp(max|normed|) * max|head_weight|; the tolerance allows two such flips:
atol = 1e-5 + 2 * 2 eps(dtype) * max|normed| * max|head_weight| (zero extra for fp32 rows).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from rewardserve.kernels.reward_head import reward_head_torch, reward_head_triton
from rewardserve.kernels.rmsnorm import rmsnorm_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (T, B, H, K): H non-power-of-two and > BLOCK_H (4099), K > BLOCK_K (33)
SHAPES = [(1, 1, 1, 1), (7, 3, 17, 2), (7, 2, 96, 5), (127, 5, 896, 5), (1023, 2, 1023, 1), (9, 2, 4099, 33)]
OPTIONS = {"plain": (False, False), "residual+bias": (True, True), "bias": (False, True)}


def _inputs(T, B, H, K, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g) * 3
    residual = torch.randn(T, H, generator=g) * 3
    norm_weight = 1 + 0.5 * torch.randn(H, generator=g)
    head_weight = torch.randn(K, H, generator=g) / H**0.5
    head_bias = torch.randn(K, generator=g)
    last_idx = torch.randperm(T, generator=g)[:B]  # B distinct pooled rows, in no particular order
    tensors = (t.to(DEVICE, dtype) for t in (hidden, residual, norm_weight, head_weight, head_bias))
    return (*tensors, last_idx.to(DEVICE))


def _atol(dtype, hidden, last_idx, norm_weight, head_weight, residual):
    if dtype == torch.float32:
        return 1e-5
    res_rows = residual[last_idx] if residual is not None else None
    normed, _ = rmsnorm_torch(hidden[last_idx], norm_weight, EPS, res_rows)
    flip = 2 * torch.finfo(dtype).eps * normed.float().abs().max().item() * head_weight.float().abs().max().item()
    return 1e-5 + 2 * flip


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_triton_matches_reference(shape, dtype, option):
    with_residual, with_bias = OPTIONS[option]
    T, B, H, K = shape
    hidden, residual, norm_weight, head_weight, head_bias, last_idx = _inputs(T, B, H, K, dtype)
    residual = residual if with_residual else None
    head_bias = head_bias if with_bias else None
    scores = reward_head_triton(hidden, last_idx, norm_weight, EPS, head_weight, head_bias, residual)
    ref = reward_head_torch(hidden, last_idx, norm_weight, EPS, head_weight, head_bias, residual)
    assert scores.shape == ref.shape == (B, K) and scores.dtype == ref.dtype == torch.float32
    atol = _atol(dtype, hidden, last_idx, norm_weight, head_weight, residual)
    torch.testing.assert_close(scores, ref, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_only_pooled_rows_are_read(dtype):
    """Rows other than the pooled ones may hold anything (here inf/NaN): they must not leak in."""
    T, H, K = 12, 40, 2
    hidden, residual, norm_weight, head_weight, head_bias, _ = _inputs(T, 1, H, K, dtype, seed=1)
    last_idx = torch.tensor([3, 11, 3]).to(DEVICE)  # a repeated index is allowed
    poisoned = torch.ones(T, dtype=torch.bool, device=DEVICE)
    poisoned[last_idx] = False
    hidden[poisoned] = float("nan")
    residual[poisoned] = float("inf")
    for fn in (reward_head_triton, reward_head_torch):
        scores = fn(hidden, last_idx, norm_weight, EPS, head_weight, head_bias, residual)
        assert torch.isfinite(scores).all(), fn.__name__
        assert torch.equal(scores[0], scores[2])


def test_fp32_head_on_bf16_rows():
    """A head kept in fp32 (and an fp32 norm weight) on bf16 activations."""
    hidden, residual, norm_weight, head_weight, head_bias, last_idx = _inputs(6, 3, 80, 2, torch.bfloat16, seed=2)
    args = (hidden, last_idx, norm_weight.float(), EPS, head_weight.float(), head_bias.float(), residual)
    torch.testing.assert_close(reward_head_triton(*args), reward_head_torch(*args), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_reference_matches_hf(dtype, with_residual):
    """The reference is HF's final LlamaRMSNorm (model dtype) on the pooled rows, then an fp32 nn.Linear."""
    T, B, H, K = 10, 4, 96, 3
    hidden, residual, norm_weight, head_weight, head_bias, last_idx = (
        t.cpu() for t in _inputs(T, B, H, K, dtype, seed=3)
    )
    norm = LlamaRMSNorm(H, eps=EPS).to(dtype)
    score = nn.Linear(H, K, bias=True)  # fp32: the head accumulates in fp32
    with torch.no_grad():
        norm.weight.copy_(norm_weight)
        score.weight.copy_(head_weight.float())
        score.bias.copy_(head_bias.float())
        h = residual + hidden if with_residual else hidden  # HF's final residual add, in the model dtype
        expected = score(norm(h)[last_idx].float())
        got = reward_head_torch(
            hidden, last_idx, norm_weight, EPS, head_weight, head_bias, residual if with_residual else None
        )
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
