"""Hostile input against a server in its own process: each answered with its typed 4xx before it costs
more than the limits allow, the server's memory bounded, and a well-behaved client beside it served."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import orjson
import pytest

from rewardserve.bench.proc import server_process

MB = 1 << 20
BIG = "x" * (10 * MB)  # a 10 MB string, ten times max_text_chars
# What one hostile request may add to the server's peak memory with the default limits (16 MiB bodies,
# 1M-character strings): the body, its parsed copy and their strings, a few times over (README).
PEAK_BOUND = 400 * MB


@pytest.fixture(scope="module")
def served(tiny_ckpt):
    with server_process(["--model", str(tiny_ckpt("llama")), "--max-wait-ms", "2"]) as s:
        yield s


@pytest.fixture
def bystander(served):
    """A well-behaved client scoring all along; every answer it gets must be a 200."""
    statuses: list[int] = []
    stop = threading.Event()

    def run():
        with httpx.Client(base_url=f"http://127.0.0.1:{served.port}", timeout=60) as c:
            i = 0
            while not stop.is_set():
                statuses.append(c.post("/v1/score", json={"items": [{"text": f"polite {i % 5}"}]}).status_code)
                i += 1
                time.sleep(0.02)

    t = threading.Thread(target=run)
    t.start()
    while not statuses:  # it is served before the hostile requests start
        time.sleep(0.01)
    yield statuses
    stop.set()
    t.join()
    assert statuses and set(statuses) == {200}


def _raw(port: int, head: bytes, body: bytes = b"", chunks: int = 0) -> tuple[int, bytes]:
    """Send `head`, then `body` or `chunks` chunks of 1 MB (chunked encoding) from a thread, and read the
    answer however much of the body the server took."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)

    def send():
        try:
            sock.sendall(head + body)
            for _ in range(chunks):
                sock.sendall(b"%x\r\n" % MB + b"a" * MB + b"\r\n")
        except OSError:
            pass  # the server answered and closed: what was left is never read, as it should be

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head_part, _, rest = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head_part.split(b"\r\n") if line.lower().startswith(
        b"content-length:"))
    while len(rest) < length:
        rest += sock.recv(65536)
    sock.close()
    return int(head_part[9:12]), rest[:length]


def _head(path: str, extra: str) -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra}\r\n".encode()


def test_bodies_too_large_are_refused_before_they_are_read(served, bystander):
    start = time.monotonic()
    status, body = _raw(served.port, _head("/v1/score", f"Content-Length: {200 * MB}\r\n"), b'{"items": [')
    assert status == 413 and b"body_too_large" in body and b"max_body_bytes" in body
    status, body = _raw(served.port, _head("/v1/score", f"Content-Length: {2 << 30}\r\n"), b"{")
    assert status == 413 and b"Content-Length is 2147483648" in body  # a 2 GB body that never arrives
    assert time.monotonic() - start < 30
    status, body = _raw(served.port, _head("/classify", "Transfer-Encoding: chunked\r\n"), chunks=200)
    assert status == 413 and b"before it ended" in body  # no Content-Length: counted as it comes


CASES = [
    ("/v1/score", {"items": [{"text": "ok"}], "x": "NESTED"}, 400, "json_too_deep", None),
    ("/v1/score", {"items": [{"text": "ok"}] * 100_000}, 413, "request_too_large", None),
    ("/v1/score", b'{"items": [{"text": "ok"}, {"text": NaN}]}', 422, "invalid_value", "items[1].text"),
    ("/v1/score", b'{"items": [{"text": "a\\ud800b"}]}', 422, "invalid_value", "items[0].text"),
    ("/v1/score", b'{"items": [{"text": "a\xffb"}]}', 422, "invalid_value", "items[0].text"),
    ("/v1/score", b'{"items": [{"text": "a\x01b"}]}', 422, "invalid_value", "items[0].text"),
    ("/v1/score", b'{"items": [{"text": "ok"}], "heads": {"LABEL_0": 1e999}}', 422, "invalid_value",
     "heads.LABEL_0"),
    ("/v1/score", {"items": [{"input_ids": [1, 2**62]}]}, 422, "invalid_input", "items[0].input_ids"),
    ("/v1/score", b'{"items": [{"input_ids": [1, 1180591620717411303424]}]}', 422, "invalid_request",
     "items[0].input_ids[1]"),
]


@pytest.mark.parametrize("path,body,status,kind,field", CASES)
def test_hostile_json_gets_its_typed_4xx(served, bystander, path, body, status, kind, field):
    if isinstance(body, dict) and body.get("x") == "NESTED":
        content = b'{"items": [{"text": "ok"}], "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    else:
        content = body if isinstance(body, bytes) else orjson.dumps(body)
    r = httpx.post(f"http://127.0.0.1:{served.port}{path}", content=content,
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text[:300]
    err = r.json()["error"]
    assert err["type"] == kind and err.get("field") == field


TEXT_FIELDS = [
    ("/v1/score", {"items": [{"text": BIG}]}, "items[0].text"),
    ("/v1/score", {"items": [{"prompt": BIG, "response": "r"}]}, "items[0].prompt"),
    ("/v1/score", {"items": [{"prompt": "p", "response": BIG}]}, "items[0].response"),
    ("/v1/score", {"items": [{"messages": [{"role": "user", "content": BIG}]}]}, "items[0].messages[0].content"),
    ("/v1/best_of_n", {"prompt": BIG, "candidates": ["a"]}, "prompt"),
    ("/v1/best_of_n", {"prompt": "p", "candidates": ["a", BIG]}, "candidates[1]"),
    ("/v1/compare", {"prompt": "p", "a": "x", "b": BIG}, "b"),
    ("/get_reward", {"query": [BIG]}, "query[0]"),
    ("/classify", {"input": BIG}, "input"),
    ("/v1/reward", {"prompt": "p", "response": BIG}, "response"),
    ("/predict", {"inputs": BIG}, "inputs"),
]


def test_a_10_mb_string_in_every_text_field(served, bystander):
    before = served.rss_bytes(peak=True)
    with httpx.Client(base_url=f"http://127.0.0.1:{served.port}", timeout=60) as c:
        for path, body, field in TEXT_FIELDS:
            r = c.post(path, content=orjson.dumps(body), headers={"content-type": "application/json"})
            assert r.status_code in (413, 422), (path, r.status_code)
            assert "max_text_chars" in r.text and field in r.text, (path, r.text[:300])
    assert served.rss_bytes(peak=True) - before < PEAK_BOUND


def test_the_server_s_peak_memory_stays_bounded(served):
    """After everything above: the whole hostile table cost less than the documented bound."""
    with httpx.Client(base_url=f"http://127.0.0.1:{served.port}") as c:
        assert c.post("/v1/score", json={"items": [{"text": "still here"}]}).status_code == 200
    peak, now = served.rss_bytes(peak=True), served.rss_bytes()
    assert peak - now < PEAK_BOUND
