#!/usr/bin/env bash
# OpenRLHF PPO/GRPO with rewardserve as the remote reward model. Start the server first:
#   rewardserve serve --host 0.0.0.0 --model /models/my-rm        (or --config registry.yaml)
# Each query OpenRLHF sends is the full prompt + response, chat template included; /get_reward
# tokenises it without adding special tokens, so BOS is never doubled. With a registry, pick the
# entry in the URL: http://rs:8000/get_reward?model=both
set -euo pipefail
RS=${RS:-http://127.0.0.1:8000}
python -m openrlhf.cli.train_ppo_ray \
  --pretrain "${POLICY:-Qwen/Qwen2.5-0.5B-Instruct}" \
  --reward.remote_url "$RS/get_reward" \
  --prompt_data "${DATA:-OpenRLHF/prompt-collection-v0.1}" --input_key context_messages --apply_chat_template \
  "$@"
