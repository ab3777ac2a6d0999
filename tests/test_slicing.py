"""Slices and the train/test split."""

from __future__ import annotations

import numpy as np
import pytest

import reference
from conftest import random_trace
from moescope.errors import UsageError
from moescope.slicing import (
    parse_ranges,
    select_labels,
    select_layers,
    select_sequences,
    select_tokens,
    split_halves,
    split_part,
)


@pytest.mark.parametrize("seed", range(4))
def test_split_matches_reference(seed):
    tr = random_trace(n_tokens=61, n_seq=9, seed=seed, token_ids=True)
    for part, got in zip(("train", "test"), split_halves(tr), strict=True):
        idx = reference.split_tokens(tr.seq_starts, tr.n_tokens, part)
        np.testing.assert_array_equal(got.experts, tr.experts[idx])
        np.testing.assert_array_equal(got.weights, tr.weights[idx])
        np.testing.assert_array_equal(got.token_ids, tr.token_ids[idx])
        assert got.meta.extra["slices"] == [{"op": "split", "part": part}]


def test_split_keeps_sequences_and_labels():
    tr = random_trace(n_tokens=40, n_seq=4)
    train, test = split_halves(tr)
    assert train.seq_lengths.tolist() == (tr.seq_lengths // 2).tolist()
    assert test.seq_lengths.tolist() == (tr.seq_lengths - tr.seq_lengths // 2).tolist()
    assert train.seq_labels.tolist() == tr.seq_labels.tolist()
    assert train.n_tokens + test.n_tokens == tr.n_tokens


def test_one_token_sequence_only_in_test():
    from moescope.trace import RoutingTrace

    tr = RoutingTrace(np.array([[[0, 1]], [[1, 2]], [[2, 3]]]), 4, seq_starts=[0, 1])
    train, test = split_halves(tr)
    assert train.n_sequences == 1 and train.n_tokens == 1
    assert test.n_sequences == 2 and test.seq_lengths.tolist() == [1, 1]


def test_select_sequences_and_tokens():
    tr = random_trace(n_tokens=50, n_seq=5)
    sub = select_sequences(tr, [3, 1])
    expect = np.concatenate(
        [tr.experts[tr.seq_starts[3] : tr.seq_ends[3]], tr.experts[tr.seq_starts[1] : tr.seq_ends[1]]]
    )
    np.testing.assert_array_equal(sub.experts, expect)
    assert sub.seq_labels.tolist() == [tr.seq_labels[3], tr.seq_labels[1]]
    cut = select_tokens(tr, 5, 30)
    np.testing.assert_array_equal(cut.experts, tr.experts[5:30])
    inside = tr.seq_starts[(tr.seq_starts > 5) & (tr.seq_starts < 30)] - 5
    assert cut.seq_starts.tolist() == [0, *inside.tolist()]
    with pytest.raises(UsageError, match="sequence 9 does not exist"):
        select_sequences(tr, [9])
    with pytest.raises(UsageError, match="selected twice"):
        select_sequences(tr, [1, 1])
    with pytest.raises(UsageError, match="token range 10:99 is outside 0:50"):
        select_tokens(tr, 10, 99)


def test_select_labels_and_layers():
    tr = random_trace(n_tokens=60, n_seq=6, n_layers=3)
    law = select_labels(tr, ["law"])
    assert set(law.seq_labels.tolist()) == {"law"} and law.n_sequences == 2
    with pytest.raises(UsageError, match=r"label\(s\) \['poetry'\] not in this trace"):
        select_labels(tr, ["poetry"])
    with pytest.raises(UsageError, match="no sequence labels"):
        select_labels(random_trace(labels=False), ["law"])
    sub = select_layers(tr, [3, 1])
    assert sub.layer_ids.tolist() == [3, 1]
    np.testing.assert_array_equal(sub.experts, tr.experts[:, [2, 0]])
    with pytest.raises(UsageError, match=r"layer\(s\) \[0\] are not in this trace"):
        select_layers(tr, [0])


def test_split_part_rejects_unknown():
    with pytest.raises(UsageError, match="split part 'val'"):
        split_part(random_trace(), "val")


def test_parse_ranges():
    assert parse_ranges("0,3,5-8") == [0, 3, 5, 6, 7, 8]
    for bad in ("a", "3-1", "-2", ""):
        with pytest.raises(UsageError):
            parse_ranges(bad)
