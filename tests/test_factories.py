"""Sanity tests for tests/factories.py (tiny random HF reward-model checkpoints)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from tests import factories
from tests.factories import ARCHS, build_checkpoint, build_tokenizer

TEXTS = (
    "Hello there, how are you today?",
    "The price rose from $19.99 to $24.50 in 2 weeks!",
    "Honestly, I don't know; maybe ask an expert.",
    "A",
)
LONG_TEXT = " ".join(factories._CORPUS[:6])  # > 64 tokens: longer than every sliding window
MESSAGES = [
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "The answer is 42."},
]


def _reward(model, tokenizer, text: str) -> torch.Tensor:
    enc = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for arch, pad in itertools.product(ARCHS, (True, False)):
        out[arch, pad] = build_checkpoint(root / f"{arch}-pad{int(pad)}", arch, pad_token=pad)
    return out


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_trained_once_and_small():
    tok = build_tokenizer()
    base = factories._BASE_TOKENIZERS[factories.VOCAB_SIZE]
    build_tokenizer(pad_token=False)
    assert factories._BASE_TOKENIZERS[factories.VOCAB_SIZE] is base  # cached, not retrained
    assert 300 <= len(tok) <= 500
    assert tok.pad_token == "<pad>" and tok.pad_token_id == len(tok) - 1
    # <pad> is appended last: every other id is identical with and without pad.
    no_pad = build_tokenizer(pad_token=False)
    assert no_pad.pad_token is None and no_pad.pad_token_id is None
    assert len(no_pad) == len(tok) - 1
    for text in TEXTS:
        assert tok(text).input_ids == no_pad(text).input_ids


def test_a_second_bpe_size_is_a_second_tokenizer():
    a, b = build_tokenizer(), build_tokenizer(bpe_vocab=330)
    assert len(b) < len(a) and a.bos_token_id == b.bos_token_id == 1
    assert a("The quick brown fox").input_ids != b("The quick brown fox").input_ids
    assert b.decode(b("The quick brown fox", add_special_tokens=False).input_ids) == "The quick brown fox"


def test_tokenizer_options():
    tok = build_tokenizer()
    ids = tok("Hello world").input_ids
    assert ids[0] == tok.bos_token_id
    assert tok.convert_ids_to_tokens(ids[0]) == "<s>"
    assert tok("Hello world", add_special_tokens=False).input_ids == ids[1:]
    assert tok.eos_token == "</s>" and tok.unk_token == "<unk>"
    assert tok.padding_side == "right"
    assert tok.decode(ids, skip_special_tokens=True) == "Hello world"

    no_bos = build_tokenizer(bos=False)
    assert no_bos("Hello world").input_ids == ids[1:]

    left = build_tokenizer(padding_side="left")
    assert left.padding_side == "left"
    batch = left(["Hi", "Hello there, world"], padding=True).input_ids
    assert batch[0][0] == left.pad_token_id

    assert build_tokenizer(chat_template=False).chat_template is None


def test_chat_template_renders():
    tok = build_tokenizer()
    text = tok.apply_chat_template(MESSAGES, tokenize=False)
    assert text == "<s><|user|>\nWhat is 12 + 30?</s>\n<|assistant|>\nThe answer is 42.</s>\n"
    gen = tok.apply_chat_template(MESSAGES[:1], tokenize=False, add_generation_prompt=True)
    assert gen.endswith("</s>\n<|assistant|>\n")
    ids = tok.apply_chat_template(MESSAGES, tokenize=True, return_dict=True)["input_ids"]
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert ids.count(tok.eos_token_id) == 2


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("pad", [True, False], ids=["pad", "nopad"])
@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_roundtrip(checkpoints, arch, pad):
    path = checkpoints[arch, pad]
    assert (path / "model.safetensors").is_file()
    assert (path / "tokenizer.json").is_file()

    ref_tok = build_tokenizer(pad_token=pad)
    tok = AutoTokenizer.from_pretrained(path)
    for text in TEXTS + (LONG_TEXT,):
        assert tok(text).input_ids == ref_tok(text).input_ids
    assert tok.padding_side == "right"
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>"
    if pad:
        assert tok.pad_token == "<pad>" and tok.pad_token_id == ref_tok.pad_token_id
    else:
        assert tok.pad_token is None and tok.pad_token_id is None
    assert len(tok) == len(ref_tok)

    rendered = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered.count("<s>") == 1 and rendered.startswith("<s>")
    chat_ids = tok(rendered, add_special_tokens=False).input_ids
    assert chat_ids.count(tok.bos_token_id) == 1

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    cfg = model.config
    assert cfg.model_type == arch
    assert cfg.num_labels == 1
    assert cfg.pad_token_id == (ref_tok.pad_token_id if pad else None)
    assert cfg.bos_token_id == tok.bos_token_id and cfg.eos_token_id == tok.eos_token_id
    assert cfg.vocab_size == len(tok)
    assert next(model.parameters()).dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) < 500_000
    if arch == "gemma2":
        # Gemma2 declares _supports_sdpa=False (softcapping), so the default is eager.
        assert cfg._attn_implementation == "eager"
        assert cfg.sliding_window == 16 and "sliding_attention" in cfg.layer_types
        assert cfg.attn_logit_softcapping is not None
    elif arch == "mistral":
        assert cfg.sliding_window == 32
    elif arch in ("qwen2", "qwen3"):
        assert cfg.sliding_window is None
        assert all(t == "full_attention" for t in cfg.layer_types)

    rewards = [_reward(model, tok, text) for text in TEXTS + (LONG_TEXT,)]
    for r in rewards:
        assert r.shape == (1, 1)
        assert torch.isfinite(r).all()
    values = [r.item() for r in rewards]
    for a, b in itertools.combinations(values, 2):
        assert abs(a - b) > 1e-3, values


@pytest.mark.parametrize("arch", ARCHS)
def test_num_labels_three(tmp_path, arch):
    path = build_checkpoint(tmp_path / arch, arch, num_labels=3, pad_token=False)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.num_labels == 3
    r1, r2 = (_reward(model, tok, t) for t in TEXTS[:2])
    assert r1.shape == (1, 3) and torch.isfinite(r1).all()
    assert (r1 - r2).abs().max() > 1e-3
    assert (r1[0, :, None] - r1[0, None, :]).abs().sum() > 1e-3  # labels differ too


def test_left_padding_side_roundtrip(tmp_path):
    path = build_checkpoint(tmp_path / "llama-left", "llama", padding_side="left")
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.padding_side == "left"


def test_no_chat_template(tmp_path):
    path = build_checkpoint(tmp_path / "llama-nochat", "llama", chat_template=False)
    assert AutoTokenizer.from_pretrained(path).chat_template is None


def test_build_is_seeded(tmp_path):
    a = build_checkpoint(tmp_path / "a", "qwen3", seed=1)
    b = build_checkpoint(tmp_path / "b", "qwen3", seed=1)
    c = build_checkpoint(tmp_path / "c", "qwen3", seed=2)
    sa, sb, sc = (AutoModelForSequenceClassification.from_pretrained(p).state_dict() for p in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_config_overrides_and_dtype(tmp_path):
    path = build_checkpoint(
        tmp_path / "over", "llama", num_hidden_layers=3, dtype=torch.bfloat16, rms_norm_eps=1e-5
    )
    cfg = AutoConfig.from_pretrained(path)
    assert cfg.num_hidden_layers == 3 and cfg.rms_norm_eps == 1e-5
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype="auto")
    assert next(model.parameters()).dtype == torch.bfloat16
    # Overrides go through the constructor, so derived fields follow them.
    q = build_checkpoint(tmp_path / "q2sw", "qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1)
    qcfg = AutoConfig.from_pretrained(q)
    assert qcfg.sliding_window == 8 and qcfg.layer_types == ["full_attention", "sliding_attention"]


@pytest.mark.parametrize("arch,window", [("gemma2", 16), ("mistral", 32)])
def test_sliding_window_matters(tmp_path, arch, window):
    small = build_checkpoint(tmp_path / "small", arch, pad_token=False)
    big = build_checkpoint(tmp_path / "big", arch, pad_token=False, sliding_window=4096)
    tok = AutoTokenizer.from_pretrained(small)
    m_small = AutoModelForSequenceClassification.from_pretrained(small).eval()
    m_big = AutoModelForSequenceClassification.from_pretrained(big).eval()
    short = "Hi there."
    assert len(tok(short).input_ids) < window
    assert len(tok(LONG_TEXT).input_ids) > 2 * window
    torch.testing.assert_close(_reward(m_small, tok, short), _reward(m_big, tok, short))
    assert (_reward(m_small, tok, LONG_TEXT) - _reward(m_big, tok, LONG_TEXT)).abs().item() > 1e-3
