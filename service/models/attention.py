"""Causal attention over packed segments (no padding in the rest of the model).

A segment is a whole sequence, a shared prompt prefix, or a response that attends to its parent
prefix's keys and values and then to its own past (positions continue after the prefix).

- CUDA: `torch.nn.attention.varlen.varlen_attn` (FlashAttention over cu_seqlens; GQA and sliding
  windows natively). A response's keys are its prefix's followed by its own; FlashAttention aligns
  the causal mask bottom-right when there are more keys than queries, which is exactly that.
- CPU (fp32 or bf16 tensors, fp32 sums): every segment goes, in one call per layer, to
  rewardserve's C++ kernel (kernels/attention_cpu.py: only the keys a query block can see are computed, and a response
  reads its prompt's keys in place; torch's CPU flash kernel computes the whole causal square below
  512 tokens).
- CPU without that kernel (switched off, or no compiler): whole sequences of 256 tokens or more get one
  SDPA call each, on views of the packed tensors (no gather, no padding: measured 12% less
  attention time than bucketing them). Shorter ones and responses are gathered into a few fused
  SDPA calls: the responses of one prompt together, and whole sequences in buckets of similar
  length. One call per segment was measured 5x slower for 128-token responses (SDPA's CPU kernel
  parallelises over batch x heads); padding inside a bucket is bounded (lengths within 30%) and
  never seen by a real query: padded keys come after every real position, so causality alone
  hides them.

A sliding window W means a token at position i sees positions j with i - W < j <= i, as HF's mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:  # torch >= 2.9 on CUDA
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - older torch
    varlen_attn = None

_BUCKET_SPREAD = 1.3  # longest / shortest within one bucket of whole sequences
_BUCKET_TOKENS = 8192  # padded query tokens per fused call
_ALONE_FROM = 256  # whole sequences at least this long get their own call, on views: no gather, no padding


def _mask(q_start: int, n_q: int, n_k: int, window: int | None, device) -> torch.Tensor:
    """(n_q, n_k) True = attend; queries sit at positions q_start.., keys at 0..n_k-1."""
    qpos = torch.arange(q_start, q_start + n_q, device=device)[:, None]
    kpos = torch.arange(n_k, device=device)[None, :]
    allowed = kpos <= qpos
    if window is not None:
        allowed &= qpos - kpos < window
    return allowed


@dataclass
class _Alone:
    """One whole sequence, attended in place: packed rows start..end."""

    start: int
    end: int


@dataclass
class _Kernel:
    """Every segment of the batch, for the compiled CPU kernel: packed start rows and lengths, and
    each response's prompt (start row, length; 0 for whole sequences)."""

    starts: torch.Tensor
    lens: torch.Tensor
    prefix_starts: torch.Tensor
    prefix_lens: torch.Tensor


@dataclass
class _Call:
    """One fused SDPA call: n segments, right-padded to `width` queries, after a shared `prefix`."""

    q_idx: torch.Tensor  # (n, width) packed row of each query (padding repeats a real row)
    k_idx: torch.Tensor  # (n, prefix + width) packed row of each key
    valid: torch.Tensor  # (n, width) True for real queries
    prefix: int


def _plan(batch, kernel: bool) -> list[_Call | _Alone | _Kernel]:
    cu, parents = batch.cu_seqlens, batch.parents
    lengths = [cu[i + 1] - cu[i] for i in range(len(parents))]
    if kernel:  # int64 and within the batch by construction: the kernel is called with trusted=True
        return [_Kernel(torch.tensor(cu[:-1]), torch.tensor(lengths),
                        torch.tensor([cu[p] if p >= 0 else 0 for p in parents]),
                        torch.tensor([lengths[p] if p >= 0 else 0 for p in parents]))]
    children: dict[int, list[int]] = {}
    for seg, parent in enumerate(parents):
        if parent >= 0:
            children.setdefault(parent, []).append(seg)
    groups: list[tuple[list[int], int]] = [(segs, parent) for parent, segs in children.items()]
    whole = sorted((s for s, p in enumerate(parents) if p < 0), key=lengths.__getitem__)
    calls: list[_Call | _Alone | _Kernel] = [_Alone(cu[s], cu[s + 1]) for s in whole if lengths[s] >= _ALONE_FROM]
    whole = [s for s in whole if lengths[s] < _ALONE_FROM]
    bucket: list[int] = []
    for seg in whole:
        if bucket and (lengths[seg] > _BUCKET_SPREAD * lengths[bucket[0]]
                       or (len(bucket) + 1) * lengths[seg] > _BUCKET_TOKENS):
            groups.append((bucket, -1))
            bucket = []
        bucket.append(seg)
    if bucket:
        groups.append((bucket, -1))
    for segs, parent in groups:
        width = max(lengths[s] for s in segs)
        offs = torch.arange(width)
        starts = torch.tensor([cu[s] for s in segs])[:, None]
        lens = torch.tensor([lengths[s] for s in segs])[:, None]
        valid = offs[None, :] < lens
        own = torch.where(valid, starts + offs, starts)  # padding points at a real row of the same segment
        if parent >= 0:
            pre = torch.arange(cu[parent], cu[parent + 1])[None, :].expand(len(segs), -1)
            k_idx, prefix = torch.cat([pre, own], 1), cu[parent + 1] - cu[parent]
        else:
            k_idx, prefix = own, 0
        dev = batch.device
        calls.append(_Call(own.to(dev), k_idx.to(dev), valid.to(dev), prefix))
    return calls


