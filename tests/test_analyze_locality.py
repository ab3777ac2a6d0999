"""Locality and prefetch (`moescope.analyze.locality`, `moescope.analyze.prefetch`) against naive references."""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import json

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

import reference_locality as ref
from conftest import random_trace
from moescope import fixture
from moescope.analyze import prefetch as pf
from moescope.errors import UsageError
from moescope.imports import read_input
from moescope.slicing import select_layers, select_sequences, split_part, split_ranges
from moescope.synth import SynthSpec, synth_trace
from moescope.trace import RoutingTrace

# the module (the package re-exports the function of the same name)
loc = importlib.import_module("moescope.analyze.locality")

SMALL_WIDTHS = (1, 2, 3, 5, 8)


def edge_trace(seed: int, k: int = 3, n_experts: int = 7) -> RoutingTrace:
    """Sequences of 1, 2, 3 tokens and longer ones, with much reuse (few experts)."""
    rng = np.random.default_rng(seed)
    lengths = [1, 2, 3, 9, 1, 17, 6]
    n = sum(lengths)
    experts = np.argsort(rng.random((n, 3, n_experts)), axis=2)[..., :k].astype(np.int16)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return RoutingTrace(experts, n_experts, seq_starts=starts, layer_ids=[3, 5, 9])


def traces():
    for seed in range(3):
        yield random_trace(n_tokens=90, n_layers=3, n_experts=8, k=3, n_seq=6, seed=seed)
        yield edge_trace(seed)


# -- temporal sums ------------------------------------------------------------------------------
@pytest.mark.kernels
@pytest.mark.parametrize("case", range(6))
def test_temporal_counts_match_reference(case):
    tr = list(traces())[case]
    got = loc.temporal_counts(tr, widths=SMALL_WIDTHS)
    for i in range(tr.n_layers):
        overlap, pairs = ref.reuse(tr.experts, tr.seq_starts, i)
        assert got.overlap[i] == overlap and got.pairs == pairs
        assert got.shuffle_expected[i] == pytest.approx(ref.shuffled_expected(tr.experts, tr.seq_starts, i))
        warm, cold = ref.gaps(tr.experts, tr.seq_starts, i)
        assert got.cold[i] == cold
        assert np.bincount(warm, minlength=loc.GAP_EXACT + 1).tolist() == got.gap_exact[i].tolist()
        ws = ref.working_sets(tr.experts, tr.seq_starts, i)
        assert np.bincount([d for _, d in ws], minlength=tr.n_experts + 1).tolist() == got.ws_hist[i].tolist()
        for wi, w in enumerate(SMALL_WIDTHS):
            assert (got.window_sum[i, wi], got.windows[wi]) == ref.window_sum(tr.experts, tr.seq_starts, i, w)
        np.testing.assert_array_equal(got.selections[i], np.bincount(tr.experts[:, i].ravel(), minlength=tr.n_experts))
    assert got.gap_over.sum() == 0


@pytest.mark.kernels
def test_default_window_widths_on_long_sequences():
    # sequences longer than the widest window exercise the gap shortcut for tokens far from the end
    tr = random_trace(n_tokens=400, n_layers=1, n_experts=12, k=2, n_seq=3, seed=9)
    got = loc.temporal_counts(tr)
    for wi, w in enumerate(loc.WIDTHS):
        assert (got.window_sum[0, wi], got.windows[wi]) == ref.window_sum(tr.experts, tr.seq_starts, 0, w)


@pytest.mark.kernels
def test_shuffled_expectation_is_the_permutation_average():
    tr = edge_trace(5, k=2, n_experts=4)
    tr = select_sequences(tr, [0, 1, 2, 4, 6])  # lengths 1, 2, 3, 1, 6: every permutation enumerable
    got = loc.temporal_counts(tr)
    for i in range(tr.n_layers):
        assert got.shuffle_expected[i] == pytest.approx(ref.shuffled_by_enumeration(tr.experts, tr.seq_starts, i))


