"""Loading: dtype, devices, max length, refusing checkpoints that are not reward models."""

from __future__ import annotations

import pytest
import torch

from rewardserve.config import ModelEntry, RegistryConfig, ServerSettings, quick
from rewardserve.models.loading import resolve_devices, resolve_dtype
from tests.conftest import KERNEL_TOOL, attention_kernel_builds, require_tool
from tests.helpers import load, score_ids


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "sdpa"])
def test_bfloat16_on_cpu_scores_close_to_float32(tiny_ckpt, kernel):
    """bf16 on CPU: attention in the C++ kernel (in fp32, converted each way) or in bf16 SDPA."""
    if kernel:
        require_tool(attention_kernel_builds(), KERNEL_TOOL)
    path = tiny_ckpt("qwen3")
    seqs = [[5, 6, 7, 8], list(range(10, 60)), [9] * 100]
    f32 = score_ids(load(path, dtype="float32"), seqs).scores
    bf16_model = load(path, dtype="bfloat16", attention_kernel=kernel)
    assert bf16_model.dtype == torch.bfloat16
    assert bf16_model.attention == ("C++ kernel" if kernel else "SDPA")
    bf16 = score_ids(bf16_model, seqs).scores
    assert bf16.dtype == torch.float32  # the head's output always leaves as fp32
    assert (bf16 - f32).abs().max().item() < 0.1 * f32.abs().max().item()


def test_max_length_is_the_smallest_of_setting_model_and_batch_budget(tiny_ckpt):
    path = tiny_ckpt("gpt2")  # n_positions = 512
    assert load(path).max_length == 512
    assert load(path, max_length=100).max_length == 100
    assert load(path, max_batch_tokens=300).max_length == 300


def test_device_and_dtype_resolution():
    assert resolve_devices("cpu") == [torch.device("cpu")]
    if not torch.cuda.is_available():
        assert resolve_devices("auto") == [torch.device("cpu")]
        assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_devices("cuda:0")
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16


def test_causal_lm_checkpoint_is_refused_not_given_a_random_head(tiny_ckpt, tmp_path):
    import json
    import shutil

    src = tiny_ckpt("llama")
    dst = tmp_path / "lm"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not a reward model"):
        load(dst)


def test_unreachable_hub_id_fails_with_the_id_in_the_message():
    with pytest.raises(OSError, match="no-such-org/no-such-reward-model"):
        load("no-such-org/no-such-reward-model")


def test_settings_validation():
    with pytest.raises(ValueError, match=r"models\[0\] \(m\)\.max_length: 20000 exceeds the batch token budget"):
        RegistryConfig(models=[ModelEntry(name="m", max_length=20000)]).check(ServerSettings(max_batch_tokens=16384))
    with pytest.raises(ValueError, match="max_length"):
        quick(max_length=20000, max_batch_tokens=16384)
    with pytest.raises(ValueError):
        ServerSettings(max_batch_tokens=0)
