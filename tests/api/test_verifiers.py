"""Verifiable rewards through the API: math answers checked against each item's ground truth (given as
`reference`, `label` or `ground_truth`), rules under per-item timeouts in a process pool, results
cached (in Redis too, across servers) under the checker's version and the reference, and the peers'
labels reaching the verifier as ground truth."""

from __future__ import annotations

import time

import pytest

from rewardserve.config import RegistryConfig, ServerSettings
from tests.redis_helper import RedisProcess
from tests.server import serve

REGISTRY = {
    "models": [{"name": "rm"}],  # the embedded reward model
    "verifiers": [
        {"name": "math", "type": "math", "timeout_s": 5},
        {"name": "exact", "type": "exact", "case_sensitive": False},
        {"name": "boxed", "type": "regex", "pattern": r"\\boxed\{{reference}\}"},
        {"name": "json", "type": "json_schema", "schema": {"type": "object", "required": ["answer"]}},
        {"name": "slow", "type": "regex", "pattern": "(a+)+$", "timeout_s": 1},
    ],
    "composites": [{"name": "mixed", "components": {"ok": "math", "rm": "rm"}, "total": "ok + 0.1 * rm"}],
}
MATH = [  # (response, reference, score)
    ("The answer is \\boxed{42}.", "42", 1.0),
    ("So we get $\\frac{1}{2}$.", "0.5", 1.0),
    ("$x^2 + 2x + 1$", "(x+1)^2", 1.0),
    ("The answer is 43.", "42", 0.0),
    ("I do not know.", "42", 0.0),
    ("$\\frac{1}{$", "1", 0.0),
]


@pytest.fixture(scope="module")
def server():
    with serve(ServerSettings(max_wait_ms=1, verifier_workers=2), RegistryConfig.model_validate(REGISTRY)) as s:
        yield s


def _score(client, model, items, **kw):
    r = client.post("/v1/score", json={"model": model, "items": items, **kw})
    assert r.status_code == 200, r.text
    return r.json()["items"]


def test_math_answers_against_their_reference(server):
    items = [{"prompt": "Solve it.", "response": r, "reference": ref} for r, ref, _ in MATH]
    with server.client() as c:
        got = _score(c, "math", items, cache=False)
    assert [g["reward"] for g in got] == [s for _, _, s in MATH]
    assert [g["reason"] for g in got[:4]] == ["correct"] * 3 + ["wrong answer"]
    assert all(g["tokens"] == 0 and g["cached"] is False for g in got)


@pytest.mark.parametrize("key", ["reference", "label", "ground_truth"])
def test_the_ground_truth_goes_by_any_of_its_peer_names(server, key):
    item = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "It is 4"}], key: "4"}
    with server.client() as c:
        [got] = _score(c, "math", [item])
        text = _score(c, "exact", [{"text": " four ", key: "FOUR"}])
    assert got["reward"] == 1.0 and text[0]["reward"] == 1.0


def test_every_checker_kind(server):
    with server.client() as c:
        boxed = _score(c, "boxed", [{"text": "so \\boxed{3.5}", "reference": "3.5"},
                                    {"text": "so \\boxed{315}", "reference": "3.5"}])  # the dot is escaped
        json = _score(c, "json", [{"text": '{"answer": 1}'}, {"text": '{"other": 1}'}, {"text": "not json"},
                                  {"text": 'Here:\n```json\n{"answer": "x"}\n```'}])
    assert [b["reward"] for b in boxed] == [1.0, 0.0]
    assert [j["reward"] for j in json] == [1.0, 0.5, 0.0, 1.0]
    assert [j["reason"] for j in json[:3]] == ["schema satisfied", "schema violated", "not JSON"]


def test_results_are_cached_with_their_reason_and_identical_items_checked_once(server):
    items = [{"prompt": "p", "response": "The answer is 7", "reference": "7"}] * 3
    with server.client() as c:
        first = _score(c, "math", items)
        again = _score(c, "math", items)
        other_ref = _score(c, "math", [{"prompt": "p", "response": "The answer is 7", "reference": "8"}])
    assert [g["reward"] for g in first] == [1.0] * 3 and [g["cached"] for g in again] == [True] * 3
    assert again[0]["reason"] == "correct" and other_ref[0] == {**other_ref[0], "reward": 0.0, "cached": False}
    assert server.metric("rewardserve_verifier_results_total", model="math", reason="correct") >= 1


