"""Placement speed at scale, measured in one process (called by `bench/run.py place_speed`).

Input: the synthetic 1M-token x 48-layer x 128-expert top-8 trace of `bench/run.py`'s SCALE (teams,
stickiness, two domains; no gate weights). Steps timed separately, each once after a JIT warm-up on a tiny
trace: the train/test split (halves of every sequence), the train tables (loads, co-activation, drift
covariance), fitting ``frequency`` and ``coact-refined`` at D = 8 on the train half, and scoring both on
the held-out half. The goal is the fit and score of one D = 8 placement under 60 s on 2 cores.
``analysis_s`` is the wall time of split, tables, both fits and scores; ``analysis_cpu_s`` the CPU time of
all threads over the same steps (on a shared machine wall time depends on other load; half the CPU time
is about the wall time on 2 idle cores).
"""

from __future__ import annotations

import time


def measure() -> dict:
    from moescope.place import METHODS, Placement, PlaceParams, TrainData, score_placement
    from moescope.slicing import split_halves
    from moescope.synth import SynthSpec, synth_trace

    spec = dict(n_experts=128, top_k=8, n_teams=8, team_size=8, team_strength=0.4, stickiness=0.2)
    small = synth_trace(SynthSpec(n_tokens=2_000, n_layers=2, domains=("a", "b"), weights_dtype=None, **spec))
    s_train, s_test = split_halves(small)
    for name in ("frequency", "coact-refined"):  # JIT warm-up (and cache load)
        a = METHODS[name](PlaceParams()).fit(TrainData(s_train), 8, 0)
        score_placement(Placement.from_assign(a, 8, small.layer_ids, name), s_test)

    t0 = time.perf_counter()
    trace = synth_trace(
        SynthSpec(n_tokens=1_000_000, n_layers=48, domains=("a", "b"), seed=1, weights_dtype=None, **spec)
    )
    out: dict = {"synth_s": round(time.perf_counter() - t0, 2), "trace": repr(trace), "devices": 8}
    t0, cpu0 = time.perf_counter(), time.process_time()
    t = time.perf_counter()
    train, test = split_halves(trace)
    out["split_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    data = TrainData(train)
    data.load, data.coact, data.drift_cov  # noqa: B018  (computed once, shared by every method)
    out["train_tables_s"] = round(time.perf_counter() - t, 2)
    rows = {}
    for name in ("frequency", "coact-refined"):
        t = time.perf_counter()
        assign = METHODS[name](PlaceParams()).fit(data, 8, 0)
        fit_s = time.perf_counter() - t
        t = time.perf_counter()
        score = score_placement(Placement.from_assign(assign, 8, trace.layer_ids, name), test)
        rows[name] = {
            "fit_s": round(fit_s, 2),
            "score_s": round(time.perf_counter() - t, 2),
            "devices_per_token": round(score.mean_devices, 4),
            "load_cv": round(score.mean_cv, 4),
        }
    out["methods"] = rows
    base = rows["frequency"]["devices_per_token"]
    out["coact_refined_vs_frequency"] = round(rows["coact-refined"]["devices_per_token"] / base - 1, 4)
    out["analysis_s"] = round(time.perf_counter() - t0, 2)
    out["analysis_cpu_s"] = round(time.process_time() - cpu0, 2)  # all threads; / 2 = wall on 2 idle cores
    out["goal"] = "split + train tables + coact-refined fit + score, D = 8, under 60 s on 2 cores"
    return out
