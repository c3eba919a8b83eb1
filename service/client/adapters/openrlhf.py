"""OpenRLHF: rewardserve behind OpenRLHF's Python-file reward mode.

OpenRLHF's `--reward.remote_url http://rs:8000/get_reward` needs nothing from here: /get_reward
speaks its protocol. Its other mode loads a .py file and calls `reward_func(queries, prompts,
labels)` (openrlhf/utils/agent.py: synchronously, one sample at a time, from a thread), which must
return `{"rewards", "scores", "extra_logs"}`. `reward_func` below hands its arguments to /get_reward
(each query is the full prompt + response as decoded, special tokens included; the labels are the
ground truths of verifier entries, which check the query's tail after its prompt) and returns lists;
deploy/examples/openrlhf/reward_func.py wraps them as the torch tensors OpenRLHF's examples return.
Settings: REWARDSERVE_URL, REWARDSERVE_MODEL, REWARDSERVE_API_KEY.
"""

from __future__ import annotations

import os
from urllib.parse import quote
from typing import Any

from rewardserve.client.core import RewardClient

_client: RewardClient | None = None


def _shared() -> RewardClient:
    global _client
    if _client is None:
        _client = RewardClient(os.environ.get("REWARDSERVE_URL", "http://127.0.0.1:8000"),
                               model=os.environ.get("REWARDSERVE_MODEL") or None,
                               api_key=os.environ.get("REWARDSERVE_API_KEY") or None)
    return _client


def reward_func(queries: list[str], prompts: list[Any] | None = None, labels: list[Any] | None = None,
                client: RewardClient | None = None) -> dict[str, Any]:
    """OpenRLHF's reward_func: the queries' rewards (and, for ensembles, members and disagreement in
    extra_logs), as lists aligned with `queries`."""
    if not queries:
        return {"rewards": [], "scores": [], "extra_logs": {}}
    rs = client or _shared()
    model = rs.aio.model
    body: dict[str, Any] = {"query": list(queries)}
    if prompts:
        body["prompts"] = list(prompts)
    if labels:
        body["labels"] = list(labels)
    return rs.post("/get_reward" + (f"?model={quote(model)}" if model else ""), body)
