"""Rotary position embedding on packed tokens, in the Hugging Face convention (Llama, Qwen2/3, Mistral).

    out = x * cos[pos] + rotate_half(x) * sin[pos],   rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])

cos/sin are float32 (max_positions, D) tables with emb = cat(freqs, freqs) (see `rope_tables`).
Like HF, the gathered rows are rounded to the model dtype before use. The reference then computes in
the model dtype (three roundings in bf16/fp16, exactly HF); the Triton kernel computes in fp32 and
rounds once, so in bf16/fp16 it can differ from HF by about one unit in the last place of the
largest term (it is the more accurate of the two). In fp32 both agree to a few fp32 ulps.
"""

from __future__ import annotations

import torch
from rewardserve.kernels._triton import cast_rn, jit, tl, triton


@jit
def _rope_heads(
    x_ptr, out_ptr, t, sx0, sx1, n_heads, c1, c2, s1, s2,
    HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr, SOFT_BF16: tl.constexpr,
):
    """Rotate all heads of token t: a (heads, D/2) tile for each half of the head dim."""
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < n_heads) & (cols < HALF)
    src = x_ptr + t * sx0 + heads * sx1 + cols
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = out_ptr + (t * n_heads + heads) * (2 * HALF) + cols
    dtype = out_ptr.dtype.element_ty
    tl.store(dst, cast_rn(x1 * c1 - x2 * s1, dtype, SOFT_BF16), mask=mask)
    tl.store(dst + HALF, cast_rn(x2 * c2 + x1 * s2, dtype, SOFT_BF16), mask=mask)


@jit
def _rope_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, pos_ptr, q_out_ptr, k_out_ptr,
    sq0, sq1, sk0, sk1, s_cos, s_sin,  # element strides: q/k over (token, head), tables over position
    n_q_heads, n_k_heads,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr,
    SOFT_BF16: tl.constexpr,  # round to bf16 by hand (CPU interpreter only, see _triton.cast_rn)
):
    """One program per token: read its cos/sin row once, rotate every q head and every k head."""
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)
    cmask = cols < HALF
    dtype = q_out_ptr.dtype.element_ty
    # HF rounds cos/sin to the model dtype before applying them
    c1 = cast_rn(tl.load(cos_ptr + pos * s_cos + cols, mask=cmask, other=0.0), dtype, SOFT_BF16).to(tl.float32)
    c2 = cast_rn(tl.load(cos_ptr + pos * s_cos + HALF + cols, mask=cmask, other=0.0), dtype, SOFT_BF16).to(tl.float32)
    s1 = cast_rn(tl.load(sin_ptr + pos * s_sin + cols, mask=cmask, other=0.0), dtype, SOFT_BF16).to(tl.float32)
    s2 = cast_rn(tl.load(sin_ptr + pos * s_sin + HALF + cols, mask=cmask, other=0.0), dtype, SOFT_BF16).to(tl.float32)
    c1, c2, s1, s2 = c1[None, :], c2[None, :], s1[None, :], s2[None, :]
    _rope_heads(q_ptr, q_out_ptr, t, sq0, sq1, n_q_heads, c1, c2, s1, s2, HALF, BLOCK_QH, BLOCK_HALF, SOFT_BF16)
    _rope_heads(k_ptr, k_out_ptr, t, sk0, sk1, n_k_heads, c1, c2, s1, s2, HALF, BLOCK_KH, BLOCK_HALF, SOFT_BF16)


def _heads_view(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def rope_triton(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: (T, Hq, D), k: (T, Hk, D), cos/sin: (max_positions, D) fp32, positions: (T,) int -> (q_out, k_out).

    q and k may be strided views (e.g. of a fused qkv projection); outputs are new contiguous tensors.
    Positions are not bounds-checked on the device: each must be < max_positions.
    """
    T, n_q, D = q.shape
    assert k.dim() == 3 and k.shape[0] == T and k.shape[2] == D, f"q {tuple(q.shape)} and k {tuple(k.shape)}"
    assert D % 2 == 0, f"head_dim {D} must be even"
    assert q.dtype == k.dtype, f"q is {q.dtype} but k is {k.dtype}"
    assert cos.shape == sin.shape and cos.dim() == 2 and cos.shape[1] == D, f"cos/sin {tuple(cos.shape)}, D={D}"
    assert positions.shape == (T,), f"positions {tuple(positions.shape)} for T={T}"
    n_k = k.shape[1]
    q_out = torch.empty((T, n_q, D), dtype=q.dtype, device=q.device)
    k_out = torch.empty((T, n_k, D), dtype=k.dtype, device=k.device)
    if T == 0:
        return q_out, k_out
    q, k = _heads_view(q), _heads_view(k)
    cos, sin = _heads_view(cos), _heads_view(sin)
    half = D // 2
    BLOCK_HALF = triton.next_power_of_2(half)
    BLOCK_QH, BLOCK_KH = triton.next_power_of_2(n_q), triton.next_power_of_2(n_k)
    tile = max(BLOCK_QH, BLOCK_KH) * BLOCK_HALF
    _rope_kernel[(T,)](
        q, k, cos, sin, positions, q_out, k_out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
        n_q, n_k,
        HALF=half, BLOCK_HALF=BLOCK_HALF, BLOCK_QH=BLOCK_QH, BLOCK_KH=BLOCK_KH,
        SOFT_BF16=q.device.type == "cpu", num_warps=max(1, min(16, tile // 256)),
    )
    return q_out, k_out


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_torch(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference, exactly HF's apply_rotary_pos_emb. q: (T, Hq, D), k: (T, Hk, D) -> (q_out, k_out)."""
    assert q.shape[-1] % 2 == 0, f"head_dim {q.shape[-1]} must be even"
    c = cos[positions].to(q.dtype)[:, None, :]  # (T, 1, D)
    s = sin[positions].to(q.dtype)[:, None, :]
    return q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s


def rope_tables(
    inv_freq: torch.Tensor, max_positions: int, attention_scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """inv_freq: (D/2,) -> (cos, sin), each (max_positions, D) float32, bit-identical to HF's rotary module."""
    positions = torch.arange(max_positions, device=inv_freq.device)
    freqs = positions.float()[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * attention_scaling, emb.sin() * attention_scaling


def rope_cpu(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """What CPUs run, bit-identical to the reference. With positions=None, cos and sin are already
    per token, (T, D): the packed model gathers them once per batch, not once per layer.

    rope_tables builds each row as cat(freqs, freqs), so both halves of cos (and of sin) are equal
    and rotate_half becomes two products per half, written straight into the output: no negated
    copy, no concatenation. The roundings are the reference's: q1*c + (-q2)*s == q1*c - q2*s.
    """
    if positions is not None:
        cos, sin = cos[positions], sin[positions]
    half = q.shape[-1] // 2
    c, s = cos[:, None, :half].to(q.dtype), sin[:, None, :half].to(q.dtype)
    outs = []
    for x in (q, k):
        x1, x2 = x[..., :half], x[..., half:]
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        o1, o2 = out[..., :half], out[..., half:]
        torch.mul(x1, c, out=o1).sub_(x2 * s)
        torch.mul(x2, c, out=o2).add_(x1 * s)
        outs.append(out)
    return outs[0], outs[1]
