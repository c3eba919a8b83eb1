"""The one Settings object of rewardserve.

Every field is an `RS_*` environment variable (``max_batch_tokens`` -> ``RS_MAX_BATCH_TOKENS``) and a
`rewardserve serve` flag (``--max-batch-tokens``); the CLI builds its flags from this model, so the two
can never drift apart. Only `cli.py` and `app.py` construct it; everything else receives it.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "default-rm"
DEFAULT_MODEL_NAME = "rewardserve-default"

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Truncation = Literal["left", "right", "error"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RS_", extra="forbid", validate_default=True)

    # --- model -------------------------------------------------------------------------------
    model: str = Field(
        str(DEFAULT_MODEL_DIR),
        description="Local path or Hugging Face hub id of an AutoModelForSequenceClassification checkpoint.",
    )
    served_name: str | None = Field(
        None, description="Name reported by /v1/models and in responses (default: the model path's name)."
    )
    dtype: Dtype = Field("auto", description="Weights dtype: auto = bfloat16 on GPU, float32 on CPU.")
    devices: str = Field("auto", description="'auto' (all visible GPUs, else CPU), 'cpu', or e.g. 'cuda:0,cuda:1'.")
    max_length: int | None = Field(
        None, ge=1, description="Longest item in tokens (default: the model's max_position_embeddings)."
    )
    default_truncation: Truncation = Field(
        "error", description="Policy for over-long items when the request does not say: left, right or error (413)."
    )
    backend: Literal["auto", "packed", "hf"] = Field(
        "auto", description="auto: the packed fast path for Llama/Qwen2/Qwen3/Mistral, else padded HF."
    )
    trust_remote_code: bool = Field(False, description="Allow custom modelling code from the checkpoint.")
    revision: str | None = Field(None, description="Hub revision, when `model` is a hub id.")
    cpu_threads: int | None = Field(None, ge=1, description="torch threads for CPU inference (default: all cores).")
    cpu_attention_kernel: bool = Field(
        True, description="On CPU (fp32, bf16), run attention in rewardserve's C++ kernel (compiled with g++ on "
                          "first load; torch SDPA when off or when it cannot be built)."
    )
    cpu_keep_memory: bool = Field(
        True, description="On CPU, make glibc reuse freed activation memory instead of page-faulting it afresh "
                          "every batch (a fifth faster here; RSS stays at its peak)."
    )

    # --- batching ----------------------------------------------------------------------------
    max_batch_tokens: int = Field(16384, ge=1, description="A batch closes when it holds this many tokens.")
    max_batch_items: int = Field(256, ge=1, description="A batch closes when it holds this many items.")
    max_wait_ms: float = Field(2.0, ge=0, description="A batch closes this long after its first item arrived.")
    max_queued_tokens: int = Field(
        1_000_000, ge=1, description="Admission control: beyond this many queued tokens requests get 429."
    )
    max_items_per_request: int = Field(4096, ge=1, description="Largest items list one request may carry (413).")
    max_candidates: int = Field(256, ge=1, description="Most candidates one best-of-N request may rank (413).")

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
    warmup: bool = Field(True, description="Run one batch at start-up before /readyz turns ready.")

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        if self.max_length is not None and self.max_length > self.max_batch_tokens:
            raise ValueError(
                f"max_length ({self.max_length}) exceeds max_batch_tokens ({self.max_batch_tokens}): "
                "the longest item must fit in one batch"
            )
        return self

    @cached_property
    def model_name(self) -> str:
        if self.served_name:
            return self.served_name
        if Path(self.model).resolve() == DEFAULT_MODEL_DIR.resolve():
            return DEFAULT_MODEL_NAME
        return Path(self.model).name or self.model