@pytest.mark.kernels
@pytest.mark.parametrize("seed", range(3))
def test_seeded_shuffle_pass_matches_reference_on_permuted_tokens(seed):
    tr = random_trace(n_tokens=80, n_layers=2, n_experts=6, k=2, n_seq=5, seed=seed)
    order = loc.shuffle_within_sequences(tr.seq_starts, tr.n_tokens, seed)
    seq = tr.token_sequence()
    assert sorted(order.tolist()) == list(range(tr.n_tokens)) and np.array_equal(seq[order], seq)
    assert np.array_equal(order, loc.shuffle_within_sequences(tr.seq_starts, tr.n_tokens, seed))
    assert not np.array_equal(order, loc.shuffle_within_sequences(tr.seq_starts, tr.n_tokens, seed + 10))
    got = loc.temporal_counts(tr, order=order, widths=SMALL_WIDTHS)
    permuted = tr.experts[order]
    for i in range(2):
        assert got.overlap[i] == ref.reuse(permuted, tr.seq_starts, i)[0]
        warm, _ = ref.gaps(permuted, tr.seq_starts, i)
        assert np.bincount(warm, minlength=loc.GAP_EXACT + 1).tolist() == got.gap_exact[i].tolist()
        for wi, w in enumerate(SMALL_WIDTHS):
            assert got.window_sum[i, wi] == ref.window_sum(permuted, tr.seq_starts, i, w)[0]
    with pytest.raises(UsageError, match="another sequence"):
        loc.temporal_counts(tr, order=np.arange(tr.n_tokens)[::-1].copy())


@pytest.mark.kernels
def test_long_gaps_beyond_the_exact_histogram():
    # one expert used at tokens 0 and GAP_EXACT + 5: one gap above the exact range, binned by log2
    n, gap = loc.GAP_EXACT + 10, loc.GAP_EXACT + 5
    experts = np.zeros((n, 1, 1), dtype=np.int16) + 1
    experts[0, 0, 0] = experts[gap, 0, 0] = 0
    tr = RoutingTrace(experts, 2)
    got = loc.temporal_counts(tr)
    assert got.gap_over[0, (gap - 1).bit_length()] == 1 and got.gap_exact[0, 1] == n - 4 and got.gap_exact[0, 2] == 1
    r = loc.locality(tr, budgets=(1,), widths=(1, 4))
    assert r.layers[0].gap_hist[(gap - 1).bit_length()] == 1 and r.gap_bins[1] == "2" and r.gap_bins[3] == "5-8"


@pytest.mark.kernels
@pytest.mark.parametrize("seed", range(3))
def test_chunks_of_whole_sequences_add_up(seed):
    tr = random_trace(n_tokens=120, n_layers=3, n_experts=8, k=2, n_seq=7, seed=seed)
    a, b = select_sequences(tr, range(3)), select_sequences(tr, range(3, 7))
    whole, parts = loc.temporal_counts(tr), loc.temporal_counts(a) + loc.temporal_counts(b)
    for f in ("overlap", "cold", "gap_exact", "window_sum", "ws_hist", "ws_by_length", "selections", "windows"):
        np.testing.assert_array_equal(getattr(whole, f), getattr(parts, f))
    np.testing.assert_allclose(whole.shuffle_expected, parts.shuffle_expected)
    assert (whole.pairs, whole.tokens) == (parts.pairs, parts.tokens)
    t_whole, t_parts = pf.learn_tables(tr), pf.learn_tables(a) + pf.learn_tables(b)
    for f in ("counts", "coact", "transition", "cross"):
        np.testing.assert_array_equal(getattr(t_whole, f), getattr(t_parts, f))
    h_whole = pf.hit_counts(tr, t_whole, (2, 4))
    h_a, h_b = pf.hit_counts(a, t_whole, (2, 4)), pf.hit_counts(b, t_whole, (2, 4))
    np.testing.assert_array_equal(h_whole.next_token, h_a.next_token + h_b.next_token)
    np.testing.assert_array_equal(h_whole.cross, h_a.cross + h_b.cross)


# -- train tables and prediction ------------------------------------------------------------------
@pytest.mark.kernels
@pytest.mark.parametrize("case", range(6))
def test_tables_match_reference_and_come_from_the_train_halves(case):
    tr = list(traces())[case]
    got = pf.learn_tables(tr)
    for i in range(tr.n_layers):
        want = ref.tables(tr.experts, tr.seq_starts, tr.n_experts, i)
        for name in ("counts", "coact", "transition"):
            np.testing.assert_array_equal(getattr(got, name)[i], want[name])
        if i + 1 < tr.n_layers:
            np.testing.assert_array_equal(got.cross[i], want["cross"])
    train = split_part(tr, "train")
    same = pf.learn_tables(train, (train.seq_starts, train.seq_ends))
    for name in ("counts", "coact", "transition", "cross"):
        np.testing.assert_array_equal(getattr(got, name), getattr(same, name))


