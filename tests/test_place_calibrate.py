"""The refined methods' train caps, chosen by validation inside the fitting data (`moescope.place.calibrate`)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from conftest import random_trace
from moescope.place import PlaceParams, TrainData, compare_placements
from moescope.place.calibrate import FALLBACK, GRID, Calibration, calibrate, inner_splits
from moescope.place.methods import METHODS
from moescope.slicing import split_halves
from moescope.synth import SynthSpec, synth_trace
from moescope.trace import RoutingTrace


def _planted(seed: int = 3, n_layers: int = 3) -> RoutingTrace:
    spec = SynthSpec(
        n_tokens=2400, n_layers=n_layers, n_experts=16, top_k=2, seq_len=120.0, n_teams=4, team_strength=0.6, seed=seed
    )
    return synth_trace(spec)


def test_inner_splits_mirror_the_protocol():
    tr = _planted()
    train, _ = split_halves(tr)
    desc, folds = inner_splits(train, "halves")
    assert "time-aware" in desc and len(folds) == 1
    fit, val = folds[0]
    first, second = split_halves(train)
    np.testing.assert_array_equal(fit.experts, first.experts)
    np.testing.assert_array_equal(val.experts, second.experts)
    assert inner_splits(train, "all")[1] == []

    labelled = tr.replace(seq_labels=[("a", "b", "c")[i % 3] for i in range(tr.n_sequences)])
    desc, folds = inner_splits(labelled, "labels")
    assert desc.startswith("leave one fitted label out") and len(folds) == 3
    for (fit, val), left in zip(folds, ("a", "b", "c"), strict=True):
        assert val.labels() == [left] and left not in fit.labels() and len(fit.labels()) == 2
    # one fitted label: two folds of whole sequences, disjoint and covering every sequence
    one = tr.replace(seq_labels=["a"] * tr.n_sequences)
    desc, folds = inner_splits(one, "labels", seed=5)
    assert desc == "two folds of whole sequences" and len(folds) == 2
    (f0, v0), (f1, v1) = folds
    assert f0.n_tokens + v0.n_tokens == tr.n_tokens and v0.n_tokens == f1.n_tokens and v1.n_tokens == f0.n_tokens
    # labels folded by whole sequences whatever their labels (the alternative bench/place_inner_split.py weighs):
    # k folds whose validation parts partition the sequences, each fit part the rest
    desc, folds = inner_splits(labelled, "labels", seed=5, by="sequences", k=4)
    assert desc == "4 folds of whole sequences" and len(folds) == 4
    assert sum(v.n_sequences for _, v in folds) == tr.n_sequences
    for fit, val in folds:
        assert fit.n_tokens + val.n_tokens == tr.n_tokens and len(val.labels()) >= 1
    with pytest.raises(ValueError, match="by='label'"):
        inner_splits(labelled, "labels", by="label")


def test_calibration_picks_the_best_candidate_that_holds_the_margins():
    train, _ = split_halves(_planted())
    params = PlaceParams(kicks=4)
    cal = calibrate(train, 4, params)
    assert isinstance(cal, Calibration) and len(cal.trials) == len(GRID) and cal.folds == 1
    assert {(t.balance_margin, t.drift_margin) for t in cal.trials} == {
        (round(params.cv_margin + off, 6), dm) for off, dm in GRID
    }
    for t in cal.trials:  # "ok" means: each validated excess plus its standard error within its margin
        assert t.ok == (t.cv_excess + t.cv_se <= params.cv_margin and t.max_mean_excess + t.max_mean_se <= 0.1)
    ok = [t for t in cal.trials if t.ok]
    chosen = cal.chosen
    assert chosen is not None and cal.met == bool(ok)
    if ok:
        assert chosen.ok and chosen.vs_frequency == min(t.vs_frequency for t in ok)
    again = calibrate(train, 4, params)
    assert again.trials == cal.trials and again.balance_margin == cal.balance_margin  # deterministic
    d = cal.to_dict()
    assert d["devices"] == 4 and len(d["trials"]) == len(GRID) and d["met"] == cal.met


def test_the_stated_margins_drive_the_choice():
    """Loose margins: every candidate passes and the fewest devices/token wins; margins of 0 on a trace whose
    co-activation pays only with some imbalance: none passes and the closest candidate is used."""
    train, _ = split_halves(_planted(seed=8))
    loose = calibrate(train, 4, PlaceParams(kicks=4, cv_margin=5.0, max_mean_margin=50.0))
    assert loose.met and all(t.ok for t in loose.trials)
    assert loose.chosen.vs_frequency == min(t.vs_frequency for t in loose.trials)
    strict_params = PlaceParams(kicks=4, cv_margin=0.0, max_mean_margin=0.0)
    strict = calibrate(train, 4, strict_params)
    if not strict.met:
        assert strict.chosen == min(strict.trials, key=lambda t: t.over(strict_params))


def test_in_sample_and_unsplittable_fits():
    train, _ = split_halves(_planted())
    cal = calibrate(train, 4, PlaceParams(cv_margin=0.07), protocol="all")
    assert cal.balance_margin == 0.07 and cal.met and cal.trials == ()
    # sequences of 2 tokens: train parts of 1 token, whose halves leave nothing to fit on
    tiny = random_trace(n_tokens=40, n_layers=1, n_experts=8, k=2, seed=1)
    tiny = RoutingTrace(tiny.experts, 8, seq_starts=np.arange(0, 40, 2))
    cal = calibrate(split_halves(tiny)[0], 2, PlaceParams())
    assert cal.balance_margin == FALLBACK and not cal.met and cal.trials == () and "too few" in cal.inner


def test_compare_validates_once_per_d_and_reports_it():
    tr = _planted(n_layers=2)
    params = PlaceParams(kicks=4)
    report = compare_placements(tr, [2, 4], ["coact-refined"], params=params)
    assert sorted(report.calibrations) == [2, 4]
    for d, cal in report.calibrations.items():
        # the refined fit is exactly a fit with the chosen margins set by hand
        fixed = dataclasses.replace(params, balance_margin=cal.balance_margin, drift_margin=cal.drift_margin)
        same = compare_placements(tr, [d], ["coact-refined"], params=fixed)
        assert same.calibrations == {}
        np.testing.assert_array_equal(
            same.placements[(d, "coact-refined", 0)].table, report.placements[(d, "coact-refined", 0)].table
        )
    assert [c["devices"] for c in report.to_dict()["calibration"]] == [2, 4]
    # no refined method, no validation; a method fitted outside compare validates on its own data
    assert compare_placements(tr, [4], ["coact-greedy"], params=params).calibrations == {}
    train, _ = split_halves(tr)
    direct = METHODS["coact-refined"](params).fit(TrainData(train), 4)
    np.testing.assert_array_equal(direct, report.placements[(4, "coact-refined", 0)].assign())


@pytest.mark.parametrize("protocol", ["halves", "labels", "all"])
def test_train_data_protocol(protocol):
    tr = _planted(n_layers=1)
    assert TrainData(tr, protocol).protocol == protocol
    with pytest.raises(ValueError, match="protocol"):
        TrainData(tr, "test")


def test_refine_batch_is_refine_for_each_candidate():
    """The calibration refines every candidate in one kernel call: each result is what `refine` gives alone,
    drift cap on or off beside each other (a cap < 0 leaves a layer unconstrained even with the covariance)."""
    from moescope.place.methods import CoactRefined, refine, refine_batch

    train, _ = split_halves(_planted(seed=5, n_layers=4))
    data = TrainData(train)
    base = PlaceParams(kicks=3)
    starts = [m(base).fit(data, 4, 0, {}) for m in CoactRefined.starts]
    cands = [
        dataclasses.replace(base, balance_margin=b, drift_margin=dm)
        for b, dm in ((-0.05, None), (0.05, 0.25), (0.0, None), (0.15, 0.1))
    ]
    got = refine_batch(data, starts, 4, cands, seed=2)
    for p, g in zip(cands, got, strict=True):
        np.testing.assert_array_equal(g, refine(data, starts, 4, p, seed=2))
    with pytest.raises(ValueError, match="differ only"):
        refine_batch(data, starts, 4, [cands[0], dataclasses.replace(cands[1], kicks=1)], seed=2)
