"""The embedded default model: `rewardserve serve` with no arguments serves it, through the same code path
as any checkpoint, and the service reproduces the training script's held-out evaluation exactly."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rewardserve.bench.proc import free_port
from rewardserve.config import DEFAULT_JUDGE_DIR, DEFAULT_JUDGE_NAME, DEFAULT_MODEL_DIR, DEFAULT_MODEL_NAME
from tests.conftest import KERNEL_TOOL, attention_kernel_builds, require_tool

EVAL = json.loads((DEFAULT_MODEL_DIR / "eval.json").read_text())
JUDGE_EVAL = json.loads((DEFAULT_JUDGE_DIR / "eval.json").read_text())


@pytest.fixture(scope="module")
def default_server():
    """`rewardserve serve` exactly as the README's first command runs it (no model argument)."""
    port = free_port()
    env = dict(os.environ, RS_PORT=str(port), RS_LOG_LEVEL="warning")
    proc = subprocess.Popen([sys.executable, "-m", "rewardserve.cli", "serve"], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, "rewardserve serve exited"
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def test_serve_with_no_arguments_serves_the_embedded_models(default_server):
    card, judge = httpx.get(default_server + "/v1/models").json()["data"]
    assert card["id"] == DEFAULT_MODEL_NAME and card["architecture"] == "LlamaForSequenceClassification"
    assert card["backend"] == "packed" and card["source"] == str(DEFAULT_MODEL_DIR)
    assert card["attention"] == ("C++ kernel" if attention_kernel_builds() else "SDPA")  # make test installs g++
    assert judge["id"] == DEFAULT_JUDGE_NAME and judge["kind"] == "judge" and judge["backend"] == "packed"
    assert judge["architecture"] == "LlamaForCausalLM" and judge["source"] == str(DEFAULT_JUDGE_DIR)
    for folder in (DEFAULT_MODEL_DIR, DEFAULT_JUDGE_DIR):
        files = {p.name for p in folder.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
        assert sum(p.stat().st_size for p in folder.iterdir()) < 20 * 2**20  # a few MB
    # a request that names no model gets the reward model
    assert httpx.post(default_server + "/v1/score", json={"items": [{"text": "hi"}]}).json()["model"] == \
        DEFAULT_MODEL_NAME


def test_service_reproduces_the_judges_held_out_evaluation(default_server):
    """The judge's held-out items (from its training script's generator) through /v1/score: the accuracy
    of P(yes) > 0.5 is what eval.json reports, and at least 95%."""
    sys.path.insert(0, str(DEFAULT_MODEL_DIR.parents[2]))
    from scripts.train_default_judge import judge_eval_sets

    items = judge_eval_sets(JUDGE_EVAL["seed"], JUDGE_EVAL["eval_per_category"])["test"]
    body = {"model": DEFAULT_JUDGE_NAME, "cache": False,
            "items": [{"prompt": prompt, "response": response} for prompt, response, _, _ in items]}
    results = httpx.post(default_server + "/v1/score", json=body, timeout=600).json()["items"]
    right = [(r["reward"] > 0) == label for r, (_, _, label, _) in zip(results, items)]
    accuracy = sum(right) / len(right)
    assert len(right) == JUDGE_EVAL["test_accuracy"]["n_items"] >= 4000
    assert accuracy == pytest.approx(JUDGE_EVAL["test_accuracy"]["overall"], abs=0.005)  # same items, same maths
    assert accuracy >= 0.95  # the target on held-out items
    assert all(r["p_yes"] == pytest.approx(1 / (1 + math.exp(-r["reward"]))) for r in results[:50])


def test_judge_eval_report_and_the_readme_table():
    sys.path.insert(0, str(DEFAULT_MODEL_DIR.parents[2]))
    from scripts.train_default_judge import readme_table

    assert JUDGE_EVAL["test_accuracy"]["overall"] >= 0.95
    assert readme_table(JUDGE_EVAL) in (DEFAULT_MODEL_DIR.parents[2] / "README.md").read_text()


def test_service_reproduces_the_held_out_evaluation(default_server):
    sys.path.insert(0, str(DEFAULT_MODEL_DIR.parents[2]))
    from scripts.train_default_model import eval_sets

    # the per-category sizes the training script evaluates with (recorded in eval.json when present)
    per_category = EVAL.get("eval_per_category") or {"test": 400, "heldout_phrasing": 200, "heldout_style": 200,
                                                     "heldout_phrasing_and_style": 200}
    sets = eval_sets(EVAL["seed"], per_category)
    pairs = sets["test"]
    body = {"pairs": [{"prompt": q, "a": chosen, "b": rejected} for q, chosen, rejected, _ in pairs], "cache": False}
    results = httpx.post(default_server + "/v1/compare", json=body, timeout=300).json()["results"]
    accuracy = sum(r["reward_a"] > r["reward_b"] for r in results) / len(results)
    # held-out pairs from the training script's generator, scored by the service's tokenisation and fast
    # path instead of the script's HF forward: the accuracy must agree with what eval.json reports (2000
    # pairs: sampling error about 1%; exact when the script is the one that trained the shipped weights)
    assert accuracy == pytest.approx(EVAL["test_accuracy"]["overall"], abs=0.03)
    assert accuracy >= 0.95  # the target on held-out pairs


def test_eval_report_meets_the_targets_and_the_readme_shows_it():
    """eval.json (what the training script measured) meets the 95% target on held-out operands,
    stays useful on held-out phrasings and answer styles, and the README's table is this report."""
    sys.path.insert(0, str(DEFAULT_MODEL_DIR.parents[2]))
    from scripts.train_default_model import readme_table

    assert EVAL["test_accuracy"]["overall"] >= 0.95 and EVAL["test_accuracy"]["n_pairs"] >= 2000
    for held_out in ("heldout_phrasing_accuracy", "heldout_style_accuracy", "heldout_phrasing_and_style_accuracy"):
        assert EVAL[held_out]["overall"] >= 0.8, held_out
    readme = (DEFAULT_MODEL_DIR.parents[2] / "README.md").read_text()
    assert readme_table(EVAL) in readme


def _saved_tokens(url: str) -> float:
    families = text_string_to_metric_families(httpx.get(url + "/metrics").text)
    return sum(s.value for f in families for s in f.samples if s.name == "rewardserve_prefix_saved_tokens_total")


@pytest.mark.parametrize("candidates", [
    ["42", "The answer is 42.", "", "After carefully adding the tens and then the units, I get 42 in total. " * 4],
    ["It is 41."],  # N = 1
], ids=["mixed-lengths", "n1"])
def test_best_of_n_on_the_embedded_model_equals_independent_scoring(default_server, candidates):
    """The shared prompt runs once on the packed path, and the rewards equal scoring each (prompt + response)
    in its own request."""
    prompt = "What is 17 + 25?"
    before = _saved_tokens(default_server)
    body = httpx.post(default_server + "/v1/best_of_n", json={"prompt": prompt, "candidates": candidates},
                      timeout=60).json()
    alone = [httpx.post(default_server + "/v1/score", json={"items": [{"prompt": prompt, "response": c}],
                                                              "cache": False}, timeout=60).json()["rewards"][0]
             for c in candidates]
    assert max(abs(a - b) for a, b in zip(body["rewards"], alone)) <= 1e-4
    if attention_kernel_builds():  # the C++ kernel: bit for bit (JSON floats round-trip exactly)
        assert body["rewards"] == alone
    if len(candidates) > 1:
        assert _saved_tokens(default_server) > before


def test_separate_items_that_begin_alike_share_their_beginning_and_score_as_alone(default_server):
    """Items of one request with different prompts are no group, but they open with the same chat
    template tokens: with the C++ kernel those run once, and each reward is bit for bit its own
    request's (JSON floats round-trip exactly)."""
    require_tool(attention_kernel_builds(), KERNEL_TOOL)
    items = [{"prompt": f"What is {a} + {a + 3}?", "response": f"The answer is {2 * a + 3}."} for a in (11, 12, 907)]
    before = _saved_tokens(default_server)
    together = httpx.post(default_server + "/v1/score", json={"items": items, "cache": False}, timeout=60).json()
    assert _saved_tokens(default_server) >= before + 2 * 4  # three items, one shared beginning of 4+ tokens
    alone = [httpx.post(default_server + "/v1/score", json={"items": [it], "cache": False}, timeout=60).json()
             ["rewards"][0] for it in items]
    assert together["rewards"] == alone
