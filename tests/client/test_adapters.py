"""The trainer adapters against a real server: TRL's GRPOTrainer training for real with rewardserve as
its reward, verl's reward function signature, OpenRLHF's reward_func file."""

from __future__ import annotations

import asyncio
import importlib.util
import math
import runpy
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rewardserve.client import RewardClient
from rewardserve.client.adapters import openrlhf, verl
from rewardserve.client.adapters.trl import trl_reward
from rewardserve.config import RegistryConfig, ServerSettings
from tests.factories import build_tokenizer
from tests.server import serve

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "deploy" / "examples"


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    registry = RegistryConfig.model_validate({
        "models": [{"name": "rm", "path": str(tiny_ckpt("llama"))}, {"name": "rm2", "path": str(tiny_ckpt("qwen2"))}],
        "ensembles": [{"name": "both", "members": ["rm", "rm2"], "aggregate": "min"}],
        "verifiers": [{"name": "math", "type": "math"}],
        "composites": [{"name": "hybrid", "components": {"ok": "math", "rm": "rm"}, "total": "ok + 0.1 * rm"}],
    })
    with serve(ServerSettings(max_wait_ms=2), registry) as s:
        yield s


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """A tiny random causal LM with the test tokenizer (the reward models' own)."""
    path = tmp_path_factory.mktemp("policy")
    tok = build_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _requests(server) -> float:
    return server.metric("rewardserve_requests_total", model="rm", endpoint="/v1/score", status="200")


@pytest.mark.parametrize("conversational", [False, True], ids=["plain", "chat"])
@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_grpo_trainer_trains_two_steps_on_rewardserve_rewards(server, policy, conversational, asynchronous):
    sys.path.insert(0, str(EXAMPLES))
    try:
        example = runpy.run_path(str(EXAMPLES / "trl_grpo.py"))
    finally:
        sys.path.remove(str(EXAMPLES))
    from trl import GRPOConfig, GRPOTrainer

    seen: list[tuple] = []

    def record(prompts, completions, **kwargs):  # weight 0: sees what the trainer scored, changes nothing
        seen.extend(zip(prompts, completions, kwargs["prompt_id"]))
        return [0.0] * len(prompts)

    reward = trl_reward(server.url, model="rm", asynchronous=asynchronous, columns={"prompt_id": "group"})
    config = GRPOConfig(output_dir=str(policy / "out"), max_steps=2, per_device_train_batch_size=4, num_generations=4,
                        max_completion_length=8, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                        seed=0, reward_weights=[1.0, 0.0])
    before = _requests(server)
    trainer = GRPOTrainer(model=str(policy), reward_funcs=[reward, record], args=config,
                          train_dataset=example["arithmetic"](8, conversational))
    trainer.train()
    assert _requests(server) >= before + 2  # the server scored the rollouts, a request per step
    logged = [h["rewards/rewardserve/mean"] for h in trainer.state.log_history if "rewards/rewardserve/mean" in h]
    assert len(logged) == 2 and len(seen) == 8
    with RewardClient(server.url, model="rm") as rs:  # the same completions, scored again without the cache
        items = [{"messages": p + c} if conversational else {"prompt": p, "response": c} for p, c, _ in seen]
        again = rs.rewards(items, cache=False)
    for step, mean in enumerate(logged):
        assert mean == pytest.approx(sum(again[4 * step: 4 * step + 4]) / 4, abs=1e-4)


def test_the_trl_example_runs_end_to_end(server, policy, capsys):
    sys.path.insert(0, str(EXAMPLES))
    try:
        main = runpy.run_path(str(EXAMPLES / "trl_grpo.py"))["main"]
    finally:
        sys.path.remove(str(EXAMPLES))
    logged = main(["--url", server.url, "--policy", str(policy), "--steps", "1", "--prompts", "4",
                   "--max-completion-length", "6", "--output-dir", str(policy / "example"), "--cpu",
                   "--conversational"])
    assert len(logged) == 1 and math.isfinite(logged[0]["rewards/rewardserve/mean"])
    assert '"reward"' in capsys.readouterr().out


