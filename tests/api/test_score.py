"""POST /v1/score and the operational endpoints, through a real uvicorn server on loopback."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rewardserve.config import quick
from tests.conftest import attention_kernel_builds
from tests.server import serve


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt):
    return tiny_ckpt("qwen2")


@pytest.fixture(scope="module")
def server(ckpt):
    with serve(*quick(model=str(ckpt), max_wait_ms=5, max_items_per_request=16, max_length=64)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


def test_scores_in_input_order_equal_hf(server, client, ckpt):
    tok = AutoTokenizer.from_pretrained(ckpt)
    hf = AutoModelForSequenceClassification.from_pretrained(ckpt).eval()
    items = [
        {"prompt": "What is 2+2?", "response": "4"},
        {"text": "a longer piece of text riding with the short ones"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}]},
        {"input_ids": [1, 40, 41, 42]},
    ]
    r = client.post("/v1/score", json={"items": items})
    assert r.status_code == 200, r.text
    body = r.json()
    msgs = [[{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}], items[2]["messages"]]
    seqs = [
        tok(tok.apply_chat_template(msgs[0], tokenize=False), add_special_tokens=False)["input_ids"],
        tok(items[1]["text"])["input_ids"],
        tok(tok.apply_chat_template(msgs[1], tokenize=False), add_special_tokens=False)["input_ids"],
        [1, 40, 41, 42],
    ]
    with torch.inference_mode():
        ref = [hf(input_ids=torch.tensor([s])).logits[0, 0].item() for s in seqs]
    assert body["model"] == server.name
    assert [it["tokens"] for it in body["items"]] == [len(s) for s in seqs]
    assert body["usage"]["tokens"] == sum(len(s) for s in seqs)
    assert body["rewards"] == [it["reward"] for it in body["items"]]
    assert max(abs(a - b) for a, b in zip(body["rewards"], ref)) <= 1e-4
    assert all(it["truncated"] is False and it["cached"] is False for it in body["items"])
    assert float(r.headers["x-total-time"]) > 0


def test_truncation_left_right_and_error(client):
    long = {"text": "word " * 200}
    r = client.post("/v1/score", json={"items": [{"text": "short"}, long]})
    assert r.status_code == 413
    assert r.json()["error"] == {
        "type": "item_too_long", "index": 1, "field": "items[1]",
        "message": r.json()["error"]["message"],
    } and "max_length 64" in r.json()["error"]["message"]
    for side in ("left", "right"):
        r = client.post("/v1/score", json={"items": [long], "truncation": side})
        assert r.status_code == 200
        assert r.json()["items"][0] | {"reward": 0} == {"reward": 0, "tokens": 64, "truncated": True, "cached": False}
    left, right = (client.post("/v1/score", json={"items": [{"text": "a b c " * 60 + "END"}], "truncation": s})
                   .json()["rewards"][0] for s in ("left", "right"))
    assert left != right


BAD_BODIES = [
    ({"items": []}, 422, None, "items"),
    ({"items": [{"text": ""}]}, 422, 0, "items[0].text"),
    ({"items": [{"text": "ok"}, {"text": 5}]}, 422, 1, "items[1].text"),
    ({"items": [{"text": "ok"}, {"text": "ok", "colour": "red"}]}, 422, 1, "items[1].colour"),
    ({"items": [{"prompt": "p"}]}, 422, 0, "items[0]"),
    ({"items": [{"prompt": "", "response": "r"}]}, 422, 0, "items[0]"),
    ({"items": [{"text": "a", "input_ids": [1]}]}, 422, 0, "items[0]"),
    ({"items": [{}]}, 422, 0, "items[0]"),
    ({"items": [{"input_ids": [1, 2.5]}]}, 422, 0, "items[0].input_ids[1]"),
    ({"items": [{"input_ids": []}]}, 422, 0, "items[0].input_ids"),
    ({"items": [{"input_ids": [1, 99999]}]}, 422, 0, "items[0].input_ids"),
    ({"items": [{"messages": []}]}, 422, 0, "items[0].messages"),
    ({"items": [{"messages": [{"role": "user"}]}]}, 422, 0, "items[0].messages[0].content"),
    ({"items": [{"prompt": "p", "response": "r", "add_special_tokens": True}]}, 422, 0, "items[0]"),
    ({"items": "not a list"}, 422, None, "items"),
    ({"items": [{"text": "ok"}], "truncation": "middle"}, 422, None, "truncation"),
    ({"items": [{"text": "ok"}], "priority": "urgent"}, 422, None, "priority"),
    ({"items": [{"text": "ok"}], "temperature": 1}, 422, None, "temperature"),
    ({"items": [{"text": "ok"}] * 17}, 413, None, None),
    ({"model": "gpt-5", "items": [{"text": "ok"}]}, 404, None, None),
]


@pytest.mark.parametrize("body,status,index,field", BAD_BODIES)
def test_bad_input_gets_4xx_naming_field_and_item(client, body, status, index, field):
    r = client.post("/v1/score", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) <= {"type", "message", "index", "field"} and err["message"]
    assert err.get("index") == index
    if field is not None:
        assert err["field"] == field


def test_invalid_json_and_wrong_content(client):
    r = client.post("/v1/score", content=b'{"items": [', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_json"
    r = client.post("/v1/score", content=b"[1, 2]", headers={"content-type": "application/json"})
    assert r.status_code == 422
    r = client.get("/v1/score")
    assert r.status_code == 405 and r.json()["error"]["type"] == "method_not_allowed"
    r = client.get("/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"


def test_models_health_ready_metrics_docs(server, client, ckpt):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready", "model": server.name, "models": [server.name]}
    [card] = client.get("/v1/models").json()["data"]
    assert len(card.pop("fingerprint")) == 32
    assert card | {"source": None} == {
        "id": server.name, "object": "model", "kind": "reward_model", "source": None,
        "architecture": "Qwen2ForSequenceClassification",
        "num_labels": 1, "labels": ["LABEL_0"], "max_length": 64, "dtype": "float32", "devices": ["cpu"],
        "backend": "packed", "attention": "C++ kernel" if attention_kernel_builds() else "SDPA",
    }
    client.post("/v1/score", json={"items": [{"text": "count me"}]})
    text = client.get("/metrics").text
    for name in ("rewardserve_request_duration_seconds_bucket", "rewardserve_queue_duration_seconds_bucket",
                 "rewardserve_inference_duration_seconds_bucket", "rewardserve_batch_items_bucket",
                 "rewardserve_batch_tokens_bucket", "rewardserve_queue_depth", "rewardserve_tokens_total",
                 "rewardserve_errors_total"):
        assert name in text, name
    assert server.metric("rewardserve_tokens_total", model=server.name) > 0
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert "/v1/score" in spec["paths"] and "413" in spec["paths"]["/v1/score"]["post"]["responses"]


def test_server_not_ready_while_loading_and_503_when_load_fails(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    with serve(*quick(model=str(tmp_path)), wait_ready=False) as s, s.client() as c:
        for _ in range(200):
            r = c.get("/readyz")
            if r.json().get("error", {}).get("type") == "load_failed":
                break
        assert r.status_code == 503 and "not a reward model" in r.json()["error"]["message"]
        assert c.get("/healthz").status_code == 200
        r = c.post("/v1/score", json={"items": [{"text": "x"}]})
        assert r.status_code == 503 and r.json()["error"]["type"] == "not_ready"
