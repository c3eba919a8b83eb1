"""Shared-prefix execution (packed: tree-shaped batch; HF: prompt KV cache) equals scoring each
(prompt + response) on its own."""

from __future__ import annotations

import random

import pytest
from transformers import AutoModelForSequenceClassification

from rewardserve.config import Settings
from rewardserve.models.loading import load_model
from rewardserve.models.units import Shared
from tests.models.test_parity import CASES, TOL, _hf_alone


@pytest.mark.parametrize("arch,backend_kind", CASES)
@pytest.mark.parametrize("prefix_len,suffix_lens", [(40, [1, 2, 90, 7, 200]), (120, [3]), (5, [60, 1, 33])],
                         ids=["mixed", "n1", "short-prefix"])
def test_shared_units_equal_full_sequences_and_hf(tiny_ckpt, arch, backend_kind, prefix_len, suffix_lens):
    path = tiny_ckpt(arch)
    loaded = load_model(Settings(model=str(path), warmup=False, backend=backend_kind))
    backend = loaded.backends[0]
    assert backend.shares_prefix
    rng = random.Random(prefix_len + len(suffix_lens))
    pad = loaded.pad_token_id
    vocab = [t for t in range(loaded.encoder.vocab_size) if t != pad]
    prefix = [rng.choice(vocab) for _ in range(prefix_len)]
    suffixes = [[rng.choice(vocab) for _ in range(n)] for n in suffix_lens]
    full = [prefix + s for s in suffixes]
    plain_extra = [rng.choice(vocab) for _ in range(77)]  # a plain sequence riding in the same batch
    shared = Shared(prefix, suffixes, [len(s) - 1 for s in suffixes])
    out = backend.score([plain_extra, shared, plain_extra[:10]])
    assert out.scores.shape[0] == len(suffixes) + 2
    if backend_kind == "packed":
        assert out.computed_positions == len(plain_extra) + shared.tokens + 10
    else:  # the prompt once, the responses padded to the longest one of their chunk, the plain rows padded
        assert out.computed_positions == prefix_len + len(suffixes) * max(suffix_lens) + 2 * len(plain_extra)
    assert out.real_tokens == len(plain_extra) + shared.tokens + 10
    alone = backend.score(full).scores
    assert (out.scores[1:-1] - alone).abs().max().item() <= 1e-5
    hf = AutoModelForSequenceClassification.from_pretrained(path).eval()
    assert (out.scores[1:-1] - _hf_alone(hf, full)).abs().max().item() <= TOL
    assert (out.scores[[0, -1]] - _hf_alone(hf, [plain_extra, plain_extra[:10]])).abs().max().item() <= TOL
