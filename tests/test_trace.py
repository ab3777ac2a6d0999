"""The data model: construction, validation errors, derived counts."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import reference
from conftest import random_trace
from moescope.errors import MoescopeError, TraceError
from moescope.trace import ExpertCounts, RoutingTrace, TraceMeta, _first_bad_selection, expert_mass


def test_shapes_and_defaults():
    ex = np.array([[[0, 1]], [[2, 3]], [[1, 0]]])
    tr = RoutingTrace(ex, 4)
    assert (tr.n_tokens, tr.n_layers, tr.top_k, tr.n_sequences) == (3, 1, 2, 1)
    assert tr.experts.dtype == np.int16
    assert tr.layer_ids.tolist() == [0]
    assert tr.seq_lengths.tolist() == [3]
    assert tr.phase == "prefill" and tr.weights is None


def test_sequences_and_labels(tiny_trace):
    tr = tiny_trace
    assert tr.seq_ends[-1] == tr.n_tokens
    assert tr.seq_lengths.sum() == tr.n_tokens
    assert tr.token_sequence().tolist() == np.repeat(np.arange(tr.n_sequences), tr.seq_lengths).tolist()
    assert tr.labels() == ["law", "code", "chat"]
    assert next(s for _, s in tr.iter_sequences()) == slice(0, int(tr.seq_starts[1]))


@pytest.mark.parametrize(
    ("experts", "n_experts", "kwargs", "match"),
    [
        ([[[0, 9]]], 8, {}, r"token 0, layer index 0, slot 1 has expert id 9 .* 8 experts"),
        ([[[0, 1]], [[-1, 2]]], 8, {}, r"token 1, layer index 0, slot 0 has expert id -1"),
        ([[[3, 3]]], 8, {}, r"token 0, layer index 0 selects expert 3 twice"),
        ([[0, 1]], 8, {}, r"experts \[tokens, layers, k\] must have 3 dimension"),
        ([[[0.5, 1]]], 8, {}, r"must hold integers"),
        ([[[0, 1, 2]]], 2, {}, r"top_k is 3 but n_experts is only 2"),
        ([[[0, 1]]], 0, {}, r"n_experts is 0"),
        ([[[0, 1]], [[1, 2]]], 8, {"seq_starts": [1]}, r"seq_starts\[0\] is 1, expected 0"),
        (
            [[[0, 1]], [[1, 2]], [[2, 3]]],
            8,
            {"seq_starts": [0, 2, 1]},
            r"not strictly increasing: seq_starts\[1\]=2",
        ),
        (
            [[[0, 1]], [[1, 2]]],
            8,
            {"seq_starts": [0, 2]},
            r"seq_starts\[1\]=2 is not below the token count 2",
        ),
        (
            [[[0, 1]]],
            8,
            {"weights": [[[0.5]]]},
            r"weights has shape \(1, 1, 1\) but experts has shape \(1, 1, 2\)",
        ),
        ([[[0, 1]]], 8, {"weights": [[[0.5, np.nan]]]}, r"slot 1 has gate weight nan"),
        ([[[0, 1]]], 8, {"weights": [[[0.5, -0.1]]]}, r"must be finite and >= 0"),
        ([[[0, 1]]], 8, {"layer_ids": [1, 2]}, r"layer_ids has 2 entries but the data has 1"),
        (
            [[[0, 1]], [[1, 2]]],
            8,
            {"layer_ids": [5, 5][:1], "seq_labels": ["a", "b"]},
            r"seq_labels has 2 entries",
        ),
        ([[[0, 1]]], 8, {"phase": "train"}, r"phase is 'train'"),
    ],
)
def test_validation_errors(experts, n_experts, kwargs, match):
    with pytest.raises(TraceError, match=match) as info:
        RoutingTrace(experts, n_experts, **kwargs)
    assert isinstance(info.value, MoescopeError)
    assert "\n" not in str(info.value)


def test_error_names_token_beyond_first_block():
    ex = np.tile(np.array([0, 1], dtype=np.int16), (70_000, 1, 1))
    ex[69_999, 0, 1] = 0
    with pytest.raises(TraceError, match="token 69999, layer index 0 selects expert 0 twice"):
        RoutingTrace(ex, 4)


@pytest.mark.kernels
@settings(max_examples=60, deadline=None)
@given(
    arrays(
        np.int16,
        st.tuples(st.integers(0, 6), st.integers(1, 3), st.integers(1, 4)),
        elements=st.integers(-2, 9),
    )
)
def test_validation_kernel_matches_reference(experts):
    assert tuple(int(x) for x in _first_bad_selection(experts, 8)) == reference.first_bad_selection(experts, 8)


@pytest.mark.kernels
@pytest.mark.parametrize("with_weights", [False, True])
def test_expert_mass_matches_reference(with_weights):
    tr = random_trace(n_tokens=80, n_layers=3, n_experts=6, k=3)
    w = tr.weights if with_weights else None
    np.testing.assert_allclose(expert_mass(tr.experts, 6, w), reference.expert_mass(tr.experts, 6, w))


def test_counts_from_trace(tiny_trace):
    c = tiny_trace.counts()
    assert c.values.shape == (2, 8)
    assert (c.values.sum(axis=1) == tiny_trace.n_tokens * tiny_trace.top_k).all()
    assert c.tokens == tiny_trace.n_tokens and c.top_k == 2 and c.layer_ids.tolist() == [1, 2]
    g = tiny_trace.counts("gate")
    assert g.mass == "gate"
    np.testing.assert_allclose(g.values.sum(axis=1), tiny_trace.weights.astype(np.float64).sum(axis=(0, 2)))
    np.testing.assert_allclose(c.shares().sum(axis=1), 1.0)
    assert c.normalize().normalized


def test_gate_mass_needs_weights():
    tr = random_trace(weights=None)
    with pytest.raises(TraceError, match="needs gate weights"):
        tr.counts("gate")


@pytest.mark.parametrize(
    ("values", "kwargs", "match"),
    [
        ([[1, -2]], {}, r"layer index 0, expert 1 is -2"),
        ([[1, 2], [3]], {}, r"equal-length rows"),
        ([1, 2], {}, r"non-empty \[layers, experts\] table"),
        ([[0.5, 0.4]], {"normalized": True}, r"layer index 0 sums to 0.9"),
        ([[1, 2]], {"n_experts": 3}, r"rows have 2 experts but n_experts is 3"),
        ([[1, 2]], {"tokens": 2, "top_k": 1}, r"counts sum to 3 but tokens x top_k = 2 x 1 = 2"),
        ([[1.0, np.inf]], {}, r"is inf"),
        ([["a", "b"]], {}, r"must be numbers"),
        ([[1, 2]], {"mass": "bytes"}, r"mass is 'bytes'"),
    ],
)
def test_counts_validation(values, kwargs, match):
    with pytest.raises(TraceError, match=match):
        ExpertCounts(values, **kwargs)


def test_counts_normalized_tolerates_rounding():
    c = ExpertCounts([[0.3334, 0.3333, 0.3338]], normalized=True)
    assert c.normalized and c.values.dtype == np.float64


def test_replace_and_equals(tiny_trace):
    other = tiny_trace.replace(phase="decode")
    assert other.phase == "decode" and not other.equals(tiny_trace)
    assert tiny_trace.replace().equals(tiny_trace)
    with pytest.raises(TypeError):
        tiny_trace.replace(colour="red")


def test_meta_roundtrip():
    m = TraceMeta(model="m", source="s", extra={"x": 1})
    assert TraceMeta.from_dict(m.to_dict()) == m


def test_empty_trace_is_valid():
    tr = RoutingTrace(np.zeros((0, 2, 2), dtype=np.int16), 4)
    assert tr.n_tokens == 0 and tr.n_sequences == 0
    assert tr.counts().values.sum() == 0


def test_extras_are_checked_and_sliced():
    from moescope.slicing import select_layers, split_halves

    tr = random_trace(n_tokens=40, n_layers=3, n_experts=8, k=2, n_seq=3, lookahead=2, candidates=3)
    assert set(tr.extras) == {"lookahead", "candidates", "candidate_probs"} and tr.token_ids is None
    assert tr.summary()["extras"]["lookahead"] == [3, 2, 2]
    train, test = split_halves(tr)
    assert train.extras["lookahead"].shape[0] == train.n_tokens and test.extras["candidates"].shape[0] == test.n_tokens
    la = tr.extras["lookahead"]
    # layers are re-indexed, not cut: distance d names the layer d positions later in the selection
    assert (select_layers(tr, [2]).extras["lookahead"] == -1).all()  # no later layer kept
    gap = select_layers(tr, [1, 3]).extras["lookahead"]  # positions 0 and 2: 0 -> 2 was captured at d = 2
    np.testing.assert_array_equal(gap[:, 0, 0], la[:, 0, 1])
    assert (gap[:, 0, 1] == -1).all() and (gap[:, 1] == -1).all()
    tail = select_layers(tr, [2, 3]).extras["lookahead"]
    np.testing.assert_array_equal(tail[:, 0, 0], la[:, 1, 0])
    assert (tail[:, 0, 1] == -1).all() and (tail[:, 1] == -1).all()
    assert (select_layers(tr, [3, 1]).extras["lookahead"] == -1).all()  # reversed: no later layer
    np.testing.assert_array_equal(select_layers(tr, [2]).extras["candidates"], tr.extras["candidates"][:, [1]])
    with pytest.raises(TraceError, match=r"lookahead has shape \(40, 3, 2, 3\).*k = 2"):
        tr.replace(extras={**tr.extras, "lookahead": np.zeros((40, 3, 2, 3), dtype=np.int16)})
    bad = tr.extras["lookahead"].copy()
    bad[0, 0, 0, 0] = 8
    with pytest.raises(TraceError, match=r"lookahead holds 8; expected values in -1\.\.7"):
        tr.replace(extras={**tr.extras, "lookahead": bad})
    with pytest.raises(TraceError, match=r"candidates has shape \(40, 2, 3\)"):
        tr.replace(extras={**tr.extras, "candidates": tr.extras["candidates"][:, :2]})
    with pytest.raises(TraceError, match="candidates holds -1"):
        tr.replace(extras={**tr.extras, "candidates": np.full((40, 3, 3), -1)})
    with pytest.raises(TraceError, match=r"unknown extra array\(s\) \['logits'\]"):
        tr.replace(extras={"logits": np.zeros((40, 3, 8))})
    assert not tr.equals(tr.replace(extras={}))
