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

Then what the leave-one-task-out splits lack (section ``given_loads``):

- ``load_correlation``: per pair of tasks, the mean over layers of the correlation of their expert loads;
- ``oracle``: coact-refined fitted in-sample on the scored task itself at train margins ``ORACLE_MARGINS``,
  scored against frequency fitted on the other two tasks (the rule's reference): whether any placement can
  meet the goal within the rule on that task at all (a ceiling over every method family, not a result);
- ``given``: default flags plus ``balance_loads`` = the expert counts of a random ``SAMPLE_SHARE`` of the
  scored task's sequences (seeded; those sequences are then left out of the scored tokens), the way a user
  brings counts of the workload to be served (`moescope place --balance-loads`). Rows against frequency
  balanced on the same counts (what ``place`` reports) and against the plain frequency fitted on the two
  tasks (the issue's reference). ``SAMPLE_SHARE`` is fixed a priori ("a short sample"), not chosen on a result.
"""

from __future__ import annotations

from pathlib import Path

RULE = 0.05  # load CV within frequency's + this, on the scored tokens
MARGINS = (-0.1, -0.05, -0.02, 0.0, 0.02, 0.05, 0.1, 0.2)
DRIFTS = (None, 0.25)
ORACLE_MARGINS = (0.0, 0.05, 0.1, 0.2)
SAMPLE_SHARE = 0.1  # share of the scored task's sequences whose counts are given (a priori, not tuned)


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
    out["given_loads"] = given_loads(trace)
    return out


def given_loads(trace) -> dict:
    """The ``given_loads`` section (module docstring)."""
    import numpy as np

    from moescope.place import PlaceParams, compare_placements
    from moescope.place.compare import load_agreement
    from moescope.place.data import balance_table
    from moescope.slicing import select_labels, select_sequences

    tasks = trace.labels()

    def corr(a: str, b: str) -> float:
        r = load_agreement(trace, [a], [b])[0].correlation
        return round(float("nan") if r is None else r, 4)

    splits = {}
    for task in tasks:
        plain = compare_placements(trace, [4, 8], ["frequency"], score_labels=[task])
        ref = {r.n_devices: r.score for r in plain.rows}
        oracle = []
        for b in ORACLE_MARGINS:
            rep = compare_placements(
                select_labels(trace, [task]), [4, 8], ["coact-refined"], split="all",
                params=PlaceParams(balance_margin=b),
            )  # fmt: skip
            oracle += [
                {"balance_margin": b, **_against(r, ref[r.n_devices])} for r in rep.rows if r.method == "coact-refined"
            ]
        seqs = np.flatnonzero(trace.seq_labels == task)
        rng = np.random.default_rng([0, tasks.index(task)])
        sample = np.sort(rng.choice(seqs, max(1, round(SAMPLE_SHARE * seqs.size)), replace=False))
        rest = select_sequences(trace, np.setdiff1d(np.arange(trace.n_sequences), sample))
        counts = select_sequences(trace, sample).counts()
        table = balance_table(counts, rest.layer_ids, rest.n_experts, f"{task} sample")
        plain_rest = compare_placements(rest, [4, 8], ["frequency"], score_labels=[task])
        ref_rest = {r.n_devices: r.score for r in plain_rest.rows}
        rep = compare_placements(rest, [4, 8], score_labels=[task], balance_loads=table)
        splits[f"without-{task}"] = {
            "sample_sequences": int(sample.size),
            "sample_tokens": int(counts.values.sum() // (trace.top_k * trace.n_layers)),
            "scored_tokens": rep.test_tokens,
            "oracle": oracle,
            "given": [
                {
                    **{k: v for k, v in row.items() if k != "fit_s"},
                    "vs_plain_frequency": _against(r, ref_rest[r.n_devices]),
                }
                for r, row in zip(rep.rows, _rows(rep), strict=True)
            ],
        }
    pairs = {f"{a}/{b}": corr(a, b) for n, a in enumerate(tasks) for b in tasks[n + 1 :]}
    return {"share": SAMPLE_SHARE, "load_correlation": pairs, "splits": splits}


def _against(row, ref) -> dict:
    """A row's devices per token, load CV and max/mean load against another placement's score ``ref``."""
    s = row.score
    return {
        "devices": row.n_devices,
        "method": row.method,
        "vs_frequency": round(s.mean_devices / ref.mean_devices - 1.0, 4),
        "load_cv_minus_frequency": round(s.mean_cv - ref.mean_cv, 4),
        "max_over_mean_minus_frequency": round(s.mean_max_mean - ref.mean_max_mean, 4),
        "balanced": bool(s.mean_cv - ref.mean_cv <= RULE),
    }
