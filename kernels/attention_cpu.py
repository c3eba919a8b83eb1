"""Causal attention over packed segments on CPU: a C++ kernel (`attention_cpu.cpp`) beside
its PyTorch reference.

This op is the exception to "Triton on CUDA, the reference on CPU": CUDA runs FlashAttention's
varlen kernel (see service/models/attention.py), and on CPU torch's own flash kernel wastes up to
half its work on masked blocks of causal sequences (measured in the .cpp's header). The kernel is
compiled on first use with the machine's C++ compiler (`g++`, flags `-O3 -march=native -fopenmp`);
the shared object is cached per source, compiler flags, torch version and CPU. Without a compiler, or
if the build fails, `load_kernel()` logs why and returns None, and the caller keeps torch's SDPA (and
`load_rope()` and `load_rmsnorm()` return None: the model keeps `rope_cpu` and `rmsnorm_cpu`).

q: (T, Hq, D); k, v: (T, Hk, D); segment s is rows starts[s] .. starts[s] + lens[s] - 1. A whole
sequence sits at positions 0 ..; a response of a shared prompt (prefix_lens[s] > 0) attends to the
prompt's rows prefix_starts[s] .. + prefix_lens[s] - 1 and then to its own, its positions
continuing after the prompt. A token at position i sees j <= i and, with a window W, i - W < j.
With `select` = (segments, rows), only those query rows are computed: q and the output then hold one
row per selected query. q, k and v are fp32 or bf16, and the output has q's dtype. bf16 is read in
place: with AVX512-BF16 and an even D, both products take bf16 pairs with fp32 sums (probabilities
rounded to bf16 for the second); otherwise it is widened to fp32 and the output rounded once.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

import torch

from rewardserve.kernels.rmsnorm import rmsnorm_cpu

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("attention_cpu.cpp")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c++17")
_I64 = ctypes.c_int64
_ARGTYPES = ([ctypes.c_void_p] * 4 + [_I64] * 8 + [ctypes.c_void_p] * 4 + [_I64] + [ctypes.c_void_p] * 2
             + [_I64, _I64, ctypes.c_float, _I64])


def causal_attention_torch(q, k, v, starts, lens, window: int | None, prefix_starts=None,
                           prefix_lens=None, select=None) -> torch.Tensor:
    """The reference: per segment, softmax(q k^T / sqrt(D) + mask) v in plain torch. -> (T, Hq, D),
    or with `select` = (segments, rows) and q (N, Hq, D) of the selected rows: those rows' outputs (N, Hq, D)."""
    if select is not None:
        seg, row = (t.tolist() for t in select)
        full_q = torch.zeros(k.shape[0], q.shape[1], q.shape[2], dtype=q.dtype)
        rows = torch.tensor([int(starts[s]) + r for s, r in zip(seg, row)], dtype=torch.long)
        full_q[rows] = q
        return causal_attention_torch(full_q, k, v, starts, lens, window, prefix_starts, prefix_lens)[rows]
    out = torch.empty_like(q)
    groups = q.shape[1] // k.shape[1]
    if prefix_lens is None:
        prefix_starts = prefix_lens = torch.zeros_like(lens)
    for start, n, p_start, p in zip(starts.tolist(), lens.tolist(), prefix_starts.tolist(), prefix_lens.tolist()):
        rows = slice(start, start + n)
        keys = torch.cat([torch.arange(p_start, p_start + p), torch.arange(start, start + n)])
        qs = q[rows].transpose(0, 1).float()  # (Hq, n, D)
        ks = k[keys].transpose(0, 1).float().repeat_interleave(groups, 0)  # (Hq, p + n, D)
        vs = v[keys].transpose(0, 1).float().repeat_interleave(groups, 0)
        qpos, kpos = torch.arange(p, p + n)[:, None], torch.arange(p + n)[None, :]
        allowed = kpos <= qpos
        if window:
            allowed &= qpos - kpos < window
        scores = (qs @ ks.transpose(1, 2)) * q.shape[-1] ** -0.5
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out[rows] = (probs @ vs).transpose(0, 1).to(q.dtype)
    return out


def _cache_dir() -> Path:
    home = Path.home() / ".cache" / "rewardserve" / "kernels"
    try:
        home.mkdir(parents=True, exist_ok=True)
        if os.access(home, os.W_OK):
            return home
    except OSError:
        pass
    fallback = Path(tempfile.gettempdir()) / f"rewardserve-kernels-{os.getuid()}"
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor()


def build(compiler: str = "g++", cache_dir: Path | None = None) -> Path:
    """Compile the kernel (or find it in the cache) and return the shared object's path.
    Raises RuntimeError with the compiler's message when it cannot be built."""
    cxx = shutil.which(compiler)
    if cxx is None:
        raise RuntimeError(f"no C++ compiler: {compiler!r} is not on PATH")
    src = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([src, " ".join(FLAGS).encode(), torch.__version__.encode(),
                                     _cpu_id().encode(), cxx.encode()])).hexdigest()[:16]
    target = (cache_dir or _cache_dir()) / f"attention_cpu-{key}.so"
    if target.exists():
        return target
    partial = target.with_suffix(f".{os.getpid()}.tmp")  # concurrent builders never see half a file
    cmd = [cxx, *FLAGS, str(SOURCE), "-o", str(partial)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"building {SOURCE.name} failed: {done.stderr.strip()[-2000:]}")
    os.replace(partial, target)
    return target


