"""verl: rewardserve as verl's custom reward function.

    reward.custom_reward_function.path=pkg://rewardserve.client.adapters.verl
    reward.custom_reward_function.name=compute_score
    +reward.custom_reward_function.reward_kwargs.rewardserve_url=http://rs:8000   (or REWARDSERVE_URL)
    +reward.custom_reward_function.reward_kwargs.rewardserve_model=rm-a           (or REWARDSERVE_MODEL)

verl's reward loop (verl/experimental/reward_loop/reward_manager/naive.py) awaits
`compute_score(data_source=, solution_str=, ground_truth=, extra_info=, **reward_kwargs)` once per
sample, concurrently. `solution_str` is the response alone; the prompt comes from the dataset's
`extra_info` (`prompt`, else `question`, as verl's GSM8K preprocessing stores it; `prompt_key`
picks another), as text or as a list of chat messages. `ground_truth` (text or a number) is the
item's `reference`: a verifier entry checks the response against it, a composite's verifier
components too. The answer is a dict: `score` (the reward); for ensembles each member's reward
(`member/<name>`) and `disagreement`; for composites each component (`component/<name>`); for
judges `p_yes`. verl logs every key.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from rewardserve.client.core import AsyncRewardClient

_clients: dict[tuple, AsyncRewardClient] = {}


def _client(url: str, model: str | None, api_key: str | None) -> AsyncRewardClient:
    """One client per event loop and server: verl runs the function in several workers' loops."""
    key = (id(asyncio.get_running_loop()), url, model, api_key)
    if key not in _clients:
        _clients[key] = AsyncRewardClient(url, model=model, api_key=api_key)
    return _clients[key]


def item_of(solution_str: str, extra_info: dict | None, prompt_key: str | None = None,
            ground_truth: Any = None) -> dict[str, Any]:
    info = extra_info or {}
    extra = {}
    if isinstance(ground_truth, str) or (isinstance(ground_truth, (int, float)) and not isinstance(ground_truth, bool)):
        extra["reference"] = str(ground_truth)
    keys = [prompt_key] if prompt_key else ["prompt", "question"]
    prompt = next((info[k] for k in keys if info.get(k) is not None), None)
    if prompt is None:
        raise KeyError(f"no prompt in extra_info (looked for {keys}; it has {sorted(info)}): put the prompt there "
                       "in your dataset's preprocessing, or name its key with prompt_key")
    if isinstance(prompt, list):  # chat messages
        return {"messages": [dict(m) for m in prompt] + [{"role": "assistant", "content": solution_str}]} | extra
    return {"prompt": str(prompt), "response": solution_str} | extra


async def compute_score(data_source: str | None = None, solution_str: str = "", ground_truth: Any = None,
                        extra_info: dict | None = None, *, rewardserve_url: str | None = None,
                        rewardserve_model: str | None = None, rewardserve_api_key: str | None = None,
                        prompt_key: str | None = None, **kwargs: Any) -> dict[str, float]:
    """verl's custom reward function signature; see the module's docstring for the settings."""
    url = rewardserve_url or os.environ.get("REWARDSERVE_URL", "http://127.0.0.1:8000")
    model = rewardserve_model or os.environ.get("REWARDSERVE_MODEL") or None
    api_key = rewardserve_api_key or os.environ.get("REWARDSERVE_API_KEY") or None
    [result] = await _client(url, model, api_key).score([item_of(solution_str, extra_info, prompt_key,
                                                                 ground_truth)])
    out = {"score": result["reward"]}
    for name, value in (result.get("members") or {}).items():
        out[f"member/{name}"] = value
    for name, value in (result.get("components") or {}).items():
        out[f"component/{name}"] = value
    if result.get("p_yes") is not None:
        out["p_yes"] = result["p_yes"]
    if result.get("disagreement") is not None:
        out["disagreement"] = result["disagreement"]
    return out
