"""TRL: rewardserve as a reward function of `GRPOTrainer(reward_funcs=[...])`.

    from rewardserve.client.adapters.trl import trl_reward
    trainer = GRPOTrainer(model=..., reward_funcs=[trl_reward("http://rs:8000", model="rm-a")], ...)

TRL calls a reward function with the batch's `prompts` and `completions` (strings, or for
conversational datasets lists of messages) and every dataset column as a keyword argument
(trl/trainer/grpo_trainer.py). Each completion is scored as the response to its prompt: plain text
as a prompt/response item, a conversation as its messages followed by the completion's. Completions
of one prompt share it, so the server computes the prompt once. `columns` copies dataset columns
into the items, e.g. `{"ground_truth": "reference"}` for entries that check answers. The returned
function's `__name__` is `name`: TRL logs `rewards/<name>/mean`.
"""

from __future__ import annotations

from typing import Any, Callable

from rewardserve.client.core import AsyncRewardClient, RewardClient


def items_of(prompts: list, completions: list, columns: dict[str, str] | None, kwargs: dict[str, Any]) -> list[dict]:
    """One API item per completion."""
    items = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        if isinstance(prompt, list):  # conversational: messages, and the completion's messages
            tail = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
            it: dict[str, Any] = {"messages": [dict(m) for m in prompt] + [dict(m) for m in tail]}
        else:
            it = {"prompt": prompt, "response": completion}
        for column, field in (columns or {}).items():
            if column not in kwargs:
                raise KeyError(f"dataset column {column!r} is not in the batch; it has {sorted(kwargs)}")
            it[field] = kwargs[column][i]
        items.append(it)
    return items


def trl_reward(url: str = "http://127.0.0.1:8000", *, model: str | None = None, name: str = "rewardserve",
               columns: dict[str, str] | None = None, asynchronous: bool = False, **client_options: Any) -> Callable:
    """A TRL reward function scoring with the rewardserve at `url` (`model`: the registry entry).
    `asynchronous=True` returns an `async def` one, which TRL runs concurrently with other async
    reward functions. `client_options` go to the client (api_key, timeout, batch_size, ...)."""
    if asynchronous:
        state: dict[str, AsyncRewardClient] = {}

        async def reward(prompts, completions, **kwargs) -> list[float]:
            if "client" not in state:  # made on the loop TRL runs it on
                state["client"] = AsyncRewardClient(url, model=model, **client_options)
            return await state["client"].rewards(items_of(prompts, completions, columns, kwargs))
    else:
        client = RewardClient(url, model=model, **client_options)

        def reward(prompts, completions, **kwargs) -> list[float]:
            return client.rewards(items_of(prompts, completions, columns, kwargs))

    reward.__name__ = reward.__qualname__ = name
    return reward