def _library(compiler: str, cache_dir: Path | None):
    """The compiled library with its functions' signatures set, or None (logged). Built once per process."""
    key = (compiler, cache_dir)
    if key not in _loaded:
        try:
            lib = ctypes.CDLL(str(build(compiler, cache_dir)))
            lib.rs_causal_attention.argtypes, lib.rs_causal_attention.restype = _ARGTYPES, ctypes.c_int
            lib.rs_rope_inplace.argtypes, lib.rs_rope_inplace.restype = _ROPE_ARGTYPES, ctypes.c_int
            lib.rs_rmsnorm.argtypes, lib.rs_rmsnorm.restype = _RMSNORM_ARGTYPES, ctypes.c_int
            _loaded[key] = lib
        except (RuntimeError, OSError, AttributeError) as exc:
            log.warning("CPU attention kernel unavailable, using torch SDPA: %s", exc)
            _loaded[key] = None
    return _loaded[key]


_loaded: dict[tuple, ctypes.CDLL | None] = {}
_ROPE_ARGTYPES = [ctypes.c_void_p] * 2 + [_I64] * 7 + [ctypes.c_void_p] * 2 + [_I64] * 2
_RMSNORM_ARGTYPES = [ctypes.c_void_p] * 5 + [_I64] * 7 + [ctypes.c_float, _I64]


def load_kernel(compiler: str = "g++", cache_dir: Path | None = None) -> Callable | None:
    """`causal_attention_cpu` bound to the compiled kernel, or None (logged) when it cannot be built
    or loaded here."""
    lib = _library(compiler, cache_dir)
    return None if lib is None else lambda *args, **kw: causal_attention_cpu(lib.rs_causal_attention, *args, **kw)


def load_rope(compiler: str = "g++", cache_dir: Path | None = None) -> Callable | None:
    """`rope_inplace_cpu` bound to the compiled library (the same one as the attention), or None."""
    lib = _library(compiler, cache_dir)
    return None if lib is None else lambda *args: rope_inplace_cpu(lib.rs_rope_inplace, *args)


def load_rmsnorm(compiler: str = "g++", cache_dir: Path | None = None) -> Callable | None:
    """`rmsnorm_fused_cpu` bound to the compiled library (the same one as the attention), or None."""
    lib = _library(compiler, cache_dir)
    return None if lib is None else lambda *args: rmsnorm_fused_cpu(lib.rs_rmsnorm, *args)


