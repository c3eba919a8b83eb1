"""The score cache against a real redis-server: exact hits, distinct keys, fail-open, single-flight."""

from __future__ import annotations

import asyncio
import shutil
import time

import pytest

from rewardserve.cache.keys import KeyMaker, decode_scores, encode_scores, model_fingerprint
from rewardserve.cache.lru import LRU
from rewardserve.cache.redis_tier import CLOSED, HALF_OPEN, OPEN, Breaker
from rewardserve.config import RegistryConfig, ServerSettings, quick
from tests.redis_helper import RedisProcess, SlowProxy
from tests.server import serve

ITEMS = [{"prompt": f"What is {i} + {i}?", "response": str(2 * i)} for i in range(6)]


@pytest.fixture
def redis_proc():
    proc = RedisProcess().start()
    yield proc
    proc.kill()


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt):
    return tiny_ckpt("llama")


def _settings(ckpt, redis_url, **kw) -> tuple[ServerSettings, RegistryConfig]:
    base = dict(model=str(ckpt), redis_url=redis_url, lru_items=0, max_wait_ms=1, cache_timeout_ms=200)
    return quick(**(base | kw))


def _score(client, items=ITEMS, **kw):
    r = client.post("/v1/score", json={"items": items, **kw})
    assert r.status_code == 200, r.text
    return r.json()


# --- keys, values, tiers as units --------------------------------------------------------------

def test_key_depends_on_fingerprint_scoring_config_and_exact_ids():
    a = KeyMaker("f1", "dtype=float32")
    assert a.key([1, 2, 3]) == KeyMaker("f1", "dtype=float32").key([1, 2, 3])
    keys = {a.key([1, 2, 3]), a.key([1, 2, 4]), a.key([1, 2]), a.key([3, 2, 1]), a.key([1, 2, 3, 0]),
            KeyMaker("f2", "dtype=float32").key([1, 2, 3]), KeyMaker("f1", "dtype=bfloat16").key([1, 2, 3])}
    assert len(keys) == 7
    assert a.key([1]).startswith(b"rs:") and KeyMaker("f", "c", prefix="team-a:").key([1]).startswith(b"team-a:")


