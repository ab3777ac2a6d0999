"""Placement on workloads the fit has not seen (called by `bench/run.py place_generalisation`).

Input: the shared ESFT / DeepSeek-V2-Lite trace (three tasks: intent, law, summary). Protocols: the held-out
halves (fit on the first half of every sequence, score on the second halves) and leave-one-task-out (fit on
two tasks' whole sequences, score on the third; each way). At D = 4 and 8, every default method with default
flags (the refined method's train caps chosen by validation inside the fitting data; the choice is reported):
devices per token and its change against frequency (fitted on the same data), load CV and max/mean load on
the scored tokens, and each against frequency's. A method meets the balance rule when its scored load CV is
within frequency's + 0.05 (the issue's rule). Then the trade-off: coact-refined with the train caps set by
hand (`balance_margin` -0.1 .. 0.2, with and without the drift cap), so the reduction reachable at each scored
CV excess shows, and the best reduction on that curve within the rule (hindsight: chosen on the scored
tokens, the ceiling of this method family, not a result).
"""

from __future__ import annotations

from pathlib import Path

RULE = 0.05  # load CV within frequency's + this, on the scored tokens
MARGINS = (-0.1, -0.05, -0.02, 0.0, 0.02, 0.05, 0.1, 0.2)
DRIFTS = (None, 0.25)


def _rows(report) -> list[dict]:
    return [
        {
            "devices": r.n_devices,
            "method": r.method,
            "devices_per_token": round(r.score.mean_devices, 4),
            "vs_frequency": round(r.vs_frequency, 4),
            "load_cv": round(r.score.mean_cv, 4),
            "load_cv_minus_frequency": round(r.cv_excess, 4),
            "max_over_mean": round(r.score.mean_max_mean, 4),
            "max_over_mean_minus_frequency": round(r.score.mean_max_mean - r.baseline.mean_max_mean, 4),
            "balanced": bool(r.cv_excess <= RULE),
            "fit_s": round(r.fit_seconds, 2),
        }
        for r in report.rows
    ]


def measure(src: Path) -> dict:
    from moescope.imports import read_input
    from moescope.place import PlaceParams, compare_placements

    trace = read_input(src)
    protocols = {"halves": {}} | {f"without-{t}": {"score_labels": [t]} for t in trace.labels()}
    out: dict = {"input": str(src), "rule": f"load CV within frequency's + {RULE}", "protocols": {}}
    for name, kw in protocols.items():
        report = compare_placements(trace, [4, 8], **kw)
        best = {}
        for d in (4, 8):
            ok = [r for r in report.rows if r.n_devices == d and r.method != "frequency" and r.cv_excess <= RULE]
            pick = min(ok, key=lambda r: r.score.mean_devices) if ok else None
            best[d] = None if pick is None else {"method": pick.method, "vs_frequency": round(pick.vs_frequency, 4)}
        curve = []
        for dm in DRIFTS:
            for m in MARGINS:
                rep = compare_placements(
                    trace, [4, 8], ["coact-refined"], params=PlaceParams(balance_margin=m, drift_margin=dm), **kw
                )
                curve += [
                    {"balance_margin": m, "drift_margin": dm, **row}
                    for row in _rows(rep)
                    if row["method"] == "coact-refined"
                ]
        ceiling = {}
        for d in (4, 8):
            ok = [c for c in curve if c["devices"] == d and c["balanced"]]
            pick = min(ok, key=lambda c: c["vs_frequency"]) if ok else None
            least = min((c for c in curve if c["devices"] == d), key=lambda c: c["load_cv_minus_frequency"])
            ceiling[d] = {
                "best_within_rule": None if pick is None else {k: pick[k] for k in ("balance_margin", "drift_margin",
                                                                                    "vs_frequency",
                                                                                    "load_cv_minus_frequency")},
                "least_cv_excess": {k: least[k] for k in ("balance_margin", "drift_margin", "vs_frequency",
                                                          "load_cv_minus_frequency")},
            }  # fmt: skip
        out["protocols"][name] = {
            "fit_labels": list(report.fit_labels),
            "score_labels": list(report.score_labels),
            "rows": _rows(report),
            "calibration": [c.to_dict() for c in report.calibrations.values()],
            "best_balanced": best,
            "tradeoff": curve,
            "tradeoff_ceiling": ceiling,
        }
    return out
