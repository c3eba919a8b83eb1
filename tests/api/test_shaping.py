"""Transforms and advantages through the API on the embedded model: exactly the formulas applied to the
raw rewards of a plain request, after the cache (which keeps raw rewards); and `rewardserve calibrate`
writing fits that a restarted server applies exactly."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import numpy as np
import pytest

from rewardserve.config import DEFAULT_MODEL_DIR, RegistryConfig, ServerSettings, quick
from tests.server import serve

P1, P2 = "What is 37 + 45?", "Convert 3 km to meters."
ITEMS = [{"prompt": P1, "response": r, "reference": "82"} for r in ("82", "83", "The answer is 82.", "82")] + \
        [{"prompt": P2, "response": r, "reference": "3000 meters"} for r in ("3000 meters", "300 meters")] + \
        [{"prompt": "What is 2 + 2?", "response": "4", "reference": "Four, since two plus two is four. " * 3}]


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.fixture(scope="module")
def server():
    with serve(*quick(max_wait_ms=1)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


def _plain(client, items) -> list[float]:
    r = client.post("/v1/score", json={"items": items, "cache": False})
    assert r.status_code == 200, r.text
    return r.json()["rewards"]


def _groups(n_first: int = 4, n_second: int = 2) -> list[list[int]]:
    return [list(range(n_first)), list(range(n_first, n_first + n_second)), [n_first + n_second]]


@pytest.mark.parametrize("kind", ["center", "par", "logsigmoid"])
@pytest.mark.parametrize("baseline", ["reference", "group_mean", "group_median", 1.25])
@pytest.mark.parametrize("adv", ["grpo", "rloo", "median", "winrate"])
def test_transforms_and_advantages_are_their_formulas_on_the_raw_rewards(client, kind, baseline, adv):
    raw = _plain(client, [{k: v for k, v in it.items() if k != "reference"} for it in ITEMS])
    refs = _plain(client, [{"prompt": it["prompt"], "response": it["reference"]} for it in ITEMS])
    body = client.post("/v1/score", json={"items": ITEMS, "transform": {"kind": kind, "baseline": baseline},
                                          "advantages": adv}).json()
    groups = _groups()
    base = [0.0] * len(ITEMS)
    for g in groups:
        for i in g:
            base[i] = {"reference": refs[i], "group_mean": sum(raw[j] for j in g) / len(g),
                       "group_median": float(np.median([raw[j] for j in g])), 1.25: 1.25}[baseline]
    f = {"center": lambda d: d, "par": sigmoid, "logsigmoid": lambda d: math.log(sigmoid(d))}[kind]
    want = [f(r - b) for r, b in zip(raw, base)]
    got = body["items"]
    assert [it["raw_reward"] for it in got] == pytest.approx(raw, abs=1e-5)
    assert [it["reward"] for it in got] == pytest.approx(want, abs=1e-4) and body["rewards"] == [
        it["reward"] for it in got]
    for g in groups:
        rs = [want[i] for i in g]
        n = len(g)
        for i in g:
            a = got[i]["advantage"]
            assert got[i]["group_size"] == n
            if n == 1:
                assert a == 0.0
            elif adv == "grpo":
                mean = sum(rs) / n
                std = math.sqrt(sum((x - mean) ** 2 for x in rs) / (n - 1))
                assert a == pytest.approx((want[i] - mean) / (std + 1e-4), abs=1e-3)
            elif adv == "rloo":
                assert a == pytest.approx(want[i] - (sum(rs) - want[i]) / (n - 1), abs=1e-4)
            elif adv == "median":
                assert a == pytest.approx(want[i] - float(np.median(rs)), abs=1e-4)
            else:
                others = [x for j, x in zip(g, rs) if j != i]
                assert a == pytest.approx(sum(1.0 if want[i] > o + 1e-9 else 0.5 if abs(want[i] - o) <= 1e-9 else 0.0
                                              for o in others) / (n - 1), abs=1e-9)


def test_the_cache_holds_raw_rewards_and_shaping_never_splits_it(server, client):
    items = [{"prompt": P1, "response": f"It is {n}.", "reference": "82"} for n in (80, 81, 82)]
    plain = client.post("/v1/score", json={"items": [{k: v for k, v in it.items() if k != "reference"}
                                                     for it in items] + [{"prompt": P1, "response": "82"}]}).json()
    hits = server.metric("rewardserve_cache_hits_total", model=server.name, tier="lru")
    shaped = client.post("/v1/score", json={"items": items, "transform": {"kind": "par", "baseline": "reference"},
                                            "advantages": "rloo"}).json()
    assert all(it["cached"] for it in shaped["items"])
    assert server.metric("rewardserve_cache_hits_total", model=server.name, tier="lru") - hits == 6  # + 3 references
    assert [it["raw_reward"] for it in shaped["items"]] == plain["rewards"][:3]


def test_best_of_n_ranks_by_the_shaped_reward_and_compare_keeps_the_raw_preference(client):
    cands = ["82", "83", "The answer is 82.", "81"]
    raw = _plain(client, [{"prompt": P1, "response": c} for c in cands])
    clipped = {"kind": "center", "baseline": 0.0, "clip": [-1.0, 1.0]}  # ties at the top: the earlier first
    bon = client.post("/v1/best_of_n", json={"prompt": P1, "candidates": cands, "transform": clipped}).json()
    shaped = [min(max(r, -1.0), 1.0) for r in raw]
    assert bon["rewards"] == pytest.approx(shaped, abs=1e-5) and bon["raw_rewards"] == pytest.approx(raw, abs=1e-5)
    assert bon["ranking"] == sorted(range(4), key=lambda i: (-shaped[i], i))
    cmp = client.post("/v1/compare", json={"prompt": P1, "a": cands[0], "b": cands[1],
                                           "transform": {"kind": "par", "baseline": 2.0}}).json()["results"][0]
    assert cmp["reward_a"] == pytest.approx(sigmoid(raw[0] - 2.0), abs=1e-5)
    assert cmp["p_a_better"] == pytest.approx(sigmoid(raw[0] - raw[1]), abs=1e-5)  # sigma of the raw difference


@pytest.mark.parametrize("body,status,field", [
    ({"items": [{"prompt": P1, "response": "82"}], "transform": {"kind": "par", "baseline": "reference"}}, 422,
     "items[0].reference"),
    ({"items": [{"text": "82", "reference": "82"}], "transform": {"kind": "par", "baseline": "reference"}}, 422,
     "items[0].reference"),  # a text item's reference is a verifier's ground truth, not a baseline response
    ({"items": [{"input_ids": [1, 2], "reference": "82"}]}, 422, "items[0]"),
    ({"items": [{"prompt": P1, "response": "82"}], "transform": {"kind": "length"}}, 422, "transform"),
    ({"items": [{"prompt": P1, "response": "82"}], "transform": {"kind": "calibrated", "baseline": 0.0}}, 422,
     "transform"),
    ({"items": [{"prompt": P1, "response": "82"}], "transform": {"kind": "par"}}, 422, "transform"),
    ({"items": [{"prompt": P1, "response": "82"}], "advantages": "ppo"}, 422, "advantages"),
])
def test_shaping_errors_name_the_field(client, body, status, field):
    r = client.post("/v1/score", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["field"] == field


# --- rewardserve calibrate, and a server started with its fits ---------------------------------------------
def _pairs_file(path, n: int, seed: int):
    sys.path.insert(0, str(DEFAULT_MODEL_DIR.parents[2]))
    from scripts.train_default_model import make_pair

    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):  # held-out operands; half in phrasings, a third in answer styles it never saw
            p = make_pair(rng, "test", "heldout" if i % 2 else "train", "heldout" if i % 3 == 0 else "train")
            f.write(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n")
    return path


def _calibrate(*args) -> dict:
    proc = subprocess.run([sys.executable, "-m", "rewardserve.cli", "calibrate", *args, "-q"], capture_output=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])


def test_calibrate_pairs_lowers_the_held_out_ece_and_a_server_applies_the_fit_exactly(tmp_path):
    data = _pairs_file(tmp_path / "pairs.jsonl", 1000, seed=12)
    report = _calibrate("pairs", str(data), "--out", str(tmp_path / "cal.json"), "--holdout", "0.3")
    assert report["held_out"] == 300 and report["fitted_on"] == 700
    assert report["after"]["ece"] < report["before"]["ece"]  # measured on the held-out pairs
    assert (tmp_path / "cal.png").stat().st_size > 1000
    fit = json.loads((tmp_path / "cal.json").read_text())
    assert fit["kind"] == "calibration" and fit["domain"] == "pairwise" and fit["report"]["after"] == report["after"]
    g = lambda d: float(np.interp(d, fit["x"], fit["y"]))  # noqa: E731  (the fit as the file says it)
    registry = RegistryConfig.model_validate({"models": [{
        "name": "rm", "path": str(DEFAULT_MODEL_DIR), "calibration": str(tmp_path / "cal.json"),
        "transform": {"kind": "calibrated", "baseline": "reference"}}]})
    with serve(ServerSettings(max_wait_ms=1), registry) as s, s.client() as c:
        items = [{"prompt": P1, "response": r, "reference": "82"} for r in ("83", "The answer is 82.", "It is 81.")]
        raw = [x["raw_reward"] for x in c.post("/v1/score", json={"items": items}).json()["items"]]
        ref = c.post("/v1/score", json={"items": [{"prompt": P1, "response": "82"}],
                                        "transform": {"kind": "none"}}).json()["rewards"][0]
        got = c.post("/v1/score", json={"items": items}).json()["rewards"]
        assert got == pytest.approx([g(r - ref) for r in raw], abs=1e-12)
        cmp = c.post("/v1/compare", json={"prompt": P1, "a": "82", "b": "83"}).json()["results"][0]
        assert cmp["p_a_better"] == pytest.approx(g(cmp["raw_reward_a"] - cmp["raw_reward_b"]), abs=1e-12)


def test_calibrate_length_and_a_server_subtracts_the_fit(tmp_path):
    rng = random.Random(3)
    with open(tmp_path / "items.jsonl", "w") as f:
        for i in range(60):
            a, b = rng.randint(2, 50), rng.randint(2, 50)
            pad = " Let me double check that carefully." * rng.randint(0, 6)
            f.write(json.dumps({"prompt": f"What is {a} + {b}?", "response": f"{a + b}.{pad}"}) + "\n")
    report = _calibrate("length", str(tmp_path / "items.jsonl"), "--out", str(tmp_path / "length.json"))
    assert all(math.isfinite(report[k]["length_correlation"]) for k in ("before", "after"))
    coef = json.loads((tmp_path / "length.json").read_text())["coefficients"]
    registry = RegistryConfig.model_validate({"models": [{
        "name": "rm", "path": str(DEFAULT_MODEL_DIR), "length_fit": str(tmp_path / "length.json"),
        "transform": {"kind": "length"}}]})
    with serve(ServerSettings(max_wait_ms=1), registry) as s, s.client() as c:
        items = [{"prompt": "What is 5 + 5?", "response": "10." + " Sure." * k} for k in range(4)]
        body = c.post("/v1/score", json={"items": items}).json()
        for it in body["items"]:
            assert it["reward"] == pytest.approx(it["raw_reward"] - np.polyval(coef, it["tokens"]), abs=1e-12)


def test_a_registry_entry_with_a_bad_fit_stops_the_start_naming_the_entry(tmp_path):
    (tmp_path / "bad.json").write_text('{"kind": "length"}')
    registry = RegistryConfig.model_validate({"models": [{
        "name": "rm", "path": str(DEFAULT_MODEL_DIR), "length_fit": str(tmp_path / "bad.json"),
        "transform": {"kind": "length"}}]})
    with pytest.raises(RuntimeError, match=r"models\[0\] \(rm\)\.length_fit: .* is not a length fit"):
        with serve(ServerSettings(), registry):
            pass
    with pytest.raises(ValueError, match="the length transform needs the entry's length_fit"):
        RegistryConfig.model_validate({"models": [{"name": "rm", "transform": {"kind": "length"}}]})
