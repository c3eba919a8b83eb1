"""Causal attention over packed segments on CPU: a C++ kernel (`attention_cpu.cpp`) beside
its PyTorch reference.

This op is the exception to "Triton on CUDA, the reference on CPU": CUDA runs FlashAttention's
varlen kernel (see service/models/attention.py), and on CPU torch's own flash kernel wastes up to
half its work on masked blocks of causal sequences (measured in the .cpp's header). The kernel is
compiled on first use with the machine's C++ compiler (`g++`, flags `-O3 -march=native -fopenmp`)
and linked against the BLAS inside libtorch_cpu; the shared object is cached per source, compiler
flags, torch version and CPU. Without a compiler, or if the build fails, `load_kernel()` logs why
and returns None, and the caller keeps torch's SDPA.

q: (T, Hq, D); k, v: (T, Hk, D); segment s is rows starts[s] .. starts[s] + lens[s] - 1. A whole
sequence sits at positions 0 ..; a response of a shared prompt (prefix_lens[s] > 0) attends to the
prompt's rows prefix_starts[s] .. + prefix_lens[s] - 1 and then to its own, its positions
continuing after the prompt. A token at position i sees j <= i and, with a window W, i - W < j.
fp32 only.
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

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("attention_cpu.cpp")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c++17")
_I64 = ctypes.c_int64
_ARGTYPES = [ctypes.c_void_p] * 4 + [_I64] * 7 + [ctypes.c_void_p] * 4 + [_I64, _I64, ctypes.c_float, _I64]


def causal_attention_torch(q, k, v, starts, lens, window: int | None, prefix_starts=None,
                           prefix_lens=None) -> torch.Tensor:
    """The reference: per segment, softmax(q k^T / sqrt(D) + mask) v in plain torch. -> (T, Hq, D)"""
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
    torch_lib = Path(torch.__file__).parent / "lib"
    src = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([src, " ".join(FLAGS).encode(), torch.__version__.encode(),
                                     _cpu_id().encode(), cxx.encode()])).hexdigest()[:16]
    target = (cache_dir or _cache_dir()) / f"attention_cpu-{key}.so"
    if target.exists():
        return target
    partial = target.with_suffix(f".{os.getpid()}.tmp")  # concurrent builders never see half a file
    cmd = [cxx, *FLAGS, str(SOURCE), "-o", str(partial), f"-L{torch_lib}", "-ltorch_cpu",
           f"-Wl,-rpath,{torch_lib}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"building {SOURCE.name} failed: {done.stderr.strip()[-2000:]}")
    os.replace(partial, target)
    return target


def load_kernel(compiler: str = "g++", cache_dir: Path | None = None) -> Callable | None:
    """`causal_attention_cpu` bound to the compiled kernel, or None (logged) when it cannot be built
    or loaded here. Builds once per process."""
    key = (compiler, cache_dir)
    if key not in _loaded:
        try:
            lib = ctypes.CDLL(str(build(compiler, cache_dir)))
            fn = lib.rs_causal_attention_f32
            fn.argtypes, fn.restype = _ARGTYPES, ctypes.c_int
            _loaded[key] = lambda *args, **kw: causal_attention_cpu(fn, *args, **kw)
        except (RuntimeError, OSError) as exc:
            log.warning("CPU attention kernel unavailable, using torch SDPA: %s", exc)
            _loaded[key] = None
    return _loaded[key]


_loaded: dict[tuple, Callable | None] = {}


def causal_attention_cpu(fn, q, k, v, starts, lens, window: int | None, out: torch.Tensor | None = None,
                         prefix_starts=None, prefix_lens=None) -> torch.Tensor:
    """Runs the compiled kernel `fn`; q, k, v may be row-strided views (of a fused qkv). Writes the
    segments' rows of `out` (T, Hq, D), new when None, and leaves its other rows alone."""
    T, hq, d = q.shape
    hk = k.shape[1]
    if q.dtype != torch.float32 or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"the CPU attention kernel is fp32 only, got {q.dtype}, {k.dtype}, {v.dtype}")
    if hq % hk or k.shape != v.shape or k.shape[0] != T or k.shape[2] != d:
        raise ValueError(f"inconsistent shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    q, k, v = (t if t.stride(2) == 1 and t.stride(1) == d else t.contiguous() for t in (q, k, v))
    if prefix_lens is None:
        prefix_starts = prefix_lens = torch.zeros_like(lens)
    starts, lens, prefix_starts, prefix_lens = (t.to(torch.int64).contiguous()
                                                for t in (starts, lens, prefix_starts, prefix_lens))
    if not starts.shape == lens.shape == prefix_starts.shape == prefix_lens.shape:
        raise ValueError("starts, lens, prefix_starts and prefix_lens must have one entry per segment")
    if len(starts) and (int(starts.min()) < 0 or int((starts + lens).max()) > T or int(lens.min()) < 1):
        raise ValueError("every segment must be non-empty and lie within the packed rows")
    if len(starts) and (int(prefix_starts.min()) < 0 or int((prefix_starts + prefix_lens).max()) > T
                        or int(prefix_lens.min()) < 0):
        raise ValueError("every prompt prefix must lie within the packed rows")
    if out is None:
        out = torch.empty(T, hq, d, dtype=q.dtype)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(2) != 1 or out.stride(1) != d:
        raise ValueError(f"out must be a row-strided (T, Hq, D) fp32 tensor, got {tuple(out.shape)} {out.stride()}")
    rc = fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), q.stride(0), k.stride(0), v.stride(0),
            out.stride(0), hq, hk, d, starts.data_ptr(), lens.data_ptr(), prefix_starts.data_ptr(),
            prefix_lens.data_ptr(), len(starts), window or 0,
            d ** -0.5, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"CPU attention kernel returned {rc} for q {tuple(q.shape)}, k {tuple(k.shape)}. "
                           "This is a bug.")
    return out
