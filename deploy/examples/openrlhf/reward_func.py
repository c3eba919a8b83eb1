"""OpenRLHF's Python-file reward mode, scored by rewardserve.

    export REWARDSERVE_URL=http://rs:8000 REWARDSERVE_MODEL=rm-a     # the server, and a registry entry
    python -m openrlhf.cli.train_ppo_ray ... --reward.remote_url deploy/examples/openrlhf/reward_func.py

(Without a Python file, `--reward.remote_url http://rs:8000/get_reward` does the same over HTTP.)
OpenRLHF loads this file and calls reward_func(queries, prompts, labels) for each sample; it returns
the tensors OpenRLHF's own examples return.
"""

import torch

from rewardserve.client.adapters.openrlhf import reward_func as rewardserve_reward_func


def reward_func(queries, prompts, labels):
    out = rewardserve_reward_func(queries, prompts, labels)
    return {"rewards": torch.tensor(out["rewards"]), "scores": torch.tensor(out["scores"]),
            "extra_logs": {name: torch.tensor(values) for name, values in out["extra_logs"].items()}}
