"""POST /v1/score_steps: a process reward model reads HF's values at every step tag in one pass (a
token-classification head, a one-label head, or Math-Shepherd label tokens of a causal LM); any other
entry's step k equals scoring, alone, the response made of steps 1..k; each aggregate is its formula."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer

from rewardserve.config import RegistryConfig, ServerSettings
from tests.server import serve

TAG = "<step>"
PROMPT = "What is 12 + 30?"
STEPS = ["First add the tens: 10 + 30 = 40.", "Then the units: 2.", "So 40 + 2 = 42."]
CHAT = [{"role": "system", "content": "Show your work."}, {"role": "user", "content": PROMPT}]


@pytest.fixture(scope="module")
def ckpts(tiny_ckpt):
    return {
        "prm2": tiny_ckpt("llama", head="token", num_labels=2, added_tokens=(TAG,)),
        "prm1": tiny_ckpt("qwen2", head="token", num_labels=1, added_tokens=(TAG,)),
        "shepherd": tiny_ckpt("llama", head="causal", added_tokens=("Yes", "No", TAG)),
        "rm": tiny_ckpt("llama"),
    }


@pytest.fixture(scope="module")
def server(ckpts):
    reg = RegistryConfig.model_validate({
        "models": [
            {"name": "prm2", "path": str(ckpts["prm2"]), "process": {"step_tag": TAG}},
            {"name": "prm2-hf", "path": str(ckpts["prm2"]), "process": {"step_tag": TAG}, "backend": "hf"},
            {"name": "prm1", "path": str(ckpts["prm1"]), "process": {"step_tag": TAG}},
            {"name": "shepherd", "path": str(ckpts["shepherd"]),
             "process": {"step_tag": TAG, "labels": {"good": "Yes", "bad": "No"}}},
            {"name": "shepherd-hf", "path": str(ckpts["shepherd"]), "backend": "hf",
             "process": {"step_tag": TAG, "labels": {"good": "Yes", "bad": "No"}}},
            {"name": "rm", "path": str(ckpts["rm"])},
            {"name": "rm-hf", "path": str(ckpts["rm"]), "backend": "hf"},
        ],
        "ensembles": [{"name": "ens", "members": ["rm", "rm-hf"]}],
    })
    with serve(ServerSettings(max_wait_ms=1), reg) as s:
        yield s


def _ids(tok, prompt=PROMPT, messages=None, steps=STEPS, separator="\n") -> torch.Tensor:
    response = separator.join(s + TAG for s in steps)
    chat = (messages or [{"role": "user", "content": prompt}]) + [{"role": "assistant", "content": response}]
    text = tok.apply_chat_template(chat, tokenize=False)
    return tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


def hf_step_values(path, kind: str, **kw) -> list[float]:
    tok = AutoTokenizer.from_pretrained(path)
    ids = _ids(tok, **kw)
    at = (ids[0] == tok.convert_tokens_to_ids(TAG)).nonzero().flatten()
    with torch.no_grad():
        if kind == "shepherd":
            logits = AutoModelForCausalLM.from_pretrained(path).eval()(ids).logits[0, at].double()
            good, bad = tok.convert_tokens_to_ids("Yes"), tok.convert_tokens_to_ids("No")
            return torch.sigmoid(logits[:, good] - logits[:, bad]).tolist()
        logits = AutoModelForTokenClassification.from_pretrained(path).eval()(ids).logits[0, at].double()
    if logits.shape[-1] == 1:
        return logits[:, 0].tolist()
    return torch.softmax(logits, -1)[:, 1].tolist()


@pytest.mark.parametrize("model, ckpt, kind", [
    ("prm2", "prm2", "token"), ("prm2-hf", "prm2", "token"), ("prm1", "prm1", "token"),
    ("shepherd", "shepherd", "shepherd"), ("shepherd-hf", "shepherd", "shepherd"),
])
def test_a_prm_reads_hfs_values_at_every_step_tag(server, ckpts, model, ckpt, kind):
    want = hf_step_values(ckpts[ckpt], kind)
    assert len(want) == len(STEPS) and len({round(w, 4) for w in want}) == len(STEPS)
    with server.client() as c:
        body = c.post("/v1/score_steps", json={"model": model, "prompt": PROMPT, "steps": STEPS}).json()
        chat = c.post("/v1/score_steps", json={"model": model, "messages": CHAT, "steps": STEPS,
                                               "separator": " "}).json()
    assert body["step_rewards"] == pytest.approx(want, abs=1e-4)
    assert body["reward"] == pytest.approx(min(want), abs=1e-4) and body["aggregate"] == "min"
    assert chat["step_rewards"] == pytest.approx(hf_step_values(ckpts[ckpt], kind, messages=CHAT, separator=" "),
                                                 abs=1e-4)


def test_a_prm_scores_one_solution_in_one_forward_pass(server):
    with server.client() as c:
        before = server.metric("rewardserve_items_total", model="prm2")
        c.post("/v1/score_steps", json={"model": "prm2", "prompt": "Once", "steps": STEPS, "cache": False})
        assert server.metric("rewardserve_items_total", model="prm2") - before == 1
        cards = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
    assert cards["prm2"]["kind"] == "process_reward_model" and cards["prm2"]["step_tag"] == TAG
    assert cards["shepherd"]["label_tokens"] == {"good": "Yes", "bad": "No"}


AGGREGATES = {"min": min, "prod": math.prod, "mean": statistics.fmean, "last": lambda v: v[-1], "sum": math.fsum}


@pytest.mark.parametrize("aggregate", list(AGGREGATES))
@pytest.mark.parametrize("model", ["prm2", "rm"])
def test_each_aggregate_is_its_formula(server, aggregate, model):
    with server.client() as c:
        body = c.post("/v1/score_steps", json={"model": model, "prompt": PROMPT, "steps": STEPS,
                                               "aggregate": aggregate}).json()
    assert body["reward"] == pytest.approx(AGGREGATES[aggregate](body["step_rewards"]), rel=1e-12)
    assert body["results"][0]["reward"] == body["reward"] and body["aggregate"] == aggregate


@pytest.mark.parametrize("model", ["rm", "rm-hf", "ens"])
def test_an_outcome_models_step_k_is_the_prefix_scored_alone(server, model):
    with server.client() as c:
        body = c.post("/v1/score_steps", json={"model": model, "prompt": PROMPT, "steps": STEPS,
                                               "separator": " ", "cache": False}).json()
        alone = [c.post("/v1/score", json={"model": model, "cache": False, "items": [
            {"prompt": PROMPT, "response": " ".join(STEPS[: k + 1])}]}).json()["rewards"][0]
            for k in range(len(STEPS))]
    assert body["step_rewards"] == pytest.approx(alone, abs=1e-4)
    assert len({round(a, 4) for a in alone}) == len(alone)


def test_an_outcome_models_prefixes_share_their_prompt(server):
    with server.client() as c:
        saved = server.metric("rewardserve_prefix_saved_tokens_total", model="rm")
        c.post("/v1/score_steps", json={"model": "rm", "prompt": "A fairly long question " * 4, "steps": STEPS,
                                        "cache": False})
        assert server.metric("rewardserve_prefix_saved_tokens_total", model="rm") > saved


def test_the_batch_form_answers_each_solution_in_order(server, ckpts):
    solutions = [{"prompt": PROMPT, "steps": STEPS}, {"messages": CHAT, "steps": STEPS[:2]},
                 {"prompt": "Another question?", "steps": ["One step only."]}]
    with server.client() as c:
        batch = c.post("/v1/score_steps", json={"model": "prm2", "solutions": solutions,
                                                "aggregate": "prod"}).json()
        one = [c.post("/v1/score_steps", json={"model": "prm2", "aggregate": "prod", **s}).json()
               for s in solutions]
    assert "reward" not in batch and len(batch["results"]) == 3
    for got, single in zip(batch["results"], one):
        assert got["step_rewards"] == pytest.approx(single["step_rewards"], abs=1e-6)
        assert got["reward"] == pytest.approx(single["reward"], abs=1e-6)
    assert [len(r["step_rewards"]) for r in batch["results"]] == [3, 2, 1]
    assert batch["usage"]["tokens"] == sum(r["tokens"] for r in batch["results"])


def test_the_client_scores_steps(server):
    from rewardserve.client import RewardClient

    with RewardClient(server.url, model="prm2") as client:
        [one] = client.score_steps(STEPS, prompt=PROMPT, aggregate="last")
        many = client.score_steps(solutions=[{"prompt": PROMPT, "steps": STEPS}] * 2)
    assert one["reward"] == one["step_rewards"][-1] and len(many) == 2


@pytest.mark.parametrize("body, status, field", [
    ({"model": "prm2", "prompt": PROMPT, "steps": ["fine", f"contains {TAG} inside"]}, 422, "steps[1]"),
    ({"model": "prm2", "solutions": [{"prompt": PROMPT, "steps": ["a"]},
                                     {"prompt": PROMPT, "steps": ["b", f"x{TAG}"]}]}, 422, "solutions[1].steps[1]"),
    ({"model": "prm2", "prompt": f"A prompt with a {TAG}", "steps": ["a"]}, 422, "steps"),
    ({"model": "rm", "prompt": PROMPT, "steps": ["a", "x " * 600]}, 413, "steps[1]"),
    ({"model": "prm2", "prompt": PROMPT, "steps": []}, 422, "steps"),
    ({"model": "prm2", "prompt": PROMPT, "steps": ["a"], "aggregate": "max"}, 422, "aggregate"),
    ({"model": "prm2", "prompt": PROMPT, "steps": ["a"], "solutions": [{"prompt": PROMPT, "steps": ["a"]}]}, 422,
     None),
    ({"model": "prm2", "prompt": PROMPT, "messages": CHAT, "steps": ["a"]}, 422, None),
    ({"model": "prm2", "prompt": PROMPT}, 422, None),
    ({"model": "nope", "prompt": PROMPT, "steps": ["a"]}, 404, None),
])
def test_what_score_steps_refuses(server, body, status, field):
    with server.client() as c:
        r = c.post("/v1/score_steps", json=body)
    assert r.status_code == status, r.text
    if field is not None:
        assert r.json()["error"]["field"] == field, r.text


def test_a_prm_on_score_reads_the_response_as_one_step(server, ckpts):
    with server.client() as c:
        one = c.post("/v1/score", json={"model": "prm2", "items": [{"prompt": PROMPT, "response": STEPS[0]}]}).json()
        steps = c.post("/v1/score_steps", json={"model": "prm2", "prompt": PROMPT, "steps": STEPS[:1]}).json()
        ids = c.post("/v1/score", json={"model": "prm2", "items": [{"input_ids": [1, 2, 3]}]})
    assert one["rewards"][0] == pytest.approx(steps["reward"], abs=1e-6)
    assert ids.status_code == 422 and ids.json()["error"]["field"] == "items[0].input_ids"


@pytest.mark.parametrize("entry, message", [
    ({"process": {"step_tag": TAG}, "heads": {"LABEL_0": 1.0}}, "heads: a process reward model"),
    ({"process": {"step_tag": ""}}, "step_tag"),
])
def test_prm_entries_are_checked_at_start(entry, message):
    with pytest.raises(ValueError, match=message):
        RegistryConfig.model_validate({"models": [{"name": "p"} | entry]})


def test_a_step_tag_must_be_one_token(ckpts):
    reg = RegistryConfig.model_validate({"models": [{"name": "p", "path": str(ckpts["prm2"]),
                                                     "process": {"step_tag": "two words"}}]})
    with pytest.raises(RuntimeError, match=r"process\.step_tag: 'two words' is \d+ tokens"):
        with serve(ServerSettings(warmup=False), reg):
            pass
