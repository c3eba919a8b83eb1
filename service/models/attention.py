"""Causal attention over packed sequences (no padding anywhere).

- CUDA: `torch.nn.attention.varlen.varlen_attn` (FlashAttention over cu_seqlens, GQA and sliding
  window natively).
- CPU: one fused SDPA call per sequence (causal, GQA). For the mixed lengths reward batches carry
  this beats any padded or block-masked formulation, whose cost grows with the longest sequence
  or with T^2 (measured in `rewardserve bench throughput`).

A sliding window W means token i sees tokens j with i - W < j <= i, as HF's sliding-window mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # torch >= 2.9 on CUDA
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - older torch
    varlen_attn = None


def _window_mask(n: int, window: int, device) -> torch.Tensor:
    i = torch.arange(n, device=device)
    d = i[:, None] - i[None, :]
    return (d >= 0) & (d < window)  # (n, n) True = attend


def packed_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch, window: int | None):
    """q: (T, Hq, D); k, v: (T, Hk, D) -> (T, Hq * D)."""
    T, Hq, D = q.shape
    if q.is_cuda and varlen_attn is not None:
        cu = batch.cu_seqlens_device
        left = window - 1 if window else -1
        out = varlen_attn(q, k, v, cu, cu, batch.max_len, batch.max_len, window_size=(left, 0),
                          enable_gqa=Hq != k.shape[1])
        return out.reshape(T, Hq * D)
    out = torch.empty(T, Hq, D, dtype=q.dtype, device=q.device)
    gqa = Hq != k.shape[1]
    cu = batch.cu_seqlens
    for s, e in zip(cu[:-1], cu[1:]):
        qs, ks, vs = (t[s:e].transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, H, L, D)
        if window is not None and e - s > window:
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=_window_mask(e - s, window, q.device),
                                               enable_gqa=gqa)
        else:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=gqa)
        out[s:e] = o[0].transpose(0, 1)
    return out.reshape(T, Hq * D)
