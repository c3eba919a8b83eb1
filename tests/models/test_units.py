"""share_across: which lone units of a batch share their beginning, and how PackedBatch lays them out."""

from __future__ import annotations

from rewardserve.models.packed import PackedBatch
from rewardserve.models.units import Unit, share_across

OPENING = [1, 4, 9, 9, 7]  # a chat template's opening


def _lone(ids: list[int], pools: tuple[int, ...] | None = None) -> Unit:
    return Unit.single(ids, pools or (len(ids) - 1,))


def test_units_that_begin_alike_form_runs_and_the_others_stay_alone():
    units = [_lone(OPENING + [20, 21, 22]), _lone([2, 3, 4, 5, 6]), _lone(OPENING + [30, 31]),
             _lone(OPENING + [20, 21, 40])]
    runs = share_across(units, 4)
    assert runs == [(len(OPENING), [0, 3, 2])]  # sorted order: 0 and 3 share 7 tokens, 2 joins at 5
    assert share_across(units, len(OPENING) + 1) == [(len(OPENING) + 2, [0, 3])]  # 2 shares too little
    assert share_across(units, 99) == []


def test_a_member_joins_only_when_the_run_saves_at_least_as_much_with_it():
    long_prompt = list(range(100, 140))
    units = [_lone(long_prompt + [1]), _lone(long_prompt + [2]), _lone(long_prompt[:5] + [3])]
    # with the third, 3 members share 5 tokens (saving 10); without it, 2 share 40 (saving 40)
    assert share_across(units, 4) == [(40, [0, 1])]


def test_the_shared_run_stops_before_a_pooled_position_and_leaves_each_member_a_token():
    units = [_lone(OPENING + [8, 8], pools=(2, 6)), _lone(OPENING + [8, 8, 8])]
    assert share_across(units, 2) == [(2, [0, 1])]  # the first reads position 2: the run stops before it
    same = [_lone(OPENING), _lone(OPENING), _lone(OPENING)]  # identical items: all but the last token
    assert share_across(same, 4) == [(len(OPENING) - 1, [0, 1, 2])]
    assert share_across([_lone(OPENING), _lone([1])], 1) == []  # a 1-token item has nothing to share


def test_units_with_a_prefix_or_several_suffixes_are_left_as_they_are():
    group = Unit(OPENING, [[5, 6], [7]], [(1,), (0,)])
    units = [group, _lone(OPENING + [5, 6]), _lone(OPENING + [7, 7])]
    assert share_across(units, 4) == [(len(OPENING), [1, 2])]


def test_packed_rows_stay_in_unit_order_and_the_saved_tokens_are_counted():
    units = [_lone(OPENING + [20, 21]), Unit([3, 3, 3], [[5], [6, 6]], [(0,), (1,)]), _lone([2, 2]),
             _lone(OPENING + [30], pools=(4, 5))]
    batch = PackedBatch.build(units, "cpu", share_min=4)
    plain = PackedBatch.build(units, "cpu")
    # the last unit reads position 4 as well: the two share the opening's first 4 tokens only
    assert batch.saved_tokens == 4 and plain.saved_tokens == 0
    assert batch.cu_seqlens[-1] == plain.cu_seqlens[-1] - 4
    # each pooled row reads the same token, at the same position, as without sharing
    for packed in (batch, plain):
        assert [packed.input_ids[i].item() for i in packed.last_idx] == [21, 5, 6, 2, 7, 30]
        assert [packed.positions[i].item() for i in packed.last_idx] == [6, 3, 4, 1, 4, 5]
    shared = batch.parents.index(-1)  # the opening's segment comes first; both members attend to it
    assert batch.input_ids[:4].tolist() == OPENING[:4]
    assert sum(p == shared for p in batch.parents) == 2
