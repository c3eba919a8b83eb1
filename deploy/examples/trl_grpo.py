"""GRPO with TRL, rewarded by rewardserve.

    make serve                                   # another terminal: the embedded arithmetic reward model
    pip install trl ./service/client             # the trainer's environment: TRL and rewardserve's client
    python deploy/examples/trl_grpo.py --policy Qwen/Qwen2.5-0.5B-Instruct --steps 100

The policy learns the embedded model's task (arithmetic, unit conversions): every completion of a
batch is scored by the server, the completions of one prompt sharing its tokens there. Options:
--model picks a registry entry, --conversational uses chat-formatted prompts, --async-reward runs
the reward function as a coroutine (TRL awaits async reward functions concurrently).
"""

from __future__ import annotations

import argparse
import json
import random

from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from rewardserve.client.adapters.trl import trl_reward


def arithmetic(n: int, conversational: bool, seed: int = 0) -> Dataset:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        question = f"What is {a} + {b}?"
        prompt = [{"role": "user", "content": question}] if conversational else question
        rows.append({"prompt": prompt, "answer": str(a + b), "prompt_id": f"q{i}"})
    return Dataset.from_list(rows)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="rewardserve's address")
    ap.add_argument("--model", default=None, help="registry entry (default: the server's default)")
    ap.add_argument("--policy", default="Qwen/Qwen2.5-0.5B-Instruct", help="policy checkpoint: hub id or path")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--generations", type=int, default=4, help="completions per prompt")
    ap.add_argument("--max-completion-length", type=int, default=32)
    ap.add_argument("--output-dir", default="grpo-rewardserve")
    ap.add_argument("--conversational", action="store_true")
    ap.add_argument("--async-reward", action="store_true")
    ap.add_argument("--cpu", action="store_true", help="train on the CPU")
    args = ap.parse_args(argv)

    reward = trl_reward(args.url, model=args.model, asynchronous=args.async_reward,
                        columns={"prompt_id": "group"})  # a dataset column copied into every item
    config = GRPOConfig(output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=args.generations,
                        num_generations=args.generations, max_completion_length=args.max_completion_length,
                        logging_steps=1, save_strategy="no", report_to=[], use_cpu=args.cpu, seed=0)
    trainer = GRPOTrainer(model=args.policy, reward_funcs=[reward], args=config,
                          train_dataset=arithmetic(args.prompts, args.conversational))
    trainer.train()
    logged = [h for h in trainer.state.log_history if "rewards/rewardserve/mean" in h]
    print(json.dumps([{"step": h["step"], "reward": h["rewards/rewardserve/mean"]} for h in logged]))
    return logged


if __name__ == "__main__":
    main()
