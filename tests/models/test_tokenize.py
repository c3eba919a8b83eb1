"""Tokenisation is explicit: chat templates, concatenation, raw text and ids, no double BOS, truncation."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from rewardserve.api.schemas import Item, Message
from rewardserve.errors import InvalidInput, ItemTooLong
from rewardserve.models.tokenize import ItemEncoder


def _encoder(path, max_length=64):
    tok = AutoTokenizer.from_pretrained(path)
    return ItemEncoder(tok, max_length=max_length, vocab_size=len(tok)), tok


def test_prompt_response_is_the_two_turn_chat_hf_renders(tiny_ckpt):
    enc, tok = _encoder(tiny_ckpt("llama"))
    msgs = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    expected = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
    [pr, chat] = enc.encode([Item(prompt="What is 2+2?", response="4"),
                             Item(messages=[Message(**m) for m in msgs])], "error")
    assert pr.ids == expected == chat.ids
    assert expected.count(tok.bos_token_id) == 1 and expected[0] == tok.bos_token_id


def test_no_double_bos_when_text_already_starts_with_bos(tiny_ckpt):
    enc, tok = _encoder(tiny_ckpt("llama"))
    [plain, prefixed] = enc.encode([Item(text="hello there"), Item(text=tok.bos_token + "hello there")], "error")
    assert plain.ids[0] == tok.bos_token_id and plain.ids[1] != tok.bos_token_id
    assert prefixed.ids == plain.ids


def test_add_special_tokens_false_and_raw_ids_are_taken_as_given(tiny_ckpt):
    enc, tok = _encoder(tiny_ckpt("llama"))
    [bare, ids] = enc.encode([Item(text="hello there", add_special_tokens=False), Item(input_ids=[1, 1, 7])], "error")
    assert bare.ids == tok("hello there", add_special_tokens=False)["input_ids"]
    assert ids.ids == [1, 1, 7]  # raw ids are the user's business, BOS included


def test_without_chat_template_prompt_and_response_are_concatenated(tiny_ckpt):
    enc, tok = _encoder(tiny_ckpt("gpt2", chat_template=False))
    [pr] = enc.encode([Item(prompt="Question: 2+2? ", response="Answer: 4")], "error")
    assert pr.ids == tok("Question: 2+2? Answer: 4")["input_ids"]
    with pytest.raises(InvalidInput) as err:
        enc.encode([Item(text="fine"), Item(messages=[Message(role="user", content="hi")])], "error")
    assert err.value.index == 1 and "chat template" in err.value.message


def test_truncation_policies(tiny_ckpt):
    enc, tok = _encoder(tiny_ckpt("llama"), max_length=8)
    text = "one two three four five six seven eight nine ten eleven twelve"
    full = tok(text)["input_ids"]
    assert len(full) > 8
    [right] = enc.encode([Item(text=text)], "right")
    [left] = enc.encode([Item(text=text)], "left")
    assert right.truncated and right.ids == full[:8] and right.original_length == len(full)
    assert left.truncated and left.ids == [tok.bos_token_id] + full[-7:]  # the tail, BOS kept at position 0
    with pytest.raises(ItemTooLong) as err:
        enc.encode([Item(text="short"), Item(text=text)], "error")
    assert err.value.index == 1 and err.value.status == 413


def test_out_of_vocabulary_ids_name_item_and_position(tiny_ckpt):
    enc, _ = _encoder(tiny_ckpt("llama"))
    with pytest.raises(InvalidInput) as err:
        enc.encode([Item(input_ids=[1, 2]), Item(input_ids=[3, -1])], "error")
    assert err.value.index == 1 and "input_ids[1] = -1" in err.value.message