def test_fingerprint_changes_with_weights_and_config(ckpt, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(ckpt, copy)
    base = model_fingerprint(copy)
    assert model_fingerprint(copy) == base == model_fingerprint(ckpt)
    (copy / "tokenizer_config.json").write_text("{}")  # not weights or config: same model
    assert model_fingerprint(copy) == base
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    changed = model_fingerprint(copy)
    assert changed != base
    (copy / "config.json").write_text((copy / "config.json").read_text().replace("}", ' , "x": 1}', 1))
    assert model_fingerprint(copy) not in (base, changed)


def test_values_round_trip_exactly_and_garbage_reads_as_miss():
    scores = [0.1234567890123, -3.5e-8, 7.0]
    assert decode_scores(encode_scores(scores), 3) == scores
    assert decode_scores(encode_scores(scores), 2) is None  # another head count: not ours
    assert decode_scores(b"garbage", 1) is None
    assert decode_scores(b"\x02" + encode_scores([1.0])[1:], 1) is None
    assert decode_scores(encode_scores([float("nan")]), 1) is None
    assert decode_scores(None, 1) is None


def test_lru_evicts_least_recently_used():
    lru = LRU(2)
    lru.put(b"a", [1.0])
    lru.put(b"b", [2.0])
    assert lru.get(b"a") == [1.0]
    lru.put(b"c", [3.0])
    assert lru.get(b"b") is None and lru.get(b"a") == [1.0] and lru.get(b"c") == [3.0] and len(lru) == 2


def test_breaker_opens_after_failures_and_probes_once_after_cooldown():
    b = Breaker(failures=2, cooldown=0.05)
    assert b.allow()
    b.failure()
    assert b.state == CLOSED and b.allow()
    b.failure()
    assert b.state == OPEN and not b.allow()
    time.sleep(0.06)
    assert b.allow() and b.state == HALF_OPEN
    assert not b.allow()  # only one probe at a time
    b.failure()
    assert b.state == OPEN
    time.sleep(0.06)
    assert b.allow()
    b.success()
    assert b.state == CLOSED and b.allow()


# --- end to end through HTTP and redis-server ---------------------------------------------------

def test_second_scoring_is_served_from_redis_with_identical_rewards(ckpt, redis_proc):
    with serve(*_settings(ckpt, redis_proc.url, cache_ttl=600)) as s, s.client() as c:
        first = _score(c)
        assert not any(it["cached"] for it in first["items"])
        _wait_for(lambda: len(redis_proc.client().keys("rs:*")) == len(ITEMS))
        keys = redis_proc.client().keys("rs:*")
        assert 0 < redis_proc.client().ttl(keys[0]) <= 600
        second = _score(c)
        assert all(it["cached"] for it in second["items"])
        assert second["rewards"] == first["rewards"]
        assert s.metric("rewardserve_cache_hits_total", model=s.name, tier="redis") == len(ITEMS)
        bypass = _score(c, cache=False)
        assert not any(it["cached"] for it in bypass["items"]) and bypass["rewards"] == first["rewards"]
        assert s.metric("rewardserve_cache_hits_total", model=s.name, tier="redis") == len(ITEMS)


def _wait_for(condition, timeout: float = 5.0) -> None:
    """Redis writes happen in the background, after the response: wait until they have landed."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def _written(redis_proc, n: int):
    return lambda: len(redis_proc.client().keys("rs:*")) >= n


def test_lru_tier_serves_repeats_in_process(ckpt):
    with serve(*quick(model=str(ckpt), lru_items=100, max_wait_ms=1)) as s, s.client() as c:
        first = _score(c)
        second = _score(c)
        assert all(it["cached"] for it in second["items"]) and second["rewards"] == first["rewards"]
        assert s.metric("rewardserve_cache_hits_total", model=s.name, tier="lru") == len(ITEMS)


def test_another_model_or_dtype_never_reads_these_entries(tiny_ckpt, redis_proc):
    a, b = tiny_ckpt("llama", seed=0), tiny_ckpt("llama", seed=1)  # same tokenizer, other weights
    with serve(*_settings(a, redis_proc.url)) as s, s.client() as c:
        rewards_a = _score(c)["rewards"]
        _wait_for(_written(redis_proc, len(ITEMS)))
    for settings in (_settings(b, redis_proc.url), _settings(a, redis_proc.url, dtype="bfloat16")):
        with serve(*settings) as s, s.client() as c:
            other = _score(c)
            assert not any(it["cached"] for it in other["items"])
            assert other["rewards"] != rewards_a
    # the CPU attention kernel and torch's SDPA agree to ~1e-6, not bit for bit: separate entries too
    with serve(*_settings(a, redis_proc.url, cpu_attention_kernel=False)) as s, s.client() as c:
        other = _score(c)
        assert not any(it["cached"] for it in other["items"])
        assert max(abs(x - y) for x, y in zip(other["rewards"], rewards_a)) <= 1e-4
    assert len(redis_proc.client().keys("rs:*")) >= 3 * len(ITEMS)


def test_garbage_in_redis_is_a_miss_and_gets_overwritten(ckpt, redis_proc):
    with serve(*_settings(ckpt, redis_proc.url)) as s, s.client() as c:
        first = _score(c)
        _wait_for(_written(redis_proc, len(ITEMS)))
        r = redis_proc.client()
        for key in r.keys("rs:*"):
            r.set(key, b"not a score")
        again = _score(c)
        assert not any(it["cached"] for it in again["items"]) and again["rewards"] == first["rewards"]
        _wait_for(lambda: b"not a score" not in r.mget(r.keys("rs:*")))
        assert all(it["cached"] for it in _score(c)["items"])


def test_killing_redis_mid_stream_fails_no_request_and_restart_brings_hits_back(ckpt, redis_proc):
    settings = _settings(ckpt, redis_proc.url, cache_breaker_failures=2, cache_breaker_cooldown_s=0.3)
    with serve(*settings) as s, s.client() as c:
        statuses = []
        for i in range(40):
            if i == 15:
                redis_proc.kill()
            r = c.post("/v1/score", json={"items": [ITEMS[i % 6], {"text": f"stream item {i % 10}"}]})
            statuses.append(r.status_code)
        assert statuses == [200] * 40
        name = s.name
        assert s.metric("rewardserve_cache_errors_total", model=name, kind="ConnectionError") + \
            s.metric("rewardserve_cache_errors_total", model=name, kind="timeout") >= 2
        assert s.metric("rewardserve_cache_breaker_state", model=name) == OPEN

        redis_proc.start()  # same port, empty database
        time.sleep(0.35)  # past the cooldown: the next call probes
        _score(c)  # probe succeeds, breaker closes, these scores are written back
        _wait_for(_written(redis_proc, len(ITEMS)))
        assert s.metric("rewardserve_cache_breaker_state", model=name) == CLOSED
        assert all(it["cached"] for it in _score(c)["items"])


def test_slow_redis_costs_at_most_the_timeout(ckpt, redis_proc):
    with SlowProxy(redis_proc.port, delay=2.0) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/0"
        with serve(*_settings(ckpt, url, cache_timeout_ms=50, cache_breaker_failures=1000)) as s, s.client() as c:
            for _ in range(3):
                start = time.perf_counter()
                body = _score(c)
                # far below the proxy's 2 s: the lookup gave up at its 50 ms deadline
                assert time.perf_counter() - start < 1.5
                assert not any(it["cached"] for it in body["items"])
            assert s.metric("rewardserve_cache_errors_total", model=s.name, kind="timeout") >= 3


def test_password_protected_redis_and_wrong_password_fails_open(ckpt):
    proc = RedisProcess(password="s3cret").start()
    try:
        with serve(*_settings(ckpt, proc.url, redis_password="s3cret")) as s, s.client() as c:
            _score(c)
            _wait_for(lambda: len(proc.client().keys("rs:*")) >= len(ITEMS))
            assert all(it["cached"] for it in _score(c)["items"])
        with serve(*_settings(ckpt, proc.url, redis_password="wrong")) as s, s.client() as c:
            assert not any(it["cached"] for it in _score(c)["items"])
            assert s.metric("rewardserve_cache_errors_total", model=s.name, kind="AuthenticationError") >= 1
    finally:
        proc.kill()


def test_identical_items_in_flight_are_computed_once(ckpt, redis_proc):
    with serve(*_settings(ckpt, redis_proc.url, max_wait_ms=300)) as s:
        name = s.name
        item = {"text": "the same item, asked for twice at once"}

        async def both():
            async with s.async_client() as c:
                return await asyncio.gather(c.post("/v1/score", json={"items": [item, item]}),
                                            c.post("/v1/score", json={"items": [item]}))

        tokens_before = s.metric("rewardserve_tokens_total", model=name)
        r1, r2 = asyncio.run(both())
        assert r1.status_code == r2.status_code == 200
        tokens = r2.json()["items"][0]["tokens"]
        assert s.metric("rewardserve_tokens_total", model=name) - tokens_before == tokens  # computed once
        assert r1.json()["rewards"] == [r2.json()["rewards"][0]] * 2
        assert s.metric("rewardserve_singleflight_shared_items_total", model=name) == 1
