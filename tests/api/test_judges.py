"""Generative judges: the reward is the verdict's log-odds at the next-token position, exactly HF's
`logits[-1, yes] - logits[-1, no]` on the rendered question, through the packed and HF paths, alone
and batched; pairwise judging averages both orders exactly; and the judge's failure modes."""

from __future__ import annotations

import math

import jinja2
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rewardserve.config import JudgeEntry, RegistryConfig, ServerSettings
from rewardserve.engine.registry import head_tokens
from rewardserve.models.loading import load_model
from tests.server import serve

TEMPLATE = ("{% if criteria %}Criteria: {{ criteria }}\n{% endif %}Question: {{ prompt }}\nAnswer: {{ response }}\n"
            "{% if reference %}Reference: {{ reference }}\n{% endif %}Is the answer correct?")
PAIR_TEMPLATE = "Question: {{ prompt }}\nFirst: {{ a }}\nSecond: {{ b }}\nIs the first better?"
ITEMS = [
    {"prompt": "What is 12 + 30?", "response": "42"},
    {"prompt": "What is 12 + 30?", "response": "The answer is 43, I think."},
    {"prompt": "Name a colour.", "response": "Blue.", "reference": "Any colour will do, e.g. red."},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why do cats purr?"},
                  {"role": "assistant", "content": "Nobody knows exactly."}]},
    {"text": "A lone answer without its question."},
]


@pytest.fixture(scope="module")
def judge_ckpt(tiny_ckpt):
    return tiny_ckpt("llama", head="causal", added_tokens=("Yes", "No", "<step>"))


@pytest.fixture(scope="module")
def server(judge_ckpt, tiny_ckpt):
    judge = {"path": str(judge_ckpt), "template": TEMPLATE, "criteria": "correctness",
             "pairwise": {"template": PAIR_TEMPLATE, "verdict": {"a": "Yes", "b": "No"}}}
    reg = RegistryConfig.model_validate({
        "models": [{"name": "rm", "path": str(tiny_ckpt("llama"))}],
        "judges": [judge | {"name": "judge"}, judge | {"name": "judge-hf", "backend": "hf"},
                   {"name": "plain", "path": str(judge_ckpt), "template": "{{ prompt }} {{ response }}"}],
    })
    with serve(ServerSettings(max_wait_ms=1), reg) as s:
        yield s


@pytest.fixture(scope="module")
def hf(judge_ckpt):
    return AutoModelForCausalLM.from_pretrained(judge_ckpt, dtype=torch.float32).eval(), \
        AutoTokenizer.from_pretrained(judge_ckpt)


def _values(item: dict) -> dict:
    if "prompt" in item:
        return {"prompt": item["prompt"], "response": item["response"], "messages": None}
    if "messages" in item:
        return {"prompt": item["messages"][-2]["content"], "response": item["messages"][-1]["content"],
                "messages": item["messages"]}
    return {"prompt": "", "response": item["text"], "messages": None}


