"""SIGTERM with work in flight: readiness off at once, new requests refused, the requests in flight
and their queued items finished, the process exits 0."""

from __future__ import annotations

import re
import signal
import threading
import time

import httpx

from rewardserve.bench.proc import server_process


def _in_flight(url: str) -> float:
    """Requests being answered, this one (for /metrics) not counted."""
    text = httpx.get(f"{url}/metrics").text
    return float(re.search(r"^rewardserve_requests_in_flight (\S+)$", text, re.M).group(1)) - 1


def test_sigterm_drains_in_flight_work_then_exits_0(tiny_ckpt):
    with server_process(["--model", str(tiny_ckpt("llama")), "--max-wait-ms", "1500", "--drain-timeout-s", "20",
                         "--lru-items", "0"]) as served:
        url = f"http://127.0.0.1:{served.port}"
        answers: list[httpx.Response] = []

        def in_flight(i: int) -> None:
            answers.append(httpx.post(f"{url}/v1/score", json={"items": [{"text": f"in flight {i}"}]}, timeout=60))

        threads = [threading.Thread(target=in_flight, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        while _in_flight(url) < 3:  # the batcher holds them for up to 1.5 s
            time.sleep(0.01)
        served.proc.send_signal(signal.SIGTERM)
        for _ in range(50):  # at once, not after the drain
            ready = httpx.get(f"{url}/readyz")
            if ready.status_code == 503:
                break
            time.sleep(0.01)
        assert ready.status_code == 503 and ready.json()["error"]["type"] == "draining"
        late = httpx.post(f"{url}/v1/score", json={"items": [{"text": "too late"}]})
        assert late.status_code == 503 and late.json()["error"]["type"] == "draining"
        for t in threads:
            t.join(30)
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert served.proc.wait(30) == 0
