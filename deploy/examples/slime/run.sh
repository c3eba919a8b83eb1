#!/usr/bin/env bash
# slime with rewardserve as the remote reward model. slime posts {"prompt", "response", "label"} once
# per sample to --rm-url and keeps the field --reward-key names: rewardserve's /v1/reward answers
# {"reward", "tokens", ...}. With a registry, pick the entry in the URL (?model=both).
set -euo pipefail
RS=${RS:-http://127.0.0.1:8000}
python train.py \
  --rm-type remote_rm --rm-url "$RS/v1/reward" --reward-key reward \
  "$@"
