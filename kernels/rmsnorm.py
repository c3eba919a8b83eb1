"""RMSNorm with an optional fused residual add, with the semantics of Hugging Face `LlamaRMSNorm`.

    new_residual = (x + residual) rounded to x.dtype       (or x itself when residual is None)
    h            = new_residual in float32
    out          = weight * (h * rsqrt(mean(h^2, -1) + eps)).to(x.dtype)

The normalized value is rounded to the input dtype *before* the weight multiply, and that product is
taken in the promoted dtype of (weight, x), exactly as HF does. The norm is over the last dim only,
so the same op serves the (T, H) residual stream and Qwen3's per-head q/k norm on (T, heads, D).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from rewardserve.kernels._triton import cast_rn, jit, tl, triton

_MAX_BLOCK = 65536  # one row lives in registers; hidden sizes of real models are far below this
_TILE = 1024  # short rows (Qwen3's per-head q/k norm, D = 128) are packed several to a program


@jit
def _rmsnorm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr,
    n_rows, inner,  # rows are indexed (outer, inner): row r = (r // inner, r % inner)
    sx0, sx1, sr0, sr1,  # element strides of x and residual over (outer, inner); the last dim is contiguous
    H, eps,
    HAS_RESIDUAL: tl.constexpr,
    ROWS: tl.constexpr,  # rows per program: 1 for hidden-size rows, several for short (head_dim) rows
    BLOCK: tl.constexpr,
    SOFT_BF16: tl.constexpr,  # round to bf16 by hand (CPU interpreter only, see _triton.cast_rn)
):
    """Each program normalizes ROWS whole rows held in registers: read x (+ residual), write
    new_residual (if any) and out, both contiguous."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    a = rows // inner
    b = rows % inner
    cols = tl.arange(0, BLOCK)
    mask = (rows < n_rows)[:, None] & (cols < H)[None, :]
    x_dtype = x_ptr.dtype.element_ty
    out_dtype = out_ptr.dtype.element_ty

    x = tl.load(x_ptr + (a * sx0 + b * sx1)[:, None] + cols[None, :], mask=mask, other=0.0)
    dst = rows[:, None] * H + cols[None, :]
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + (a * sr0 + b * sr1)[:, None] + cols[None, :], mask=mask, other=0.0)
        x = cast_rn(x.to(tl.float32) + r.to(tl.float32), x_dtype, SOFT_BF16)  # the residual stream, model dtype
        tl.store(new_res_ptr + dst, x, mask=mask)
    h = x.to(tl.float32)

    rstd = tl.rsqrt(tl.sum(h * h, axis=1) / H + eps)[:, None]
    w = tl.load(w_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)[None, :]
    normed = cast_rn(h * rstd, x_dtype, SOFT_BF16).to(tl.float32)  # HF rounds to x.dtype before the weight
    tl.store(out_ptr + dst, cast_rn(normed * w, out_dtype, SOFT_BF16), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """View t (..., H) as (outer, inner, H) with a contiguous last dim, copying only when it must."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    if t.dim() == 1:
        return t.view(1, 1, -1)
    if t.dim() == 2:
        return t.unsqueeze(1)
    if t.dim() == 3:
        return t
    return t.reshape(-1, t.shape[-2], t.shape[-1])


def _num_warps(tile: int) -> int:
    return max(1, min(32, tile // 256))


def rmsnorm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (..., H), weight: (H,), residual: like x or None -> (out (..., H), new_residual (..., H)).

    Fused: one pass reads x (+ residual) and writes out and, when residual is given, new_residual.
    Strided inputs (e.g. q/k views of a fused qkv projection) are read in place; outputs are contiguous.
    """
    H = x.shape[-1]
    assert weight.shape == (H,), f"weight {tuple(weight.shape)} does not match the last dim of x {tuple(x.shape)}"
    BLOCK = triton.next_power_of_2(H)
    assert BLOCK <= _MAX_BLOCK, f"rmsnorm_triton keeps one row in registers; H={H} is too large"
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if x.numel() == 0:
        return out, (x if residual is None else torch.empty_like(x))
    x3 = _rows(x)
    if residual is not None:
        assert residual.shape == x.shape, f"residual {tuple(residual.shape)} != x {tuple(x.shape)}"
        r3 = _rows(residual)
        new_residual = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    else:
        r3, new_residual = x3, out  # never read / written (HAS_RESIDUAL is off)
    n_rows = x3.shape[0] * x3.shape[1]
    ROWS = max(1, min(_TILE // BLOCK, triton.next_power_of_2(n_rows)))
    _rmsnorm_kernel[(triton.cdiv(n_rows, ROWS),)](
        x3, r3, weight.contiguous(), out, new_residual,
        n_rows, x3.shape[1], x3.stride(0), x3.stride(1), r3.stride(0), r3.stride(1),
        H, float(eps),
        HAS_RESIDUAL=residual is not None, ROWS=ROWS, BLOCK=BLOCK, SOFT_BF16=x.device.type == "cpu",
        num_warps=_num_warps(ROWS * BLOCK),
    )
    return out, (x if residual is None else new_residual)


def rmsnorm_torch(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference. x: (..., H), weight: (H,), residual: like x or None -> (out, new_residual)."""
    if residual is not None:
        new_residual = (x.float() + residual.float()).to(x.dtype)
    else:
        new_residual = x
    h = new_residual.float()
    out = weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return out, new_residual


def rmsnorm_cpu(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """What CPUs run: the reference's numbers with fewer passes over memory (torch's fused
    `rms_norm` instead of pow, mean, rsqrt and two products, each a full pass). fp32 equals the
    reference up to the reduction order of the sum of squares; bf16/fp16 keep the reference's two
    roundings (normalized value, then the weight product). Measured on the 2-core VM: the 40M
    benchmark model's norms took 25% less time. Where the C++ kernels build, the packed CPU model
    runs kernels/attention_cpu.py's `rmsnorm_fused_cpu` instead: these roundings in one call."""
    new_residual = x if residual is None else torch.add(x, residual)  # one rounding, as the reference
    if new_residual.dtype == torch.float32:
        return F.rms_norm(new_residual, (x.shape[-1],), weight, eps), new_residual
    normed = F.rms_norm(new_residual.float(), (x.shape[-1],), None, eps).to(x.dtype)
    return weight * normed, new_residual
