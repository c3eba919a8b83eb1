"""Tiny random-weight Hugging Face reward-model checkpoints for parity tests.

Everything is built locally: a small byte-level BPE tokenizer is trained with the
``tokenizers`` library on a hard-coded corpus (once per process), and models are
constructed from real ``transformers`` config classes with tiny dimensions, then
re-initialised with a seeded normal so that rewards vary visibly between inputs.
Nothing is downloaded from a model hub.

Usage::

    from tests.factories import build_checkpoint
    path = build_checkpoint(tmp_path / "llama", "llama", pad_token=False)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
"""

from __future__ import annotations

import json
import pathlib

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    Gemma2Config,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

__all__ = ["ARCHS", "build_tokenizer", "build_checkpoint"]

ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gpt2")

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"

VOCAB_SIZE = 400  # target BPE size (256 byte alphabet + 3 specials + merges)
MAX_POSITIONS = 512

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "A reward model assigns a scalar score to each response.",
    "In 1969, Apollo 11 landed on the Moon; 600 million people watched.",
    "Please summarize the following article in three sentences.",
    "What is 12 + 30? The answer is 42!",
    "She sold 7 apples, 3 oranges, and 15 bananas at the market.",
    "Is it raining in Paris today? I'm not sure, let me check.",
    "The temperature dropped to -5.5 degrees Celsius last night.",
    "Write a short poem about the ocean, the wind, and the stars.",
    "Error: file not found (code 404). Try again later...",
    "He said, \"Don't forget your umbrella!\" and left at 8:30 a.m.",
    "Machine learning models can be biased if the data is biased.",
    "The price rose from $19.99 to $24.50 in just two weeks.",
    "Step 1: preheat the oven. Step 2: mix flour, sugar & eggs.",
    "Why do cats purr? Scientists still debate the exact reason.",
    "Our meeting is scheduled for Monday, March 3rd, 2025.",
    "I think the second answer is more helpful than the first one.",
    "This response is rude, unhelpful, and factually incorrect.",
    "Thank you so much for your detailed and thoughtful explanation!",
    "The library opens at 9 and closes at 17 on weekdays.",
    "Python, Rust, and Go are popular programming languages.",
    "def add(a, b): return a + b  # adds two numbers",
    "Roughly 70% of the Earth's surface is covered by water.",
    "Can you translate 'good morning' into Spanish and French?",
    "The user asked a question; the assistant gave an answer.",
    "Once upon a time, there lived a king who had three daughters.",
    "Her phone number is 555-0123, and her zip code is 94105.",
    "Never share your password with anyone, not even support staff.",
    "The train departs from platform 4 at 10:45 sharp.",
    "Compute the square root of 144, then add 8 to the result.",
    "Honestly, I don't know; maybe we should ask an expert?",
    "Large language models are trained on trillions of tokens.",
    "The recipe needs 2 cups of rice and 1/2 teaspoon of salt.",
    "Warning: this action cannot be undone. Continue? [y/N]",
    "Mount Everest is 8,849 meters tall, the highest on Earth.",
    "Good answers are correct, concise, polite, and well organized.",
    "Bad answers ramble, hallucinate facts, or ignore the question.",
    "The committee voted 9 to 2 in favor of the new proposal.",
    "Let's walk through the proof one step at a time.",
    "JSON looks like {\"key\": [1, 2, 3], \"ok\": true}.",
)

# Same pre-tokenization as Qwen2 / GPT-4 style byte-level BPE. Matching Qwen2Tokenizer
# exactly matters: AutoTokenizer forces ``Qwen2Tokenizer`` for model_type "qwen2"
# (transformers v5 MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS), which rebuilds the
# backend from vocab/merges with this normalizer + pre-tokenizer (it keeps the
# post-processor from tokenizer.json). Using it for every arch keeps ids identical.
_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

_BASE_TOKENIZERS: dict[int, Tokenizer] = {}


