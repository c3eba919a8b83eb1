"""Hybrid reward specs: a composite over a verifier, a reward model and a judge returns each component
and the total exactly as its spec says (transforms, gates, thresholds), including gated-off items;
and the deploy example (math verifier + 0.2 PAR of the reward model, gated on a format check) runs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from rewardserve.config import RegistryConfig, ServerSettings, load_registry
from tests.server import serve

EXAMPLE = Path(__file__).parents[2] / "deploy" / "examples" / "hybrid" / "registry.yaml"
ITEMS = [
    {"prompt": "What is 12 + 30?", "response": "Answer: 42", "reference": "42"},
    {"prompt": "What is 12 + 30?", "response": "Answer: 43", "reference": "42"},
    {"prompt": "What is 12 + 30?", "response": "forty-two, I guess", "reference": "42"},
    {"prompt": "What is 7 * 6?", "response": "Answer: \\frac{84}{2}", "reference": "42"},
]


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    judge = tiny_ckpt("llama", head="causal", added_tokens=("Yes", "No", "<step>"))
    reg = RegistryConfig.model_validate({
        "models": [{"name": "rm", "path": str(tiny_ckpt("llama"))}],
        "judges": [{"name": "judge", "path": str(judge)}],
        "verifiers": [{"name": "math", "type": "math"},
                      {"name": "format", "type": "regex", "pattern": r"^Answer: "}],
        "composites": [
            {"name": "hybrid", "components": {"correct": "math", "quality": "rm", "verdict": "judge",
                                              "formatted": "format"},
             "total": "correct + 0.2 * par(quality) + 0.1 * clip(verdict, -1, 1) - min(formatted, 0.5)",
             "gates": {"quality": {"on": "formatted", "at_least": 1}, "verdict": {"on": "correct", "at_least": 1}},
             "thresholds": {"quality": 0.0, "correct": 1.0}},
            {"name": "centred", "components": {"q": "rm", "ok": "format"}, "total": "q + ok",
             "transforms": {"q": {"kind": "center", "baseline": "group_mean"}}},
            {"name": "ratio", "components": {"a": "format", "b": "math"}, "total": "a / b"},
        ],
    })
    with serve(ServerSettings(max_wait_ms=1), reg) as s:
        yield s


def _direct(client, model: str, items: list[dict]) -> list[float]:
    r = client.post("/v1/score", json={"model": model, "items": items})
    assert r.status_code == 200, r.text
    return r.json()["rewards"]


def test_the_total_and_components_are_the_spec_applied_to_each_components_score(server):
    with server.client() as c:
        direct = {name: _direct(c, name, ITEMS) for name in ("math", "rm", "judge", "format")}
        body = c.post("/v1/score", json={"model": "hybrid", "items": ITEMS}).json()
    gated_any = set()
    for i, got in enumerate(body["items"]):
        raw = {"correct": direct["math"][i], "quality": direct["rm"][i], "verdict": direct["judge"][i],
               "formatted": direct["format"][i]}
        values = dict(raw)
        gated = []
        if raw["formatted"] < 1:
            values["quality"], gated = 0.0, gated + ["quality"]
        if raw["correct"] < 1:
            values["verdict"], gated = 0.0, gated + ["verdict"]
        total = (values["correct"] + 0.2 * sigmoid(values["quality"]) + 0.1 * min(max(values["verdict"], -1), 1)
                 - min(values["formatted"], 0.5))
        assert got["components"] == pytest.approx(values, abs=1e-9)
        assert got["reward"] == pytest.approx(total, abs=1e-9) and body["rewards"][i] == got["reward"]
        assert sorted(got["gated"]) == sorted(gated)
        assert got["passed"] == {"quality": values["quality"] >= 0.0, "correct": values["correct"] >= 1.0}
        assert got["reasons"]["correct"] in ("correct", "wrong answer", "no answer found")
        gated_any.update(gated)
    assert gated_any == {"quality", "verdict"}  # the items exercise both gates, on and off
    assert [it["components"]["correct"] for it in body["items"]] == [1.0, 0.0, 0.0, 1.0]


def test_each_component_is_monitored_beside_the_total(server):
    with server.client() as c:
        c.post("/v1/score", json={"model": "hybrid", "items": ITEMS})
    for head in ("reward", "correct", "quality", "verdict", "formatted"):
        assert server.metric("rewardserve_reward_count", model="hybrid", head=head) >= len(ITEMS), head


def test_a_component_transform_shapes_its_value_before_the_total(server):
    items = ITEMS[:3]
    with server.client() as c:
        q = _direct(c, "rm", items)
        ok = _direct(c, "format", items)
        body = c.post("/v1/score", json={"model": "centred", "items": items}).json()  # one prompt: one group
    mean = sum(q) / len(q)
    assert [it["components"]["q"] for it in body["items"]] == pytest.approx([x - mean for x in q], abs=1e-9)
    assert body["rewards"] == pytest.approx([x - mean + o for x, o in zip(q, ok)], abs=1e-9)


def test_composites_are_cached_through_their_components_and_carry_tokens(server):
    with server.client() as c:
        c.post("/v1/score", json={"model": "hybrid", "items": ITEMS[:2]})
        again = c.post("/v1/score", json={"model": "hybrid", "items": ITEMS[:2]}).json()
    assert all(it["cached"] for it in again["items"]) and all(it["tokens"] > 0 for it in again["items"])


def test_what_a_composite_refuses(server):
    with server.client() as c:
        no_ref = c.post("/v1/score", json={"model": "hybrid", "items": [{"prompt": "p", "response": "r"}]})
        undefined = c.post("/v1/score", json={"model": "ratio", "items": [ITEMS[1]]})  # b = 0
        card = {m["id"]: m for m in c.get("/v1/models").json()["data"]}["hybrid"]
    assert no_ref.status_code == 422 and no_ref.json()["error"]["field"] == "items[0].reference"
    assert "component 'correct' (math)" in no_ref.json()["error"]["message"]
    assert undefined.status_code == 422 and undefined.json()["error"]["field"] == "items[0]"
    assert card["kind"] == "composite" and card["needs_reference"] is True and card["total"].startswith("correct")


@pytest.mark.parametrize("composite, message", [
    ({"components": {"a": "rm"}, "total": "a + b"}, r"total: 'b' is not a component"),
    ({"components": {"a": "rm"}, "total": "a ** 2"}, r"total: .*only numbers"),
    ({"components": {"a": "rm"}, "total": "__import__('os')"}, r"total: __import__\(\) is not a function"),
    ({"components": {"a": "nope"}, "total": "a"}, r"components\.a: 'nope' is not an entry"),
    ({"components": {"a": "rm"}, "total": "a", "gates": {"a": {"on": "a", "at_least": 1}}},
     r"gates\.a\.on: 'a' is not another component"),
    ({"components": {"a": "rm"}, "total": "a", "thresholds": {"b": 1}}, r"thresholds: \['b'\] are not components"),
    ({"components": {"a": "c2"}, "total": "a"}, r"'c2' is not an entry a composite can use"),
])
def test_composite_entries_are_checked_at_start(composite, message):
    raw = {"models": [{"name": "rm"}], "composites": [{"name": "c"} | composite,
                                                      {"name": "c2", "components": {"x": "rm"}, "total": "x"}]}
    with pytest.raises(ValueError, match=message):
        RegistryConfig.model_validate(raw)


def test_the_deploy_example_runs_on_the_embedded_model():
    registry = load_registry(EXAMPLE)
    with serve(ServerSettings(max_wait_ms=1), registry) as s, s.client() as c:
        items = [{"prompt": "What is 37 + 45?", "response": "Final answer: 82", "reference": "82"},
                 {"prompt": "What is 37 + 45?", "response": "Final answer: 83", "reference": "82"},
                 {"prompt": "What is 37 + 45?", "response": "82", "reference": "82"}]
        body = c.post("/v1/score", json={"items": items}).json()
        rm = _direct(c, "rewardserve-default", items)
        [ref] = _direct(c, "rewardserve-default", [{"prompt": "What is 37 + 45?", "response": "82"}])
    assert body["model"] == "hybrid"
    good, wrong, unformatted = body["items"]
    assert good["components"]["correct"] == 1.0 and wrong["components"]["correct"] == 0.0
    assert good["reward"] == pytest.approx(1.0 + 0.2 * sigmoid(rm[0] - ref), abs=1e-9)
    assert wrong["reward"] == pytest.approx(0.2 * sigmoid(rm[1] - ref), abs=1e-9)
    assert good["passed"] == {"quality": sigmoid(rm[0] - ref) >= 0.5}
    assert unformatted["gated"] == ["quality"] and unformatted["reward"] == 1.0  # the gate zeroes the shaped value