def hf_last_logits(hf, text: str) -> torch.Tensor:
    """HF's next-token logits after `text` as the user turn of the judge's chat, generation prompt added."""
    model, tok = hf
    chat = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    ids = tok(chat, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(ids).logits[0, -1].double()


def verdict_ids(hf) -> tuple[int, int]:
    tok = hf[1]
    return tok.convert_tokens_to_ids("Yes"), tok.convert_tokens_to_ids("No")


def expected(hf, item: dict, template: str = TEMPLATE, criteria: str | None = "correctness") -> float:
    text = jinja2.Template(template, keep_trailing_newline=True).render(
        criteria=criteria, reference=item.get("reference"), **_values(item))
    logits = hf_last_logits(hf, text)
    yes, no = verdict_ids(hf)
    return float(logits[yes] - logits[no])


@pytest.mark.parametrize("model", ["judge", "judge-hf"])
def test_the_reward_is_the_verdicts_log_odds_alone_and_batched(server, hf, model):
    want = [expected(hf, it) for it in ITEMS]
    with server.client() as c:
        batched = c.post("/v1/score", json={"model": model, "items": ITEMS, "cache": False}).json()["items"]
        alone = [c.post("/v1/score", json={"model": model, "items": [it], "cache": False}).json()["items"][0]
                 for it in ITEMS]
    for got in (batched, alone):
        assert [r["reward"] for r in got] == pytest.approx(want, abs=1e-4)
        for r in got:
            assert r["p_yes"] == pytest.approx(1 / (1 + math.exp(-r["reward"])), abs=1e-12)
    assert len({round(w, 3) for w in want}) == len(want)  # the items' verdicts differ: the test can fail


def test_only_the_verdict_rows_of_the_lm_head_are_computed(judge_ckpt, hf):
    entry = JudgeEntry(name="j", path=str(judge_ckpt), pairwise={"template": PAIR_TEMPLATE})
    [packed] = load_model(entry, 4096, tokens=head_tokens(entry)).backends
    yes, no = verdict_ids(hf)
    assert tuple(packed.model.score.shape) == (4, hf[0].config.hidden_size)  # yes, no, and the pairwise a, b
    torch.testing.assert_close(packed.model.score[:2].float(), hf[0].lm_head.weight[[yes, no]].float())


def test_a_template_without_criteria_or_reference_and_the_card(server, hf):
    item = ITEMS[0]
    with server.client() as c:
        r = c.post("/v1/score", json={"model": "plain", "items": [item]}).json()["items"][0]
        cards = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
    assert r["reward"] == pytest.approx(expected(hf, item, "{{ prompt }} {{ response }}", None), abs=1e-4)
    card = cards["judge"]
    assert card["kind"] == "judge" and card["verdict"] == {"yes": "Yes", "no": "No"} and card["pairwise"] is True
    assert card["verdict_ids"]["verdict.yes"] == verdict_ids(hf)[0] and card["backend"] == "packed"
    assert cards["judge-hf"]["backend"] == "hf" and cards["rm"]["kind"] == "reward_model"


def test_verdicts_are_cached_under_the_template(server):
    with server.client() as c:
        first = c.post("/v1/score", json={"model": "judge", "items": ITEMS[:2]}).json()["items"]
        again = c.post("/v1/score", json={"model": "judge", "items": ITEMS[:2]}).json()["items"]
    assert [r["cached"] for r in again] == [True, True]
    assert [r["reward"] for r in again] == [r["reward"] for r in first]
    keys = {n: server.registry.scorers[n].runner.cache.keys.namespace for n in ("judge", "plain")}
    assert keys["judge"] != keys["plain"]  # same checkpoint, another template and verdict rows: other keys


@pytest.mark.parametrize("model", ["judge", "judge-hf"])
def test_pairwise_compare_averages_both_orders_exactly(server, hf, model):
    pairs = [{"prompt": "What is 12 + 30?", "a": "42", "b": "43"},
             {"prompt": "Name a colour.", "a": "Blue.", "b": "The sky, perhaps, or the sea."}]
    with server.client() as c:
        body = c.post("/v1/compare", json={"model": model, "pairs": pairs}).json()
    yes, no = verdict_ids(hf)  # the pairwise verdicts are the same tokens here: a = Yes, b = No
    for p, got in zip(pairs, body["results"]):
        render = jinja2.Template(PAIR_TEMPLATE).render
        ab = hf_last_logits(hf, render(prompt=p["prompt"], a=p["a"], b=p["b"]))
        ba = hf_last_logits(hf, render(prompt=p["prompt"], a=p["b"], b=p["a"]))
        first, swapped = float(ab[yes] - ab[no]), float(ba[no] - ba[yes])
        assert got["position_log_odds"] == pytest.approx([first, swapped], abs=1e-4)
        mean = (first + swapped) / 2
        assert got["reward_a"] - got["reward_b"] == pytest.approx(mean, abs=1e-4)
        assert got["p_a_better"] == pytest.approx(1 / (1 + math.exp(-mean)), abs=1e-5)
        assert got["winner"] == ("a" if mean > 0 else "b")


def test_a_judge_without_pairwise_compares_its_pointwise_verdicts(server, hf):
    with server.client() as c:
        got = c.post("/v1/compare", json={"model": "plain", "prompt": "What is 12 + 30?", "a": "42",
                                          "b": "43"}).json()["results"][0]
    ra = expected(hf, {"prompt": "What is 12 + 30?", "response": "42"}, "{{ prompt }} {{ response }}", None)
    rb = expected(hf, {"prompt": "What is 12 + 30?", "response": "43"}, "{{ prompt }} {{ response }}", None)
    assert got["reward_a"] == pytest.approx(ra, abs=1e-4) and got["reward_b"] == pytest.approx(rb, abs=1e-4)
    assert got.get("position_log_odds") is None


@pytest.mark.parametrize("body, status, field", [
    ({"model": "judge", "items": [{"input_ids": [1, 2, 3]}]}, 422, "items[0].input_ids"),
    ({"model": "judge", "items": ITEMS[:1], "truncation": "right"}, 422, "truncation"),
    ({"model": "judge", "items": ITEMS[:1], "heads": {"LABEL_0": 1.0}}, 422, "heads"),
    ({"model": "judge", "items": [{"prompt": "x " * 2000, "response": "y"}]}, 413, "items[0]"),
])
def test_what_a_judge_refuses(server, body, status, field):
    with server.client() as c:
        r = c.post("/v1/score", json=body)
    assert r.status_code == status and r.json()["error"]["field"] == field, r.text


def test_a_long_question_is_cut_on_the_left_keeping_the_verdict_position(server, hf):
    with server.client() as c:
        r = c.post("/v1/score", json={"model": "judge", "truncation": "left",
                                      "items": [{"prompt": "x " * 2000, "response": "y"}]}).json()["items"][0]
    assert r["truncated"] is True and r["tokens"] == server.registry.scorers["judge"].model.max_length


def test_pairwise_judging_refuses_shaping(server):
    with server.client() as c:
        r = c.post("/v1/compare", json={"model": "judge", "prompt": "p", "a": "x", "b": "y",
                                        "transform": {"kind": "center", "baseline": 0.0}})
    assert r.status_code == 422 and r.json()["error"]["field"] == "transform"


def test_verdicts_must_be_single_tokens_and_the_checkpoint_a_causal_lm(judge_ckpt, tiny_ckpt):
    bad = RegistryConfig.model_validate({"judges": [{"name": "j", "path": str(judge_ckpt),
                                                     "verdict": {"yes": "Absolutely", "no": "No"}}]})
    with pytest.raises(RuntimeError, match=r"entry 'j'.*verdict\.yes: 'Absolutely' is \d+ tokens"):
        with serve(ServerSettings(warmup=False), bad):
            pass
    not_lm = RegistryConfig.model_validate({"judges": [{"name": "j", "path": str(tiny_ckpt("llama"))}]})
    with pytest.raises(RuntimeError, match=r"not a causal LM"):
        with serve(ServerSettings(warmup=False), not_lm):
            pass


@pytest.mark.parametrize("entry, message", [
    ({"truncation": "right"}, "truncation: a judge's verdict follows its question"),
    ({"verdict": {"yes": "A", "no": "A"}}, "verdict: yes and no are the same token"),
    ({"template": "{% if %}"}, "template: line 1"),
])
def test_judge_entries_are_checked_at_start(entry, message):
    with pytest.raises(ValueError, match=message):
        RegistryConfig.model_validate({"judges": [{"name": "j"} | entry]})
