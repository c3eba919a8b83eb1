"""Scores are the model's scores: our batched path equals AutoModelForSequenceClassification run on
each item alone (fp32, max abs difference <= 1e-4), whatever the batch, the tokenizer's padding side,
the presence of a pad token, or the architecture."""

from __future__ import annotations

import logging
import random

import pytest
import torch
from transformers import AutoModelForSequenceClassification, LlamaConfig

from rewardserve.models import packed
from rewardserve.models.loading import choose_backend
from rewardserve.models.packed import Ops
from tests.conftest import KERNEL_TOOL, attention_kernel_builds, require_tool
from tests.factories import ARCHS, MAX_POSITIONS
from tests.helpers import load, score_ids

TOL = 1e-4


def _hf_alone(model, seqs: list[list[int]]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(input_ids=torch.tensor([s])).logits.float() for s in seqs])


def _random_seqs(vocab: int, lengths: list[int], seed: int, avoid: set[int]) -> list[list[int]]:
    rng = random.Random(seed)
    ids = [t for t in range(vocab) if t not in avoid]
    return [[rng.choice(ids) for _ in range(n)] for n in lengths]


LENGTHS = [1, 2, 7, 33, 64, 100, 151, 299, 300, 5, 48, 17]
PACKED_ARCHS = ("llama", "qwen2", "qwen3", "mistral")
CASES = [(a, b) for a in ARCHS for b in (("packed", "hf") if a in PACKED_ARCHS else ("hf",))]


