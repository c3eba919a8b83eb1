"""Where a decoder reward model reads its reward: the pooling rule of AutoModelForSequenceClassification.

HF pools the head's output at the rightmost token that is not `config.pad_token_id` (or at the last
position when the config has no pad token). We apply that rule to each item's *unpadded* ids, so the
position is the one HF would pick for the item alone, whatever padding we add around it, whatever the
tokenizer's padding side: this is what makes scores independent of the batch an item rides in.
"""

from __future__ import annotations


def last_token_index(ids: list[int], pad_token_id: int | None) -> int:
    """Index HF's last-token pooling picks for `ids` scored alone (ids are never empty)."""
    if pad_token_id is None:
        return len(ids) - 1
    for j in range(len(ids) - 1, -1, -1):
        if ids[j] != pad_token_id:
            return j
    return 0  # all pad: HF's argmax over an all-zero mask returns 0
