"""Adapters that make rewardserve the reward of a training framework, built on the client:
trl.py (GRPOTrainer reward_funcs), verl.py (custom compute_score), openrlhf.py (reward_func file).
OpenRLHF's --reward.remote_url and slime's --rm-url need none: point them at /get_reward and
/v1/reward."""
