"""The benchmark commands run end to end and print their final JSON line (numbers are not asserted)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import KERNEL_TOOL, attention_kernel_builds, require_tool


def _bench(*args: str) -> dict:
    """Runs `rewardserve bench ARGS` and returns its final JSON line."""
    proc = subprocess.run([sys.executable, "-m", "rewardserve.cli", "bench", *args], capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])


def test_bench_cache_reports_hits_next_to_healthz(tiny_ckpt):
    require_tool(shutil.which("redis-server") is not None, "redis-server")
    result = _bench("cache", "--model", str(tiny_ckpt("llama")), "--duration", "0.5", "--concurrency", "4",
                    "--tiers", "lru,redis,miss")
    assert result["bench"] == "cache" and [r["tier"] for r in result["results"]] == ["lru", "redis", "miss"]
    for row in result["results"]:
        for phase in ("healthz", "score_misses" if row["tier"] == "miss" else "score_hits"):
            assert row[phase]["requests"] > 0 and row[phase]["errors"] == 0
            assert 0 < row[phase]["p50_ms"] <= row[phase]["p99_ms"]
        assert row["hit_rps_vs_healthz"] > 0


def test_bench_throughput_runs_all_three_paths_and_prints_json():
    result = _bench("throughput", "--items", "3", "--min-len", "8", "--max-len", "40", "--repeats", "1")
    assert result["bench"] == "throughput" and result["dtype"] == "float32"
    assert set(result["paths"]) == {"a_hf_arrival_order", "b_hf_length_sorted", "c_packed"}
    assert result["paths"]["a_hf_arrival_order"]["ratio_vs_a"] == 1.0
    for row in result["paths"].values():
        assert row["tokens_per_s"] > 0 and 0 < row["fraction_of_limit"]
    assert result["gemm_flops"] > 0 and result["model_flops_per_token"] > 0
    assert len(result["gemm_flops_per_round"]) == 1  # measured in each round beside the paths
    packed = result["paths"]["c_packed"]
    executed = result["executed_flops_per_token"] / result["model_flops_per_token"]
    assert packed["executed_fraction_of_limit"] == pytest.approx(packed["fraction_of_limit"] * executed, rel=0.02)


def test_executed_flops_count_the_last_layer_for_pooled_rows_only():
    """By hand, for 2 layers and two sequences of 3 and 5 tokens: layer 1 in full; layer 2's qkv for
    all 8 tokens, its o projection and MLP for 2 pooled rows, and their attention over 3 and 5 keys."""
    from types import SimpleNamespace

    from rewardserve.bench.throughput import executed_flops_per_token, model_flops_per_token

    cfg = SimpleNamespace(hidden_size=8, intermediate_size=12, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2)
    seqs = [[1] * 3, [1] * 5]
    h, i, q, kv = 8, 12, 8, 4
    layer = 2 * (h * (q + 2 * kv) + q * h + 3 * h * i)  # per token
    attention = 2 * 2 * q * (3 * 4 / 2 + 5 * 6 / 2)  # per layer, all 8 tokens
    assert model_flops_per_token(cfg, seqs) == pytest.approx(2 * layer + 2 * attention / 8)
    last = 8 * 2 * h * (q + 2 * kv) + 2 * 2 * (q * h + 3 * h * i) + 2 * 2 * q * (3 + 5)  # all 8 tokens
    assert executed_flops_per_token(cfg, seqs) == pytest.approx(layer + attention / 8 + last / 8)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 0.05)])
def test_bench_attention_compares_the_kernel_with_sdpa_alone_and_in_the_model(dtype, tol):
    require_tool(attention_kernel_builds(), KERNEL_TOOL)
    result = _bench("attention", "--items", "4", "--min-len", "8", "--max-len", "90", "--repeats", "1",
                    "--dtype", dtype)
    assert result["bench"] == "attention" and result["dtype"] == dtype
    assert result["items"] == 4 and 4 * 8 <= result["tokens"] <= 4 * 90
    assert set(result["attention"]) == set(result["model"]) == {"kernel", "sdpa"}
    assert all(row["gflops"] > 0 for row in result["attention"].values())
    assert all(row["tokens_per_s"] > 0 for row in result["model"].values())
    assert result["max_abs_diff"] <= tol and result["attention_speedup"] > 0 and result["model_ratio"] > 0


@pytest.mark.parametrize("backend", ["packed", "hf"])
def test_bench_bon_reports_shared_vs_independent_and_the_ideal(backend):
    result = _bench("bon", "--shapes", "24x3x4", "--groups", "1", "--repeats", "1", "--backend", backend)
    assert result["backend"] == backend
    [row] = result["results"]
    assert (row["prompt"], row["n"], row["response"]) == (24, 3, 4)
    assert row["ideal"] == round(3 * 28 / (24 + 12), 3)
    assert row["shared_tok_s"] > 0 and row["independent_tok_s"] > 0 and row["fraction_of_ideal"] > 0


def test_bench_overload_every_request_ends_in_200_429_or_504_and_nothing_is_lost():
    """The load test, on the embedded model: capacity, then an open loop ramping to 5x it, each request with
    a deadline."""
    result = _bench("overload", "--capacity-s", "1.5", "--ramp-s", "3", "--peak", "5", "--deadline-s", "1",
                    "--texts", "32")
    assert result["bench"] == "overload" and result["capacity_rps"] > 0
    assert result["peak_offered_rps"] == pytest.approx(5 * result["capacity_rps"], rel=0.01)
    assert set(result["by_status"]) <= {"200", "429", "504"}, result["by_status"]
    assert result["hung"] == result["failed"] == result["wrong_or_duplicated"] == 0
    assert result["by_status"].get("200", 0) > 0 and result["requests"] >= 3 * result["capacity_rps"]
    assert result["rss_mb"]["peak"] - result["rss_mb"]["before"] < 400  # the same bound as the hostile table
    first, second = result["rss_mb"]["after_each_round"]
    assert second - first < 100  # flat: the second ramp keeps nothing of its own (RSS holds the peak's pages)


def test_bench_texts_tokenise_back_to_the_workload_ids():
    """bench peers sends texts to servers that tokenise them: the benchmark checkpoint's tokenizer must read
    each text back as exactly the workload's ids (no special tokens, no merges)."""
    from rewardserve.bench.peers import Peer
    from rewardserve.bench.throughput import as_text, word_tokenizer, workload

    tok = word_tokenizer(32000)
    for ids in workload(5, 1, 300, 32000, seed=4) + [[2, 35, 36, 37, 1295, 1296, 31999]]:
        assert tok(as_text(ids)).input_ids == ids
    ours, vllm = Peer("rewardserve", "/v1/score", "m"), Peer("vllm", "/classify", "m")
    assert max(len(as_text(ids)) / len(ids) for ids in workload(5, 1, 300, 151936, seed=5)) <= 5  # vLLM's bound: 6
    assert ours.body(["a b"]) == {"items": [{"text": "a b"}]}
    assert vllm.body(["a b", "c"]) == {"model": "m", "input": ["a b", "c"], "use_activation": False}


def test_free_ports_lie_below_the_ephemeral_range_bind_and_are_not_handed_out_twice():
    """A port from bind(0) can be taken by another process's outgoing connection before the server binds it
    (a Ray proxy once failed so in CI); ports below the kernel's ephemeral range cannot."""
    import socket

    from rewardserve.bench.proc import _ephemeral_low, free_port

    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert all(20000 <= p < _ephemeral_low() for p in ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))
