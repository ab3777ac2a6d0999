"""Co-activation counts, the two nulls, the balanced clustering and the gain, against naive references;
recovery of planted teams, no structure in independent routing; the `coact` command."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

import moescope.cli
import reference_coact as ref
from conftest import random_trace
from moescope import fixture
from moescope.analyze.coact import (
    NULLS,
    _null_counts,
    _stream_keys,
    balanced_groups,
    clustering_gain,
    coact_counts,
    coactivation,
    group_sizes,
    write_coact_npz,
)
from moescope.cli.coact_cmd import coact
from moescope.errors import OutputExistsError, UsageError
from moescope.imports import read_input, write_output
from moescope.synth import SynthSpec, synth_trace
from moescope.trace import RoutingTrace


def _keys(seed: int, n: int, m: int = 1) -> np.ndarray:
    return np.stack([_stream_keys(seed, 0, r, 0, n) for r in range(m)])


def _teams(n_tokens: int = 6000, strength: float = 0.8, seed: int = 1) -> RoutingTrace:
    spec = SynthSpec(
        n_tokens=n_tokens,
        n_layers=2,
        n_experts=16,
        top_k=3,
        n_teams=4,
        team_size=4,
        team_strength=strength,
        seed=seed,
        weights_dtype=None,
    )
    return synth_trace(spec)


# -- counts ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("n_experts", "k", "seed"), [(8, 2, 0), (8, 3, 1), (13, 5, 2), (70, 4, 3)])
def test_counts_match_reference_and_invariants(n_experts, k, seed):
    tr = random_trace(n_tokens=120, n_layers=3, n_experts=n_experts, k=k, seed=seed)
    c = coact_counts(tr.experts, n_experts)
    np.testing.assert_array_equal(c, ref.coact_counts(tr.experts, n_experts))
    np.testing.assert_array_equal(coact_counts(tr.experts[:, 1], n_experts), c[1])  # one layer [tokens, k]
    assert c.dtype == np.int64 and np.array_equal(c, np.swapaxes(c, 1, 2))
    np.testing.assert_array_equal(np.einsum("lii->li", c), tr.counts().values)
    # each selection of i sits beside k - 1 others
    off = c.sum(axis=2) - np.einsum("lii->li", c)
    np.testing.assert_array_equal(off, (k - 1) * tr.counts().values)


def test_counts_add_over_token_chunks():
    tr = random_trace(n_tokens=500, n_layers=2, n_experts=16, k=4, seed=5)
    cuts = [0, 1, 77, 78, 300, 500]
    parts = [coact_counts(tr.experts[a:b], 16) for a, b in itertools.pairwise(cuts)]
    np.testing.assert_array_equal(sum(parts), coact_counts(tr.experts, 16))
    assert coact_counts(tr.experts[:0], 16).sum() == 0


def test_counts_refuse_bad_input():
    ex = np.array([[0, 1], [2, 9]])
    with pytest.raises(UsageError, match=r"expert id 9 is outside 0\.\.7"):
        coact_counts(ex, 8)
    with pytest.raises(UsageError, match="expected integer ids"):
        coact_counts(ex.astype(float), 16)
    with pytest.raises(UsageError, match="expected integer ids"):
        coact_counts(ex[0], 16)


# -- nulls ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(3))
def test_shuffle_null_matches_reference(seed):
    tr = random_trace(n_tokens=90, n_layers=1, n_experts=70, k=5, seed=seed)  # 70 experts: two bit words
    n_sel = coact_counts(tr.experts, 70)[0].diagonal().copy()
    keys = _keys(seed, 70)
    c = _null_counts(n_sel[None], 90, 5, keys, "shuffle")[0]
    np.testing.assert_array_equal(c, ref.shuffle_null(n_sel.tolist(), 90, keys[0].tolist()))
    np.testing.assert_array_equal(c.diagonal(), n_sel)  # every expert keeps its selections


@pytest.mark.parametrize("seed", range(3))
def test_swap_null_matches_reference_and_keeps_set_sizes(seed):
    tr = random_trace(n_tokens=90, n_layers=1, n_experts=8, k=3, seed=seed)
    n_sel = coact_counts(tr.experts, 8)[0].diagonal().copy()
    keys = _keys(seed, 8)
    c = _null_counts(n_sel[None], 90, 3, keys, "swap")[0]
    np.testing.assert_array_equal(c, ref.swap_null(n_sel.tolist(), 3, keys[0].tolist()))
    np.testing.assert_array_equal(c.diagonal(), n_sel)
    assert c.sum() - n_sel.sum() == 90 * 3 * 2  # N tokens of exactly k distinct experts: N k (k-1) pairs


def test_swap_null_with_a_saturated_expert():
    # expert 0 is chosen by every token: the deal repeats it often, and each repeat must find a partner
    n_sel = np.array([50, 20, 20, 10], dtype=np.int64)
    c = _null_counts(n_sel[None], 50, 2, _keys(4, 4), "swap")[0]
    np.testing.assert_array_equal(c, ref.swap_null(n_sel.tolist(), 2, _keys(4, 4)[0].tolist()))
    assert c[0, 0] == 50 and c[0, 1:].sum() == 50
    # one token cannot hold expert 1 twice: no partner exists
    with pytest.raises(UsageError, match="use the shuffle null"):
        _null_counts(np.array([[0, 2, 0, 0]]), 1, 2, _keys(0, 4), "swap")


def test_shuffle_null_mean_is_chance():
    # E[C_ij] = n_i n_j / N under the shuffle: 200 draws, tolerance from the hypergeometric variance
    n_sel, n_tok = np.array([30, 20, 12, 5, 40, 33], dtype=np.int64), 60
    draws = _null_counts(np.repeat(n_sel[None], 200, axis=0), n_tok, 2, _keys(9, 6, 200), "shuffle")
    p = n_sel[:, None] * n_sel[None, :] / n_tok**2
    sd = np.sqrt(n_tok * p * (1 - p) / 200)  # binomial bound on the hypergeometric sd of the mean
    off = ~np.eye(6, dtype=bool)
    z = np.abs(draws.mean(axis=0) - n_tok * p)[off] / sd[off]
    assert z.max() < 4.5 and len({d.tobytes() for d in draws}) == 200


def test_nulls_destroy_planted_structure():
    tr = _teams(4000)
    real = coact_counts(tr.experts[:, 0], 16)
    teams = tr.meta.extra["synth"]["truth"]["teams"][0]
    labels = np.zeros(16, dtype=np.int64)
    for g, members in enumerate(teams):
        labels[members] = g
    assert clustering_gain(real, 4000, labels).gain > 2
    for null in NULLS:
        shuffled = _null_counts(real.diagonal()[None].copy(), 4000, 3, _keys(1, 16), null)[0]
        assert abs(clustering_gain(shuffled, 4000, labels).gain - 1) < 0.1


# -- gain and clustering --------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_gain_matches_reference(seed):
    tr = random_trace(n_tokens=150, n_layers=1, n_experts=10, k=3, seed=seed)
    c = coact_counts(tr.experts[:, 0], 10)
    labels = np.random.default_rng(seed).integers(0, 3, size=10)
    got = clustering_gain(c, 150, labels)
    want = ref.gain(c, 150, labels.tolist())
    np.testing.assert_allclose(
        [got.gain, got.intra_share_observed, got.intra_share_expected, got.pair_ratio], want, rtol=1e-12
    )
    one = clustering_gain(c, 150, np.zeros(10, dtype=np.int64))  # a single group holds every pair
    assert one.gain == pytest.approx(1.0) and one.intra_share_observed == pytest.approx(1.0)
    assert got.pair_ratio == pytest.approx(2 * 10 / (3 * 9), rel=0.1)  # (k-1) E / (k (E-1)), near-uniform


@pytest.mark.parametrize(("n_experts", "n_groups"), [(8, 2), (8, 4), (9, 2), (10, 3), (9, 4), (12, 4)])
def test_clustering_reaches_the_brute_force_optimum(n_experts, n_groups):
    hits = 0
    for seed in range(6):
        tr = random_trace(n_tokens=300, n_layers=1, n_experts=n_experts, k=3, seed=seed)
        c = coact_counts(tr.experts[:, 0], n_experts)
        labels = balanced_groups(c, n_groups, seed=seed)
        assert sorted(np.bincount(labels)) == sorted(group_sizes(n_experts, n_groups))
        best, _ = ref.best_partitions(c, group_sizes(n_experts, n_groups).tolist())
        ours = ref.objective(c, labels.tolist())
        assert ours <= best + 1e-12
        hits += ours >= best - 1e-12
    # a heuristic on pure noise (the hardest case: a flat landscape): 1 miss in 120 such runs measured
    assert hits >= 5


def test_clustering_is_deterministic_and_canonical():
    c = coact_counts(random_trace(n_tokens=400, n_layers=1, n_experts=12, k=3, seed=2).experts[:, 0], 12)
    a = balanced_groups(c, 4, seed=3)
    np.testing.assert_array_equal(a, balanced_groups(c, 4, seed=3))
    first = [int(np.flatnonzero(a == g)[0]) for g in range(4)]
    assert first == sorted(first) and a[0] == 0  # groups numbered by smallest member
    assert group_sizes(10, 4).tolist() == [3, 3, 2, 2]
    with pytest.raises(UsageError, match=r"groups is 7; expected an integer in 2\.\.6"):
        balanced_groups(c, 7)
    with pytest.raises(UsageError, match="not symmetric"):
        balanced_groups(np.triu(c), 3)


# -- the analysis ---------------------------------------------------------------------------------
def test_planted_teams_are_recovered():
    tr = _teams()
    result = coactivation(tr, groups=4, n_null=2, seed=0)
    truth = tr.meta.extra["synth"]["truth"]["teams"]
    for i, row in enumerate(result.layers):
        assert sorted(map(sorted, row.groups)) == sorted(map(sorted, truth[i]))
        found = np.zeros(16, dtype=np.int64)
        planted = np.zeros(16, dtype=np.int64)
        for g, members in enumerate(row.groups):
            found[list(members)] = g
        for g, members in enumerate(truth[i]):
            planted[members] = g
        assert ref.adjusted_rand_index(found.tolist(), planted.tolist()) == pytest.approx(1.0)
        assert row.excess > 2 and row.structured and row.gain > row.null_gain_mean + 5 * row.null_gain_std
    assert result.structured and result.structured_layers == 2


@pytest.mark.parametrize("zipf", [0.0, 1.5])
def test_independent_routing_reads_no_structure(zipf):
    # no teams: a real layer is exchangeable with its swap null. Measured over k = 2..8, E = 16..128,
    # Zipf 0..2: excess within 0.98..1.02 (null std ~0.001-0.01); 0.05 leaves room for this small trace
    spec = SynthSpec(n_tokens=6000, n_layers=2, n_experts=16, top_k=2, zipf=zipf, seed=4, weights_dtype=None)
    result = coactivation(synth_trace(spec), groups=4, n_null=3, seed=1)
    for row in result.layers:
        assert abs(row.excess - 1) < 0.05 and not row.structured and not row.grouped
        assert row.gain > 1  # groups fitted to noise find some, which is why the null is there
        assert row.pair_excess is not None and abs(row.pair_excess - 1) < 0.05  # the pair test too
    assert not result.structured


@pytest.mark.parametrize("groups", [4, 8, 16])
def test_team_verdict_does_not_depend_on_the_group_count(groups):
    """The README's `trace synth --teams 8 --team-strength 0.5` (teams of 4 among 128 experts, top-8): real
    structure at any D, found by the pair test; 8 groups of 16 capture little of it (they read 'no' before)."""
    spec = SynthSpec(
        n_tokens=20_000,
        n_layers=2,
        n_experts=128,
        top_k=8,
        n_teams=8,
        team_size=4,
        team_strength=0.5,
        seed=1,
        weights_dtype=None,
    )
    result = coactivation(synth_trace(spec), groups=groups, n_null=3, seed=1)
    assert result.structured and result.structured_layers == 2, [r.pair_excess for r in result.layers]
    assert all(r.pair_excess >= 1.3 for r in result.layers)  # measured 1.40-1.70


def test_shuffle_null_reads_top_k_as_structure():
    # why the swap null is the default: with k=2 and skewed popularity, fixed-size sampling alone makes
    # popular pairs rarer than n_i n_j / N, and clustering a real layer exploits it; a shuffled one cannot
    spec = SynthSpec(n_tokens=6000, n_layers=2, n_experts=16, top_k=2, zipf=2.0, seed=4, weights_dtype=None)
    tr = synth_trace(spec)
    shuffle = coactivation(tr, groups=8, null="shuffle", seed=1)
    swap = coactivation(tr, groups=8, null="swap", seed=1)
    assert shuffle.median_excess > 1.15 and shuffle.structured
    assert abs(swap.median_excess - 1) < 0.05 and not swap.structured


def test_layers_are_independent_of_the_selection_and_seeded():
    tr = random_trace(n_tokens=300, n_layers=3, n_experts=8, k=2, seed=1)
    whole = coactivation(tr, groups=2, seed=5)
    part = coactivation(tr, groups=2, seed=5, layers=[3, 1])
    assert [r.layer for r in part.layers] == [3, 1]
    assert part.layers[0] == whole.layers[2] and part.layers[1] == whole.layers[0]
    other = coactivation(tr, groups=2, seed=6)
    assert other.layers[0].null_gains != whole.layers[0].null_gains


def test_progress_result_and_matrices(tmp_path):
    tr = random_trace(n_tokens=200, n_layers=3, n_experts=8, k=3, seed=2)
    calls = []
    result = coactivation(tr, groups=2, n_null=1, keep_matrices=True, progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (3, 3) and [d for d, _ in calls] == sorted(d for d, _ in calls)
    d = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert d["layers"][0]["null_gain_std"] is None and len(d["layers"][0]["counts"]) == 8
    assert d["group_sizes"] == [4, 4] and d["null"] == "swap"
    np.testing.assert_array_equal(result.layers[1].counts, coact_counts(tr.experts[:, 1], 8))
    path = write_coact_npz(result, tmp_path / "m.npz")
    with np.load(path) as z:
        np.testing.assert_array_equal(z["counts"], coact_counts(tr.experts, 8))
        assert z["layer_ids"].tolist() == [1, 2, 3] and int(z["n_tokens"]) == 200
        n = z["counts"][0].diagonal()
        np.testing.assert_allclose(z["lift"][0] * (n[:, None] * n[None, :] / 200), z["counts"][0])
        assert sorted(np.bincount(z["groups"][2])) == [4, 4]
    with pytest.raises(OutputExistsError):
        write_coact_npz(result, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.npz"]  # no temporary left behind
    with pytest.raises(UsageError, match="keep_matrices=True"):
        write_coact_npz(coactivation(tr, groups=2, n_null=1), tmp_path / "n.npz")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"groups": 1}, "groups is 1"),
        ({"groups": 5}, r"in 2\.\.4"),
        ({"groups": 2.0}, "groups is 2.0"),
        ({"n_null": 0}, "n_null is 0"),
        ({"null": "perm"}, "null is 'perm'"),
        ({"layers": [9]}, r"layer\(s\) \[9\] are not in this trace"),
        ({"min_excess": 0.5}, "min_excess is 0.5"),
    ],
)
def test_refusals(kwargs, match):
    with pytest.raises(UsageError, match=match):
        coactivation(random_trace(n_experts=8), **{"groups": 2, **kwargs})


def test_default_groups_and_top_k_one():
    assert coactivation(random_trace(n_experts=8), n_null=1).n_groups == 4  # min(8, E // 2)
    assert coactivation(random_trace(n_tokens=200, n_experts=40, k=4), n_null=1).group_sizes == (5,) * 8
    with pytest.raises(UsageError, match="top_k is 1"):
        coactivation(random_trace(n_experts=8, k=1))


@pytest.mark.realdata
def test_esft_has_real_pairwise_structure(realdata):
    # measured: every layer structured, excess 1.9-3.2 (median 2.47), null gain ~1.05 +- 0.002
    tr = read_input(realdata / "esft-dsv2lite" / "trace.npz")
    result = coactivation(tr, groups=8, layers=[1, 13, 26], n_null=2)
    assert result.structured and all(r.excess > 1.8 for r in result.layers)
    assert all(1.0 < r.null_gain_mean < 1.1 for r in result.layers)


# -- the command ----------------------------------------------------------------------------------
def _app() -> typer.Typer:
    app = typer.Typer(rich_markup_mode="markdown")
    app.command()(coact)

    @app.callback()
    def _root() -> None:
        pass

    return app


def test_command_table_json_and_matrix(tmp_path):
    runner = CliRunner()
    res = runner.invoke(_app(), ["coact", str(fixture.TRACE), "--groups", "4", "--n-null", "2"])
    assert res.exit_code == 0, res.output
    assert "excess" in res.output and "Pair test (no group count)" in res.output and "pairwise structure" in res.output
    out = tmp_path / "c.npz"
    res = runner.invoke(_app(), ["coact", str(fixture.TRACE), "--json", "--layers", "1,3", "--matrix-out", str(out)])
    d = json.loads(res.stdout)
    assert res.exit_code == 0 and [r["layer"] for r in d["layers"]] == [1, 3] and "counts" not in d["layers"][0]
    with np.load(out) as z:
        assert z["counts"].shape == (2, 16, 16)
    res = runner.invoke(_app(), ["coact", str(fixture.TRACE), "--matrix-out", str(out)])
    assert isinstance(res.exception, OutputExistsError)
    res = runner.invoke(_app(), ["coact", str(fixture.TRACE), "--groups", "9"])
    assert isinstance(res.exception, UsageError) and "groups is 9" in str(res.exception)


def test_command_through_main(capsys, tmp_path):
    if "coact" not in [cmd.name for cmd in moescope.cli.app.registered_commands]:
        pytest.skip("`coact` is not registered in moescope.cli yet")
    from conftest import run

    path = tmp_path / "t.npz"
    write_output(random_trace(n_tokens=80, n_experts=8, k=2), path)
    code, out, _ = run(capsys, "coact", path, "--groups", "2", "--json")
    assert code == 0 and len(json.loads(out)["layers"]) == 2
    code, _, err = run(capsys, "coact", path, "--null", "perm")
    assert code == 2 and "--null 'perm'" in err
    code, out, _ = run(capsys, "coact", "--help")
    assert code == 0 and "Example" in out
