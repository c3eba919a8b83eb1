"""Verifiable rewards: a rule checks each item's response against its ground truth (`reference`).

The checks (verifiers/checks.py: math, exact, regex, json_schema) run in a process pool off the
event loop, each under the entry's per-item timeout (verifiers/pool.py). A result is a score (1.0,
0.0, or partial credit where the checker defines it) and a short reason. Results are cached like
model scores, under keys of the checker, its version and configuration, the response and the
reference; identical items in flight are checked once. Timeouts and checker errors are not cached.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Sequence

import orjson

from rewardserve.cache.tiered import ModelCache
from rewardserve.entries import VerifierEntry
from rewardserve.errors import InvalidInput, Overloaded
from rewardserve.models.tokenize import ItemLike, chat_of
from rewardserve.monitoring.metrics import Metrics
from rewardserve.scorers.base import Call, Result, Scorer
from rewardserve.verifiers import checks
from rewardserve.verifiers.pool import VerifierPool

UNCACHED = ("timed out", "checker error")  # they depend on load, or on a worker that died


def response_text(item: ItemLike, index: int) -> str:
    """The text a rule checks: the response, a chat's last turn, or the text."""
    if item.response is not None:  # a peer's text item may say which part is the response
        return item.response
    if item.messages is not None:
        return chat_of(item)[-1]["content"]
    if item.text is not None:
        return item.text
    raise InvalidInput("a verifier checks text: send prompt/response, messages or text, not input_ids", index=index,
                       part="input_ids")


class VerifierScorer(Scorer):
    kind = "verifier"

    def __init__(self, entry: VerifierEntry, pool: VerifierPool, cache: ModelCache | None, metrics: Metrics,
                 max_queued: int):
        self.entry = entry
        self.name = entry.name
        self.labels = ["reward"]
        self.pool = pool
        self.cache = cache
        self.metrics = metrics
        self.max_queued = max_queued
        self.config = entry.config
        self.version = checks.checker_version(entry.type)
        self.uses_reference = checks.needs_reference(entry.type, self.config)
        self.queued = 0
        self._running: dict[bytes, asyncio.Task] = {}  # single-flight: the check of a key already under way

    async def score(self, items: Sequence[ItemLike], call: Call) -> list[Result]:
        if call.heads is not None:
            raise InvalidInput(f"heads: {self.name} is a verifier; heads apply to reward models", field="heads")
        texts = [response_text(it, i) for i, it in enumerate(items)]
        refs = [getattr(it, "reference", None) for it in items]
        if self.uses_reference:
            for i, ref in enumerate(refs):
                if ref is None:
                    raise InvalidInput(f"{self.name} checks the response against the item's ground truth: send it as "
                                       "`reference` (or `label`, `ground_truth`)", index=i, part="reference")
        if self.queued + len(items) > self.max_queued:
            raise Overloaded(f"{self.queued} verifier items are waiting for a process (verifier_max_queued is "
                             f"{self.max_queued})", retry_after=1)
        start = time.perf_counter()
        keys = [orjson.dumps([t, r]) for t, r in zip(texts, refs)]
        cache = self.cache if call.use_cache else None
        hashed = [cache.keys.key_bytes(k) for k in keys] if cache else keys
        found = await cache.lookup(hashed, [1] * len(items)) if cache else [None] * len(items)
        tasks: dict[bytes, asyncio.Task] = {}
        for i, key in enumerate(hashed):
            if found[i] is None and key not in tasks:
                tasks[key] = self._running.get(key) or self._start(key, texts[i], refs[i], cache)
        if tasks:
            await asyncio.wait([asyncio.shield(t) for t in tasks.values()])  # shield: others may share a check
        results = []
        for i, key in enumerate(hashed):
            if found[i] is not None:
                [[score, code]] = found[i]
                results.append(Result(reward=score, tokens=0, cached=True, reason=checks.REASONS[int(code)]))
            else:
                score, reason = tasks[key].result()
                results.append(Result(reward=score, tokens=0, reason=reason))
        self.metrics.verifier_duration.labels(self.name).observe(time.perf_counter() - start)
        if self.monitor is not None:
            self.monitor.observe([[r.reward] for r in results], [len(t) for t in texts], call.groups)
        return results

    def _start(self, key: bytes, text: str, ref: str | None, cache: ModelCache | None) -> asyncio.Task:
        self.queued += 1
        task = asyncio.ensure_future(self.pool.run(self.entry.type, self.config, text, ref, self.entry.timeout_s))
        self._running[key] = task

        def done(t: asyncio.Task) -> None:
            self.queued -= 1
            self._running.pop(key, None)
            if t.cancelled() or t.exception() is not None:
                return
            score, reason = t.result()
            self.metrics.verifier_results.labels(self.name, reason).inc()
            if cache is not None and reason not in UNCACHED:
                cache.store(key, [[score, float(checks.reason_code(reason))]])

        task.add_done_callback(done)
        return task

    def card(self) -> dict[str, Any]:
        e = self.entry
        return dict(id=self.name, kind=self.kind, type=e.type, checker_version=self.version, timeout_s=e.timeout_s,
                    needs_reference=self.uses_reference, pattern=e.pattern, case_sensitive=e.case_sensitive)
