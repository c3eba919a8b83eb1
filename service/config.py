"""What a server is told at start: server-wide settings, and the registry of scorers it serves.

- `ServerSettings`: HTTP, batching budgets, request limits, cache, monitoring, CPU tuning. Every
  field is an `RS_*` environment variable and a `rewardserve serve` flag (the CLI builds its flags
  from the fields, so the two cannot drift apart).
- `RegistryConfig` (entries.py): named entries (models, ensembles, judges, verifiers, composites) and
  the default one, from a YAML file (`--config registry.yaml`, `load_registry`) or, on the quick path,
  one model entry made of the `--model` flags (`QuickModel`). Entries are validated at start; errors
  name the entry and the key.

Only `cli.py` and `app.py` construct these; components get the small pieces they need.
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, create_model
from pydantic_settings import BaseSettings, SettingsConfigDict


from rewardserve.entries import (  # noqa: F401  (the registry's schema, importable from here too)
    DEFAULT_JUDGE_DIR, DEFAULT_JUDGE_NAME, DEFAULT_MODEL_DIR, DEFAULT_MODEL_NAME, CheckpointEntry, CompositeEntry,
    EnsembleEntry, JudgeEntry, ModelEntry, RegistryConfig, VerifierEntry, SECTIONS,
)


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RS_", extra="forbid", validate_default=True)

    config: str | None = Field(
        None, description="Registry YAML of the scorers to serve (models, ensembles); without it, --model serves one."
    )

    # --- batching (each model gets its own queue with these budgets) ------------------------------
    max_batch_tokens: int = Field(16384, ge=1, description="A batch closes when it holds this many tokens.")
    max_batch_items: int = Field(256, ge=1, description="A batch closes when it holds this many items.")
    max_wait_ms: float = Field(2.0, ge=0, description="A batch closes this long after its first item arrived.")
    max_step_ms: float = Field(
        200.0, ge=0, description="A batch holds at most the tokens its device computes in this long (from the "
        "measured rate), so an item arriving behind queued bulk work waits at most about one such step; 0: "
        "batches fill to max_batch_tokens.",
    )
    max_queued_tokens: int = Field(
        1_000_000, ge=1, description="Admission control: beyond this many queued tokens requests get 429."
    )
    max_items_per_request: int = Field(4096, ge=1, description="Largest items list one request may carry (413).")
    max_candidates: int = Field(256, ge=1, description="Most candidates one best-of-N request may rank (413).")

    # --- limits before work: what one request may cost (each exceeded one is a typed 4xx) -----------
    max_body_bytes: int = Field(16 << 20, ge=1024, description="Largest request body (413 before it is parsed, "
                                                                "with or without Content-Length).")
    max_json_depth: int = Field(32, ge=4, le=1000, description="Deepest nesting of arrays and objects in a body.")
    max_text_chars: int = Field(1_000_000, ge=1, description="Longest string in a body, in characters, checked "
                                                             "before tokenisation (413).")
    max_request_tokens: int = Field(2_000_000, ge=1, description="Most tokens one request may hold after "
                                                                 "tokenisation, over its items and models (413).")
    max_concurrent_requests: int = Field(512, ge=1, description="Scoring requests in flight at once; beyond, 429 "
                                                                 "before the body is read.")
    max_request_timeout_s: float = Field(600.0, gt=0, description="Cap of a request's own deadline (its `timeout` "
                                                                  "field or X-Request-Timeout header).")
    request_timeout_s: float | None = Field(None, gt=0, description="Deadline of requests that set none (504 when "
                                                                    "it passes; default: none).")

    # --- who may call ----------------------------------------------------------------------------
    api_keys_file: str | None = Field(None, description="API keys, one per line ('key' or 'name:key', optionally "
                                                        "':requests_per_s=R,tokens_per_s=T'); reloaded when it "
                                                        "changes. Off: no authentication.")
    public_paths: str = Field("/healthz,/readyz,/metrics", description="Comma-separated paths served without a "
                                                                       "key when keys are on.")
    quota_requests_per_s: float | None = Field(None, gt=0, description="Per-key request rate (429 beyond it); a "
                                                                       "key's own quota wins.")
    quota_tokens_per_s: float | None = Field(None, gt=0, description="Per-key token rate (429 beyond it); a key's "
                                                                     "own quota wins.")

    # --- faults and shutdown --------------------------------------------------------------------
    batch_timeout_s: float = Field(300.0, gt=0, description="A batch running longer fails (503) and its device's "
                                                            "worker thread is replaced.")
    drain_timeout_s: float = Field(30.0, ge=0, description="On SIGTERM: how long in-flight and queued requests "
                                                           "may take to finish while new ones get 503.")

    # --- where models run ----------------------------------------------------------------------
    engine: Literal["process", "thread"] = Field(
        "process", description="process: each device's models run in an engine process of their own, so a "
                               "forward never waits for the front end's GIL; thread: in this process."
    )

    # --- CPU tuning (process-wide) ---------------------------------------------------------------
    cpu_threads: int | None = Field(None, ge=1, description="torch threads for CPU inference (default: all cores).")
    cpu_attention_kernel: bool = Field(
        True, description="On CPU (fp32, bf16), run attention in rewardserve's C++ kernel (compiled with g++ on "
                          "first load; torch SDPA when off or when it cannot be built)."
    )
    cpu_keep_memory: bool = Field(
        True, description="On CPU, make glibc reuse freed activation memory instead of page-faulting it afresh "
                          "every batch (a fifth faster here; RSS stays at its peak)."
    )

    # --- verifiers (rule-based rewards, in a process pool) -----------------------------------------
    verifier_workers: int = Field(0, ge=0, description="Processes checking verifier items (0: one per core, at most "
                                                       "4).")
    verifier_max_queued: int = Field(100_000, ge=1, description="Verifier items waiting for a process, beyond which "
                                                               "requests get 429.")

    # --- score cache -------------------------------------------------------------------------
    lru_items: int = Field(100_000, ge=0, description="In-process LRU cache size in items (0 disables it).")
    redis_url: str | None = Field(
        None, description="Redis for the shared cache tier, e.g. redis://host:6379/0 or rediss:// for TLS (off if unset)."
    )
    redis_password: str | None = Field(None, description="Redis password, if not in the URL (keep it out of argv).")
    cache_ttl: int = Field(7 * 24 * 3600, ge=1, description="Seconds a score lives in Redis.")
    cache_timeout_ms: float = Field(5.0, gt=0, description="Deadline of one Redis call; slower means a miss.")
    cache_prefix: str = Field("rs:", description="Prefix of every Redis key.")
    cache_breaker_failures: int = Field(3, ge=1, description="Consecutive Redis failures that open the breaker.")
    cache_breaker_cooldown_s: float = Field(2.0, gt=0, description="Seconds before an open breaker probes Redis.")

    # --- monitoring --------------------------------------------------------------------------
    monitoring: bool = Field(True, description="Reward distribution, drift and hacking monitors (off: none of them).")
    drift_window: int = Field(256, ge=10, description="Rolling window of recent scores for drift and hacking signals.")
    drift_reference_size: int = Field(256, ge=10, description="The first this-many scores become the drift reference.")
    drift_reference_file: str | None = Field(None, description="JSON rewards to use as the drift reference instead.")
    monitor_interval_s: float = Field(1.0, gt=0, description="Seconds between drift/hacking computations.")
    reward_clip_low: float | None = Field(None, description="Lower clip bound, for the share-at-bounds signal.")
    reward_clip_high: float | None = Field(None, description="Upper clip bound, for the share-at-bounds signal.")

    # --- HTTP --------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Interface to listen on (0.0.0.0 in containers).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    warmup: bool = Field(True, description="Run one batch per device and model at start-up before /readyz turns ready.")


def registry_errors(exc: ValidationError, raw: Any) -> list[str]:
    """Pydantic's errors as `models[1] (rm-b).dtype: message` lines: the entry by position and name."""
    lines = []
    for e in exc.errors():
        loc, where = list(e["loc"]), ""
        if len(loc) >= 2 and loc[0] in SECTIONS and isinstance(loc[1], int):
            try:
                name = raw[loc[0]][loc[1]].get("name")
            except (KeyError, IndexError, TypeError, AttributeError):
                name = None
            where = f"{loc[0]}[{loc[1]}]" + (f" ({name})" if name else "")
            loc = loc[2:]
        key = ".".join(str(p) for p in loc)
        msg = str(e["msg"]).removeprefix("Value error, ")
        named = re.match(r"([A-Za-z_][\w.]*): (.*)", msg, re.S)  # an entry's own check names its key first
        if named:
            key, msg = ".".join(p for p in (key, named.group(1)) if p), named.group(2)
        path = ".".join(p for p in (where, key) if p)
        lines.append(f"{path}: {msg}" if path else msg)
    return lines


