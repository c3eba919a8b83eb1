"""Shared-prefix execution (packed: tree-shaped batch; HF: prompt KV cache) equals scoring each
(prompt + response) on its own."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from rewardserve.models.units import Unit, lone
from tests.helpers import load
from tests.models.test_parity import CASES, TOL, _hf_alone


@pytest.mark.parametrize("arch,backend_kind", CASES)
@pytest.mark.parametrize("prefix_len,suffix_lens", [(40, [1, 2, 90, 7, 200]), (120, [3]), (5, [60, 1, 33])],
                         ids=["mixed", "n1", "short-prefix"])
def test_shared_units_equal_full_sequences_and_hf(tiny_ckpt, arch, backend_kind, prefix_len, suffix_lens):
    path = tiny_ckpt(arch)
    loaded = load(path, backend=backend_kind)
    backend = loaded.backends[0]
    assert backend.shares_prefix
    rng = random.Random(prefix_len + len(suffix_lens))
    pad = loaded.pad_token_id
    vocab = [t for t in range(loaded.encoder.vocab_size) if t != pad]
    prefix = [rng.choice(vocab) for _ in range(prefix_len)]
    suffixes = [[rng.choice(vocab) for _ in range(n)] for n in suffix_lens]
    full = [prefix + s for s in suffixes]
    plain_extra = [rng.choice(vocab) for _ in range(77)]  # a plain sequence riding in the same batch
    shared = Unit(prefix, suffixes, [(len(s) - 1,) for s in suffixes])
    [extra, extra_10] = lone([plain_extra, plain_extra[:10]], pad)
    out = backend.score([extra, shared, extra_10])
    assert out.scores.shape[0] == len(suffixes) + 2
    if backend_kind == "packed":  # with the C++ kernel, the two plain rows' first 9 tokens run once
        saved = 9 if backend.share_across else 0
        assert (out.computed_positions, out.saved_tokens) == (len(plain_extra) + shared.tokens + 10 - saved, saved)
        assert out.real_tokens == out.computed_positions
    else:  # the prompt once, the responses padded to the longest one of their chunk, the plain rows padded
        assert out.computed_positions == prefix_len + len(suffixes) * max(suffix_lens) + 2 * len(plain_extra)
        assert out.real_tokens == len(plain_extra) + shared.tokens + 10
    alone = backend.score(lone(full, pad)).scores
    if backend_kind == "packed" and backend.share_across:  # the same bits as each whole sequence alone
        assert torch.equal(out.scores[1:-1], alone)
        assert torch.equal(out.scores[[0, -1]], torch.cat([backend.score(lone([s], pad)).scores
                                                           for s in (plain_extra, plain_extra[:10])]))
    assert (out.scores[1:-1] - alone).abs().max().item() <= 1e-5
    hf = AutoModelForSequenceClassification.from_pretrained(path).eval()
    assert (out.scores[1:-1] - _hf_alone(hf, full)).abs().max().item() <= TOL
    assert (out.scores[[0, -1]] - _hf_alone(hf, [plain_extra, plain_extra[:10]])).abs().max().item() <= TOL


@pytest.mark.parametrize("arch,backend_kind", [("llama", "packed"), ("qwen3", "packed"), ("llama", "hf"),
                                               ("gpt2", "hf")])
def test_several_pooled_positions_per_sequence_read_the_head_where_hf_would(tiny_ckpt, arch, backend_kind):
    """A unit's suffix may name several positions (a process reward model reads one per step): each is
    one output row, equal to HF's score head on the hidden state at that position."""
    path = tiny_ckpt(arch)
    loaded = load(path, backend=backend_kind)
    rng = random.Random(11)
    vocab = [t for t in range(loaded.encoder.vocab_size) if t != loaded.pad_token_id]
    prefix = [rng.choice(vocab) for _ in range(30)]
    suffixes = [[rng.choice(vocab) for _ in range(n)] for n in (12, 40)]
    lone_seq = [rng.choice(vocab) for _ in range(25)]
    units = [Unit.single(lone_seq, (0, 9, 24)), Unit(prefix, suffixes, [(0, 5, 11), (39,)])]
    out = loaded.backends[0].score(units)
    hf = AutoModelForSequenceClassification.from_pretrained(path).eval()

    def head_at(ids, positions):
        with torch.inference_mode():
            hidden = hf.base_model(input_ids=torch.tensor([ids])).last_hidden_state[0]
            return hf.score(hidden[list(positions)]).float()

    ref = torch.cat([head_at(lone_seq, (0, 9, 24)), head_at(prefix + suffixes[0], (30, 35, 41)),
                     head_at(prefix + suffixes[1], (69,))])
    assert out.scores.shape == (7, 1)
    assert (out.scores - ref).abs().max().item() <= TOL