@pytest.mark.kernels
@pytest.mark.parametrize("case", range(6))
def test_prefetch_and_cross_hits_match_reference(case):
    tr = list(traces())[case]
    budgets = (1, 2, 3, 5, tr.n_experts)
    r = loc.locality(tr, budgets=budgets, widths=SMALL_WIDTHS)
    for i in range(tr.n_layers):
        row = r.prefetch[i]
        for name in pf.PREDICTORS:
            for bi, b in enumerate(budgets):
                hits, pairs = ref.prefetch_hits(tr.experts, tr.seq_starts, tr.n_experts, i, name, b)
                assert row.pairs == pairs == r.test_pairs
                assert row.hit_rate[name][bi] == pytest.approx(hits / (pairs * tr.top_k)), (name, b)
        assert row.hit_rate["lfu"][-1] == 1.0  # B = E predicts everything
    for i, x in enumerate(r.cross):
        hits, freq, tokens = ref.cross_hits(tr.experts, tr.seq_starts, tr.n_experts, i)
        assert x.tokens == tokens and (x.layer, x.next_layer) == tuple(tr.layer_ids[i : i + 2])
        assert x.precision == pytest.approx(hits / (tokens * tr.top_k))
        assert x.frequency == pytest.approx(freq / (tokens * tr.top_k)) and x.chance == tr.top_k / tr.n_experts


@pytest.mark.kernels
@pytest.mark.parametrize("self_weight", [0, 3, 10**6])
def test_scorer_modes_match_a_direct_ranking(self_weight):
    # static (no self weight), small self weight (scored with the generic key), self weight above every base
    tr = random_trace(n_tokens=70, n_layers=1, n_experts=9, k=3, n_seq=3, seed=self_weight % 7)
    base = np.random.default_rng(1).integers(0, 6, 9)
    for rows in (None, np.random.default_rng(2).integers(0, 4, (9, 9))):
        scorer = pf.Scorer(base, self_weight, rows)
        starts, stops = split_ranges(tr, "test")
        got = pf._run_jobs(pf.layer_slab(tr.experts, 0, 1), [pf._Job(0, 0, 1, scorer)], starts, stops, 1)[0]
        want = np.zeros(9, dtype=np.int64)
        for a, b in zip(starts.tolist(), stops.tolist(), strict=True):
            for t in range(a, b - 1):
                cur = [int(e) for e in tr.experts[t, 0]]
                score = {f: int(base[f]) + self_weight * (f in cur) for f in range(9)}
                if rows is not None:
                    score = {f: v + sum(int(rows[e, f]) for e in cur) for f, v in score.items()}
                for budget in range(1, 10):
                    want[budget - 1] += len(ref.top(score, budget) & {int(e) for e in tr.experts[t + 1, 0]})
        np.testing.assert_array_equal(got, want)


@pytest.mark.kernels
def test_int64_keys_when_scores_exceed_int32():
    tr = random_trace(n_tokens=60, n_layers=2, n_experts=8, k=2, n_seq=3, seed=4)
    tables = pf.learn_tables(tr)
    big = pf.TrainTables(
        tables.counts * 10**8, tables.coact * 10**8, tables.transition * 10**8, tables.cross * 10**8, 0, 0
    )
    small, large = pf.hit_counts(tr, tables, (2, 4)), pf.hit_counts(tr, big, (2, 4))
    np.testing.assert_array_equal(small.next_token, large.next_token)  # scaling counts keeps every ranking


