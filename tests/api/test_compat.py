"""Peer-compatible endpoints: the bodies each peer's client sends (as its source gives them), answered
in the peer's shapes, with every value equal to /v1/score on the same items."""

from __future__ import annotations

import asyncio
import math

import pytest
from transformers import AutoTokenizer

from rewardserve.config import DEFAULT_MODEL_DIR, RegistryConfig, ServerSettings
from tests.server import serve

CHAT = [{"role": "user", "content": "What is 37 + 45?"}, {"role": "assistant", "content": "82"}]
# scores computed in other batch company agree within the batch-invariance tolerance the README states: 1e-5
TEXTS = ["What is 12 + 30? 42", "Convert 3 km to meters. 3000 meters"]


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    registry = RegistryConfig.model_validate({
        "models": [{"name": "rm", "path": str(DEFAULT_MODEL_DIR), "max_length": 96},
                   {"name": "tiny", "path": str(tiny_ckpt("llama"))},
                   {"name": "heads", "path": str(tiny_ckpt("qwen3", num_labels=3))}],
        "ensembles": [{"name": "both", "members": ["rm", "tiny"], "aggregate": "mean"}],
    })
    with serve(ServerSettings(max_wait_ms=2), registry) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)


def native(client, items, model="rm") -> list[float]:
    r = client.post("/v1/score", json={"model": model, "items": items, "cache": False})
    assert r.status_code == 200, r.text
    return r.json()["rewards"]