def load_registry(path: str | Path) -> RegistryConfig:
    """Read and validate a registry YAML; ValueError lists every problem with its entry and key."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read registry {path}: {exc}") from None
    try:
        return RegistryConfig.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(f"invalid registry {path}:\n  " + "\n  ".join(registry_errors(exc, raw))) from None


# --- the quick path: `--model PATH` and its flags make a one-entry registry -----------------------------
# Flag name -> ModelEntry field. The entry's field carries the type, default and description, so the
# quick path's flags and RS_* variables are the registry's keys under the names they always had.
QUICK_FIELDS = {"model": "path", "served_name": "name", "dtype": "dtype", "devices": "devices",
                "max_length": "max_length", "default_truncation": "truncation", "backend": "backend",
                "trust_remote_code": "trust_remote_code", "revision": "revision"}


class _QuickBase(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RS_", extra="forbid", validate_default=True)

    @cached_property
    def served_as(self) -> str:
        if self.served_name:
            return self.served_name
        if Path(self.model).resolve() == DEFAULT_MODEL_DIR.resolve():
            return DEFAULT_MODEL_NAME
        return Path(self.model).name or self.model

    def entry(self) -> ModelEntry:
        values = {field: getattr(self, flag) for flag, field in QUICK_FIELDS.items() if flag != "served_name"}
        return ModelEntry(**(values | {"name": self.served_as}))


def _quick_field(flag: str, field: str):
    info = ModelEntry.model_fields[field]
    if flag == "served_name":  # optional here: the path's name by default
        return str | None, Field(None, description="Name reported by /v1/models and in responses "
                                                   "(default: the model path's name).")
    return info.annotation, info


QuickModel = create_model("QuickModel", __base__=_QuickBase,
                          **{flag: _quick_field(flag, field) for flag, field in QUICK_FIELDS.items()})


def quick(**values: Any) -> tuple[ServerSettings, RegistryConfig]:
    """Flat `rewardserve serve` values (server settings and --model flags) -> the two configurations.
    RS_* variables fill what `values` leaves out. With `config`, the --model flags are refused."""
    server = ServerSettings(**{k: v for k, v in values.items() if k in ServerSettings.model_fields})
    unknown = set(values) - set(ServerSettings.model_fields) - set(QUICK_FIELDS)
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}")
    model_values = {k: v for k, v in values.items() if k in QUICK_FIELDS}
    if server.config is not None:
        flags = sorted(model_values) + sorted(f for f in QUICK_FIELDS if f"RS_{f.upper()}" in _environ())
        if flags:
            names = ", ".join("--" + f.replace("_", "-") for f in dict.fromkeys(flags))
            raise ValueError(f"{names}: per-model settings; with --config, set them in the registry's entries")
        registry = load_registry(server.config)
    else:
        entry = QuickModel(**model_values).entry()
        judges = []
        if entry.name == DEFAULT_MODEL_NAME:  # with no model named, the embedded judge comes along
            judges.append(JudgeEntry(name=DEFAULT_JUDGE_NAME, dtype=entry.dtype, devices=entry.devices,
                                     backend=entry.backend))
        registry = RegistryConfig(models=[entry], judges=judges)
    registry.check(server)
    return server, registry


def _environ() -> dict[str, str]:
    import os

    return {k.upper(): v for k, v in os.environ.items()}