@pytest.mark.kernels
def test_learned_tables_never_see_the_test_halves():
    # first halves use experts 0..3, second halves 4..7: anything learned on train ranks 0..3 first
    rng = np.random.default_rng(0)
    lengths = [10, 12, 9, 14]
    rows = []
    for n in lengths:
        for t in range(n):
            pool = np.arange(4) if t < n // 2 else np.arange(4, 8)
            rows.append([rng.permutation(pool)[:2], rng.permutation(pool)[:2]])
    experts = np.asarray(rows, dtype=np.int16)
    tr = RoutingTrace(experts, 8, seq_starts=np.concatenate([[0], np.cumsum(lengths)[:-1]]))
    r = loc.locality(tr, budgets=(2, 4))
    for row in r.prefetch:
        assert row.hit_rate["lfu"] == (0.0, 0.0)
        assert row.hit_rate["coact"] == (0.0, 0.0) and row.hit_rate["transition"] == (0.0, 0.0)
        # `last` hits through the current token's experts (not learned); its LFU padding adds nothing
        assert row.hit_rate["last"][1] == row.hit_rate["last"][0] > 0
    assert r.cross[0].precision == 0.0 and r.cross[0].frequency == 0.0
    # the same trace with halves swapped: LFU learned on 4..7 still misses the test experts 0..3
    swapped = np.where(experts < 4, experts + 4, experts - 4).astype(np.int16)
    r2 = loc.locality(tr.replace(experts=swapped), budgets=(2, 4))
    assert all(row.hit_rate["lfu"] == (0.0, 0.0) for row in r2.prefetch)


# -- end to end -------------------------------------------------------------------------------------
def _synth(stickiness: float) -> RoutingTrace:
    spec = SynthSpec(
        n_tokens=20_000, n_layers=2, n_experts=32, top_k=4, seq_len=200, stickiness=stickiness, seed=3,
        weights_dtype=None,
    )  # fmt: skip
    return synth_trace(spec)


def test_stickiness_shows_as_reuse_beyond_the_shuffle():
    sticky, plain = loc.locality(_synth(0.8)), loc.locality(_synth(0.0))
    for row in sticky.layers:
        assert row.reuse > 2 * row.reuse_shuffled_expected and row.median_gap == 1
        assert row.window[3] < 0.8 * row.window_shuffled[3]  # W(8): fewer distinct experts than shuffled
    for row in plain.layers:
        assert row.reuse_ratio == pytest.approx(1.0, abs=0.05)
        assert row.reuse_shuffled == pytest.approx(row.reuse_shuffled_expected, rel=0.05)
        assert row.window[3] == pytest.approx(row.window_shuffled[3], rel=0.03)
    # a sticky trace is easy to prefetch with `last`; independent tokens are not
    assert sticky.prefetch_overall["last"][0].mean > 0.75 > plain.prefetch_overall["last"][0].mean


@pytest.mark.kernels
@pytest.mark.parametrize("case", range(6))
def test_result_figures_match_reference(case):
    tr = list(traces())[case]
    r = loc.locality(tr, budgets=(2,), widths=SMALL_WIDTHS, seed=1)
    order = loc.shuffle_within_sequences(tr.seq_starts, tr.n_tokens, 1)
    k = tr.top_k
    for i, row in enumerate(r.layers):
        overlap, pairs = ref.reuse(tr.experts, tr.seq_starts, i)
        assert row.reuse == pytest.approx(overlap / (pairs * k))
        assert row.reuse_shuffled == pytest.approx(ref.reuse(tr.experts[order], tr.seq_starts, i)[0] / (pairs * k))
        assert row.reuse_independent == pytest.approx(ref.independent(tr.experts, i))
        assert row.reuse_uniform == k / tr.n_experts
        warm, cold = ref.gaps(tr.experts, tr.seq_starts, i)
        assert ref.isclose(row.median_gap, ref.median(warm)) and row.cold == cold
        assert ref.isclose(row.median_gap_shuffled, ref.median(ref.gaps(tr.experts[order], tr.seq_starts, i)[0]))
        assert sum(row.gap_hist) == len(warm) and row.gap_hist[0] == overlap
        assert row.cold_share == pytest.approx(cold / (tr.n_tokens * k))
        ws = [d for _, d in ref.working_sets(tr.experts, tr.seq_starts, i)]
        assert row.working_set_mean == pytest.approx(np.mean(ws)) and row.working_set_median == np.median(ws)
        assert row.window[0] == k and all(a <= b + 1e-12 for a, b in itertools.pairwise(row.window))
    dist = r.working_set_by_length
    assert sum(x.sequences for x in dist) == tr.n_sequences and all(x.min_len <= x.max_len for x in dist)
    json.dumps(r.to_dict(), allow_nan=False)


def test_hist_median_equals_numpy():
    rng = np.random.default_rng(0)
    for _ in range(20):
        data = rng.integers(0, 9, rng.integers(1, 12))
        assert loc.hist_median(np.bincount(data)) == np.median(data)
    assert loc.hist_median(np.zeros(4, dtype=np.int64)) is None


