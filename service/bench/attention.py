"""`rewardserve bench attention`: the CPU attention kernel against torch's SDPA, in one process.

The workload is `bench throughput`'s (the same lengths, the CPU shape's heads), and its first
token-budget batch is what both implementations see, as the packed model would hand it over: q, k
and v as views of one fused projection. Rounds alternate the implementations. It prints each one's
rate in GFLOP/s of useful causal work (QK^T and PV below the diagonal only), the kernel's speed-up,
their largest difference, and then the whole packed model's tokens/s with each attention, so the
end-to-end effect is measured in the same run. In bf16 the kernel's times include converting q, k
and v to fp32 and the output back, as the model does.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from rewardserve.kernels.attention_cpu import load_kernel
from rewardserve.bench.throughput import SHAPES, batches_by_tokens, build_checkpoint, device_label, workload
from rewardserve.config import ModelEntry
from rewardserve.models.attention import packed_causal_attention
from rewardserve.models.loading import load_model
from rewardserve.models.packed import PackedBatch
from rewardserve.models.units import lone


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run(n_items: int, lo: int, hi: int, repeats: int, batch_tokens: int, dtype_name: str = "float32") -> dict:
    kernel = load_kernel()
    if kernel is None:
        raise SystemExit("the CPU attention kernel cannot be built here (see the warning above): nothing to compare")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    shape = SHAPES["cpu"]
    hq, hk = shape["num_attention_heads"], shape["num_key_value_heads"]
    d = shape["hidden_size"] // hq
    seqs = batches_by_tokens(workload(n_items, lo, hi, shape["vocab_size"]), batch_tokens)[0]
    lengths = [len(s) for s in seqs]
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    T = cu[-1]
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(T, (hq + 2 * hk) * d, generator=g).to(dtype).split([hq * d, hk * d, hk * d], -1)
    q, k, v = q.view(T, hq, d), k.view(T, hk, d), v.view(T, hk, d)
    flops = sum(4 * hq * d * n * (n + 1) / 2 for n in lengths)

    def batch() -> PackedBatch:  # a fresh one per implementation: each caches its own attention plan
        return PackedBatch(torch.zeros(T, dtype=torch.long), torch.zeros(T, dtype=torch.long), cu,
                           [-1] * len(lengths), torch.zeros(1, dtype=torch.long), torch.device("cpu"))

    impls = {"kernel": (batch(), kernel), "sdpa": (batch(), None)}
    outs = {name: packed_causal_attention(q, k, v, b, None, fn) for name, (b, fn) in impls.items()}  # warm-up
    max_diff = (outs["kernel"].float() - outs["sdpa"].float()).abs().max().item()
    times: dict[str, list[float]] = {name: [] for name in impls}
    for _ in range(repeats):
        for name, (b, fn) in impls.items():
            times[name].append(_timed(lambda: packed_causal_attention(q, k, v, b, None, fn)))
    attention = {name: {"seconds": round(statistics.median(ts), 5),
                        "gflops": round(flops / statistics.median(ts) / 1e9, 1)} for name, ts in times.items()}

    with tempfile.TemporaryDirectory() as tmp:
        path = build_checkpoint("cpu", hi, Path(tmp))
        entry = ModelEntry(name="bench", path=str(path), dtype=dtype_name, devices="cpu", backend="packed")
        models = {name: load_model(entry, batch_tokens, attention_kernel=name == "kernel").backends[0]
                  for name in impls}
    assert models["kernel"].model.ops.attention_kernel is not None, "the model lacks the kernel. This is a bug."
    units = lone(seqs, None)
    for m in models.values():
        m.score(units)  # warm-up
    model_times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, m in models.items():
            model_times[name].append(_timed(lambda: m.score(units)))
    model = {name: {"tokens_per_s": round(T / statistics.median(ts), 1)} for name, ts in model_times.items()}

    speedup = attention["sdpa"]["seconds"] / attention["kernel"]["seconds"]
    model_ratio = model["kernel"]["tokens_per_s"] / model["sdpa"]["tokens_per_s"]
    for name in impls:
        print(f"attention {name:6s} {attention[name]['gflops']:7.1f} GFLOP/s   "
              f"model {model[name]['tokens_per_s']:8.1f} tok/s", flush=True)
    print(f"kernel vs sdpa: attention x{speedup:.2f}, model x{model_ratio:.3f}, max |diff| {max_diff:.1e}", flush=True)
    return {
        "bench": "attention", "device": device_label(torch.device("cpu")), "dtype": dtype_name,
        "heads": [hq, hk, d], "items": len(lengths), "tokens": T, "lengths": [lo, hi], "repeats": repeats,
        "attention": attention, "model": model, "attention_speedup": round(speedup, 3),
        "model_ratio": round(model_ratio, 3), "max_abs_diff": max_diff,
    }
