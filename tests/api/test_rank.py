"""/v1/best_of_n, /v1/compare and group detection in /v1/score: shared prompts, exact rewards."""

from __future__ import annotations

import math

import pytest

from rewardserve.config import quick
from tests.server import serve

PROMPT = "Please compare these answers about the Apollo 11 landing in 1969, and think about it carefully."
CANDIDATES = ["", "Yes.", "The Moon landing happened in July 1969; 600 million people watched it live. " * 3,
              "No", "It was 1969."]


@pytest.fixture(scope="module", params=[("llama", "auto"), ("qwen3", "auto"), ("llama", "hf"), ("gpt2", "auto")],
                ids=["llama-packed", "qwen3-packed", "llama-hf", "gpt2-hf"])
def server(request, tiny_ckpt):
    arch, backend = request.param
    with serve(*quick(model=str(tiny_ckpt(arch)), backend=backend, max_wait_ms=1, lru_items=0,
                        max_candidates=8)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


def _alone(client, prompt, responses):
    """Each (prompt, response) in its own request, no cache, no groups: the reference."""
    return [client.post("/v1/score", json={"items": [{"prompt": prompt, "response": r}], "cache": False})
            .json()["rewards"][0] for r in responses]


def test_best_of_n_ranks_with_rewards_equal_to_independent_scoring(server, client):
    name = server.name
    saved = server.metric("rewardserve_prefix_saved_tokens_total", model=name)
    r = client.post("/v1/best_of_n", json={"prompt": PROMPT, "candidates": CANDIDATES})
    assert r.status_code == 200, r.text
    body = r.json()
    ref = _alone(client, PROMPT, CANDIDATES)
    assert max(abs(a - b) for a, b in zip(body["rewards"], ref)) <= 1e-4
    assert body["ranking"] == sorted(range(len(ref)), key=lambda i: -body["rewards"][i])
    assert body["best_index"] == body["ranking"][0]
    assert body["margin"] == pytest.approx(body["rewards"][body["ranking"][0]] - body["rewards"][body["ranking"][1]])
    assert server.metric("rewardserve_prefix_saved_tokens_total", model=name) > saved  # the prompt ran once
    top = client.post("/v1/best_of_n", json={"prompt": PROMPT, "candidates": CANDIDATES, "top_k": 2}).json()
    assert top["ranking"] == body["ranking"][:2] and top["rewards"] == pytest.approx(body["rewards"], abs=1e-5)


def test_best_of_n_with_one_candidate_and_with_messages(client):
    one = client.post("/v1/best_of_n", json={"prompt": PROMPT, "candidates": ["Only me."]}).json()
    assert one["best_index"] == 0 and one["ranking"] == [0] and one["margin"] is None
    assert one["rewards"][0] == pytest.approx(_alone(client, PROMPT, ["Only me."])[0], abs=1e-4)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": PROMPT}]
    r = client.post("/v1/best_of_n", json={"messages": chat, "candidates": CANDIDATES[1:4]})
    assert r.status_code == 200
    ref = [client.post("/v1/score", json={"items": [{"messages": chat + [{"role": "assistant", "content": c}]}],
                                          "cache": False}).json()["rewards"][0] for c in CANDIDATES[1:4]]
    assert max(abs(a - b) for a, b in zip(r.json()["rewards"], ref)) <= 1e-4


def test_compare_is_bradley_terry_for_one_pair_and_many(client):
    r = client.post("/v1/compare", json={"prompt": PROMPT, "a": CANDIDATES[2], "b": CANDIDATES[4]}).json()
    [res] = r["results"]
    ra, rb = _alone(client, PROMPT, [CANDIDATES[2], CANDIDATES[4]])
    assert res["reward_a"] == pytest.approx(ra, abs=1e-4) and res["reward_b"] == pytest.approx(rb, abs=1e-4)
    assert res["p_a_better"] == pytest.approx(1 / (1 + math.exp(-(res["reward_a"] - res["reward_b"]))), abs=1e-12)
    assert res["winner"] == ("a" if ra > rb else "b")
    many = client.post("/v1/compare", json={"pairs": [{"prompt": PROMPT, "a": "x", "b": "y"},
                                                      {"prompt": "other", "a": CANDIDATES[2], "b": CANDIDATES[4]}]})
    assert many.status_code == 200 and len(many.json()["results"]) == 2


def test_length_tie_rule(client):
    long, short = CANDIDATES[2], CANDIDATES[4]
    base = client.post("/v1/compare", json={"prompt": PROMPT, "a": long, "b": short}).json()["results"][0]
    gap = abs(base["reward_a"] - base["reward_b"])
    longer_wins = base["winner"] == "a"
    tie = client.post("/v1/compare", json={"prompt": PROMPT, "a": long, "b": short,
                                           "length_tie": {"chars": 10, "margin": gap + 1}}).json()["results"][0]
    assert tie["winner"] == ("tie" if longer_wins else "b")
    strict = client.post("/v1/compare", json={"prompt": PROMPT, "a": long, "b": short,
                                              "length_tie": {"chars": 10, "margin": gap / 2}}).json()["results"][0]
    assert strict["winner"] == base["winner"]  # a clear win stands, however long


def test_score_groups_by_prompt_or_group_field_without_changing_rewards(server, client):
    name = server.name
    items = [{"prompt": PROMPT, "response": c} for c in CANDIDATES[1:]] + [{"text": "unrelated item"}]
    saved = server.metric("rewardserve_prefix_saved_tokens_total", model=name)
    grouped = client.post("/v1/score", json={"items": items}).json()["rewards"]
    assert server.metric("rewardserve_prefix_saved_tokens_total", model=name) > saved
    ref = _alone(client, PROMPT, CANDIDATES[1:])
    assert max(abs(a - b) for a, b in zip(grouped[:-1], ref)) <= 1e-4
    texts = [{"text": PROMPT + c, "group": "g1"} for c in ("A", "BB", "CCC")]
    g = client.post("/v1/score", json={"items": texts}).json()["rewards"]
    solo = [client.post("/v1/score", json={"items": [{"text": t["text"]}], "cache": False}).json()["rewards"][0]
            for t in texts]
    assert max(abs(a - b) for a, b in zip(g, solo)) <= 1e-4


@pytest.mark.parametrize("path,body,status,index,field", [
    ("/v1/best_of_n", {"prompt": "p", "candidates": []}, 422, None, "candidates"),
    ("/v1/best_of_n", {"candidates": ["a"]}, 422, None, None),
    ("/v1/best_of_n", {"prompt": "p", "messages": [{"role": "user", "content": "x"}], "candidates": ["a"]},
     422, None, None),
    ("/v1/best_of_n", {"prompt": "p", "candidates": ["a", 3]}, 422, 1, "candidates[1]"),
    ("/v1/best_of_n", {"prompt": "p", "candidates": ["a"] * 9}, 413, None, None),
    ("/v1/best_of_n", {"prompt": "p", "candidates": ["a"], "top_k": 0}, 422, None, "top_k"),
    ("/v1/best_of_n", {"prompt": "p", "candidates": ["a"], "model": "nope"}, 404, None, None),
    ("/v1/compare", {"prompt": "p", "a": "x"}, 422, None, None),
    ("/v1/compare", {"prompt": "p", "a": "x", "b": "y", "pairs": [{"prompt": "p", "a": "x", "b": "y"}]},
     422, None, None),
    ("/v1/compare", {"pairs": [{"prompt": "p", "a": "x", "b": "y"}, {"prompt": "p", "a": "x"}]}, 422, 1, "pairs[1].b"),
    ("/v1/compare", {"pairs": []}, 422, None, "pairs"),
    ("/v1/compare", {"prompt": "p", "a": "x", "b": "y", "length_tie": {"chars": -1, "margin": 1}}, 422, None,
     "length_tie.chars"),
])
def test_rank_endpoints_reject_bad_input(client, path, body, status, index, field):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err.get("index") == index and err["message"]
    if field:
        assert err["field"] == field