@pytest.mark.kernels
def test_progress_and_layer_blocks():
    tr = random_trace(n_tokens=100, n_layers=5, n_experts=8, k=2, n_seq=4, seed=2)
    calls = []
    r = loc.locality(tr, progress=lambda d, n: calls.append((d, n)))
    assert calls[-1] == (5, 5) and [d for d, _ in calls] == sorted(d for d, _ in calls)
    # blocks of layers give the same result as one layer at a time (layers are independent); the gap
    # histogram's length is the trace's longest bin, so it is compared without trailing zeros
    one = [loc.locality(select_layers(tr, [lid])) for lid in tr.layer_ids.tolist()]
    for i, single in enumerate(one):
        a, b = single.layers[0], r.layers[i]
        assert repr(dataclasses.replace(a, gap_hist=())) == repr(dataclasses.replace(b, gap_hist=()))
        assert np.trim_zeros(np.array(a.gap_hist), "b").tolist() == np.trim_zeros(np.array(b.gap_hist), "b").tolist()
        assert single.prefetch[0] == r.prefetch[i]


def test_refusals():
    tr = random_trace(n_tokens=40, n_layers=2, n_experts=8, k=2, n_seq=3)
    with pytest.raises(UsageError, match="budget 0 is not"):
        loc.locality(tr, budgets=(0, 4))
    with pytest.raises(UsageError, match="budget 9 is not"):
        loc.locality(tr, budgets=(9,))
    with pytest.raises(UsageError, match="from lfu, coact, transition, last"):
        loc.locality(tr, predictors=("lfu", "oracle"))
    with pytest.raises(UsageError, match="window widths"):
        loc.locality(tr, widths=(0, 2))
    with pytest.raises(UsageError, match="seed is -1"):
        loc.locality(tr, seed=-1)
    single = RoutingTrace(tr.experts[:5], 8, seq_starts=range(5))
    with pytest.raises(UsageError, match="no two consecutive tokens"):
        loc.locality(single)
    pairs_only = RoutingTrace(tr.experts[:6], 8, seq_starts=[0, 2, 4])
    with pytest.raises(UsageError, match="at least 3 tokens"):
        loc.locality(pairs_only)


# -- CLI ----------------------------------------------------------------------------------------------
def _app() -> typer.Typer:
    from moescope.cli.locality_cmd import locality

    app = typer.Typer()
    app.command()(locality)
    return app


