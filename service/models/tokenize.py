"""Turning request items into the exact token ids the model scores.

Rules (DESIGN.md, "Tokenisation is explicit"):
- `messages` go through the tokenizer's chat template, rendered to text and encoded without adding
  special tokens (the template owns BOS), as `apply_chat_template(tokenize=True)` does.
- `prompt`/`response` are a two-turn chat (user, assistant) when the tokenizer has a template, else the
  plain concatenation `prompt + response` encoded with special tokens.
- `text` is encoded with special tokens unless the item says otherwise; `input_ids` are taken as given.
- No double BOS: if encoding produced BOS twice at the start (text that already began with the BOS
  string, or a template that renders it while the tokenizer adds it too), one is dropped.
- Over-long items follow the policy: `right` keeps the head, `left` keeps the tail (and the leading BOS,
  which decoder reward models expect at position 0), `error` raises 413 naming the item.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from rewardserve.errors import InvalidInput, ItemTooLong


class ItemLike(Protocol):
    prompt: str | None
    response: str | None
    messages: list[Any] | None
    text: str | None
    input_ids: list[int] | None
    add_special_tokens: bool | None


@dataclass
class Plain:
    """An item built by the server itself (a reference response, a judge's question, a prefix of steps)."""

    prompt: str | None = None
    response: str | None = None
    messages: list | None = None
    text: str | None = None
    input_ids: list[int] | None = None
    add_special_tokens: bool | None = None
    group: str | None = None
    reference: str | None = None


def chat_of(item: ItemLike) -> list[dict]:
    """An item's messages as plain dicts."""
    return [m if isinstance(m, dict) else m.model_dump(exclude_none=True) for m in item.messages]


@dataclass(slots=True)
class Encoded:
    ids: list[int]
    truncated: bool
    original_length: int


# Items whose token ids are remembered: a cache hit then costs a dictionary look-up instead of a chat
# template and a tokenizer call (most of its time on the 2-core VM).
MEMO_ITEMS = 16384


def memo_key(item: ItemLike) -> tuple | None:
    """What decides a text-bearing item's ids, hashable; None for items not worth remembering."""
    if item.messages is not None:
        try:
            return ("m", bool(item.add_special_tokens), tuple(tuple(sorted(m.items())) for m in chat_of(item)))
        except TypeError:  # a message value that cannot be hashed (a peer's structured content)
            return None
    if item.prompt is not None:
        return ("p", item.prompt, item.response)
    if item.text is not None:
        return ("t", item.add_special_tokens, item.text)
    return None


class ItemEncoder:
    """Encodes items for one tokenizer; shared by every worker (tokenizers are thread-safe for encode)."""

    def __init__(self, tokenizer, max_length: int, vocab_size: int, memo_items: int = MEMO_ITEMS):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.vocab_size = vocab_size
        self.bos_id = tokenizer.bos_token_id
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self.memo_items = memo_items
        self._memo: OrderedDict[tuple, tuple[int, ...]] = OrderedDict()  # key -> ids before truncation
        self._lock = threading.Lock()  # requests encode on the event loop and in threads alike

    # -- rendering ---------------------------------------------------------------------------
    def render_chat(self, messages: list[dict], index: int, generation: bool = False) -> str:
        if not self.has_template:
            raise InvalidInput(
                "this model's tokenizer has no chat template: send 'text' or 'input_ids' instead of 'messages'",
                index=index, part="messages",
            )
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        except Exception as exc:  # jinja errors name the template problem; the item is what the user can fix
            raise InvalidInput(f"chat template failed on this item: {exc}", index=index, part="messages") from exc

    def _text_of(self, item: ItemLike, index: int) -> tuple[str, bool]:
        """(text, add_special_tokens) for a text-bearing item."""
        if item.messages is not None:  # the template owns BOS unless the item asks for special tokens too
            return self.render_chat(chat_of(item), index), bool(item.add_special_tokens)
        if item.prompt is not None:
            if self.has_template:
                msgs = [{"role": "user", "content": item.prompt}, {"role": "assistant", "content": item.response}]
                return self.render_chat(msgs, index), False
            return item.prompt + item.response, True
        add = True if item.add_special_tokens is None else item.add_special_tokens
        return item.text, add

    # -- encoding ----------------------------------------------------------------------------
    def encode(self, items: Sequence[ItemLike], truncation: str, limit: int | None = None) -> list[Encoded]:
        """Encode a whole request; texts sharing a special-token setting go through one batch call.
        `limit` cuts items to fewer tokens than max_length (a peer's truncate-to-k option)."""
        raw: list[list[int] | None] = [None] * len(items)
        keys: list[tuple | None] = [None] * len(items)
        groups: dict[bool, tuple[list[int], list[str]]] = {True: ([], []), False: ([], [])}
        for i, item in enumerate(items):
            if item.input_ids is not None:
                raw[i] = self._check_ids(item.input_ids, i)
                continue
            keys[i] = key = memo_key(item)
            if key is not None:
                with self._lock:
                    known = self._memo.get(key)
                    if known is not None:
                        self._memo.move_to_end(key)
                if known is not None:
                    raw[i] = list(known)
                    continue
            text, add = self._text_of(item, i)
            groups[add][0].append(i)
            groups[add][1].append(text)
        for add, (idx, texts) in groups.items():
            if not texts:
                continue
            enc = self.tokenizer(texts, add_special_tokens=add, return_attention_mask=False)["input_ids"]
            for i, ids in zip(idx, enc):
                raw[i] = self._dedupe_bos(ids)
                self._remember(keys[i], raw[i])
        limit = self.max_length if limit is None else min(limit, self.max_length)
        if limit < 1:
            raise InvalidInput(f"items cannot be cut to {limit} tokens")
        return [self._fit(ids, i, truncation, limit) for i, ids in enumerate(raw)]

    def encode_questions(self, texts: Sequence[str], truncation: str, limit: int | None = None) -> list[Encoded]:
        """Each text as a user turn awaiting the assistant's answer (a judge's question): through the
        chat template with its generation prompt, else as plain text with special tokens."""
        if self.has_template:
            chats = [self.render_chat([{"role": "user", "content": t}], i, generation=True)
                     for i, t in enumerate(texts)]
            ids = self.tokenizer(chats, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        else:
            ids = self.tokenizer(list(texts), add_special_tokens=True, return_attention_mask=False)["input_ids"]
        limit = self.max_length if limit is None else min(limit, self.max_length)
        return [self._fit(self._dedupe_bos(x), i, truncation, limit) for i, x in enumerate(ids)]

    def _remember(self, key: tuple | None, ids: list[int]) -> None:
        if key is None or not self.memo_items:
            return
        with self._lock:
            self._memo[key] = tuple(ids)
            if len(self._memo) > self.memo_items:
                self._memo.popitem(last=False)

    def _check_ids(self, ids: list[int], index: int) -> list[int]:
        for j, t in enumerate(ids):
            if not 0 <= t < self.vocab_size:
                raise InvalidInput(
                    f"input_ids[{j}] = {t} is outside the model's vocabulary [0, {self.vocab_size})",
                    index=index, part="input_ids",
                )
        return list(ids)

    def _dedupe_bos(self, ids: list[int]) -> list[int]:
        if self.bos_id is not None and len(ids) >= 2 and ids[0] == self.bos_id and ids[1] == self.bos_id:
            return ids[1:]
        return ids

    def _fit(self, ids: list[int], index: int, truncation: str, limit: int) -> Encoded:
        n = len(ids)
        if n == 0:
            raise InvalidInput("item encodes to zero tokens", index=index)
        if n <= limit:
            return Encoded(ids, False, n)
        if truncation == "error":
            raise ItemTooLong(
                f"item has {n} tokens, more than max_length {limit}; send truncation 'left' or 'right' to cut it",
                index=index,
            )
        if truncation == "right":
            return Encoded(ids[:limit], True, n)
        if self.bos_id is not None and ids[0] == self.bos_id and limit > 1:
            return Encoded([ids[0]] + ids[n - limit + 1 :], True, n)
        return Encoded(ids[n - limit :], True, n)
