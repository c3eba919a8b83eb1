"""Causal attention over packed segments (no padding anywhere).

A segment is a whole sequence, a shared prompt prefix, or a response that attends to its parent
prefix's keys and values and then to its own past (positions continue after the prefix).

- CUDA: `torch.nn.attention.varlen.varlen_attn` (FlashAttention over cu_seqlens; GQA and sliding
  windows natively). A response's keys are its prefix's followed by its own; FlashAttention aligns
  the causal mask bottom-right when there are more keys than queries, which is exactly that.
- CPU: one fused SDPA call per segment (causal, GQA). For the mixed lengths reward batches carry this
  beats padded or block-masked formulations, whose cost grows with the longest sequence or with T^2.

A sliding window W means a token at position i sees positions j with i - W < j <= i, as HF's mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # torch >= 2.9 on CUDA
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - older torch
    varlen_attn = None


def _mask(q_start: int, n_q: int, n_k: int, window: int | None, device) -> torch.Tensor:
    """(n_q, n_k) True = attend; queries sit at positions q_start.., keys at 0..n_k-1."""
    qpos = torch.arange(q_start, q_start + n_q, device=device)[:, None]
    kpos = torch.arange(n_k, device=device)[None, :]
    allowed = kpos <= qpos
    if window is not None:
        allowed &= qpos - kpos < window
    return allowed


def packed_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch, window: int | None):
    """q: (T, Hq, D); k, v: (T, Hk, D) -> (T, Hq * D)."""
    T, Hq, D = q.shape
    if q.is_cuda and varlen_attn is not None:
        return _varlen_cuda(q, k, v, batch, window).reshape(T, Hq * D)
    out = torch.empty(T, Hq, D, dtype=q.dtype, device=q.device)
    gqa = Hq != k.shape[1]
    cu = batch.cu_seqlens
    for seg, parent in enumerate(batch.parents):
        s, e = cu[seg], cu[seg + 1]
        if parent < 0:
            ks, vs = k[s:e], v[s:e]
            prefix = 0
        else:
            ps, pe = cu[parent], cu[parent + 1]
            ks, vs = torch.cat([k[ps:pe], k[s:e]]), torch.cat([v[ps:pe], v[s:e]])
            prefix = pe - ps
        qs, ks, vs = (t.transpose(0, 1).unsqueeze(0) for t in (q[s:e], ks, vs))  # (1, H, L, D)
        if prefix == 0 and (window is None or e - s <= window):
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=gqa)
        else:
            mask = _mask(prefix, e - s, prefix + e - s, window, q.device)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=gqa)
        out[s:e] = o[0].transpose(0, 1)
    return out.reshape(T, Hq * D)


def _varlen_cuda(q, k, v, batch, window):
    cu = batch.cu_seqlens
    lengths = [cu[i + 1] - cu[i] for i in range(len(batch.parents))]
    if all(p < 0 for p in batch.parents):
        kk, vv, cu_k, max_k = k, v, cu, max(lengths)
    else:  # each response's keys: its prefix's, then its own
        index, cu_k = [], [0]
        for seg, parent in enumerate(batch.parents):
            if parent >= 0:
                index.extend(range(cu[parent], cu[parent + 1]))
            index.extend(range(cu[seg], cu[seg + 1]))
            cu_k.append(len(index))
        gather = torch.tensor(index, device=q.device)
        kk, vv = k.index_select(0, gather), v.index_select(0, gather)
        max_k = max(cu_k[i + 1] - cu_k[i] for i in range(len(lengths)))
    cu_q_t = torch.tensor(cu, dtype=torch.int32, device=q.device)
    cu_k_t = torch.tensor(cu_k, dtype=torch.int32, device=q.device)
    left = window - 1 if window else -1
    return varlen_attn(q, kk, vv, cu_q_t, cu_k_t, max(lengths), max_k, window_size=(left, 0),
                       enable_gqa=q.shape[1] != k.shape[1])