def packed_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch, window: int | None,
                            kernel=None):
    """q: (T, Hq, D); k, v: (T, Hk, D) -> (T, Hq * D). `kernel`: the compiled CPU attention
    (`rewardserve.kernels.attention_cpu.load_kernel()`), on CPU; None keeps SDPA."""
    T, Hq, D = q.shape
    if q.is_cuda and varlen_attn is not None:
        return _varlen_cuda(q, k, v, batch, window).reshape(T, Hq * D)
    if batch.attention_plan is None:  # the same for every layer of this batch
        batch.attention_plan = _plan(batch, kernel is not None)
    if kernel is not None:  # the plan is one call that covers every segment
        [call] = batch.attention_plan
        # bf16 goes in as it is: the kernel reads it in place (see kernels/attention_cpu.cpp)
        o = kernel(q, k, v, call.starts, call.lens, window, None, call.prefix_starts, call.prefix_lens, trusted=True)
        return o.reshape(T, Hq * D)
    out = torch.empty(T, Hq, D, dtype=q.dtype, device=q.device)
    gqa = Hq != k.shape[1]
    for call in batch.attention_plan:
        if isinstance(call, _Alone):
            seq = slice(call.start, call.end)
            qs, ks, vs = (t[seq].transpose(0, 1)[None] for t in (q, k, v))  # (1, H, L, D) views
            out[seq] = _sdpa(qs, ks, vs, 0, window, gqa)[0].transpose(0, 1)
            continue
        qs = q[call.q_idx].transpose(1, 2)  # (n, Hq, width, D)
        ks, vs = k[call.k_idx].transpose(1, 2), v[call.k_idx].transpose(1, 2)  # (n, Hk, prefix + width, D)
        o = _sdpa(qs, ks, vs, call.prefix, window, gqa)
        out[call.q_idx[call.valid]] = o.transpose(1, 2)[call.valid]
    return out.reshape(T, Hq * D)


def pooled_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch, window: int | None,
                            kernel=None) -> torch.Tensor:
    """The attention outputs of the batch's pooled rows only (`batch.last_idx`), in that order:
    (B, Hq * D). A reward model's last layer needs nothing else. The CPU kernel computes just those
    queries against the keys each can see; the other paths compute every row and keep the pooled ones."""
    T, Hq, D = q.shape
    if kernel is None or q.is_cuda:
        return packed_causal_attention(q, k, v, batch, window, kernel)[batch.last_idx]
    if batch.attention_plan is None:
        batch.attention_plan = _plan(batch, True)
    [call] = batch.attention_plan
    seg = torch.searchsorted(call.starts, batch.last_idx, right=True) - 1  # segments start in order
    row = batch.last_idx - call.starts[seg]
    o = kernel(q[batch.last_idx], k, v, call.starts, call.lens, window, None, call.prefix_starts,
               call.prefix_lens, select=(seg, row), trusted=True)  # the plan's own tensors: no bounds checks
    return o.reshape(-1, Hq * D)


def _sdpa(qs, ks, vs, prefix: int, window: int | None, gqa: bool) -> torch.Tensor:
    """Causal SDPA of queries that follow `prefix` keys: (n, Hq, width, D) against (n, Hk, prefix + width, D)."""
    width = qs.shape[2]
    if prefix == 0 and (window is None or width <= window):
        return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=gqa)
    # an additive float mask: SDPA's CPU kernel takes it about 2x faster than a boolean one
    allowed = _mask(prefix, width, prefix + width, window, qs.device)
    mask = torch.zeros(allowed.shape, dtype=qs.dtype, device=qs.device).masked_fill_(~allowed, float("-inf"))
    return F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=gqa)


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
    # num_splits=1: no split-KV, whose split count follows max_k, i.e. the batch; with it a sequence's
    # output would depend on its batch mates (torch documents bitwise batch invariance without it)
    return varlen_attn(q, kk, vv, cu_q_t, cu_k_t, max(lengths), max_k, window_size=(left, 0),
                       enable_gqa=q.shape[1] != k.shape[1], num_splits=1)
