"""service/models/attention.py: the arguments the CUDA path hands FlashAttention, checked on CPU.

FlashAttention (torch's `varlen_attn`) is CUDA-only, so this test runs `_varlen_cuda` with
`varlen_attn` replaced by a plain-torch implementation of its documented contract: segment i's
queries are rows cu_q[i]..cu_q[i+1]-1 and its keys rows cu_k[i]..cu_k[i+1]-1; with more keys than
queries the causal mask aligns bottom-right; window_size=(left, 0) lets a query see the `left` keys
before its own. If our cu_seqlens, key gather or window conversion were wrong, the result would
differ from the reference attention, which knows nothing of FlashAttention's conventions.
"""

from __future__ import annotations

import torch

from rewardserve.kernels.attention_cpu import causal_attention_torch
from rewardserve.models import attention
from rewardserve.models.packed import PackedBatch

CALLS: list[dict] = []


def flash_contract(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size, enable_gqa, num_splits):
    CALLS.append(dict(max_q=max_q, max_k=max_k, window_size=window_size, num_splits=num_splits))
    out = torch.empty_like(q)
    groups = q.shape[1] // k.shape[1]
    assert enable_gqa == (groups > 1)
    for i in range(len(cu_q) - 1):
        qs = q[cu_q[i]:cu_q[i + 1]].transpose(0, 1)
        ks = k[cu_k[i]:cu_k[i + 1]].transpose(0, 1).repeat_interleave(groups, 0)
        vs = v[cu_k[i]:cu_k[i + 1]].transpose(0, 1).repeat_interleave(groups, 0)
        nq, nk = qs.shape[1], ks.shape[1]
        assert nq <= max_q and nk <= max_k
        qpos = torch.arange(nq)[:, None] + (nk - nq)  # bottom-right alignment
        kpos = torch.arange(nk)[None, :]
        allowed = kpos <= qpos
        if window_size[0] >= 0:
            allowed &= kpos >= qpos - window_size[0]
        scores = (qs @ ks.transpose(1, 2)) * q.shape[-1] ** -0.5
        out[cu_q[i]:cu_q[i + 1]] = (scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ vs).transpose(0, 1)
    return out


def test_the_flashattention_arguments_describe_our_attention(monkeypatch):
    monkeypatch.setattr(attention, "varlen_attn", flash_contract)
    # a whole sequence, a 40-token prompt with three responses, another whole sequence
    lens, parents = [23, 40, 5, 1, 17, 9], [-1, -1, 1, 1, 1, -1]
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    T, hq, hk, d = cu[-1], 6, 2, 8
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(T, h, d, generator=g) for h in (hq, hk, hk))
    batch = PackedBatch(torch.zeros(T, dtype=torch.long), torch.zeros(T, dtype=torch.long), cu, parents,
                        torch.zeros(1, dtype=torch.long), torch.device("cpu"))
    starts, lens_t = torch.tensor(cu[:-1]), torch.tensor(lens)
    pre_starts = torch.tensor([cu[p] if p >= 0 else 0 for p in parents])
    pre_lens = torch.tensor([lens[p] if p >= 0 else 0 for p in parents])
    for window in (None, 1, 12):
        CALLS.clear()
        out = attention._varlen_cuda(q, k, v, batch, window)
        ref = causal_attention_torch(q, k, v, starts, lens_t, window, pre_starts, pre_lens)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        assert CALLS == [dict(max_q=40, max_k=57, window_size=(window - 1 if window else -1, 0), num_splits=1)]


def test_pooled_attention_equals_the_pooled_rows_of_the_full_attention():
    """The last layer's attention: only the pooled rows, in last_idx order, on the C++ kernel (queries
    against the keys each sees) and on SDPA (every row, then the pooled ones)."""
    from rewardserve.kernels.attention_cpu import load_kernel
    from rewardserve.models.units import Unit
    from tests.conftest import KERNEL_TOOL, attention_kernel_builds, require_tool

    require_tool(attention_kernel_builds(), KERNEL_TOOL)
    kernel = load_kernel()
    # a whole sequence pooled at its end, a prompt with two responses (one pooled at three steps), a
    # one-token sequence
    units = [Unit(prefix=[], suffixes=[[5] * 70], pools=[[69]]),
             Unit(prefix=[7] * 40, suffixes=[[3] * 9, [4] * 30], pools=[[8], [0, 12, 29]]),
             Unit(prefix=[], suffixes=[[9]], pools=[[0]])]
    batch = PackedBatch.build(units, "cpu")
    T, hq, hk, d = len(batch.input_ids), 8, 4, 16
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(T, h, d, generator=g) for h in (hq, hk, hk))
    for window in (None, 6):
        for fn in (kernel, None):
            batch.attention_plan = None
            full = attention.packed_causal_attention(q, k, v, batch, window, fn)
            batch.attention_plan = None
            pooled = attention.pooled_causal_attention(q, k, v, batch, window, fn)
            assert pooled.shape == (len(batch.last_idx), hq * d)
            torch.testing.assert_close(pooled, full[batch.last_idx], atol=1e-5, rtol=1e-5)
