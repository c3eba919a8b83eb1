"""The registry: every scorer a process serves, by name, and everything they run on.

`start()` builds the entries in order: it loads the checkpoints of models and judges onto their
devices (off the event loop) and gives each its own queue, scheduler and cache view on the shared
device workers and cache tiers; builds ensembles over models, verifiers over one shared process
pool, composites over any of those; warms every model up and then starts the reward monitors.
`get(name)` is what routes use.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os

import orjson
import torch

from rewardserve.cache.keys import KeyMaker, model_fingerprint
from rewardserve.cache.lru import LRU
from rewardserve.cache.redis_tier import RedisTier
from rewardserve.cache.tiered import ScoreCache
from rewardserve.config import CheckpointEntry, JudgeEntry, ModelEntry, RegistryConfig, ServerSettings
from rewardserve.engine.batcher import Batcher, Budgets
from rewardserve.engine.process import Engine, Tuning
from rewardserve.engine.scheduler import ModelRunner
from rewardserve.engine.workers import Devices, ModelWorkers
from rewardserve.errors import ModelNotFound, NotReady
from rewardserve.models.loading import LoadedModel, load_model
from rewardserve.monitoring.drift import fitted_buckets
from rewardserve.monitoring.metrics import Metrics
from rewardserve.monitoring.monitor import RewardMonitor
from rewardserve.runtime import freeze_startup_objects, keep_freed_memory, unfreeze
from rewardserve.scorers.base import ModelScorer, Scorer
from rewardserve.scorers.composite import CompositeScorer
from rewardserve.scorers.ensemble import EnsembleScorer
from rewardserve.scorers.judge import JudgeScorer
from rewardserve.scorers.process import ProcessScorer
from rewardserve.scorers.reward_model import RewardModelScorer
from rewardserve.scorers.verifier import VerifierScorer
from rewardserve.verifiers import checks
from rewardserve.verifiers.pool import VerifierPool
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
        self.pool: VerifierPool | None = None  # the verifiers' processes, when any entry is a verifier
        self.engines: dict[str, Engine] = {}  # device -> its engine process (settings.engine == "process")

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
            for section, i, entry in self.config.entries():
                self._loading = entry.name
                self.scorers[entry.name] = await self._build(section, entry)
                self._shaping(self.scorers[entry.name], entry, f"{section}[{i}] ({entry.name})")
            self._loading = None
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
        freeze_startup_objects()
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

    async def _build(self, section: str, entry) -> Scorer:
        if section in ("models", "judges"):
            model = await asyncio.to_thread(self._load, entry)
            return await asyncio.to_thread(self._wire, entry, model)
        if section == "ensembles":
            return EnsembleScorer(entry, [self.scorers[m] for m in entry.members])
        if section == "verifiers":
            if self.pool is None:
                workers = self.settings.verifier_workers or min(4, os.cpu_count() or 1)
                self.pool = VerifierPool(workers, on_replace=self.metrics.verifier_replacements.inc)
                await self.pool.start()
            cache = None
            if self.cache is not None:
                keys = KeyMaker(f"verifier:{entry.type}:{checks.checker_version(entry.type)}",
                                orjson.dumps(entry.config, option=orjson.OPT_SORT_KEYS).decode(),
                                self.settings.cache_prefix)
                cache = self.cache.for_model(entry.name, keys, 2)  # a row: score, reason code
            return VerifierScorer(entry, self.pool, cache, self.metrics, self.settings.verifier_max_queued)
        return CompositeScorer(entry, {part: self.scorers[name] for part, name in entry.components.items()})

    def _load(self, entry: CheckpointEntry) -> LoadedModel:
        return load_model(entry, self._budget(entry), self.settings.cpu_attention_kernel, tokens=head_tokens(entry),
                          process=isinstance(entry, ModelEntry) and entry.process is not None,
                          engines=self._engine if self.settings.engine == "process" else None)

    def _engine(self, device: torch.device) -> Engine:
        """The engine process of `device`, started on first use (in a loading thread)."""
        key = str(device)
        if key not in self.engines:
            s = self.settings
            engine = Engine(device, Tuning(s.cpu_threads, s.cpu_keep_memory, s.cpu_attention_kernel, s.log_level))
            engine.start()
            self.engines[key] = engine
        return self.engines[key]

    @property
    def failure(self) -> str | None:
        """Why start() failed, naming the entry being loaded; None unless it failed."""
        if self.load_error is None:
            return None
        where = f"entry {self._loading!r}: " if self._loading else ""
        return f"{where}{type(self.load_error).__name__}: {self.load_error}"

    def _budget(self, entry: CheckpointEntry) -> int:
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

    def _wire(self, entry: CheckpointEntry, m: LoadedModel) -> ModelScorer:
        """A loaded model's queue, scheduler and cache view (runs in a thread: it may hash the weights)."""
        s = self.settings
        cache = fingerprint = None
        if self.cache is not None:
            fingerprint = model_fingerprint(m.model_dir)
            # everything besides the weights and the ids that decides a score goes into the key
            scoring = (f"dtype={m.dtype};backend={m.backend};attention={m.attention};labels={m.num_labels};"
                       f"rows={sorted(m.token_ids.items())}")
            if isinstance(entry, JudgeEntry):
                templates = entry.template + "\0" + (entry.pairwise.template if entry.pairwise else "")
                scoring += f";template={hashlib.blake2b(templates.encode(), digest_size=16).hexdigest()}"
            cache = self.cache.for_model(m.name, KeyMaker(fingerprint, scoring, s.cache_prefix), m.num_labels)
        workers = ModelWorkers(m.backends, self.devices, self.metrics, m.name, s.batch_timeout_s)
        budget = self._budget(entry)
        batcher = Batcher(Budgets(budget, s.max_batch_items, s.max_wait_ms / 1000, s.max_queued_tokens,
                                  s.max_step_ms / 1000), workers,
                          self.metrics, m.name)
        self._workers.append(workers)
        self._batchers.append(batcher)
        runner = ModelRunner(m.name, batcher, cache, self.metrics, budget,
                             all(b.shares_prefix for b in m.backends))
        if isinstance(entry, JudgeEntry):
            return JudgeScorer(entry, m, runner, self.metrics, fingerprint)
        if entry.process is not None:
            return ProcessScorer(entry, m, runner, self.metrics, fingerprint)
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
        for engine in self.engines.values():
            await asyncio.to_thread(engine.close)
        if self.pool is not None:
            await self.pool.close()
        if self.cache is not None:
            await self.cache.close()
        unfreeze()


def head_tokens(entry: CheckpointEntry) -> dict[str, str] | None:
    """The LM-head rows an entry reads, by config key ({"verdict.yes": "Yes", ...}); None: its score head."""
    if isinstance(entry, JudgeEntry):
        tokens = {"verdict.yes": entry.verdict.yes, "verdict.no": entry.verdict.no}
        if entry.pairwise is not None:
            tokens |= {"pairwise.verdict.a": entry.pairwise.verdict.a, "pairwise.verdict.b": entry.pairwise.verdict.b}
        return tokens
    if entry.process is not None and entry.process.labels is not None:
        return {"process.labels.good": entry.process.labels.good, "process.labels.bad": entry.process.labels.bad}
    return None
