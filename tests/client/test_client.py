"""rewardserve.client against a real server: batching and order, retries (with Retry-After honoured),
dropped connections, timeouts, typed errors; and the client installed on its own, without torch."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from rewardserve.client import (
    AsyncRewardClient, BadRequest, ConnectionFailed, NotFound, Overloaded, RewardClient, Timeout, Unavailable,
)
from rewardserve.config import quick
from tests.faults import Faults
from tests.redis_helper import SlowProxy
from tests.server import serve

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    faults: list[Faults] = []

    def wrap(app):
        faults.append(Faults(app))
        return faults[0]

    with serve(*quick(model=str(tiny_ckpt("llama")), max_wait_ms=2, max_items_per_request=500), wrap=wrap) as s:
        s.faults = faults[0]
        yield s


@pytest.fixture
def faults(server):
    server.faults.queue.clear()
    yield server.faults
    server.faults.queue.clear()


class Sleeps:
    """Records the waits the client asks for instead of sleeping them."""

    def __init__(self):
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def _requests(server) -> float:
    return server.metric("rewardserve_requests_total", model=server.name, endpoint="/v1/score", status="200")


def test_ten_thousand_items_go_out_in_batches_and_come_back_in_order(server):
    items = [{"input_ids": [5 + i % 300, 6 + i % 7, 7 + i % 11]} for i in range(10_000)]
    before = _requests(server)
    with RewardClient(server.url, batch_size=400, concurrency=4) as rs:
        results = rs.score(items)
        assert _requests(server) - before == 25  # 10,000 items in requests of 400
        # order: every distinct item's reward is what it gets alone
        distinct = {tuple(it["input_ids"]): r["reward"] for it, r in zip(items, results)}
        probe = [list(k) for k in list(distinct)[:: max(1, len(distinct) // 20)]]
        alone = rs.rewards([{"input_ids": ids} for ids in probe], cache=False)
    assert len(results) == 10_000 and all(r["tokens"] == 3 for r in results)
    assert max(abs(distinct[tuple(ids)] - a) for ids, a in zip(probe, alone)) <= 1e-5
    assert len(distinct) > 100


@pytest.mark.parametrize("code", [429, 503])
def test_429_and_503_are_retried_honouring_retry_after(server, faults, code):
    sleeps = Sleeps()
    faults.queue.extend([("status", code, 3), ("status", code, None)])
    with RewardClient(server.url, sleep=sleeps, backoff=0.25) as rs:
        seen = faults.seen
        [reward] = rs.rewards(["retry me"])
    assert faults.seen - seen == 3 and isinstance(reward, float)
    assert 3 <= sleeps.waits[0] <= 3 * 1.2  # Retry-After: never sooner, a little later at most
    assert 0.125 <= sleeps.waits[1] <= 0.5  # no Retry-After: exponential backoff (attempt 1) with jitter


def test_retries_run_out_into_a_typed_error_with_the_server_body(server, faults):
    faults.queue.extend([("status", 429, 1)] * 3)
    with RewardClient(server.url, retries=2, sleep=Sleeps()) as rs:
        with pytest.raises(Overloaded) as err:
            rs.score(["x"])
    assert err.value.status == 429 and err.value.type == "overloaded" and "injected 429" in err.value.message
    faults.queue.extend([("status", 503, None)] * 2)
    with RewardClient(server.url, retries=1, sleep=Sleeps()) as rs, pytest.raises(Unavailable):
        rs.score(["x"])


def test_a_dropped_connection_is_retried(server):
    sleeps = Sleeps()
    with SlowProxy(int(server.url.rsplit(":", 1)[1])) as proxy:
        proxy.drops = 1
        with RewardClient(f"http://127.0.0.1:{proxy.port}", sleep=sleeps) as rs:
            [reward] = rs.rewards(["through a flaky network"])
        assert proxy.drops == 0 and len(sleeps.waits) == 1 and isinstance(reward, float)
        proxy.drops = 10
        with RewardClient(f"http://127.0.0.1:{proxy.port}", retries=2, sleep=Sleeps()) as rs:
            with pytest.raises(ConnectionFailed):
                rs.rewards(["never arrives"])


def test_a_call_past_its_timeout_raises_timeout_and_is_not_retried(server, faults):
    faults.queue.append(("delay", 2.0))
    with RewardClient(server.url, sleep=Sleeps()) as rs:
        seen = faults.seen
        with pytest.raises(Timeout):
            rs.score(["slow"], timeout=0.3)
        assert faults.seen - seen == 1
        assert rs.rewards(["fast again"])


def test_server_errors_surface_as_typed_exceptions_with_the_body(server):
    with RewardClient(server.url) as rs:
        with pytest.raises(BadRequest) as err:
            rs.score([{"text": "fine"}, {"input_ids": [1, 10**9]}])
        assert (err.value.status, err.value.index, err.value.field) == (422, 1, "items[1].input_ids")
        assert err.value.body["error"]["type"] == "invalid_input"
        with pytest.raises(NotFound, match="served names"):
            rs.score(["x"], model="nope")
        [card] = rs.models()
        assert card["id"] == server.name and card["kind"] == "reward_model"
        bon = rs.best_of_n(["4", "5", "four"], prompt="What is 2+2?", top_k=2)
        assert bon["ranking"] == sorted(range(3), key=lambda i: -bon["rewards"][i])[:2]
        [cmp] = rs.compare("What is 2+2?", "4", "5")
        assert cmp["reward_a"] == pytest.approx(bon["rewards"][0], abs=1e-5)
    with pytest.raises(ConnectionFailed):
        with RewardClient("http://127.0.0.1:9", retries=1, sleep=Sleeps()) as rs:  # nothing listens on port 9
            rs.score(["x"])


def test_the_async_client_from_a_running_loop(server):
    async def run():
        async with AsyncRewardClient(server.url, batch_size=3) as rs:
            return await rs.rewards([("What is 2+2?", str(n)) for n in range(7)])

    rewards = asyncio.run(run())
    with RewardClient(server.url) as rs:
        assert rewards == pytest.approx(rs.rewards([("What is 2+2?", str(n)) for n in range(7)]), abs=1e-5)


def test_the_client_installs_on_its_own_and_imports_no_torch(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT / "service" / "client", src, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    [wheel] = (tmp_path / "dist").glob("rewardserve_client-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"rewardserve"}
    assert "rewardserve/__init__.py" not in names and "rewardserve/client/adapters/trl.py" in names
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert [line for line in meta.splitlines() if line.startswith("Requires-Dist")] == ["Requires-Dist: httpx>=0.27"]
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    code = ("import sys\n"
            "for heavy in ('torch', 'transformers', 'numpy', 'fastapi'):\n"
            "    sys.modules[heavy] = None  # importing any of them fails\n"
            "import rewardserve.client, rewardserve.client.adapters.trl, rewardserve.client.adapters.verl\n"
            "import rewardserve.client.adapters.openrlhf\n"
            "print(rewardserve.client.__file__)")
    httpx_home = str(Path(__import__("httpx").__file__).parents[1])  # httpx and its dependencies, nothing else
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=f"{target}{os.pathsep}{httpx_home}"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(target / "rewardserve" / "client" / "__init__.py")