def test_verl_compute_score(server):
    # verl-project/verl verl/experimental/reward_loop/reward_manager/naive.py awaits, per sample,
    # compute_score(data_source=, solution_str=, ground_truth=, extra_info=, **reward_kwargs)
    async def run():
        calls = [verl.compute_score(data_source="gsm8k", solution_str=str(n), ground_truth="4",
                                    extra_info={"split": "train", "index": n, "question": "What is 2+2?"},
                                    rewardserve_url=server.url, rewardserve_model="rm") for n in range(6)]
        chat = verl.compute_score(data_source="x", solution_str="4", ground_truth=None,
                                  extra_info={"prompt": [{"role": "user", "content": "What is 2+2?"}]},
                                  rewardserve_url=server.url, rewardserve_model="both")
        return await asyncio.gather(*calls), await chat

    scores, ens = asyncio.run(run())
    with RewardClient(server.url) as rs:
        ref = rs.rewards([("What is 2+2?", str(n)) for n in range(6)], model="rm", cache=False)
        [both] = rs.score([{"messages": [{"role": "user", "content": "What is 2+2?"},
                                         {"role": "assistant", "content": "4"}]}], model="both")
    assert [s["score"] for s in scores] == pytest.approx(ref, abs=1e-5) and all(set(s) == {"score"} for s in scores)
    assert ens == {"score": both["reward"], "member/rm": both["members"]["rm"], "member/rm2": both["members"]["rm2"],
                   "disagreement": both["disagreement"]}
    with pytest.raises(KeyError, match="no prompt in extra_info"):
        asyncio.run(verl.compute_score("gsm8k", "4", "4", {"split": "train"}, rewardserve_url=server.url))


def test_verl_ground_truth_reaches_verifiers_and_composites(server):
    async def run(model, answer, truth):
        return await verl.compute_score(data_source="gsm8k", solution_str=answer, ground_truth=truth,
                                        extra_info={"question": "What is 2+2?"}, rewardserve_url=server.url,
                                        rewardserve_model=model)

    right, wrong, number = (asyncio.run(run("math", a, t)) for a, t in (("So \\boxed{4}", "4"), ("5", "4"),
                                                                        ("4", 4)))
    hybrid = asyncio.run(run("hybrid", "The answer is 4", "4"))
    assert (right, wrong, number) == ({"score": 1.0}, {"score": 0.0}, {"score": 1.0})
    assert set(hybrid) == {"score", "component/ok", "component/rm"} and hybrid["component/ok"] == 1.0
    assert hybrid["score"] == pytest.approx(1.0 + 0.1 * hybrid["component/rm"])


def test_openrlhf_labels_reach_verifiers(server):
    query = "<s><|user|>\nWhat is 2+2?</s>\n<|assistant|>\nIt is 4</s>\n"
    prompt = "<s><|user|>\nWhat is 2+2?</s>\n<|assistant|>\n"
    with RewardClient(server.url, model="math") as rs:
        out = openrlhf.reward_func([query, query.replace("4", "5")], [prompt, prompt], ["4", "4"], client=rs)
    assert out["rewards"] == [1.0, 0.0]


def test_openrlhf_reward_func_file(server, monkeypatch):
    query = "<s><|user|>\nWhat is 2+2?</s>\n<|assistant|>\n4</s>\n"
    with server.client() as c:
        http = c.post("/get_reward", json={"query": [query], "prompts": ["What is 2+2?"], "labels": ["4"]}).json()
    with RewardClient(server.url) as rs:
        direct = openrlhf.reward_func([query], ["What is 2+2?"], ["4"], client=rs)
    assert direct == http
    # the example file, loaded as OpenRLHF loads it (openrlhf/utils/agent.py: spec_from_file_location)
    monkeypatch.setenv("REWARDSERVE_URL", server.url)
    monkeypatch.setenv("REWARDSERVE_MODEL", "both")
    monkeypatch.setattr(openrlhf, "_client", None)
    spec = importlib.util.spec_from_file_location("reward_func", EXAMPLES / "openrlhf" / "reward_func.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.reward_func([query], ["What is 2+2?"], ["4"])
    assert isinstance(out["rewards"], torch.Tensor) and out["rewards"].shape == (1,)
    assert set(out["extra_logs"]) == {"rm", "rm2", "disagreement"}
    assert out["rewards"].item() == pytest.approx(min(out["extra_logs"]["rm"].item(), out["extra_logs"]["rm2"].item()))
