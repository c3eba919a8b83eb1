"""The engine: a loaded model, its workers and the batcher, behind one `score` call.

The HTTP routes and the offline `rewardserve score` command both go through `Engine.score`, so
there is one path from token ids to rewards.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass
from typing import Sequence

from rewardserve.config import Settings
from rewardserve.engine.batcher import Batcher
from rewardserve.cache.keys import KeyMaker, model_fingerprint
from rewardserve.cache.lru import LRU
from rewardserve.cache.redis_tier import RedisTier
from rewardserve.cache.tiered import ScoreCache
from rewardserve.engine.types import Lane, Ticket, WorkItem
from rewardserve.engine.workers import WorkerPool
from rewardserve.errors import NotReady, bug
from rewardserve.models.loading import LoadedModel, load_model
from rewardserve.models.pooling import last_token_index
from rewardserve.models.tokenize import Encoded, ItemLike
from rewardserve.models.units import Shared, Unit
from rewardserve.monitoring.drift import fitted_buckets
from rewardserve.monitoring.metrics import Metrics
from rewardserve.monitoring.monitor import RewardMonitor

log = logging.getLogger(__name__)

# Warm-up texts: their rewards place the reward histogram's buckets where this model's rewards fall.
WARMUP_TEXTS = (
    "What is 12 + 30? The answer is 42.",
    "Translate 'good morning' into French. Bonjour.",
    "Write a haiku about the sea. Waves fold into foam, the tide forgets every name, salt keeps the secret.",
    "Summarize: the meeting moved to Tuesday because the room was booked. The meeting is now on Tuesday.",
    "Is the Earth flat? Yes, obviously.",
    "How many minutes are in 3 hours? 180 minutes.",
    "Explain recursion. Recursion is when a function calls itself on a smaller input until a base case.",
    "asdf qwerty zxcv",
)
# Below this many shared tokens a group is not worth a prefix segment of its own.
_MIN_SHARED_PREFIX = 8
# Requests with fewer items are tokenised on the event loop: a thread hop costs more than encoding them.
_INLINE_TOKENIZE_ITEMS = 8


@dataclass(slots=True)
class ScoredItem:
    scores: list[float]  # one per head (num_labels)
    tokens: int
    truncated: bool
    cached: bool = False

    @property
    def reward(self) -> float:
        return self.scores[0]


class Engine:
    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        self.model: LoadedModel | None = None
        self.pool: WorkerPool | None = None
        self.batcher: Batcher | None = None
        self.ready = False
        self.load_error: BaseException | None = None
        self.cache: ScoreCache | None = None
        self.keys: KeyMaker | None = None
        self.fingerprint: str | None = None
        self._inflight: dict[bytes, WorkItem] = {}
        self.monitor: RewardMonitor | None = None

    @property
    def name(self) -> str:
        return self.settings.model_name

    async def start(self) -> None:
        """Load the model off the event loop, start the batcher, warm up; then mark ready."""
        try:
            self.model = await asyncio.to_thread(load_model, self.settings)
            self.cache = await asyncio.to_thread(self._build_cache)
            self.pool = WorkerPool(self.model.backends, self.metrics, self.name)
            self.batcher = Batcher(self.settings, self.pool, self.metrics, self.name)
            self.batcher.start()
            sample = await self._warmup() if self.settings.warmup else []
            if self.settings.monitoring:
                self.monitor = RewardMonitor(self.settings, self.metrics, self.name, self.model.labels,
                                             fitted_buckets(sample))
                self.monitor.start()
        except BaseException as exc:
            self.load_error = exc
            log.exception("model failed to load")
            raise
        self.ready = True
        self.metrics.ready.labels(self.name).set(1)

    def _build_cache(self) -> ScoreCache | None:
        s, m = self.settings, self.model
        if not s.lru_items and not s.redis_url:
            return None
        self.fingerprint = model_fingerprint(m.model_dir)
        # everything besides the weights and the ids that decides a score goes into the key
        scoring = f"dtype={m.dtype};backend={m.backend};attention={m.attention};labels={m.num_labels}"
        self.keys = KeyMaker(self.fingerprint, scoring, s.cache_prefix)
        lru = LRU(s.lru_items) if s.lru_items else None
        redis = None
        if s.redis_url:
            redis = RedisTier(
                s.redis_url, password=s.redis_password, ttl=s.cache_ttl, timeout=s.cache_timeout_ms / 1000,
                metrics=self.metrics, model=self.name, breaker_failures=s.cache_breaker_failures,
                breaker_cooldown=s.cache_breaker_cooldown_s,
            )
        return ScoreCache(lru, redis, m.num_labels, self.metrics, self.name)

    async def _warmup(self) -> list[float]:
        """One batch per worker (every replica pays its first-call costs before traffic arrives); the
        rewards of the sample texts fit the reward histogram's buckets to this model."""
        enc = self.model.encoder
        ids = [(enc.tokenizer(t, add_special_tokens=True)["input_ids"] or [0])[: enc.max_length] for t in WARMUP_TEXTS]
        rewards: list[float] = []
        for _ in self.model.backends:
            # one text at a time: warm-up must fit any queue limit the operator set
            rewards = [(await self.score_ids([x], Lane.interactive, Ticket(), use_cache=False))[0][0][0] for x in ids]
        return rewards

    async def stop(self) -> None:
        if self.monitor is not None:
            await self.monitor.stop()
        if self.batcher is not None:
            await self.batcher.stop()
        if self.pool is not None:
            await self.pool.close()
        if self.cache is not None:
            await self.cache.close()
        self.ready = False

    def _require(self) -> LoadedModel:
        if self.model is None or self.batcher is None:
            raise NotReady("model is still loading; poll /readyz")
        return self.model

    async def encode(self, items: Sequence[ItemLike], truncation: str) -> list[Encoded]:
        enc = self._require().encoder
        start = time.perf_counter()
        if len(items) < _INLINE_TOKENIZE_ITEMS:
            out = enc.encode(items, truncation)
        else:
            out = await asyncio.to_thread(enc.encode, items, truncation)
        self.metrics.tokenize_duration.labels(self.name).observe(time.perf_counter() - start)
        return out

    async def score_ids(
        self, seqs: list[list[int]], lane: Lane, ticket: Ticket, use_cache: bool = True,
        groups: Sequence[Sequence[int]] = (),
    ) -> list[tuple[list[float], bool]]:
        """(scores, cached) per sequence. Raises typed errors (429 overload, 503 backend).

        `groups` lists indices of sequences that share a prompt: on backends that can (packed: a
        tree-shaped batch; HF decoders: a KV cache), their common token prefix is computed once and
        each member attends to it. With the cache on, hits come from the LRU or Redis, and a plain
        item identical to one already being computed (by this request or another) joins that
        computation (single-flight). Computed scores are stored on completion.
        """
        self._require()
        cache = self.cache if use_cache else None
        keys = [self.keys.key(s) for s in seqs] if cache else []
        found = await cache.lookup(keys) if cache else [None] * len(seqs)
        result = list(found)
        pending: list[tuple[list[int], WorkItem]] = []  # (indices served by the item, item)
        submit: list[tuple[Unit, list[int]]] = []
        grouped: set[int] = set()
        for group in groups:
            members = [i for i in group if found[i] is None]
            for unit, local in self._share([seqs[i] for i in members]):
                submit.append((unit, [members[j] for j in local]))
                grouped.update(submit[-1][1])
        joined: dict[bytes, list[int]] = {}  # duplicate items within this request share one computation
        for i, seq in enumerate(seqs):
            if result[i] is not None or i in grouped:
                continue
            if not cache:
                submit.append((seq, [i]))
                continue
            if keys[i] in joined:
                joined[keys[i]].append(i)
                continue
            joined[keys[i]] = idxs = [i]
            running = self._inflight.get(keys[i])
            if running is not None and not running.future.done():
                running.tickets.append(ticket)
                pending.append((idxs, running))
                self.metrics.singleflight_shared.labels(self.name).inc()
            else:
                submit.append((seq, idxs))
        if submit:
            for (unit, idxs), item in zip(submit, self.batcher.submit([u for u, _ in submit], lane, ticket)):
                pending.append((idxs, item))
                unit_keys = [keys[i] for i in idxs] if cache else []
                if cache and not isinstance(unit, Shared):
                    self._inflight[unit_keys[0]] = item
                item.future.add_done_callback(functools.partial(self._settle, unit_keys, item))
        values = await self._wait([item for _, item in pending], ticket)
        for (idxs, item), value in zip(pending, values):
            rows = value if isinstance(item.work, Shared) else [value] * len(idxs)
            for i, row in zip(idxs, rows):
                result[i] = row
        return [(result[i], found[i] is not None) for i in range(len(seqs))]

    def _share(self, seqs: list[list[int]]) -> list[tuple[Shared, list[int]]]:
        """Shared-prefix units for one group (positions into `seqs`); members left out score alone.

        The prefix is the longest common prefix of the members' *full* token sequences, so it is by
        construction exactly what each full tokenisation starts with, whatever a chat template or a
        BPE merge at the prompt/response boundary did.
        """
        if len(seqs) < 2 or not all(b.shares_prefix for b in self.model.backends):
            return []
        n = min(len(s) for s in seqs) - 1  # every member keeps at least its last token
        p = 0
        while p < n and all(s[p] == seqs[0][p] for s in seqs):
            p += 1
        if p < _MIN_SHARED_PREFIX:
            return []
        pools = [last_token_index(s, self.model.pad_token_id) - p for s in seqs]
        members = [j for j, pool in enumerate(pools) if pool >= 0]
        if len(members) < len(seqs):  # pooled inside the prefix (trailing pad ids): score those alone
            self.metrics.prefix_fallback.labels(self.name).inc(len(seqs) - len(members))
        units, chunk, tokens = [], [], p
        for j in members + [None]:
            if chunk and (j is None or tokens + len(seqs[j]) - p > self.settings.max_batch_tokens):
                if len(chunk) > 1:
                    units.append((Shared(seqs[chunk[0]][:p], [seqs[c][p:] for c in chunk],
                                         [pools[c] for c in chunk]), chunk))
                chunk, tokens = [], p
            if j is not None:
                chunk.append(j)
                tokens += len(seqs[j]) - p
        return units

    def _settle(self, keys: list[bytes], item: WorkItem, future: asyncio.Future) -> None:
        if keys and self._inflight.get(keys[0]) is item:
            del self._inflight[keys[0]]
        if future.cancelled() or future.exception() is not None:
            return
        value = future.result()
        if isinstance(item.work, Shared):
            self.metrics.prefix_saved_tokens.labels(self.name).inc(item.work.full_tokens - item.work.tokens)
            for key, row in zip(keys, value):
                self.cache.store(key, row)
        elif keys:
            self.cache.store(keys[0], value)

    @staticmethod
    async def _wait(items: list[WorkItem], ticket: Ticket) -> list[list[float]]:
        """Wait for items without cancelling them: another request may share them (single-flight)."""
        if not items:
            return []
        futures = [it.future for it in items]
        try:
            await asyncio.wait(futures)
        except asyncio.CancelledError:
            ticket.cancel()  # our client left: items nobody else waits for are dropped before compute
            raise
        for f in futures:
            if f.cancelled():
                ticket.cancel()
                raise bug("an item was dropped while its request still waited for it.")
            if f.exception() is not None:
                ticket.cancel()  # the rest of this request is moot; drop what has not run
                raise f.exception()
        return [f.result() for f in futures]

    async def score_items(
        self, items: Sequence[ItemLike], *, truncation: str, lane: Lane, ticket: Ticket, use_cache: bool = True,
        groups: Sequence[Sequence[int]] = (),
    ) -> list[ScoredItem]:
        encoded = await self.encode(items, truncation)
        rows = await self.score_ids([e.ids for e in encoded], lane, ticket, use_cache, groups)
        if self.monitor is not None:
            self.monitor.observe([row for row, _ in rows], [len(e.ids) for e in encoded], groups)
        return [ScoredItem(row, len(e.ids), e.truncated, cached) for e, (row, cached) in zip(encoded, rows)]
