"""Batch invariance on the packed CPU path: an item's score is bit-identical whatever its batch
mates, its position in the batch, the batch's size and the number of threads (verl's deterministic
mode turns batching off for want of exactly this), and whether or not batch mates that begin like
it made its beginning a shared prefix segment."""

from __future__ import annotations

import random

import pytest
import torch

from rewardserve.models.packed import Ops
from rewardserve.models.units import Unit
from tests.conftest import KERNEL_TOOL, attention_kernel_builds, require_tool
from tests.factories import MAX_POSITIONS
from tests.helpers import load


@pytest.fixture
def threads():
    """Set torch's thread count for one call, then restore it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _items(loaded, n: int, seed: int) -> list[Unit]:
    rng = random.Random(seed)
    vocab = [t for t in range(loaded.encoder.vocab_size) if t != loaded.pad_token_id]
    items = []
    openings = [[rng.choice(vocab) for _ in range(n)] for n in (5, 40)]  # as a chat template's, a shared prompt's
    for i in range(n):
        ids = [rng.choice(vocab) for _ in range(rng.choice([1, 2, 7, 63, 64, 65, 200, MAX_POSITIONS - 1])
                                                   if i % 3 else rng.randint(1, MAX_POSITIONS - 1))]
        if i % 4:  # most items begin like others: batches share those beginnings across items
            ids = (openings[i % 2] + ids)[:MAX_POSITIONS - 1]
        # every third item reads several positions, as a process reward model's steps do
        pools = tuple(sorted({rng.randrange(len(ids)) for _ in range(3)} | {len(ids) - 1})) if i % 3 == 1 else \
            (len(ids) - 1,)
        items.append(Unit.single(ids, pools))
    return items


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_scores_do_not_depend_on_batch_mates_position_size_or_threads(tiny_ckpt, threads, arch, dtype):
    require_tool(attention_kernel_builds(), KERNEL_TOOL)
    loaded = load(tiny_ckpt(arch, num_labels=2), backend="packed", dtype=dtype)  # two heads: K > 1
    backend = loaded.backends[0]
    assert backend.attention == "C++ kernel"
    items = _items(loaded, 30, seed=len(arch))
    threads(1)
    alone = [backend.score([u]).scores for u in items]
    rng = random.Random(0)
    checked = 0
    for trial in range(6):
        threads(1 + trial % 2)
        # trial 0: every item at once, more tokens than one CPU chunk of the block's MLP, so chunk
        # boundaries fall inside items; then random subsets in random orders
        picks = list(range(len(items))) if trial == 0 else rng.sample(range(len(items)), rng.randint(2, 12))
        rng.shuffle(picks)
        batch = [items[i] for i in picks]
        if trial == 0:
            assert sum(u.tokens for u in batch) > Ops.cpu_chunk_tokens
        scored = backend.score(batch)
        out = scored.scores
        if trial == 0:  # items' shared beginnings ran once
            assert scored.saved_tokens > 0
        row = 0
        for i in picks:
            got = out[row: row + items[i].rows]
            row += items[i].rows
            assert torch.equal(got, alone[i]), (f"item {i} ({items[i].tokens} tokens) in a batch of {len(batch)} "
                                                f"with {torch.get_num_threads()} threads: {got} vs alone {alone[i]}")
            checked += 1
    assert checked > 30
