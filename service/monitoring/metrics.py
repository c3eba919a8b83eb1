"""Every Prometheus metric of rewardserve, in one place.

Metrics live in a per-app `CollectorRegistry` (not the process-global one) so that several apps can
run in one process (tests, benchmarks) without clashing. Names carry the `rewardserve_` prefix;
buckets are explicit: durations geometric, batch sizes and token counts powers of two.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# 0.5 ms .. ~65 s, factor 2: covers a cache hit through a long bulk batch on CPU.
DURATION_BUCKETS = tuple(0.0005 * 2**i for i in range(18))
CACHE_BUCKETS = tuple(0.00002 * 2**i for i in range(16))  # 20 us .. ~0.65 s
ITEM_BUCKETS = tuple(float(2**i) for i in range(13))  # 1 .. 4096 items
TOKEN_BUCKETS = tuple(float(2**i) for i in range(4, 21))  # 16 .. 1M tokens

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self._reward_histogram: Histogram | None = None
        r = self.registry
        self.requests = Counter(
            "rewardserve_requests", "HTTP requests by endpoint and status code.", ["model", "endpoint", "status"],
            registry=r,
        )
        self.in_flight = Gauge(
            "rewardserve_requests_in_flight", "HTTP requests being answered (a drain waits for them).", registry=r)
        self.request_duration = Histogram(
            "rewardserve_request_duration_seconds", "Wall time of a request, arrival to response.",
            ["model", "endpoint"], buckets=DURATION_BUCKETS, registry=r,
        )
        self.tokenize_duration = Histogram(
            "rewardserve_tokenize_duration_seconds", "Time spent tokenising one request.", ["model"],
            buckets=DURATION_BUCKETS, registry=r,
        )
        self.queue_duration = Histogram(
            "rewardserve_queue_duration_seconds", "Time an item waited in the queue before its batch started.",
            ["model", "lane"], buckets=DURATION_BUCKETS, registry=r,
        )
        self.inference_duration = Histogram(
            "rewardserve_inference_duration_seconds", "Model time of one batch on its device.", ["model", "device"],
            buckets=DURATION_BUCKETS, registry=r,
        )
        self.batch_items = Histogram(
            "rewardserve_batch_items", "Items per batch.", ["model"], buckets=ITEM_BUCKETS, registry=r,
        )
        self.batch_tokens = Histogram(
            "rewardserve_batch_tokens", "Real (unpadded) tokens per batch.", ["model"], buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.batch_budget = Gauge(
            "rewardserve_batch_budget_tokens", "Token budget of the latest batch (max_batch_tokens, or what the "
            "device computes in max_step_ms).", ["model"], registry=r,
        )
        self.padding_fraction = Histogram(
            "rewardserve_batch_padding_fraction", "Share of computed positions that were padding, per batch.",
            ["model"], buckets=(0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0), registry=r,
        )
        self.queue_depth = Gauge(
            "rewardserve_queue_depth", "Items waiting in the queue.", ["model", "lane"], registry=r,
        )
        self.queued_tokens = Gauge(
            "rewardserve_queued_tokens", "Tokens waiting in the queue.", ["model"], registry=r,
        )
        self.tokens = Counter(
            "rewardserve_tokens", "Tokens scored (computed, not served from cache).", ["model"], registry=r,
        )
        self.items = Counter(
            "rewardserve_items", "Items scored.", ["model"], registry=r,
        )
        self.dropped_items = Counter(
            "rewardserve_dropped_items", "Items dropped before compute because their client went away.", ["model"],
            registry=r,
        )
        self.errors = Counter(
            "rewardserve_errors", "Error responses by type.", ["model", "type"], registry=r,
        )
        self.rejected = Counter(
            "rewardserve_rejected_requests", "Requests rejected by admission control (429).", ["model"],
            registry=r,
        )
        self.cache_hits = Counter(
            "rewardserve_cache_hits", "Items served from a cache tier.", ["model", "tier"], registry=r,
        )
        self.cache_misses = Counter(
            "rewardserve_cache_misses", "Items looked up in a cache tier and not found.", ["model", "tier"],
            registry=r,
        )
        self.cache_errors = Counter(
            "rewardserve_cache_errors", "Redis calls that failed (each one a miss, never a failed request).",
            ["model", "kind"], registry=r,
        )
        self.cache_breaker_state = Gauge(
            "rewardserve_cache_breaker_state", "Redis circuit breaker: 0 closed, 1 half-open (probing), 2 open.",
            ["model"], registry=r,
        )
        self.cache_duration = Histogram(
            "rewardserve_cache_duration_seconds", "Latency of one cache tier operation for a whole request.",
            ["model", "tier", "op"], buckets=CACHE_BUCKETS, registry=r,
        )
        self.singleflight_shared = Counter(
            "rewardserve_singleflight_shared_items", "Items that joined an identical item already being computed.",
            ["model"], registry=r,
        )
        self.prefix_saved_tokens = Counter(
            "rewardserve_prefix_saved_tokens", "Tokens not computed because a shared beginning ran once: a group's "
            "prompt, or the opening that items of one batch have in common.",
            ["model"], registry=r,
        )
        self.prefix_fallback = Counter(
            "rewardserve_prefix_fallback_items", "Group members scored alone because they pool inside the prefix.",
            ["model"], registry=r,
        )
        self.oom_splits = Counter(
            "rewardserve_oom_splits", "Batches halved and retried after running out of memory.", ["model", "device"],
            registry=r)
        self.worker_replacements = Counter(
            "rewardserve_worker_replacements", "Worker threads replaced (a batch past batch_timeout_s, or a thread "
            "gone).", ["device"], registry=r)
        self.verifier_duration = Histogram(
            "rewardserve_verifier_seconds", "Time a request's items spent in a verifier (cache, queue and checks).",
            ["model"], registry=r,
        )
        self.verifier_results = Counter(
            "rewardserve_verifier_results", "Verifier checks by outcome (reason): correct, wrong answer, timed out...",
            ["model", "reason"], registry=r,
        )
        self.verifier_replacements = Counter(
            "rewardserve_verifier_process_replacements", "Verifier processes killed (an item past its timeout) or "
            "lost, and started afresh.", registry=r)
        self.auth_rejections = Counter(
            "rewardserve_auth_rejections", "Requests refused for a missing (401) or wrong (403) API key.", ["reason"],
            registry=r)
        self.quota_rejections = Counter(
            "rewardserve_quota_rejections", "Requests refused (429) because their tenant was over its quota.",
            ["tenant", "kind"], registry=r)
        self.device_busy = Counter(
            "rewardserve_device_busy_seconds", "Seconds a device spent running batches (rate() = busy fraction).",
            ["model", "device"], registry=r,
        )
        self.device_memory = Gauge(
            "rewardserve_device_memory_bytes", "GPU memory allocated by this process.", ["model", "device"],
            registry=r,
        )
        # --- reward distribution, drift and hacking signals (service/monitoring/monitor.py) ---
        self.reward_window_mean = Gauge(
            "rewardserve_reward_window_mean", "Mean reward over the rolling window.", ["model", "head"], registry=r)
        self.reward_window_std = Gauge(
            "rewardserve_reward_window_std", "Reward std over the rolling window.", ["model", "head"], registry=r)
        self.reward_window_quantile = Gauge(
            "rewardserve_reward_window_quantile", "Reward quantiles over the rolling window.",
            ["model", "head", "quantile"], registry=r)
        self.drift_psi = Gauge(
            "rewardserve_drift_psi", "Population stability index, current window vs reference.", ["model", "head"],
            registry=r)
        self.drift_ks = Gauge(
            "rewardserve_drift_ks", "Kolmogorov-Smirnov statistic, current window vs reference.", ["model", "head"],
            registry=r)
        self.drift_mean_shift = Gauge(
            "rewardserve_drift_mean_shift", "(window mean - reference mean) / reference std.", ["model", "head"],
            registry=r)
        self.drift_reference_n = Gauge(
            "rewardserve_drift_reference_size", "Scores in the drift reference (0 until it is complete).",
            ["model", "head"], registry=r)
        self.length_correlation = Gauge(
            "rewardserve_hacking_length_correlation", "Pearson correlation of response tokens and reward (window).",
            ["model", "head"], registry=r)
        self.group_std = Gauge(
            "rewardserve_hacking_group_std", "Mean within-group reward std over recent groups (collapse -> 0).",
            ["model", "head"], registry=r)
        self.clip_share = Gauge(
            "rewardserve_hacking_clip_share", "Share of window rewards at the configured clip bounds.",
            ["model", "head"], registry=r)
        self.disagreement = Gauge(
            "rewardserve_hacking_disagreement", "Rolling mean of the per-item spread the scorer reports (ensembles).",
            ["model"], registry=r)
        self.ready = Gauge("rewardserve_ready", "1 once the model is loaded and warmed up.", ["model"], registry=r)

    def reward_histogram(self, buckets: list[float]) -> Histogram:
        """The reward distribution, with buckets fitted to the model (known only after warm-up)."""
        if self._reward_histogram is None:
            self._reward_histogram = Histogram(
                "rewardserve_reward", "Rewards served, per head.", ["model", "head"], buckets=buckets,
                registry=self.registry,
            )
        return self._reward_histogram

    def render(self) -> bytes:
        return generate_latest(self.registry)
