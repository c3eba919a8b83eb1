"""`rewardserve bench bon`: best-of-N groups scored with the shared prompt computed once, against the same
groups scored as independent (prompt + response) sequences, on one backend (packed by default; `hf` runs
the padded HF path, whose groups share the prompt through a KV cache), in one run.

Throughput counts *logical* tokens, N*(P+R) per group, so the two paths are directly comparable; the
ideal speed-up, if cost were proportional to computed tokens, is N*(P+R) / (P+N*R).
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rewardserve.bench.throughput import _sync, build_checkpoint, device_label
from rewardserve.config import ModelEntry
from rewardserve.models.loading import load_model, resolve_dtype
from rewardserve.models.units import Unit, lone


def run(device_name: str, dtype_name: str, shapes: list[tuple[int, int, int]], groups: int, repeats: int,
        batch_tokens: int, backend_kind: str = "packed") -> dict:
    device = torch.device(device_name)
    dtype = resolve_dtype(dtype_name, device)
    shape = "gpu" if device.type == "cuda" else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        path = build_checkpoint(shape, max(p + r for p, _, r in shapes), Path(tmp))
        loaded = load_model(ModelEntry(name="bench", path=str(path), dtype=str(dtype).removeprefix("torch."),
                                       devices=device_name, backend=backend_kind), batch_tokens)
    backend = loaded.backends[0]
    rng = random.Random(0)
    vocab = loaded.encoder.vocab_size
    rows = []
    for prompt_len, n, resp_len in shapes:
        work = []
        for _ in range(groups):
            prefix = [rng.randrange(1, vocab) for _ in range(prompt_len)]
            suffixes = [[rng.randrange(1, vocab) for _ in range(resp_len)] for _ in range(n)]
            work.append(Unit(prefix, suffixes, [(resp_len - 1,)] * n))
        independent = [lone([u.prefix + s for s in u.suffixes], loaded.pad_token_id) for u in work]
        logical = groups * n * (prompt_len + resp_len)

        def shared_once() -> float:
            _sync(device)
            t = time.perf_counter()
            for u in work:
                backend.score([u])
            _sync(device)
            return logical / (time.perf_counter() - t)

        def independent_once() -> float:
            _sync(device)
            t = time.perf_counter()
            for seqs in independent:
                backend.score(seqs)
            _sync(device)
            return logical / (time.perf_counter() - t)

        shared_once(), independent_once()  # warm-up
        s_rates, i_rates = [], []
        for _ in range(repeats):
            s_rates.append(shared_once())
            i_rates.append(independent_once())
        s, i = statistics.median(s_rates), statistics.median(i_rates)
        ideal = n * (prompt_len + resp_len) / (prompt_len + n * resp_len)
        row = {"prompt": prompt_len, "n": n, "response": resp_len, "shared_tok_s": round(s, 1),
               "independent_tok_s": round(i, 1), "speedup": round(s / i, 3), "ideal": round(ideal, 3),
               "fraction_of_ideal": round(s / i / ideal, 3)}
        rows.append(row)
        print(f"P={prompt_len:4d} N={n:3d} R={resp_len:4d}  shared {s:9.1f} tok/s  independent {i:9.1f} tok/s  "
              f"x{s / i:5.2f} (ideal x{ideal:5.2f}, {100 * s / i / ideal:5.1f}% of ideal)", flush=True)
    return {"bench": "bon", "backend": backend_kind, "device": device_label(device),
            "dtype": str(dtype).removeprefix("torch."),
            "groups": groups, "repeats": repeats, "results": rows}