# --- OpenRLHF ------------------------------------------------------------------------------------------------
def test_openrlhf_get_reward(client, tok):
    # OpenRLHF/OpenRLHF openrlhf/utils/agent.py (SingleTurnAgentExecutor._fetch_rewards_via_http) posts one sample:
    # the query is prompt + response decoded with skip_special_tokens=False, chat template and BOS included
    query = tok.apply_chat_template(CHAT, tokenize=False)
    assert query.startswith(tok.bos_token)
    r = client.post("/get_reward", json={"query": [query], "prompts": ["What is 37 + 45?"], "labels": ["82"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"rewards", "scores", "extra_logs"} and body["extra_logs"] == {}
    [ref] = native(client, [{"messages": CHAT}])  # tokenised without special tokens: one BOS, the template's
    assert body["rewards"] == body["scores"] and abs(body["rewards"][0] - ref) <= 1e-5
    # with several URLs, OpenRLHF sends every server but the first empty lists
    assert client.post("/get_reward", json={"query": [], "prompts": [], "labels": []}).json() == \
        {"rewards": [], "scores": [], "extra_logs": {}}
    both = client.post("/get_reward?model=both", json={"query": [query, query.replace("82", "83")]}).json()
    assert set(both["extra_logs"]) == {"rm", "tiny", "disagreement"} and len(both["extra_logs"]["rm"]) == 2
    assert both["rewards"][0] == pytest.approx((both["extra_logs"]["rm"][0] + both["extra_logs"]["tiny"][0]) / 2)
    bad = client.post("/get_reward", json={"query": [query], "prompts": ["a", "b"]})
    assert bad.status_code == 422 and bad.json()["error"]["type"] == "invalid_request"
    assert client.post("/get_reward?model=nope", json={"query": []}).status_code == 404


# --- vLLM ----------------------------------------------------------------------------------------------------
def test_verl_reward_loop_exchange(client, tok):
    # verl-project/verl verl/experimental/reward_loop/reward_loop.py (compute_score_disrm): the chat templated with
    # the reward model's tokenizer, a leading BOS stripped, posted to /classify; the reward is data[-1].probs[-1]
    text = tok.apply_chat_template(CHAT, tokenize=False).removeprefix(tok.bos_token)
    r = client.post("/classify", json={"model": "rm", "input": text, "use_activation": False})
    assert r.status_code == 200, r.text
    out = r.json()
    [ref] = native(client, [{"messages": CHAT}])
    assert abs(out["data"][-1]["probs"][-1] - ref) <= 1e-5
    assert out["id"].startswith("classify-") and out["object"] == "list" and out["model"] == "rm"
    assert out["data"] == [{"index": 0, "label": "LABEL_0", "probs": out["data"][0]["probs"], "num_classes": 1}]
    assert out["usage"]["prompt_tokens"] == out["usage"]["total_tokens"] > 0 and out["usage"]["completion_tokens"] == 0
    # older verl sent "activation": false (vLLM's earlier name for it)
    old = client.post("/classify", json={"model": "rm", "input": text, "activation": False}).json()
    assert old["data"][0]["probs"] == out["data"][0]["probs"]


def test_classify_forms_activation_and_truncation(client, tok):
    ids = tok(TEXTS[0])["input_ids"]
    refs = native(client, [{"text": t} for t in TEXTS])
    default = client.post("/classify", json={"input": TEXTS}).json()["data"]  # use_activation defaults to true
    assert [d["probs"][0] for d in default] == pytest.approx([sigmoid(x) for x in refs], abs=3e-6)
    tokens = client.post("/classify", json={"input": ids, "use_activation": False}).json()["data"]
    assert tokens[0]["probs"][0] == pytest.approx(refs[0], abs=1e-5)
    many = client.post("/classify", json={"input": [ids, ids[:5]], "use_activation": False}).json()["data"]
    assert many[0]["probs"] == tokens[0]["probs"] and many[1]["index"] == 1
    chat = client.post("/classify", json={"messages": CHAT, "use_activation": False}).json()["data"]
    assert chat[0]["probs"][0] == pytest.approx(native(client, [{"messages": CHAT}])[0], abs=1e-5)
    heads = client.post("/classify", json={"model": "heads", "input": "x"}).json()["data"][0]
    assert heads["num_classes"] == 3 and sum(heads["probs"]) == pytest.approx(1.0)  # softmax over the heads
    assert heads["label"] == ["LABEL_0", "LABEL_1", "LABEL_2"][max(range(3), key=heads["probs"].__getitem__)]
    long = "word " * 200  # more than rm's 96 tokens
    assert client.post("/classify", json={"input": long}).status_code == 400
    for k, side, want in ((-1, None, {"text": long, "truncation": "right"}), (10, "left", None)):
        body = {"input": long, "truncate_prompt_tokens": k, "use_activation": False}
        if side:
            body["truncation_side"] = side
        r = client.post("/classify", json=body).json()
        assert r["usage"]["prompt_tokens"] == (96 if k == -1 else 10)
        if want:
            ref = client.post("/v1/score", json={"model": "rm", "items": [{"text": long}], "truncation": "right"})
            assert r["data"][0]["probs"][0] == pytest.approx(ref.json()["rewards"][0], abs=1e-5)


def test_pooling_score_and_rerank(client):
    ref = native(client, [{"text": TEXTS[1]}])[0]
    pooled = client.post("/pooling", json={"input": TEXTS[1], "task": "classify"}).json()
    assert pooled["id"].startswith("pooling-") and pooled["data"] == [
        {"index": 0, "object": "pooling", "data": [pytest.approx(sigmoid(ref), abs=3e-6)]}]
    q, docs = "What is 37 + 45?", ["82", "83", "It is 82."]
    refs = native(client, [{"prompt": q, "response": d} for d in docs])
    shapes = [{"text_1": q, "text_2": docs}, {"queries": q, "documents": docs}, {"queries": [q], "items": docs},
              {"data_1": [q] * 3, "data_2": docs}]
    for shape in shapes:  # 1:N, 1:N, 1:N, N:N
        out = client.post("/score", json=shape).json()
        assert out["object"] == "list" and [d["index"] for d in out["data"]] == [0, 1, 2]
        assert [d["score"] for d in out["data"]] == pytest.approx([sigmoid(x) for x in refs], abs=3e-6)
    one = client.post("/score", json={"text_1": q, "text_2": docs[0], "use_activation": False}).json()
    assert one["data"][0]["score"] == pytest.approx(refs[0], abs=1e-5)
    assert client.post("/score", json={"text_1": [q, q], "text_2": docs}).status_code == 400
    assert client.post("/score", json={"text_1": q}).status_code == 400
    ranked = client.post("/rerank", json={"query": q, "documents": docs, "top_n": 2}).json()
    order = sorted(range(3), key=lambda i: -refs[i])[:2]
    assert [r["index"] for r in ranked["results"]] == order
    assert [r["document"]["text"] for r in ranked["results"]] == [docs[i] for i in order]
    assert [r["relevance_score"] for r in ranked["results"]] == pytest.approx([sigmoid(refs[i]) for i in order])
    assert client.post("/v1/rerank", json={"query": q, "documents": docs}).json()["results"][2]["index"] == \
        sorted(range(3), key=lambda i: -refs[i])[2]
    assert client.post("/rerank", json={"query": q, "documents": docs, "top_n": -1}).status_code == 400


@pytest.mark.parametrize("path,body,status,param", [
    ("/classify", {"input": "x", "temperature": 0.5}, 400, "temperature"),
    ("/classify", {"input": "x", "mm_processor_kwargs": {"a": 1}}, 400, "mm_processor_kwargs"),
    ("/classify", {"messages": CHAT, "add_generation_prompt": True}, 400, "add_generation_prompt"),
    ("/classify", {"input": []}, 400, None),
    ("/classify", {"input": "x", "messages": CHAT}, 400, None),
    ("/classify", {"input": "x", "truncate_prompt_tokens": 10_000}, 400, None),
    ("/classify", {"input": [1, 10**9]}, 400, "input"),
    ("/classify", {"model": "nope", "input": "x"}, 404, None),
    ("/pooling", {"input": "x", "task": "embed"}, 400, "task"),
    ("/pooling", {"input": "x", "encoding_format": "base64"}, 400, "encoding_format"),
])
def test_vllm_errors_in_vllm_shape(client, path, body, status, param):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status and err["message"]
    assert err["type"] == {400: "BadRequestError", 404: "NotFoundError"}[status] and err["param"] == param


def test_64_concurrent_single_sample_classify_requests_share_batches(server):
    texts = [f"Sample {i}: what is {i} + {i}? It is {2 * i}." for i in range(64)]

    def batches():
        return (server.metric("rewardserve_batch_items_count", model="rm"),
                server.metric("rewardserve_batch_items_sum", model="rm"))

    async def burst():
        async with server.async_client() as ac:
            rs = await asyncio.gather(*(ac.post("/classify", json={"model": "rm", "input": t, "use_activation": False})
                                        for t in texts))
            return [r.json()["data"][-1]["probs"][-1] for r in rs]

    before = batches()
    singles = asyncio.run(burst())
    count, items = (a - b for a, b in zip(batches(), before))
    assert items == 64 and count < 32  # 64 requests, batched across requests
    with server.client() as c:
        together = c.post("/classify", json={"model": "rm", "input": texts, "use_activation": False}).json()
    assert max(abs(a - d["probs"][0]) for a, d in zip(singles, together["data"])) <= 1e-5


# --- slime ---------------------------------------------------------------------------------------------------
def test_slime_remote_rm(client, tok):
    # THUDM/slime slime/rollout/rm_hub/__init__.py (remote_rm) posts {"prompt", "response", "label"} per sample;
    # with --apply-chat-template the prompt is already rendered text, else the chat so far
    rendered = tok.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True)
    r = client.post("/v1/reward", json={"prompt": rendered, "response": "82", "label": "82"})
    assert r.status_code == 200, r.text
    [ref] = native(client, [{"text": rendered + "82"}])
    assert abs(r.json()["reward"] - ref) <= 1e-5 and r.json()["tokens"] > 0
    chat = client.post("/v1/reward", json={"prompt": CHAT[:1], "response": "82", "label": None}).json()
    assert abs(chat["reward"] - native(client, [{"messages": CHAT}])[0]) <= 1e-5
    both = client.post("/v1/reward?model=both", json={"prompt": CHAT[:1], "response": "82", "label": None}).json()
    assert set(both["members"]) == {"rm", "tiny"} and "disagreement" in both
    assert client.post("/v1/reward", json={"prompt": "p"}).status_code == 422


# --- text-embeddings-inference -------------------------------------------------------------------------------
def test_tei_predict_forms_and_headers(client):
    # huggingface/text-embeddings-inference router/src/http/types.rs (PredictInput): one text, a pair, or a batch
    refs = native(client, [{"text": TEXTS[0]}, {"prompt": "What is 37 + 45?", "response": "82"}])
    one = client.post("/predict", json={"inputs": TEXTS[0]})
    assert one.status_code == 200, one.text
    assert one.json() == [{"score": pytest.approx(sigmoid(refs[0]), abs=3e-6), "label": "LABEL_0"}]
    for name in ("x-total-time", "x-compute-time", "x-tokenization-time", "x-queue-time", "x-inference-time",
                 "x-compute-tokens", "x-compute-characters"):
        assert one.headers[name].isdigit(), name
    assert int(one.headers["x-compute-characters"]) == len(TEXTS[0])
    pair = client.post("/predict", json={"inputs": ["What is 37 + 45?", "82"], "raw_scores": True}).json()
    assert pair[0]["score"] == pytest.approx(refs[1], abs=1e-5)
    batch = client.post("/predict", json={"inputs": [[TEXTS[0]], ["What is 37 + 45?", "82"]], "raw_scores": True})
    assert [b[0]["score"] for b in batch.json()] == pytest.approx(refs, abs=1e-5)
    heads = client.post("/predict?model=heads", json={"inputs": "x"}).json()
    assert len(heads) == 3 and [h["score"] for h in heads] == sorted((h["score"] for h in heads), reverse=True)
    assert sum(h["score"] for h in heads) == pytest.approx(1.0)
    cut = client.post("/predict", json={"inputs": "word " * 200, "truncate": True, "truncation_direction": "Left",
                                        "raw_scores": True})
    ref = client.post("/v1/score", json={"model": "rm", "items": [{"text": "word " * 200}], "truncation": "left"})
    assert cut.json()[0]["score"] == pytest.approx(ref.json()["rewards"][0], abs=1e-5)


@pytest.mark.parametrize("body,status,kind", [
    ({"inputs": ""}, 400, "Empty"),
    ({"inputs": [["", ""]]}, 400, "Empty"),
    ({"inputs": "word " * 200, "truncate": False}, 422, "Validation"),
    ({"inputs": [["a", "b", "c"]]}, 422, "Validation"),
    ({"inputs": 5}, 422, "Validation"),
    ({"inputs": "x", "truncation_direction": "middle"}, 422, "Validation"),
])
def test_tei_errors_in_tei_shape(client, body, status, kind):
    r = client.post("/predict", json=body)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error", "error_type"} and r.json()["error_type"] == kind