def rmsnorm_fused_cpu(fn, x: torch.Tensor, weight: torch.Tensor, eps: float,
                      residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """kernels/rmsnorm.py's `rmsnorm_cpu` (same signature, same roundings; the sum of squares in
    another order) in one C++ call per (T, H) tensor of rows with contiguous columns; anything else
    (other dtypes, a weight of another dtype, strided columns, other ranks) goes to `rmsnorm_cpu`."""
    ok = (x.dim() == 2 and x.dtype in (torch.float32, torch.bfloat16) and weight.dtype == x.dtype
          and x.stride(1) == 1 and weight.is_contiguous() and weight.shape == (x.shape[1],)
          and (residual is None or (residual.shape == x.shape and residual.dtype == x.dtype
                                    and residual.stride(1) == 1)))
    if not ok:
        return rmsnorm_cpu(x, weight, eps, residual)
    T, H = x.shape
    out = torch.empty((T, H), dtype=x.dtype)
    stream = x if residual is None else torch.empty((T, H), dtype=x.dtype)
    rc = fn(x.data_ptr(), None if residual is None else residual.data_ptr(), weight.data_ptr(), out.data_ptr(),
            None if residual is None else stream.data_ptr(), x.dtype == torch.bfloat16, T, H, x.stride(0),
            0 if residual is None else residual.stride(0), H, H, eps, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"CPU rmsnorm kernel returned {rc} for x {tuple(x.shape)}. This is a bug.")
    return out, stream


def rope_inplace_cpu(fn, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotary embedding of q (T, Hq, D) and k (T, Hk, D), row-strided views (of a fused qkv) allowed,
    in place, with per-token fp32 tables cos, sin (T, D) as the packed model gathers them: bit-identical
    to kernels/rope.py's `rope_cpu`, in one pass. -> (q, k), the same tensors."""
    T, hq, d = q.shape
    if q.dtype not in (torch.float32, torch.bfloat16) or k.dtype != q.dtype:
        raise TypeError(f"the CPU rope takes fp32 or bf16 q and k alike, got {q.dtype} and {k.dtype}")
    if k.shape[0] != T or k.shape[2] != d or d % 2 or cos.shape != (T, d) or sin.shape != (T, d):
        raise ValueError(f"inconsistent shapes q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}, "
                         f"sin {tuple(sin.shape)}")
    for t in (q, k):
        if t.stride(2) != 1 or t.stride(1) != d:
            raise ValueError(f"q and k must have contiguous heads (strides (*, D, 1)), got {t.stride()}")
    cos, sin = cos.float(), sin.float()
    if cos.stride() != sin.stride() or cos.stride(1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    rc = fn(q.data_ptr(), k.data_ptr(), q.dtype == torch.bfloat16, T, hq, k.shape[1], d, q.stride(0), k.stride(0),
            cos.data_ptr(), sin.data_ptr(), cos.stride(0), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"CPU rope kernel returned {rc} for q {tuple(q.shape)}. This is a bug.")
    return q, k


def causal_attention_cpu(fn, q, k, v, starts, lens, window: int | None, out: torch.Tensor | None = None,
                         prefix_starts=None, prefix_lens=None, select=None, trusted: bool = False) -> torch.Tensor:
    """Runs the compiled kernel `fn`; q, k, v may be row-strided views (of a fused qkv). Writes the
    segments' rows of `out` (T, Hq, D), new when None, and leaves its other rows alone. With `select`
    = (segments, rows), two int64 tensors of N entries: q and `out` are (N, Hq, D), the selected
    query rows (row r of segment s is packed row starts[s] + r) in that order. `trusted`: the segment
    and selection tensors are contiguous int64 built from the batch itself (the packed model's plan),
    so their bounds checks, a dozen small reductions per call, are skipped."""
    T, hk, d = k.shape
    n_q, hq = q.shape[0], q.shape[1]
    if q.dtype not in (torch.float32, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"the CPU attention kernel takes fp32 or bf16 (all three alike), got {q.dtype}, {k.dtype}, "
                        f"{v.dtype}")
    if hq % hk or k.shape != v.shape or q.shape[2] != d or (select is None and n_q != T):
        raise ValueError(f"inconsistent shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    q, k, v = (t if t.stride(2) == 1 and t.stride(1) == d else t.contiguous() for t in (q, k, v))
    if prefix_lens is None:
        prefix_starts = prefix_lens = torch.zeros_like(lens)
    if trusted:
        return _run(fn, q, k, v, starts, lens, prefix_starts, prefix_lens, select, window, out)
    starts, lens, prefix_starts, prefix_lens = (t.to(torch.int64).contiguous()
                                                for t in (starts, lens, prefix_starts, prefix_lens))
    if not starts.shape == lens.shape == prefix_starts.shape == prefix_lens.shape:
        raise ValueError("starts, lens, prefix_starts and prefix_lens must have one entry per segment")
    if len(starts) and (int(starts.min()) < 0 or int((starts + lens).max()) > T or int(lens.min()) < 1):
        raise ValueError("every segment must be non-empty and lie within the packed rows")
    if len(starts) and (int(prefix_starts.min()) < 0 or int((prefix_starts + prefix_lens).max()) > T
                        or int(prefix_lens.min()) < 0):
        raise ValueError("every prompt prefix must lie within the packed rows")
    if select is not None:
        sel_seg, sel_row = (t.to(torch.int64).contiguous() for t in select)
        if not sel_seg.shape == sel_row.shape == (n_q,):
            raise ValueError(f"select needs one (segment, row) per query row: {n_q} rows, "
                             f"{tuple(sel_seg.shape)} segments and {tuple(sel_row.shape)} rows")
        if n_q and (int(sel_seg.min()) < 0 or int(sel_seg.max()) >= len(starts) or int(sel_row.min()) < 0
                    or bool((sel_row >= lens[sel_seg]).any())):
            raise ValueError("every selected row must lie within its segment")
        select = sel_seg, sel_row
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.stride(2) != 1 or out.stride(1) != d):
        raise ValueError(f"out must be a row-strided (T, Hq, D) tensor of q's dtype, got {tuple(out.shape)} "
                         f"{out.dtype} {out.stride()}")
    return _run(fn, q, k, v, starts, lens, prefix_starts, prefix_lens, select, window, out)


_NO_SELECTION = torch.zeros(0, dtype=torch.int64)


def _run(fn, q, k, v, starts, lens, prefix_starts, prefix_lens, select, window, out):
    """The kernel call itself, on arguments already checked."""
    T, hk, d = k.shape
    n_q, hq = q.shape[0], q.shape[1]
    sel_seg, sel_row = (_NO_SELECTION, _NO_SELECTION) if select is None else select
    if out is None:
        out = torch.empty(n_q, hq, d, dtype=q.dtype)
    if select is not None and n_q == 0:  # nothing selected (the kernel reads no selection as "every row")
        return out
    rc = fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), q.dtype == torch.bfloat16, q.stride(0),
            k.stride(0), v.stride(0), out.stride(0), hq, hk, d, starts.data_ptr(), lens.data_ptr(),
            prefix_starts.data_ptr(), prefix_lens.data_ptr(), len(starts), sel_seg.data_ptr(), sel_row.data_ptr(),
            len(sel_seg), window or 0, d ** -0.5, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"CPU attention kernel returned {rc} for q {tuple(q.shape)}, k {tuple(k.shape)}. "
                           "This is a bug.")
    return out
