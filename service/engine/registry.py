"""The registry: every scorer a process serves, by name, and everything they run on.

`start()` loads the model entries onto their devices (off the event loop), gives each model its own
queue, scheduler and cache view on the shared device workers and cache tiers, builds the ensembles
over them, warms every model up and then starts the reward monitors. `get(name)` is what routes use.
"""

from __future__ import annotations

import asyncio
import logging

import torch

from rewardserve.cache.keys import KeyMaker, model_fingerprint
from rewardserve.cache.lru import LRU
from rewardserve.cache.redis_tier import RedisTier
from rewardserve.cache.tiered import ScoreCache
from rewardserve.config import ModelEntry, RegistryConfig, ServerSettings
from rewardserve.engine.batcher import Batcher, Budgets
from rewardserve.engine.scheduler import ModelRunner
from rewardserve.engine.workers import Devices, ModelWorkers
from rewardserve.errors import ModelNotFound, NotReady
from rewardserve.models.loading import LoadedModel, load_model
from rewardserve.monitoring.drift import fitted_buckets
from rewardserve.monitoring.metrics import Metrics
from rewardserve.monitoring.monitor import RewardMonitor
from rewardserve.runtime import keep_freed_memory
from rewardserve.scorers.base import Scorer
from rewardserve.scorers.ensemble import EnsembleScorer
from rewardserve.scorers.reward_model import RewardModelScorer
from rewardserve.transforms import fits

log = logging.getLogger(__name__)


class Registry:
    def __init__(self, settings: ServerSettings, config: RegistryConfig, metrics: Metrics):
        self.settings = settings
        self.config = config
        self.metrics = metrics
        self.default = config.default_name
        self.scorers: dict[str, Scorer] = {}
        self.devices = Devices()
        self.cache: ScoreCache | None = None
        self.ready = False
        self.draining = False  # set on SIGTERM: readiness off, new requests refused, in-flight ones finish
        self.load_error: BaseException | None = None
        self._loading: str | None = None  # the entry start() is loading
        self._batchers: list[Batcher] = []
        self._workers: list[ModelWorkers] = []

    def default_batcher(self) -> Batcher | None:
        """The default entry's queue, when it is a model (what admission estimates waits from)."""
        runner = getattr(self.scorers.get(self.default), "runner", None)
        return runner.batcher if runner is not None else None

    @property
    def names(self) -> list[str]:
        return self.config.names

    def get(self, name: str | None) -> Scorer:
        """The scorer a request names (the default one when it names none)."""
        if not self.ready:
            raise NotReady("models are still loading; poll /readyz")
        scorer = self.scorers.get(self.default if name is None else name)
        if scorer is None:
            raise ModelNotFound(f"model {name!r} is not served here; the served names are {self.names}")
        return scorer

    async def start(self) -> None:
        """Load, wire and warm up every entry; then mark ready."""
        s = self.settings
        try:
            if s.cpu_threads:
                torch.set_num_threads(s.cpu_threads)
            if s.cpu_keep_memory:
                keep_freed_memory()
            self.cache = self._tiers()
            if self.cache is not None and self.cache.redis is not None:
                await self.cache.redis.warm()  # connected and checked before the first request needs it
            for entry in self.config.models:
                model = await asyncio.to_thread(self._load, entry)
                self.scorers[entry.name] = await asyncio.to_thread(self._wire, entry, model)
            self._loading = None
            for e in self.config.ensembles:
                self.scorers[e.name] = EnsembleScorer(e, [self.scorers[m] for m in e.members])
            for section, entries in (("models", self.config.models), ("ensembles", self.config.ensembles)):
                for i, e in enumerate(entries):
                    self._shaping(self.scorers[e.name], e, f"{section}[{i}] ({e.name})")
            for b in self._batchers:
                b.start()
            samples = []
            if s.warmup:
                for scorer in self.scorers.values():
                    samples += await scorer.warmup()
            if s.monitoring:
                buckets = fitted_buckets(samples)
                for name, scorer in self.scorers.items():
                    scorer.monitor = RewardMonitor(s, self.metrics, name, scorer.labels, buckets,
                                                   default=name == self.default)
                    scorer.monitor.start()
        except BaseException as exc:
            self.load_error = exc
            log.exception("loading the registry failed")
            raise
        self.ready = True
        for name in self.scorers:
            self.metrics.ready.labels(name).set(1)

    @staticmethod
    def _shaping(scorer: Scorer, entry, where: str) -> None:
        """The entry's default transform and its fits, read now: a bad file stops the start, named."""
        scorer.transform = entry.transform
        for key, kind in (("length_fit", "length"), ("calibration", "calibration")):
            path = getattr(entry, key)
            if path is not None:
                try:
                    setattr(scorer, key, fits.load(path, kind))
                except ValueError as exc:
                    raise ValueError(f"{where}.{key}: {exc}") from None

    def _load(self, entry: ModelEntry) -> LoadedModel:
        self._loading = entry.name
        return load_model(entry, self._budget(entry), self.settings.cpu_attention_kernel)

    @property
    def failure(self) -> str | None:
        """Why start() failed, naming the entry being loaded; None unless it failed."""
        if self.load_error is None:
            return None
        where = f"model entry {self._loading!r}: " if self._loading else ""
        return f"{where}{type(self.load_error).__name__}: {self.load_error}"

    def _budget(self, entry: ModelEntry) -> int:
        return entry.max_batch_tokens or self.settings.max_batch_tokens

    def _tiers(self) -> ScoreCache | None:
        s = self.settings
        if not s.lru_items and not s.redis_url:
            return None
        redis = None
        if s.redis_url:
            redis = RedisTier(
                s.redis_url, password=s.redis_password, ttl=s.cache_ttl, timeout=s.cache_timeout_ms / 1000,
                metrics=self.metrics, breaker_failures=s.cache_breaker_failures,
                breaker_cooldown=s.cache_breaker_cooldown_s,
            )
        return ScoreCache(LRU(s.lru_items) if s.lru_items else None, redis, self.metrics)

    def _wire(self, entry: ModelEntry, m: LoadedModel) -> RewardModelScorer:
        """A loaded model's queue, scheduler and cache view (runs in a thread: it may hash the weights)."""
        s = self.settings
        cache = fingerprint = None
        if self.cache is not None:
            fingerprint = model_fingerprint(m.model_dir)
            # everything besides the weights and the ids that decides a score goes into the key
            scoring = f"dtype={m.dtype};backend={m.backend};attention={m.attention};labels={m.num_labels}"
            cache = self.cache.for_model(m.name, KeyMaker(fingerprint, scoring, s.cache_prefix), m.num_labels)
        workers = ModelWorkers(m.backends, self.devices, self.metrics, m.name, s.batch_timeout_s)
        budget = self._budget(entry)
        batcher = Batcher(Budgets(budget, s.max_batch_items, s.max_wait_ms / 1000, s.max_queued_tokens), workers,
                          self.metrics, m.name)
        self._workers.append(workers)
        self._batchers.append(batcher)
        runner = ModelRunner(m.name, batcher, cache, self.metrics, budget,
                             all(b.shares_prefix for b in m.backends))
        return RewardModelScorer(m, runner, self.metrics, entry.truncation, entry.heads, fingerprint)

    async def stop(self) -> None:
        self.ready = False
        for scorer in self.scorers.values():
            if scorer.monitor is not None:
                await scorer.monitor.stop()
        for b in self._batchers:
            await b.stop()
        for w in self._workers:
            await w.close()
        await self.devices.close()
        if self.cache is not None:
            await self.cache.close()
