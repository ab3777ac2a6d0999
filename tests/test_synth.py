"""Synthetic traces: determinism, chunking, validity, the naive reference, and recovery of planted truth."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

import reference as ref
from moescope import synth
from moescope.errors import UsageError
from moescope.synth import SynthSpec, synth_chunks, synth_trace, truth
from moescope.trace import RoutingTrace, validate_experts

RICH = SynthSpec(
    n_tokens=600,
    n_layers=2,
    n_experts=12,
    top_k=3,
    seq_len=9,
    seed=3,
    zipf=(1.0, 2.0),
    n_teams=2,
    team_size=3,
    team_strength=0.6,
    stickiness=0.4,
    domains=("a", "b", "c"),
    domain_specificity=0.7,
    n_generalists=1,
    generalist_share=0.2,
    weights_dtype="float32",
)
TIGHT = SynthSpec(
    n_tokens=300, n_layers=2, n_experts=6, top_k=6, seq_len=5, seed=1, zipf=3.0, stickiness=0.3, weights_dtype="float32"
)  # k = E and a steep tail: the exact fallback draw runs often
SPECS = {
    "rich": RICH,
    "tight": TIGHT,
    "near-full-teams": SynthSpec(
        n_tokens=300,
        n_layers=1,
        n_experts=8,
        top_k=7,
        seq_len=4,
        zipf=2.5,
        n_teams=2,
        team_size=4,
        team_strength=0.9,
        weights_dtype="float32",
    ),
    "plain": SynthSpec(n_tokens=300, n_layers=3, n_experts=16, top_k=2, seq_len=30, weights_dtype="float32"),
}


@functools.cache
def make(spec: SynthSpec) -> RoutingTrace:
    return synth_trace(spec)


def concat_blocks(spec: SynthSpec, chunk: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, list]:
    blocks = list(synth_chunks(spec, chunk_tokens=chunk))
    assert all(b.experts.shape[0] <= chunk for b in blocks)
    assert [b.token_offset for b in blocks] == list(range(0, spec.n_tokens, chunk))
    experts = np.concatenate([b.experts for b in blocks])
    weights = None if spec.weights_dtype is None else np.concatenate([b.weights for b in blocks])
    starts = np.concatenate([b.seq_starts + b.token_offset for b in blocks])
    labels = [x for b in blocks for x in (b.labels.tolist() if b.labels is not None else [])]
    return experts, weights, starts, labels


def overlap(trace: RoutingTrace) -> float:
    """Mean number of experts a token shares with the previous token of its sequence (same layer)."""
    ex = trace.experts.astype(np.int64)
    same = (ex[1:, :, :, None] == ex[:-1, :, None, :]).any(axis=3).sum(axis=2)
    cont = np.ones(trace.n_tokens, dtype=bool)
    cont[trace.seq_starts] = False
    return float(same[cont[1:]].mean())


def shares(experts: np.ndarray, n_experts: int) -> np.ndarray:
    """[layers, experts] share of selections."""
    counts = [np.bincount(experts[:, i].ravel(), minlength=n_experts) for i in range(experts.shape[1])]
    return np.stack(counts) / (experts.shape[0] * experts.shape[2])


# ----------------------------------------------------------------------------------------------
# determinism, chunking, validity


def test_same_seed_same_trace_other_seed_other_trace():
    a, b = synth_trace(RICH), synth_trace(RICH)
    assert a.equals(b)
    c = synth_trace(SynthSpec(**{**RICH.to_dict(), "seed": 4}))
    assert not np.array_equal(a.experts, c.experts)


@pytest.mark.kernels
@pytest.mark.parametrize("chunk", [1, 7, 64, 599, 600, 10_000])
@pytest.mark.parametrize("name", ["rich", "tight"])
def test_chunks_concatenate_to_the_whole_trace(name, chunk):
    spec = SPECS[name]
    whole = make(spec)
    experts, weights, starts, labels = concat_blocks(spec, chunk)
    assert np.array_equal(experts, whole.experts)
    assert np.array_equal(weights, whole.weights)
    assert np.array_equal(starts, whole.seq_starts)
    assert labels == (whole.seq_labels.tolist() if whole.seq_labels is not None else [])


def test_a_shorter_trace_is_a_prefix_of_a_longer_one():
    long, short = make(RICH), synth_trace(SynthSpec(**{**RICH.to_dict(), "n_tokens": 250}))
    assert np.array_equal(short.experts, long.experts[:250])
    assert np.array_equal(short.seq_starts, long.seq_starts[long.seq_starts < 250])


@pytest.mark.parametrize("name", sorted(SPECS))
def test_ids_in_range_and_distinct(name):
    trace = make(SPECS[name])
    validate_experts(trace.experts, trace.n_experts)  # raises on a repeat or an out-of-range id
    assert trace.experts.dtype == np.int16 and trace.experts.shape == (
        SPECS[name].n_tokens,
        SPECS[name].n_layers,
        SPECS[name].top_k,
    )


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_weights_positive_descending_sum_to_one(dtype):
    trace = synth_trace(SynthSpec(**{**RICH.to_dict(), "weights_dtype": dtype}))
    w = trace.weights.astype(np.float64)
    assert trace.weights.dtype == np.dtype(dtype)
    assert (w > 0).all()
    assert (np.diff(w, axis=2) <= 0).all()
    np.testing.assert_allclose(w.sum(axis=2), 1.0, atol=4e-3 if dtype == "float16" else 1e-6)


def test_no_weights_and_empty_trace():
    assert synth_trace(SynthSpec(n_tokens=50, weights_dtype=None)).weights is None
    empty = synth_trace(SynthSpec(n_tokens=0, domains=("x",)))
    assert empty.experts.shape == (0, 4, 8) and empty.n_sequences == 0
    assert list(synth_chunks(SynthSpec(n_tokens=0))) == []


def test_sequences_vary_around_seq_len_and_labels_follow_domain_order():
    trace = synth_trace(
        SynthSpec(
            n_tokens=20_000, n_layers=1, n_experts=8, top_k=2, seq_len=20, domains=("a", "b", "c"), domain_order="cycle"
        )
    )
    lengths = trace.seq_lengths[:-1]  # the last sequence is cut
    assert lengths.min() >= 1 and lengths.std() > 5
    assert abs(lengths.mean() - 20) < 2
    assert trace.seq_labels.tolist() == [("a", "b", "c")[i % 3] for i in range(trace.n_sequences)]
    assert (synth_trace(SynthSpec(n_tokens=40, seq_len=1)).seq_lengths == 1).all()


def test_meta_holds_json_spec_and_truth():
    trace = make(RICH)
    extra = json.loads(json.dumps(trace.meta.extra["synth"]))
    assert SynthSpec(**extra["spec"]) == RICH
    assert extra["truth"] == truth(RICH)
    assert trace.meta.model == "synthetic" and trace.phase == "prefill"


def test_truth_structure():
    t = truth(RICH)
    for layer in range(RICH.n_layers):
        members = [e for team in t["teams"][layer] for e in team]
        assert len(set(members)) == len(members) == RICH.n_teams * RICH.team_size
        assert not set(members) & set(t["generalists"][layer])
        for d in range(len(RICH.domains)):
            assert abs(sum(t["popularity"][layer][d]) - 1) < 1e-12
            assert abs(sum(t["expected_share"][layer][d]) - 1) < 1e-9
            assert sorted(t["domain_order"][layer][d]) == list(range(RICH.n_experts))


# ----------------------------------------------------------------------------------------------
# the kernel against the naive reference


def test_mix_matches_the_reference():
    for z in [0, 1, 2**63, 2**64 - 1, 0x0123456789ABCDEF]:
        with np.errstate(over="ignore"):
            assert int(synth._mix(np.uint64(z))) == ref.splitmix64(z)


@pytest.mark.kernels
@pytest.mark.parametrize("name", sorted(SPECS))
def test_kernel_matches_naive_reference(name):
    spec = SPECS[name]
    experts, weights = ref.synth_routing(spec)
    trace = make(spec)
    np.testing.assert_array_equal(trace.experts, experts)
    np.testing.assert_allclose(trace.weights, weights, rtol=1e-6)


def test_inclusion_matches_enumeration():
    rng = np.random.default_rng(0)
    for n_exp, k in [(4, 1), (5, 2), (6, 3), (6, 5)]:
        rates = rng.gamma(0.5, size=(3, n_exp))
        want = [ref.plackett_luce_inclusion(r.tolist(), k) for r in rates]
        np.testing.assert_allclose(synth._inclusion(rates, k), want, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# planted truth is recovered


def test_marginal_shares_match_expected_share():
    spec = SynthSpec(
        n_tokens=6000,
        n_layers=2,
        n_experts=16,
        top_k=4,
        seq_len=30,
        zipf=(1.0, 3.0),
        n_teams=2,
        team_size=4,
        team_strength=0.7,
        domains=("a", "b"),
        n_generalists=1,
        generalist_share=0.2,
        weights_dtype=None,
    )
    trace, t = make(spec), truth(spec)
    tok_domain = np.repeat(trace.seq_labels, trace.seq_lengths)
    for d, name in enumerate(spec.domains):
        sub = trace.experts[tok_domain == name]
        expected = np.array(t["expected_share"])[:, d]
        sd = np.sqrt(expected / (sub.shape[0] * spec.top_k))  # loose: counts are at most Poisson-spread
        assert (np.abs(shares(sub, spec.n_experts) - expected) < 5 * sd + 1e-3).all()
    steep = np.array(t["expected_share"])[1]  # zipf 3: the head expert is in almost every token
    assert steep.max() > 0.9 / spec.top_k


def test_top_expert_share_with_high_zipf():
    spec = SynthSpec(n_tokens=3000, n_layers=2, n_experts=32, top_k=2, zipf=2.0, weights_dtype=None)
    trace, t = make(spec), truth(spec)
    got = shares(trace.experts, spec.n_experts)
    for layer in range(spec.n_layers):
        top = t["global_order"][layer][0]
        assert got[layer].argmax() == top
        assert abs(got[layer, top] - t["expected_share"][layer][0][top]) < 0.02


def team_lift(trace: RoutingTrace, teams: list) -> tuple[float, float]:
    """Mean lift P(a, b) / (P(a) P(b)) over pairs inside planted teams and over all other pairs."""
    inside, outside = [], []
    for layer in range(trace.n_layers):
        onehot = np.zeros((trace.n_tokens, trace.n_experts))
        np.put_along_axis(onehot, trace.experts[:, layer].astype(np.int64), 1.0, axis=1)
        p = onehot.mean(axis=0)
        lift = (onehot.T @ onehot / trace.n_tokens) / np.outer(p, p)
        team = {e: i for i, members in enumerate(teams[layer]) for e in members}
        for a in range(trace.n_experts):
            for b in range(a):
                both = a in team and b in team and team[a] == team[b]
                (inside if both else outside).append(lift[a, b])
    return float(np.mean(inside)), float(np.mean(outside))


@pytest.mark.parametrize("strength", [0.0, 0.8])
def test_teams_co_activate(strength):
    spec = SynthSpec(
        n_tokens=4000,
        n_layers=2,
        n_experts=16,
        top_k=4,
        zipf=0.5,
        n_teams=4,
        team_size=4,
        team_strength=strength,
        weights_dtype=None,
    )
    inside, outside = team_lift(make(spec), truth(spec)["teams"])
    chance = 0.8  # (k-1) E / (k (E-1)): k distinct ids make any two experts repel a little
    if strength:
        assert inside > 2.5 * chance and outside < chance
    else:
        assert abs(inside - chance) < 0.1 and abs(outside - chance) < 0.05


def test_stickiness_raises_consecutive_overlap():
    base = dict(n_tokens=4000, n_layers=2, n_experts=32, top_k=4, seq_len=50, zipf=0.8, weights_dtype=None)
    got = {s: overlap(make(SynthSpec(**base, stickiness=s))) for s in (0.0, 0.5, 0.9)}
    k = base["top_k"]
    assert got[0.0] < got[0.5] < got[0.9]
    for s in (0.5, 0.9):  # sticky slots always overlap, the others about as often as without stickiness
        expected = s * k + (1 - s) * got[0.0]
        assert abs(got[s] - expected) < 0.15 * k


def test_domains_prefer_different_experts_and_share_generalists():
    spec = SynthSpec(
        n_tokens=6000,
        n_layers=2,
        n_experts=32,
        top_k=2,
        seq_len=40,
        zipf=1.2,
        domains=("code", "math", "chat"),
        domain_specificity=0.9,
        n_generalists=2,
        generalist_share=0.3,
        weights_dtype=None,
    )
    trace, t = make(spec), truth(spec)
    tok_domain = np.repeat(trace.seq_labels, trace.seq_lengths)
    for layer in range(spec.n_layers):
        gens = set(t["generalists"][layer])
        tops = []
        for d, name in enumerate(spec.domains):
            got = shares(trace.experts[tok_domain == name], spec.n_experts)[layer]
            ranked = np.argsort(-got, kind="stable")
            assert gens <= set(ranked[:3].tolist()), f"generalists {gens} not on top of {name}"
            specific = [e for e in ranked.tolist() if e not in gens][:3]
            assert specific[0] == next(e for e in t["domain_order"][layer][d] if e not in gens)
            tops.append(tuple(specific))
        assert len(set(tops)) == len(spec.domains)


def test_generalist_share_without_generalists_is_ignored():
    a = truth(SynthSpec(n_layers=1, n_experts=8, top_k=2, generalist_share=0.5))
    b = truth(SynthSpec(n_layers=1, n_experts=8, top_k=2))
    assert a == b


def test_zero_specificity_makes_domains_alike():
    spec = SynthSpec(n_layers=2, n_experts=16, top_k=2, domains=("a", "b"), domain_specificity=0)
    pop = np.array(truth(spec)["popularity"])
    np.testing.assert_allclose(pop[:, 0], pop[:, 1])


# ----------------------------------------------------------------------------------------------
# bad specs


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"top_k": 9, "n_experts": 8}, "top_k"),
        ({"n_tokens": -1}, "n_tokens"),
        ({"n_layers": 0}, "n_layers"),
        ({"n_experts": 40_000}, "n_experts"),
        ({"top_k": 1.5}, "top_k"),
        ({"seed": -3}, "seed"),
        ({"seq_len": 0.5}, "seq_len"),
        ({"zipf": -0.1}, "zipf"),
        ({"zipf": float("nan")}, "zipf"),
        ({"zipf": (1.0, 2.0)}, "zipf"),
        ({"n_teams": 9, "team_size": 8}, "n_teams"),
        ({"n_teams": 2, "team_size": 0}, "team_size"),
        ({"n_teams": 2, "team_size": 4, "team_strength": 1.0}, "team_strength"),
        ({"team_strength": 1.5}, "team_strength"),
        ({"stickiness": -0.1}, "stickiness"),
        ({"stickiness": 1.01}, "stickiness"),
        ({"domains": "code"}, "domains"),
        ({"domains": ("a", "a")}, "domains"),
        ({"domains": None}, "domains"),
        ({"domain_specificity": 2}, "domain_specificity"),
        ({"domain_order": "shuffle"}, "domain_order"),
        ({"n_generalists": 2}, "generalist_share"),
        ({"n_generalists": 2, "generalist_share": 1.0}, "generalist_share"),
        ({"n_generalists": 60, "generalist_share": 0.1, "n_teams": 2}, "n_teams"),
        ({"weights_dtype": "float64"}, "weights_dtype"),
        ({"phase": "train"}, "phase"),
        ({"n_tokens": True}, "n_tokens"),
    ],
)
def test_bad_spec_raises_usage_error(changes, field):
    with pytest.raises(UsageError, match=field) as info:
        SynthSpec(**changes)
    assert "\n" not in str(info.value)


def test_bad_chunk_size():
    with pytest.raises(UsageError, match="chunk_tokens"):
        next(synth_chunks(SynthSpec(n_tokens=10), chunk_tokens=0))


def test_edge_specs_are_accepted():
    SynthSpec(n_experts=8, top_k=4, n_teams=2, team_size=4, team_strength=1.0)  # teams alone fill k
    trace = synth_trace(
        SynthSpec(
            n_tokens=30,
            n_layers=1,
            n_experts=8,
            top_k=4,
            n_teams=2,
            team_size=4,
            team_strength=1.0,
            stickiness=1.0,
            weights_dtype=None,
        )
    )
    validate_experts(trace.experts, 8)
    for _, span in trace.iter_sequences():  # stickiness 1: every token repeats its sequence's first one
        rows = np.sort(trace.experts[span], axis=2)
        assert (rows == rows[:1]).all()