def test_cli_json_on_the_fixture_trace():
    res = CliRunner().invoke(_app(), [str(fixture.TRACE), "--json", "--budget", "2,4", "--seed", "3"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    tr = read_input(fixture.TRACE)
    assert len(d["layers"]) == tr.n_layers and len(d["cross"]) == tr.n_layers - 1 and d["budgets"] == [2, 4]
    assert d["seed"] == 3 and d["predictors"] == list(pf.PREDICTORS)
    overlap, pairs = ref.reuse(tr.experts, tr.seq_starts, 0)
    assert d["layers"][0]["reuse"] == pytest.approx(overlap / (pairs * tr.top_k))
    assert d["prefetch_chance"] == [2 / 16, 4 / 16]


def test_cli_tables_options_and_errors():
    runner = CliRunner()
    res = runner.invoke(_app(), [str(fixture.TRACE), "--layers", "1-2", "--predictor", "lfu,last", "--per-layer"])
    assert res.exit_code == 0, res.output
    for text in ("temporal locality", "cross-layer prediction", "next-token prefetch hit rate", "hit rate per layer"):
        assert text in res.stdout
    assert "coact" not in res.stdout.split("next-token prefetch")[1]
    res = runner.invoke(_app(), [str(fixture.TRACE), "--predictor", "oracle"])
    assert res.exit_code != 0 and isinstance(res.exception, UsageError) and "oracle" in str(res.exception)
    res = runner.invoke(_app(), [str(fixture.TRACE), "--budget", "99"])
    assert isinstance(res.exception, UsageError) and "budget 99" in str(res.exception)
    res = runner.invoke(_app(), ["--help"])
    assert res.exit_code == 0 and "Example" in res.stdout
    assert all(name in res.stdout for name in pf.PREDICTORS)


def test_cli_predictor_choices_are_the_registry():
    import inspect

    from moescope.cli.locality_cmd import locality

    default = inspect.signature(locality).parameters["predictor"].default
    assert default.split(",") == list(pf.PREDICTORS)


# -- real data ---------------------------------------------------------------------------------------
@pytest.mark.kernels
@pytest.mark.realdata
def test_esft_slice_matches_reference(realdata):
    tr = read_input(realdata / "esft-dsv2lite" / "trace.npz")
    small = select_layers(select_sequences(tr, range(3)), tr.layer_ids[:3].tolist())
    r = loc.locality(small, budgets=(6, 12), widths=SMALL_WIDTHS)
    for i in range(3):
        overlap, pairs = ref.reuse(small.experts, small.seq_starts, i)
        assert r.layers[i].reuse == pytest.approx(overlap / (pairs * small.top_k))
        hits, n = ref.prefetch_hits(small.experts, small.seq_starts, small.n_experts, i, "coact", 12)
        assert r.prefetch[i].hit_rate["coact"][1] == pytest.approx(hits / (n * small.top_k))


@pytest.mark.realdata
def test_esft_whole_trace(realdata):
    tr = read_input(realdata / "esft-dsv2lite" / "trace.npz")
    full = loc.locality(tr)
    assert len(full.layers) == 26 and len(full.cross) == 25 and full.budgets == (6, 12, 24)
    for p in full.predictors:
        assert all(0 <= s.mean <= 1 for s in full.prefetch_overall[p])


def test_locality_and_analyze_state_reuse_alike(capsys, tmp_path):
    """One definition of the reuse ratio (median of the per-layer ratios) in `locality` and `analyze`."""
    from conftest import random_trace, run
    from moescope.analyze.locality import locality, reuse_sentence
    from moescope.store import save_trace

    trace = random_trace(n_tokens=400, n_layers=3, n_experts=16, k=2, n_seq=4, seed=5)
    save_trace(trace, tmp_path / "t.zarr")
    want = reuse_sentence(locality(trace).summary)
    flat = lambda s: " ".join(s.replace("│", " ").split())  # noqa: E731 (the console wraps lines and cells)
    code, out, err = run(capsys, "locality", tmp_path / "t.zarr")
    assert code == 0, err
    assert want in flat(out)
    code, out, err = run(capsys, "analyze", tmp_path / "t.zarr", "--only", "temporal")
    assert code == 0, err
    assert want in flat(out)


def test_lookahead_recall_matches_a_naive_count_and_a_perfect_lookahead_scores_one(capsys, tmp_path):
    from conftest import random_trace, run
    from moescope.analyze.locality import locality
    from moescope.imports import write_output

    tr = random_trace(n_tokens=300, n_layers=3, n_experts=8, k=2, n_seq=5, seed=2, lookahead=2)
    result = locality(tr)
    starts, stops = split_ranges(tr, "test")
    test = [t for a, b in zip(starts, stops, strict=True) for t in range(a, b)]
    la = tr.extras["lookahead"]
    for row in result.lookahead:
        i, d = tr.layer_ids.tolist().index(row.layer), row.distance
        hits = sum(len(set(la[t, i, d - 1].tolist()) & set(tr.experts[t, i + d].tolist())) for t in test)
        assert row.recall == pytest.approx(hits / (len(test) * 2))
        assert row.target == tr.layer_ids[i + d] and ("cross-layer" in row.id_only) == (d == 1)
    assert [(r.layer, r.distance) for r in result.lookahead] == [(1, 1), (1, 2), (2, 1)]
    perfect = tr.extras["lookahead"].copy()
    for d in (1, 2):
        perfect[:, : 3 - d, d - 1] = tr.experts[:, d:]
    best = locality(tr.replace(extras={"lookahead": perfect}))
    assert all(r.recall == 1.0 for r in best.lookahead) and best.summary["lookahead_recall_d1"].median == 1.0
    # layers 1 and 3 only: 1 -> 3 is the captured distance 2, now distance 1; nothing else was captured
    from moescope.slicing import select_layers

    gap = locality(select_layers(tr, [1, 3]))
    assert [(r.layer, r.target, r.distance) for r in gap.lookahead] == [(1, 3, 1)]
    write_output(tr, tmp_path / "t.npz")
    code, out, err = run(capsys, "locality", tmp_path / "t.npz")
    assert code == 0, err
    assert "lookahead: the later routers" in out and "Median over layers: distance 1: lookahead" in " ".join(
        out.split()
    )
