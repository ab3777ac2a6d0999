"""Placement speed at scale, measured in one process (called by `bench/run.py place_speed`).

Input: the synthetic 1M-token x 48-layer x 128-expert top-8 trace of `bench/run.py`'s SCALE (teams,
stickiness, two domains; no gate weights). Timed once after a JIT warm-up on a tiny trace: what
``moescope place TRACE --devices 8`` runs with its default methods (`default_methods`): the split (halves of
every sequence), the train tables, the refined method's train caps chosen by validation inside the train
halves (`moescope.place.calibrate`, its seconds reported), every default method fitted at D = 8 on the train
halves (the refined method reusing the placements it starts from) and scored on the held-out halves. The
goal is under 60 s on 2 cores. ``seconds`` is wall time, ``cpu_s`` the CPU time of all threads (on a shared
machine wall time depends on other load; half the CPU time is about the wall time on 2 idle cores).
"""

from __future__ import annotations

import time


def measure() -> dict:
    from moescope.place import compare_placements
    from moescope.place.methods import default_methods
    from moescope.synth import SynthSpec, synth_trace

    spec = dict(n_experts=128, top_k=8, n_teams=8, team_size=8, team_strength=0.4, stickiness=0.2)
    small = synth_trace(SynthSpec(n_tokens=2_000, n_layers=2, domains=("a", "b"), weights_dtype=None, **spec))
    compare_placements(small, [8])  # JIT warm-up (and cache load)

    t0 = time.perf_counter()
    trace = synth_trace(
        SynthSpec(n_tokens=1_000_000, n_layers=48, domains=("a", "b"), seed=1, weights_dtype=None, **spec)
    )
    out: dict = {"synth_s": round(time.perf_counter() - t0, 2), "trace": repr(trace), "devices": 8}
    t0, cpu0 = time.perf_counter(), time.process_time()
    report = compare_placements(trace, [8])
    out["seconds"] = round(time.perf_counter() - t0, 2)
    out["cpu_s"] = round(time.process_time() - cpu0, 2)  # all threads; / 2 = wall on 2 idle cores
    # the placement's wall time over the same run's trace generation (code that does not change with the
    # placement's): a machine-speed reference, so runs on a machine whose speed drifts still compare
    out["seconds_per_synth_second"] = round(out["seconds"] / out["synth_s"], 3)
    out["methods"] = {
        r.method: {
            "fit_s": round(r.fit_seconds, 2),
            "devices_per_token": round(r.score.mean_devices, 4),
            "vs_frequency": round(r.vs_frequency, 4),
            "load_cv": round(r.score.mean_cv, 4),
            "max_over_mean": round(r.score.mean_max_mean, 4),
        }
        for r in report.rows
    }
    out["calibration"] = [
        {k: v for k, v in c.to_dict().items() if k != "trials"} | {"chosen": c.chosen.to_dict() if c.chosen else None}
        for c in report.calibrations.values()
    ]
    out["default_methods"] = default_methods()
    out["goal"] = "moescope place --devices 8, default methods (split, tables, fits, scores): under 60 s on 2 cores"
    return out