def test_a_pathological_item_times_out_cleanly_and_is_not_cached(server):
    evil = {"text": "a" * 40 + "b"}
    with server.client() as c:
        start = time.monotonic()
        got = _score(c, "slow", [evil, {"text": "aaa"}])
        took = time.monotonic() - start
        ok = _score(c, "exact", [{"text": "x", "reference": "x"}])  # the pool still serves
        again = _score(c, "slow", [evil])
    assert got[0] == {**got[0], "reward": 0.0, "reason": "timed out"} and got[1]["reward"] == 1.0
    assert took < 1 + 3 and ok[0]["reward"] == 1.0
    assert again[0]["cached"] is False and again[0]["reason"] == "timed out"
    assert server.metric("rewardserve_verifier_process_replacements_total") >= 1


@pytest.mark.parametrize("item, status, field", [
    ({"prompt": "p", "response": "4"}, 422, "items[0].reference"),
    ({"input_ids": [1, 2, 3]}, 422, "items[0]"),
    ({"prompt": "p", "response": "4", "reference": "4", "label": "4"}, 422, "items[0]"),
    ({"prompt": "p", "response": "4", "reference": 4}, 422, "items[0].reference"),
])
def test_what_a_verifier_refuses(server, item, status, field):
    with server.client() as c:
        r = c.post("/v1/score", json={"model": "math", "items": [{"prompt": "ok", "response": "1", "reference": "1"},
                                                                 item]})
    assert r.status_code == status, r.text
    assert r.json()["error"]["field"].replace("[1]", "[0]").startswith(field)


def test_a_full_queue_is_429_with_retry_after(server):
    scorer = server.registry.scorers["math"]
    limit, scorer.max_queued = scorer.max_queued, 2
    try:
        with server.client() as c:
            r = c.post("/v1/score", json={"model": "math", "cache": False, "items": [
                {"prompt": "p", "response": str(i), "reference": "1"} for i in range(3)]})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    finally:
        scorer.max_queued = limit


def test_verifiers_in_best_of_n_compare_and_the_models_list(server):
    with server.client() as c:
        bon = c.post("/v1/best_of_n", json={"model": "math", "prompt": "12 + 30?", "candidates": ["41", "42", "43"],
                                            "reference": "42"}).json()
        cmp = c.post("/v1/compare", json={"model": "math", "prompt": "12 + 30?", "a": "43", "b": "42",
                                          "reference": "42"}).json()["results"][0]
        cards = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
    assert bon["best_index"] == 1 and bon["rewards"] == [0.0, 1.0, 0.0]
    assert (cmp["reward_a"], cmp["reward_b"], cmp["winner"]) == (0.0, 1.0, "b")
    assert cards["math"]["kind"] == "verifier" and cards["math"]["needs_reference"] is True
    assert cards["math"]["checker_version"].startswith("math/") and "math-verify=" in cards["math"]["checker_version"]
    assert cards["json"]["needs_reference"] is False


def test_peer_labels_are_the_ground_truth(server):
    with server.client() as c:
        slime = c.post("/v1/reward?model=math", json={"prompt": "<|user|>What is 6 * 7?<|end|><|assistant|>",
                                                      "response": "6 * 7 = 42", "label": "42"}).json()
        number = c.post("/v1/reward?model=math", json={"prompt": "What is 6 * 7? ", "response": "42",
                                                       "label": 42}).json()
        bad = c.post("/v1/reward?model=math", json={"prompt": "q", "response": "42", "label": {"x": 1}})
        rlhf = c.post("/get_reward?model=math", json={
            "query": ["Q: 40 + 2 = 41? A: 42", "Q: 40 + 2? A: 41"], "prompts": ["Q: 40 + 2 = 41? A: ", "Q: 40 + 2?"],
            "labels": ["42", "42"]}).json()
        mixed = c.post("/get_reward?model=mixed", json={"query": ["What is 6 * 7? 42"], "prompts": ["What is 6 * 7? "],
                                                        "labels": ["42"]}).json()
    assert slime["reward"] == 1.0 and slime["reason"] == "correct" and number["reward"] == 1.0
    assert bad.status_code == 422
    assert rlhf["rewards"] == [1.0, 0.0]  # the response alone is checked: the prompt's 41 is not the answer
    assert mixed["rewards"][0] > 0.5


def test_two_servers_share_verifier_results_through_redis():
    redis = RedisProcess().start()
    try:
        registry = RegistryConfig.model_validate({"verifiers": [{"name": "math", "type": "math"}]})
        settings = ServerSettings(redis_url=redis.url, lru_items=0, verifier_workers=1)
        item = {"prompt": "p", "response": "\\boxed{\\frac{3}{4}}", "reference": "0.75"}
        with serve(settings, registry) as a, a.client() as c:
            assert _score(c, "math", [item])[0]["cached"] is False
        with serve(settings, registry) as b, b.client() as c:
            [got] = _score(c, "math", [item])
        assert got["cached"] is True and got["reward"] == 1.0 and got["reason"] == "correct"
        assert len(redis.client().keys("rs:*")) == 1
    finally:
        redis.kill()