@pytest.mark.parametrize("arch,backend", CASES)
@pytest.mark.parametrize("pad_token", [True, False], ids=["pad", "nopad"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batched_scores_equal_hf_alone(tiny_ckpt, arch, backend, pad_token, padding_side):
    path = tiny_ckpt(arch, pad_token=pad_token, padding_side=padding_side)
    loaded = load(path, backend=backend)
    assert loaded.backend == backend
    hf = AutoModelForSequenceClassification.from_pretrained(path).eval()
    pad_id = hf.config.pad_token_id
    seqs = _random_seqs(loaded.encoder.vocab_size, LENGTHS, seed=len(arch), avoid={pad_id} if pad_id is not None else set())
    ref = _hf_alone(hf, seqs)
    assert ref.std() > 1e-3, "rewards should vary between inputs for this test to mean anything"

    mixed = score_ids(loaded, seqs).scores
    assert (mixed - ref).abs().max().item() <= TOL

    # batch invariance: the same item in other company (reversed, a subset, alone) gets the same reward
    rev = score_ids(loaded, seqs[::-1]).scores.flip(0)
    sub = score_ids(loaded, seqs[3:7]).scores
    assert (rev - mixed).abs().max().item() <= 1e-5
    assert (sub - mixed[3:7]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("attention", ["kernel", "sdpa"])
@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "plain-torch"])
@pytest.mark.parametrize("arch", PACKED_ARCHS)
def test_cpu_token_chunks_match_hf_wherever_the_chunks_cut(tiny_ckpt, arch, onednn, attention, monkeypatch, caplog):
    """On CPU everything after attention runs a chunk of tokens at a time, gate and up projected
    apart, on packed oneDNN weights (or, where the oneDNN probe fails, F.linear on the modules'
    weights). With 64-token chunks every long item straddles chunk boundaries, and putting a
    37-token item first moves every boundary. Attention runs in the compiled kernel (64-query
    blocks: the same boundaries) or, without a compiler, in torch's SDPA."""
    monkeypatch.setattr(Ops, "cpu_chunk_tokens", 64)
    if not onednn:
        monkeypatch.setattr(packed, "onednn_works", lambda dtype: False)
    if attention == "kernel":
        require_tool(attention_kernel_builds(), KERNEL_TOOL)
    path = tiny_ckpt(arch)
    with caplog.at_level(logging.INFO, logger="rewardserve.models.loading"):
        loaded = load(path, backend="packed", attention_kernel=attention == "kernel")
    assert ("attention: C++ kernel" if attention == "kernel" else "attention: SDPA") in caplog.text
    backend = loaded.backends[0]
    assert backend.model.ops.onednn is onednn and backend.model.ops.chunk_tokens == 64
    assert (backend.model.ops.attention_kernel is not None) is (attention == "kernel")
    hf = AutoModelForSequenceClassification.from_pretrained(path).eval()
    seqs = _random_seqs(loaded.encoder.vocab_size, LENGTHS, seed=7, avoid={hf.config.pad_token_id})
    mixed = score_ids(loaded, seqs).scores
    assert (mixed - _hf_alone(hf, seqs)).abs().max().item() <= TOL
    shifted = score_ids(loaded, _random_seqs(loaded.encoder.vocab_size, [37], 8, {hf.config.pad_token_id}) + seqs)
    assert (shifted.scores[1:] - mixed).abs().max().item() <= 1e-5


def test_cpu_path_packs_projection_weights_once_and_releases_the_originals(tiny_ckpt):
    model = load(tiny_ckpt("qwen2"), backend="packed").backends[0].model
    block = model.blocks[0]
    assert {name: w.is_mkldnn for name, (w, _) in block.gemm.items()} == dict.fromkeys(
        ("qkv", "o", "gate", "up", "down"), True)
    assert block.gemm["qkv"][1] is not None  # Qwen2's q/k/v biases stay plain tensors beside the packed weight
    assert all(layer.weight.numel() == 0 for layer in (block.wqkv, block.wo, block.w_gate_up, block.w_down))
    with pytest.raises(AssertionError, match="once per model"):
        model.to_device(torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("arch,backend", [("llama", "packed"), ("llama", "hf"), ("gpt2", "hf")])
def test_trailing_pad_tokens_pool_where_hf_pools(tiny_ckpt, arch, backend):
    """An item that itself ends in pad ids is pooled at its last non-pad token, as HF does alone."""
    path = tiny_ckpt(arch, pad_token=True)
    loaded = load(path, backend=backend)
    hf = AutoModelForSequenceClassification.from_pretrained(path).eval()
    pad = hf.config.pad_token_id
    seqs = [[5, 6, 7, pad, pad], [8, 9, 10, 11, 12, 13, 14], [pad, 20, 21]]
    ref = _hf_alone(hf, seqs)
    ours = score_ids(loaded, seqs).scores
    assert (ours - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("arch", ["qwen3", "gemma2"])
def test_multi_head_models_return_every_head(tiny_ckpt, arch):
    path = tiny_ckpt(arch, num_labels=3)
    loaded = load(path)
    assert loaded.backend == ("packed" if arch == "qwen3" else "hf")
    hf = AutoModelForSequenceClassification.from_pretrained(path).eval()
    seqs = _random_seqs(loaded.encoder.vocab_size, [3, 40, 90], seed=1, avoid={hf.config.pad_token_id})
    ours = score_ids(loaded, seqs).scores
    assert ours.shape == (3, 3)
    assert (ours - _hf_alone(hf, seqs)).abs().max().item() <= TOL


def test_small_batch_token_budget_splits_into_micro_batches_without_changing_scores(tiny_ckpt):
    path = tiny_ckpt("mistral")
    loaded = load(path, max_batch_tokens=320, backend="hf")
    hf = AutoModelForSequenceClassification.from_pretrained(path).eval()
    seqs = _random_seqs(loaded.encoder.vocab_size, [300, 10, 200, 50, 299, 3], seed=2, avoid={hf.config.pad_token_id})
    out = score_ids(loaded, seqs)
    assert out.computed_positions <= sum(300 for _ in seqs)  # sorted micro-batches, never one 6x300 block
    assert (out.scores - _hf_alone(hf, seqs)).abs().max().item() <= TOL


ROPES = {
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    "yarn": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0},
    "theta": {"rope_type": "default", "rope_theta": 1000000.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0},
}


@pytest.mark.parametrize("rope", sorted(ROPES))
def test_packed_path_follows_rope_scaling(tiny_ckpt, rope):
    """Up to the longest item served: the encoder caps items at max_position_embeddings, which is
    also where HF's dynamic scaling would start to rescale."""
    path = tiny_ckpt("llama", rope_parameters=ROPES[rope])
    loaded = load(path, backend="packed")
    assert loaded.max_length == MAX_POSITIONS
    hf = AutoModelForSequenceClassification.from_pretrained(path).eval()
    seqs = _random_seqs(loaded.encoder.vocab_size, [5, 90, 300, 511, MAX_POSITIONS], seed=4,
                        avoid={hf.config.pad_token_id})
    assert (score_ids(loaded, seqs).scores - _hf_alone(hf, seqs)).abs().max().item() <= TOL


def test_a_rope_type_the_fast_path_lacks_falls_back_to_hf_with_the_reason():
    config = LlamaConfig()
    config.rope_parameters = {"rope_type": "longrope", "rope_theta": 10000.0}
    kind, why = choose_backend("auto", config, None)
    assert kind == "hf" and "'longrope' is not one of" in why and "dynamic" in why
    with pytest.raises(ValueError, match="longrope"):
        choose_backend("packed", config, None)


def test_auto_backend_picks_packed_for_llama_family_and_hf_otherwise(tiny_ckpt):
    assert load(tiny_ckpt("qwen2")).backend == "packed"
    assert load(tiny_ckpt("gpt2")).backend == "hf"
    with pytest.raises(ValueError, match="cannot serve"):
        load(tiny_ckpt("gemma2"), backend="packed")


@pytest.mark.parametrize("arch,backend", CASES)
def test_through_the_scorer_seam_rewards_equal_hf_alone(tiny_ckpt, arch, backend):
    """The same contract end to end below HTTP: items -> scorer -> scheduler (groups, single-flight,
    cache) -> batcher -> device, for every architecture and backend."""
    import asyncio

    from rewardserve.api.schemas import Item
    from rewardserve.config import quick
    from rewardserve.engine.registry import Registry
    from rewardserve.monitoring.metrics import Metrics
    from rewardserve.scorers.base import Call

    path = tiny_ckpt(arch)
    hf = AutoModelForSequenceClassification.from_pretrained(path).eval()
    pad = hf.config.pad_token_id
    prompt = _random_seqs(hf.config.vocab_size, [40], seed=9, avoid={pad})[0]
    tails = _random_seqs(hf.config.vocab_size, [1, 9, 60, 3], seed=10, avoid={pad})
    seqs = [prompt + t for t in tails] + _random_seqs(hf.config.vocab_size, [70, 2], seed=11, avoid={pad})
    seqs.append(seqs[1])  # a duplicate within the request

    async def run():
        settings, registry = quick(model=str(path), backend=backend, warmup=False, monitoring=False, max_wait_ms=1)
        reg = Registry(settings, registry, Metrics())
        await reg.start()
        try:
            items = [Item(input_ids=s) for s in seqs]
            return [r.reward for r in await reg.get(None).score(items, Call(groups=[[0, 1, 2, 3]]))]
        finally:
            await reg.stop()

    ours = torch.tensor(asyncio.run(run()))
    assert (ours - _hf_alone(hf, seqs)[:, 0]).abs().max().item() <= TOL
