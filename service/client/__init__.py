"""rewardserve.client: a Python client for rewardserve (httpx only: no torch, no transformers), and
adapters that plug it into training frameworks (adapters/: TRL, verl, OpenRLHF).

    from rewardserve.client import RewardClient
    with RewardClient("http://127.0.0.1:8000") as rs:
        rewards = rs.rewards([("What is 37 + 45?", "82"), ("What is 37 + 45?", "83")])

It installs on its own: `pip install rewardserve-client` (its pyproject.toml is in this folder).
"""

from rewardserve.client.core import AsyncRewardClient, RewardClient, as_item
from rewardserve.client.errors import (
    BadRequest, ConnectionFailed, NotFound, Overloaded, RewardServeError, Timeout, Unauthorized, Unavailable,
)

__all__ = [
    "AsyncRewardClient", "RewardClient", "as_item", "RewardServeError", "BadRequest", "NotFound", "Unauthorized",
    "Overloaded", "Unavailable", "ConnectionFailed", "Timeout",
]