def _base_tokenizer(vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Train (once per process and size) the byte-level BPE with <unk>, <s>, </s> as ids 0, 1, 2.
    Another size gives other merges, so other ids for the same text (a second tokenizer)."""
    if vocab_size not in _BASE_TOKENIZERS:
        tok = Tokenizer(models.BPE(fuse_unk=False, byte_fallback=False))
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=[UNK, BOS, EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(_CORPUS, trainer=trainer)
        _BASE_TOKENIZERS[vocab_size] = tok
    return _BASE_TOKENIZERS[vocab_size]


def build_tokenizer(
    *,
    pad_token: bool = True,
    padding_side: str = "right",
    chat_template: bool = True,
    bos: bool = True,
    bpe_vocab: int = VOCAB_SIZE,
    added_tokens: tuple[str, ...] = (),
) -> PreTrainedTokenizerFast:
    """Return a fresh ``PreTrainedTokenizerFast`` wrapping the cached trained BPE.

    Ids: ``<unk>``=0, ``<s>``=1, ``</s>``=2; ``<pad>`` (only when ``pad_token``) is
    appended as the last id, so all other ids are identical with and without pad.
    """
    tok = Tokenizer.from_str(_base_tokenizer(bpe_vocab).to_str())  # independent copy
    if pad_token:
        tok.add_special_tokens([PAD])
    if added_tokens:  # whole tokens (a judge's verdicts, a step tag), after every other id
        tok.add_tokens(list(added_tokens))
    bos_id = tok.token_to_id(BOS)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A",
            pair=f"{BOS} $A {BOS} $B",
            special_tokens=[(BOS, bos_id)],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    kwargs = dict(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side=padding_side,
        model_max_length=MAX_POSITIONS,
    )
    if pad_token:
        kwargs["pad_token"] = PAD
    if chat_template:
        kwargs["chat_template"] = CHAT_TEMPLATE
    hf_tok = PreTrainedTokenizerFast(**kwargs)
    if not pad_token:
        assert hf_tok.pad_token is None
    return hf_tok


def _tiny_config(arch: str, vocab_size: int, ids: dict, num_labels: int, overrides: dict):
    def make(cls, **kwargs):
        # Overrides go through the constructor so derived fields (layer_types,
        # sliding_window, ...) are computed from the overridden values.
        kwargs.update(overrides)
        return cls(**kwargs)

    common_llama = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        num_labels=num_labels,
        **ids,
    )
    if arch == "llama":
        return make(LlamaConfig, **common_llama)
    if arch == "qwen2":
        return make(Qwen2Config, **common_llama, use_sliding_window=False)
    if arch == "qwen3":
        return make(Qwen3Config, **common_llama, head_dim=16, use_sliding_window=False)
    if arch == "mistral":
        return make(MistralConfig, **common_llama, sliding_window=32)
    if arch == "gemma2":
        # Defaults kept: attn_logit_softcapping=50, final_logit_softcapping=30 (the
        # latter only affects the LM head, not the score head), alternating
        # sliding/full layer_types. Gemma2 declares _supports_sdpa=False, so the
        # default attention implementation resolves to "eager".
        return make(
            Gemma2Config,
            **common_llama,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=16,
        )
    if arch == "gpt2":
        return make(
            GPT2Config,
            vocab_size=vocab_size,
            n_positions=MAX_POSITIONS,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_inner=128,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            summary_first_dropout=0.0,
            num_labels=num_labels,
            **ids,
        )
    raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")


def _is_norm(name: str, module: torch.nn.Module) -> bool:
    leaf = name.rsplit(".", 1)[-1].lower()
    return "norm" in type(module).__name__.lower() or "norm" in leaf or leaf.startswith("ln_")


@torch.no_grad()
def _reinit_(model: torch.nn.Module, seed: int, gemma_norm: bool) -> None:
    """Seeded re-init of every parameter: normal(0, 0.2); norm scales ~ 1 +- 0.1."""
    gen = torch.Generator().manual_seed(seed)
    for mod_name, module in model.named_modules():
        for p_name, param in module.named_parameters(recurse=False):
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if _is_norm(mod_name, module):
                if p_name == "weight":
                    # Gemma RMSNorm computes x * (1 + weight), so centre at 0 there.
                    value = noise * 0.1 + (0.0 if gemma_norm else 1.0)
                else:  # LayerNorm bias
                    value = noise * 0.1
            else:
                value = noise * 0.2
            param.copy_(value.to(param.dtype))


def build_checkpoint(
    path,
    arch: str,
    *,
    pad_token: bool = True,
    padding_side: str = "right",
    chat_template: bool = True,
    num_labels: int = 1,
    seed: int = 0,
    dtype=torch.float32,
    bpe_vocab: int = VOCAB_SIZE,
    head: str = "sequence",
    added_tokens: tuple[str, ...] = (),
    **config_overrides,
) -> pathlib.Path:
    """Build and save (safetensors + tokenizer) a tiny random reward model; return ``path``.
    ``bpe_vocab`` other than the default gives the checkpoint a tokenizer of its own (other ids).
    ``head``: "sequence" (a reward model), "causal" (a causal LM: judges, label-token PRMs) or
    "token" (a token-classification PRM); ``added_tokens`` become whole tokens of its tokenizer."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    path = pathlib.Path(path)
    tokenizer = build_tokenizer(
        pad_token=pad_token, padding_side=padding_side, chat_template=chat_template, bpe_vocab=bpe_vocab,
        added_tokens=tuple(added_tokens),
    )
    ids = dict(
        pad_token_id=tokenizer.pad_token_id if pad_token else None,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = _tiny_config(arch, len(tokenizer), ids, num_labels, config_overrides)

    torch.manual_seed(seed)
    auto = {"sequence": AutoModelForSequenceClassification, "causal": AutoModelForCausalLM,
            "token": AutoModelForTokenClassification}[head]
    model = auto.from_config(config, dtype=torch.float32)
    _reinit_(model, seed, gemma_norm=(arch == "gemma2"))
    model = model.to(dtype).eval()

    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    if not pad_token:
        _write_explicit_null_pad(path)
    return path


def _write_explicit_null_pad(path: pathlib.Path) -> None:
    """Record ``"pad_token": null`` in tokenizer_config.json.

    save_pretrained omits unset special tokens; for model_type "qwen2" AutoTokenizer
    then loads ``Qwen2Tokenizer`` whose ``pad_token`` default is "<|endoftext|>" (a
    new token). An explicit null keeps the reloaded tokenizer pad-less.
    """
    cfg_file = path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    cfg["pad_token"] = None
    cfg_file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
