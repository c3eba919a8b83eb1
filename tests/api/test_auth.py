"""Who may call: API keys from a file (reloaded when it changes), 401 / 403, public paths, per-key
quotas that hold one tenant back and not another, and keys kept out of logs and metrics."""

from __future__ import annotations

import logging
import time

import pytest

from rewardserve.api.security import parse_keys
from rewardserve.config import quick
from tests.server import serve

KEYS = """# tenants of the test server
interactive:sk-interactive-0001
bulk:sk-bulk-000000001:requests_per_s=2
tokens:sk-tokens-00000001:tokens_per_s=40
sk-anonymous-000001
"""
SECRETS = ["sk-interactive-0001", "sk-bulk-000000001", "sk-tokens-00000001", "sk-anonymous-000001"]


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys"
    path.write_text(KEYS)
    return path


@pytest.fixture(scope="module")
def server(tiny_ckpt, keys_file):
    with serve(*quick(model=str(tiny_ckpt("llama")), max_wait_ms=1, api_keys_file=str(keys_file))) as s:
        yield s


def _bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _operations(server) -> list[tuple[str, str]]:
    spec = server.app.openapi()
    return [(method.upper(), path) for path, ops in spec["paths"].items() for method in ops]


def test_every_endpoint_without_a_key_with_a_wrong_one_and_with_a_right_one(server):
    public = {"/healthz", "/readyz", "/metrics"}
    ops = _operations(server)
    assert len(ops) >= 17 and ("POST", "/classify") in ops and ("POST", "/v1/score") in ops
    with server.client() as c:
        for method, path in ops + [("GET", "/docs"), ("GET", "/openapi.json")]:
            none = c.request(method, path, json={})
            wrong = c.request(method, path, json={}, headers=_bearer("sk-not-a-key-at-all"))
            right = c.request(method, path, json={}, headers=_bearer(SECRETS[0]))
            if path in public:
                assert none.status_code == wrong.status_code == right.status_code == 200, path
                continue
            assert none.status_code == 401 and none.headers["www-authenticate"] == "Bearer", path
            assert none.json()["error"]["type"] == "unauthorized"
            assert wrong.status_code == 403 and wrong.json()["error"]["type"] == "forbidden", path
            assert right.status_code not in (401, 403), (path, right.text)
        ok = c.post("/v1/score", json={"items": [{"text": "hi"}]}, headers={"X-API-Key": SECRETS[3]})
        assert ok.status_code == 200
        via_query = c.post(f"/get_reward?model={server.name}&api_key={SECRETS[0]}", json={"query": ["hi"]})
        assert via_query.status_code == 200 and len(via_query.json()["rewards"]) == 1


def test_a_tenant_over_its_quota_waits_while_another_is_served(server):
    with server.client() as c:
        statuses = [c.post("/v1/score", json={"items": [{"text": f"bulk {i}"}]}, headers=_bearer(SECRETS[1]))
                    for i in range(4)]
        assert [r.status_code for r in statuses[:2]] == [200, 200]
        over = next(r for r in statuses if r.status_code == 429)
        assert over.json()["error"]["type"] == "quota_exceeded" and "'bulk'" in over.json()["error"]["message"]
        assert int(over.headers["Retry-After"]) >= 1
        for i in range(10):  # the other tenant is not held back
            r = c.post("/v1/score", json={"items": [{"text": f"interactive {i}"}]}, headers=_bearer(SECRETS[0]))
            assert r.status_code == 200
        # a token quota: the first request may go into debt, the next one waits
        big = {"items": [{"text": "tokens " * 20}]}
        assert c.post("/v1/score", json=big, headers=_bearer(SECRETS[2])).status_code == 200
        r = c.post("/v1/score", json=big, headers=_bearer(SECRETS[2]))
        assert r.status_code == 429 and "tokens/s" in r.json()["error"]["message"]
    assert server.metric("rewardserve_quota_rejections_total", tenant="bulk", kind="requests") >= 1
    assert server.metric("rewardserve_quota_rejections_total", tenant="tokens", kind="tokens") == 1


def test_keys_reload_without_a_restart(server, keys_file):
    new = "sk-newcomer-0000001"
    with server.client() as c:
        assert c.post("/v1/score", json={"items": [{"text": "x"}]}, headers=_bearer(new)).status_code == 403
        keys_file.write_text(KEYS.replace(f"interactive:{SECRETS[0]}\n", "") + f"newcomer:{new}\n")
        for _ in range(60):
            if c.post("/v1/score", json={"items": [{"text": "x"}]}, headers=_bearer(new)).status_code == 200:
                break
            time.sleep(0.1)
        assert c.post("/v1/score", json={"items": [{"text": "x"}]}, headers=_bearer(new)).status_code == 200
        assert c.post("/v1/score", json={"items": [{"text": "x"}]}, headers=_bearer(SECRETS[0])).status_code == 403
        keys_file.write_text("newcomer:short\n")  # broken: the previous keys stay
        time.sleep(2.5)
        assert c.post("/v1/score", json={"items": [{"text": "x"}]}, headers=_bearer(new)).status_code == 200
        keys_file.write_text(KEYS)


def test_keys_never_reach_logs_or_metrics(server, caplog):
    with caplog.at_level(logging.DEBUG), caplog.at_level(logging.INFO, logger="uvicorn.access"), \
            server.client() as c:
        for key in SECRETS + ["sk-not-a-key-at-all"]:
            c.post("/v1/score", json={"items": [{"text": "x"}]}, headers=_bearer(key))
        c.post(f"/get_reward?api_key={SECRETS[3]}&model={server.name}", json={"query": ["x"]})
        text = c.get("/metrics").text
    server_logs = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith(("httpx", "httpcore")))
    assert "/get_reward?model=" in server_logs  # the access log has the path, without the key
    for key in SECRETS + ["sk-not-a-key-at-all"]:
        assert key not in text and key not in server_logs


@pytest.mark.parametrize("text,message", [
    ("", "no keys"),
    ("a:b:c:d\n", "line 1: expected"),
    ("name:short\n", "line 1: a tenant needs a name and a key of at least 8 characters"),
    ("x:sk-aaaaaaaa\nx:sk-bbbbbbbb\n", "line 2: tenant 'x' twice"),
    ("x:sk-aaaaaaaa:requests_per_s=fast\n", "line 1: quotas are"),
    ("x:sk-aaaaaaaa:colour=3\n", "line 1: quotas are"),
])
def test_a_bad_keys_file_names_the_line_not_the_key(text, message):
    with pytest.raises(ValueError, match=message) as err:
        parse_keys(text, None, None)
    assert "sk-" not in str(err.value)


def test_a_bad_keys_file_stops_the_start(tmp_path):
    path = tmp_path / "keys"
    path.write_text("x:sk-aaaaaaaa\nx:sk-bbbbbbbb\n")
    from rewardserve.app import create_app

    with pytest.raises(ValueError, match=r"api keys file .*: line 2"):
        create_app(*quick(api_keys_file=str(path)))
