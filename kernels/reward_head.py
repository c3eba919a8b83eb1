"""The fused reward head: final residual add + gather of each sequence's pooled token + final RMSNorm
+ projection onto every reward head, accumulated in fp32.

    h      = (hidden + residual)[last_idx] rounded to the model dtype   (hidden[last_idx] without residual)
    normed = HF LlamaRMSNorm(h): norm_weight * (h * rsqrt(mean(h^2) + eps)).to(dtype)
    scores = normed.float() @ head_weight.float().T + head_bias.float()        (B, K) float32

Only the B pooled rows are read; the other T - B rows are never normalized.
"""

from __future__ import annotations

import torch
from rewardserve.kernels._triton import cast_rn, jit, tl, triton

_MAX_BLOCK_K = 16  # heads per program; more heads get more programs (each recomputes its row's rms)
_TILE = 8192  # BLOCK_K * BLOCK_H: the fp32 accumulator tile of a program (no register spills on sm_90)


@jit
def _load_row(hid_ptr, res_ptr, cols, mask, HAS_RESIDUAL: tl.constexpr, SOFT_BF16: tl.constexpr):
    """One chunk of the pooled row in fp32, the residual added and rounded to the model dtype."""
    x = tl.load(hid_ptr + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + cols, mask=mask, other=0.0)
        x = cast_rn(x.to(tl.float32) + r.to(tl.float32), hid_ptr.dtype.element_ty, SOFT_BF16)
    return x.to(tl.float32)


@jit
def _reward_head_kernel(
    hid_ptr, res_ptr, idx_ptr, nw_ptr, hw_ptr, hb_ptr, out_ptr,
    s_hid, s_res, s_hw,  # row strides (elements) of hidden, residual and head_weight
    H, K, eps,
    NORM_IN_X_DTYPE: tl.constexpr,  # norm_weight * x promotes to x's dtype (else to fp32: nothing to round)
    HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    SOFT_BF16: tl.constexpr,  # round to bf16 by hand (CPU interpreter only, see _triton.cast_rn)
):
    """Program (b, j): sequence b, heads [j*BLOCK_K, (j+1)*BLOCK_K). Two passes over the pooled row:
    sum of squares, then normalize and dot with the head rows (the second read hits cache)."""
    b = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = heads < K
    tok = tl.load(idx_ptr + b).to(tl.int64)
    hid_row = hid_ptr + tok * s_hid
    res_row = res_ptr + tok * s_res
    x_dtype = hid_ptr.dtype.element_ty

    ss = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for start in range(0, H, BLOCK_H):
        cols = start + tl.arange(0, BLOCK_H)
        h = _load_row(hid_row, res_row, cols, cols < H, HAS_RESIDUAL, SOFT_BF16)
        ss += h * h
    rstd = tl.rsqrt(tl.sum(ss, axis=0) / H + eps)

    acc = tl.zeros((BLOCK_K, BLOCK_H), dtype=tl.float32)
    for start in range(0, H, BLOCK_H):
        cols = start + tl.arange(0, BLOCK_H)
        cmask = cols < H
        h = _load_row(hid_row, res_row, cols, cmask, HAS_RESIDUAL, SOFT_BF16)
        w = tl.load(nw_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        normed = cast_rn(h * rstd, x_dtype, SOFT_BF16).to(tl.float32)  # HF rounds to x.dtype, then * weight
        normed = normed * w
        if NORM_IN_X_DTYPE:
            normed = cast_rn(normed, x_dtype, SOFT_BF16).to(tl.float32)
        hw = tl.load(hw_ptr + heads[:, None] * s_hw + cols[None, :], mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc += hw.to(tl.float32) * normed[None, :]
    score = tl.sum(acc, axis=1)
    if HAS_BIAS:
        score += tl.load(hb_ptr + heads, mask=kmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + b * K + heads, score, mask=kmask)


def reward_head_triton(
    hidden: torch.Tensor,
    last_idx: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """hidden: (T, H), last_idx: (B,) int, norm_weight: (H,), head_weight: (K, H), head_bias: (K,) or None,
    residual: (T, H) or None -> scores (B, K) float32. last_idx is not bounds-checked on the device."""
    T, H = hidden.shape
    K = head_weight.shape[0]
    assert head_weight.shape == (K, H), f"head_weight {tuple(head_weight.shape)} for H={H}"
    assert norm_weight.shape == (H,), f"norm_weight {tuple(norm_weight.shape)} for H={H}"
    assert head_bias is None or head_bias.shape == (K,), f"head_bias {tuple(head_bias.shape)} for K={K}"
    assert residual is None or residual.shape == hidden.shape, f"residual {tuple(residual.shape)}"
    norm_dtype = torch.promote_types(norm_weight.dtype, hidden.dtype)  # HF's dtype of norm_weight * x
    assert norm_dtype in (hidden.dtype, torch.float32), f"norm_weight {norm_weight.dtype}, hidden {hidden.dtype}"
    B = last_idx.shape[0]
    out = torch.empty((B, K), dtype=torch.float32, device=hidden.device)
    if B == 0 or K == 0:
        return out

    def rows(t):  # a contiguous last dim; rows may be strided
        return t if t.stride(-1) == 1 else t.contiguous()

    hidden, head_weight = rows(hidden), rows(head_weight)
    res = rows(residual) if residual is not None else hidden
    BLOCK_K = min(triton.next_power_of_2(K), _MAX_BLOCK_K)
    BLOCK_H = min(triton.next_power_of_2(H), 1024, _TILE // BLOCK_K)
    grid = (B, triton.cdiv(K, BLOCK_K))
    _reward_head_kernel[grid](
        hidden, res, last_idx, norm_weight.contiguous(), head_weight,
        head_bias.contiguous() if head_bias is not None else head_weight, out,
        hidden.stride(0), res.stride(0), head_weight.stride(0),
        H, K, float(eps),
        NORM_IN_X_DTYPE=norm_dtype == hidden.dtype,
        HAS_RESIDUAL=residual is not None, HAS_BIAS=head_bias is not None,
        BLOCK_H=BLOCK_H, BLOCK_K=BLOCK_K, SOFT_BF16=hidden.device.type == "cpu",
        num_warps=8 if BLOCK_K * BLOCK_H >= 4096 else 4,
    )
    return out


def reward_head_torch(
    hidden: torch.Tensor,
    last_idx: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference. hidden: (T, H), last_idx: (B,) -> scores (B, K) float32; touches only the B pooled rows."""
    h = hidden[last_idx]
    if residual is not None:
        h = (h.float() + residual[last_idx].float()).to(hidden.dtype)
    x = h.float()
    normed = norm_weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(hidden.dtype)
    # one dot product per head rather than a GEMM: a GEMM's rows depend on how many rows share it, and
    # each score must be the same whatever its batch mates (and this is B x K dot products, not a GEMM's worth)
    rows = normed.float()
    scores = torch.stack([(rows * w).sum(-1) for w in head_weight.float()], dim=-1)
    if head_bias is not None:
        scores = scores + head_bias.float()
    return scores
