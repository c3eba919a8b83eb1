"""One process, several scorers: a registry of models (two tokenizers, a three-head checkpoint) and
ensembles over them, through a real server."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rewardserve.config import ModelEntry, RegistryConfig, ServerSettings
from tests.server import serve

HEADS = {0: "helpfulness", 1: "correctness", 2: "verbosity"}
STATS = {"rm-a": {"mean": 0.3, "std": 2.0}, "rm-b": {"mean": -0.4, "std": 0.5}}
ITEMS = [
    {"prompt": "What is 2+2?", "response": "4"},
    {"text": "The quick brown fox jumps over the lazy dog."},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there!"}]},
    {"text": "Roughly 70% of the Earth's surface is covered by water."},
]


@pytest.fixture(scope="module")
def ckpts(tiny_ckpt):
    return {
        "rm-a": tiny_ckpt("llama"),
        "rm-b": tiny_ckpt("qwen2", bpe_vocab=330, seed=5),  # another architecture and another tokenizer
        "rm-h": tiny_ckpt("qwen3", num_labels=3, id2label=HEADS, label2id={v: k for k, v in HEADS.items()}, seed=2),
    }


@pytest.fixture(scope="module")
def server(ckpts):
    registry = RegistryConfig.model_validate({
        "default": "rm-a",
        "models": [
            {"name": "rm-a", "path": str(ckpts["rm-a"])},
            {"name": "rm-b", "path": str(ckpts["rm-b"]), "max_length": 64},
            {"name": "rm-h", "path": str(ckpts["rm-h"])},
            {"name": "rm-h-weighted", "path": str(ckpts["rm-h"]), "heads": {"helpfulness": 1.0, "verbosity": -0.5}},
        ],
        "ensembles": [
            {"name": "mean", "members": ["rm-a", "rm-b"], "aggregate": "mean"},
            {"name": "min", "members": ["rm-a", "rm-b"], "aggregate": "min"},
            {"name": "uwo", "members": ["rm-a", "rm-b", "rm-h"], "aggregate": "uwo", "lambda": 0.7},
            {"name": "median", "members": ["rm-a", "rm-b", "rm-h"], "aggregate": "median"},
            {"name": "norm", "members": ["rm-a", "rm-b"], "aggregate": "mean", "normalize": True, "stats": STATS},
            {"name": "watched", "members": ["rm-a", "rm-b"], "aggregate": "mean"},
        ],
    })
    settings = ServerSettings(max_wait_ms=2, drift_window=10, drift_reference_size=10, monitor_interval_s=0.2)
    with serve(settings, registry) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


def _score(client, model, items=ITEMS, **kw):
    r = client.post("/v1/score", json={"model": model, "items": items, **kw})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == model
    return r.json()


def _hf(path, texts: list[str]) -> torch.Tensor:
    tok = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.inference_mode():
        return torch.cat([hf(input_ids=torch.tensor([tok(t)["input_ids"]])).logits for t in texts])


def test_models_lists_every_entry_with_its_kind(client):
    data = client.get("/v1/models").json()["data"]
    assert [d["id"] for d in data] == ["rm-a", "rm-b", "rm-h", "rm-h-weighted", "mean", "min", "uwo", "median",
                                       "norm", "watched"]
    assert {d["id"]: d["kind"] for d in data}["rm-b"] == "reward_model"
    uwo = next(d for d in data if d["id"] == "uwo")
    assert uwo == {"id": "uwo", "object": "model", "kind": "ensemble", "members": ["rm-a", "rm-b", "rm-h"],
                   "aggregate": "uwo", "lambda": 0.7, "normalize": False}
    h = next(d for d in data if d["id"] == "rm-h-weighted")
    assert h["labels"] == list(HEADS.values()) and h["heads"] == {"helpfulness": 1.0, "verbosity": -0.5}
    assert client.get("/readyz").json()["models"] == [d["id"] for d in data]


def test_members_are_the_models_served_alone_whatever_their_tokenizer(client, ckpts):
    ens = _score(client, "mean")
    direct = {m: _score(client, m, cache=False) for m in ("rm-a", "rm-b")}
    for i, item in enumerate(ens["items"]):
        for m in ("rm-a", "rm-b"):
            assert abs(item["members"][m] - direct[m]["rewards"][i]) <= 1e-6
        assert item["tokens"] == direct["rm-a"]["items"][i]["tokens"] + direct["rm-b"]["items"][i]["tokens"]
    # two tokenizers: the same texts are different token sequences for the two members
    assert [it["tokens"] for it in direct["rm-a"]["items"]] != [it["tokens"] for it in direct["rm-b"]["items"]]
    # and each is what a server of that model alone gives
    with serve(ServerSettings(max_wait_ms=1), RegistryConfig(models=[ModelEntry(name="rm-b", path=str(ckpts["rm-b"]),
                                                                              max_length=64)])) as alone:
        with alone.client() as c:
            single = _score(c, "rm-b")
    assert max(abs(it["members"]["rm-b"] - r) for it, r in zip(ens["items"], single["rewards"])) <= 1e-6
    texts = [ITEMS[1]["text"], ITEMS[3]["text"]]
    for m in ("rm-a", "rm-b"):
        ref = _hf(ckpts[m], texts)[:, 0].tolist()
        assert max(abs(a - b) for a, b in zip([direct[m]["rewards"][1], direct[m]["rewards"][3]], ref)) <= 1e-4


def _by_hand(name: str, members: dict[str, float]) -> tuple[float, float]:
    """(reward, disagreement) from the formulas, written out."""
    xs = [(members[m] - STATS[m]["mean"]) / STATS[m]["std"] for m in members] if name == "norm" \
        else list(members.values())
    n = len(xs)
    mean = sum(xs) / n
    var = sum((x - mean) ** 2 for x in xs) / n
    ordered = sorted(xs)
    reward = {"mean": mean, "norm": mean, "min": min(xs), "uwo": mean - 0.7 * var,
              "median": ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2}[name]
    return reward, var ** 0.5


@pytest.mark.parametrize("name", ["mean", "min", "uwo", "median", "norm"])
def test_every_aggregation_equals_its_formula(client, name):
    body = _score(client, name)
    for item in body["items"]:
        reward, spread = _by_hand(name, item["members"])
        assert item["reward"] == pytest.approx(reward, abs=1e-12)
        assert item["disagreement"] == pytest.approx(spread, abs=1e-12)
        assert "scores" not in item
    assert body["rewards"] == [it["reward"] for it in body["items"]]
    assert len({round(it["disagreement"], 9) for it in body["items"]}) > 1  # members really disagree, unevenly


def test_uwo_and_median_over_three_members_use_the_weighted_heads_of_none(client):
    """rm-h has three heads and no head weights: its member reward is head 0."""
    h = _score(client, "rm-h", cache=False)
    for ens in ("uwo", "median"):
        for i, item in enumerate(_score(client, ens)["items"]):
            assert abs(item["members"]["rm-h"] - h["items"][i]["scores"]["helpfulness"]) <= 1e-6


def test_disagreement_feeds_the_hacking_gauge(server, client):
    body = _score(client, "watched", items=[{"text": f"watch item {i} " * (i + 1)} for i in range(4)], cache=False)
    client.get("/admin/drift")  # a fresh monitor refresh publishes the gauges
    gauge = server.metric("rewardserve_hacking_disagreement", model="watched")
    spreads = [it["disagreement"] for it in body["items"]]
    assert gauge == pytest.approx(sum(spreads) / len(spreads), abs=1e-12) and gauge > 0
    report = client.get("/admin/drift").json()["models"]["watched"]
    assert report["disagreement"] == pytest.approx(gauge) and set(report["heads"]) == {"reward"}


def test_a_member_score_cached_by_a_direct_request_serves_the_ensemble(server, client):
    item = [{"text": "cache me once, read me twice"}]
    hits = server.metric("rewardserve_cache_hits_total", model="rm-a", tier="lru")
    direct = _score(client, "rm-a", items=item)
    first = _score(client, "min", items=item)
    assert server.metric("rewardserve_cache_hits_total", model="rm-a", tier="lru") == hits + 1
    assert first["items"][0]["members"]["rm-a"] == direct["rewards"][0]
    assert first["items"][0]["cached"] is False  # rm-b computed it
    again = _score(client, "mean", items=item)
    assert again["items"][0]["cached"] is True and again["items"][0]["members"] == first["items"][0]["members"]


def test_named_heads_equal_hf_logits_and_weighted_sums_their_formula(client, ckpts):
    texts = [{"text": it["text"]} for it in ITEMS if "text" in it]
    body = _score(client, "rm-h", items=texts)
    ref = _hf(ckpts["rm-h"], [t["text"] for t in texts])
    for item, logits in zip(body["items"], ref.tolist()):
        assert list(item["scores"]) == list(HEADS.values())
        assert max(abs(a - b) for a, b in zip(item["scores"].values(), logits)) <= 1e-4
        assert item["reward"] == item["scores"]["helpfulness"]  # head 0 by default
    asked = _score(client, "rm-h", items=texts, heads={"correctness": 2.0, "verbosity": -1.0})
    weighted = _score(client, "rm-h-weighted", items=texts)
    override = _score(client, "rm-h-weighted", items=texts, heads={"verbosity": 1.0})
    for a, w, o, item in zip(asked["items"], weighted["items"], override["items"], body["items"]):
        s = item["scores"]
        assert a["reward"] == pytest.approx(2.0 * s["correctness"] - 1.0 * s["verbosity"], abs=1e-12)
        assert w["reward"] == pytest.approx(s["helpfulness"] - 0.5 * s["verbosity"], abs=1e-12)
        assert o["reward"] == pytest.approx(s["verbosity"], abs=1e-12)
        assert a["scores"] == s and a["cached"] is True  # the cache holds every head: other weights are hits


@pytest.mark.parametrize("path,body,status,field,message", [
    ("/v1/score", {"model": "rm-h", "items": [{"text": "x"}], "heads": {"kindness": 1.0}}, 422, "heads",
     "['kindness'] are not heads of rm-h; its heads are ['helpfulness', 'correctness', 'verbosity']"),
    ("/v1/score", {"model": "rm-h", "items": [{"text": "x"}], "heads": {}}, 422, "heads", None),
    ("/v1/score", {"model": "rm-h", "items": [{"text": "x"}], "heads": {"helpfulness": "a lot"}}, 422,
     "heads.helpfulness", None),
    ("/v1/score", {"model": "mean", "items": [{"text": "x"}], "heads": {"helpfulness": 1.0}}, 422, "heads",
     "mean is an ensemble; heads apply to model entries"),
    ("/v1/score", {"model": "gpt-5", "items": [{"text": "x"}]}, 404, None,
     "model 'gpt-5' is not served here; the served names are ['rm-a', 'rm-b', 'rm-h', 'rm-h-weighted', 'mean',"),
    ("/v1/best_of_n", {"model": "nope", "prompt": "p", "candidates": ["a"]}, 404, None, "the served names are"),
    ("/v1/compare", {"model": "nope", "prompt": "p", "a": "x", "b": "y"}, 404, None, "the served names are"),
])
def test_bad_model_and_head_options(client, path, body, status, field, message):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err.get("field") == field
    if message:
        assert message in err["message"]


LONG = "word " * 90  # more than rm-b's 64 tokens, well within rm-a's


@pytest.mark.parametrize("model", ["rm-b", "mean"])
def test_errors_about_one_item_name_it_in_the_route_s_own_fields(client, model):
    pairs = [{"prompt": "p", "a": "x", "b": "y"}, {"prompt": "p", "a": "fine", "b": LONG}]
    r = client.post("/v1/compare", json={"model": model, "pairs": pairs})
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert (err["type"], err["index"], err["field"]) == ("item_too_long", 1, "pairs[1].b")
    r = client.post("/v1/compare", json={"model": model, "prompt": "p", "a": LONG, "b": "y"})
    assert (r.status_code, r.json()["error"]["field"]) == (413, "a") and "index" not in r.json()["error"]
    r = client.post("/v1/best_of_n", json={"model": model, "prompt": "p", "candidates": ["a", "b", "c", LONG]})
    assert r.status_code == 413
    assert (r.json()["error"]["index"], r.json()["error"]["field"]) == (3, "candidates[3]")
    r = client.post("/v1/score", json={"model": model, "items": [{"text": "ok"}, {"input_ids": [1, 99999]}]})
    assert r.status_code == 422
    assert (r.json()["error"]["index"], r.json()["error"]["field"]) == (1, "items[1].input_ids")
    if model == "mean":
        assert "member 'rm-b' of ensemble 'mean'" in r.json()["error"]["message"] or \
            "member 'rm-a' of ensemble 'mean'" in r.json()["error"]["message"]


def test_best_of_n_and_compare_rank_by_the_ensemble_reward(client):
    prompt, cands = "What is 12 + 30?", ["42", "The answer is 42.", "43", "forty-two"]
    bon = client.post("/v1/best_of_n", json={"model": "uwo", "prompt": prompt, "candidates": cands}).json()
    ref = _score(client, "uwo", items=[{"prompt": prompt, "response": c} for c in cands])["rewards"]
    assert bon["model"] == "uwo" and bon["rewards"] == pytest.approx(ref, abs=1e-9)
    assert bon["ranking"] == sorted(range(4), key=lambda i: -ref[i])
    cmp = client.post("/v1/compare", json={"model": "uwo", "prompt": prompt, "a": cands[0], "b": cands[2]}).json()
    assert cmp["results"][0]["reward_a"] == pytest.approx(ref[0], abs=1e-9)


class _Recorder:
    """Around a real backend: when each batch ran, on which thread, for which model."""

    def __init__(self, inner, model: str, log: list):
        self.inner, self.device, self.shares_prefix = inner, inner.device, inner.shares_prefix
        self.model, self.log = model, log

    def score(self, units):
        start = time.perf_counter()
        try:
            return self.inner.score(units)
        finally:
            self.log.append((start, time.perf_counter(), threading.current_thread().name, self.model))


def test_two_models_and_an_ensemble_under_concurrent_mixed_traffic_share_the_device(server):
    requests = []
    for k in range(8):
        items = [{"prompt": f"Question {k}: what is {k} + {k}?", "response": r} for r in (str(2 * k), "no idea")]
        items.append({"text": f"free text number {k} " * (1 + k % 4)})
        for model in ("rm-a", "rm-b", "mean", "rm-h"):
            requests.append(("/v1/score", {"model": model, "items": items, "cache": False}))
        requests.append(("/v1/best_of_n", {"model": "min", "prompt": f"Question {k}?", "candidates": ["a", "bb", "c"],
                                           "cache": False}))

    def key(body):
        return body["rewards"]

    with server.client() as c:  # references: each request alone, one at a time
        refs = [key(c.post(path, json=body).json()) for path, body in requests]
    log: list = []
    pools = [s.runner.batcher.pool for s in server.registry.scorers.values() if hasattr(s, "runner")]
    saved = [dict(p.backends) for p in pools]
    for p in pools:
        p.backends = {d: _Recorder(b, p.model, log) for d, b in p.backends.items()}
    try:
        async def burst():
            async with server.async_client() as ac:
                return await asyncio.gather(*(ac.post(path, json=body) for path, body in requests))

        responses = asyncio.run(burst())
    finally:
        for p, backends in zip(pools, saved):
            p.backends = backends
    for r, ref in zip(responses, refs):
        assert r.status_code == 200, r.text
        assert max(abs(a - b) for a, b in zip(key(r.json()), ref)) <= 1e-5
    # one device: batches of different models went through its one worker, which holds at most its depth
    # of them at once (an engine process's: one computing, one waiting in the engine's pipe)
    assert {m for *_, m in log} == {"rm-a", "rm-b", "rm-h"}
    assert {t.rsplit("_", 1)[0] for _, _, t, _ in log} == {"rs-cpu"}
    events = sorted([(s, 1) for s, _, _, _ in log] + [(e, -1) for _, e, _, _ in log])
    assert max(itertools.accumulate(d for _, d in events)) <= server.registry.devices.workers["cpu"].depth
