"""Two defaults of the placement search, chosen on a development set (called by `bench/run.py place_defaults`).

`PlaceParams.late_weight` (train tokens in the second half of their sequence weigh this many times more in
coact-refined's objective) and `PlaceParams.coact_lambda` (coact-capped's merge penalty;
coact-capped is a default method and one of coact-refined's starts) were set by hand when the methods were
first written, while the shared ESFT trace was the only data looked at. This study re-chooses them where the
placement results are not reported: the project's own fixture trace (tiny Qwen3-MoE, 4 layers x 16 experts,
top-2, five text domains), with every other flag at its default (the refined method's train margin chosen
by its own validation inside the fitting data).

Development cases, at D = 2, 4, 8:

- halves: fitted on the first halves of the sequences, scored on the second halves -- of the whole trace
  and of each domain's sequences alone (6 traces, 18 cases);
- labels: fitted on 2 or 4 domains, scored on another (35 splits, 105 cases).

A case *holds* when coact-refined's scored load CV is within frequency's + ``cv_margin`` and its max/mean
within frequency's + ``max_mean_margin`` (the stated constraint).

Decision rules, fixed before the run:

- ``late_weight``: among `LATE_WEIGHTS`, the one holding the most cases, halves and labels together; ties:
  the lowest mean change of devices per token against frequency; then the smallest weight;
- ``coact_lambda`` (with that late weight): among `COACT_LAMBDAS`, the same count; ties: the lowest mean
  change of devices per token; then the hand-set 5.0 in force before this study.

(A first run applied the late weight under the halves protocol only and chose it on the 18 halves cases:
weight 1 held 17, weights 2, 3 and 5 held 16. With no late weight the labels cases held 59 of 105, against
66 with the weight 3 in force then, so whether the weight helps is not protocol-blind on this set either:
it is one knob for every protocol, chosen on every case.)
"""

from __future__ import annotations

import itertools
import time

import numpy as np

LATE_WEIGHTS = (1, 2, 3, 5)
COACT_LAMBDAS = (1.0, 2.0, 5.0, 10.0, 20.0)
DEVICES = (2, 4, 8)


def _cases(trace) -> list[tuple[str, dict]]:
    """(case name, compare_placements keyword arguments) of every development split."""
    from moescope.slicing import select_labels

    labels = trace.labels()
    out = [("halves/all", {"trace": trace})]
    out += [(f"halves/{lab}", {"trace": select_labels(trace, [lab])}) for lab in labels]
    for n_fit in (2, 4):
        for scored in labels:
            for fit in itertools.combinations([x for x in labels if x != scored], n_fit):
                kw = {"trace": trace, "fit_labels": list(fit), "score_labels": [scored]}
                out.append((f"labels/{'+'.join(fit)}->{scored}", kw))
    return out


def _run(cases, params) -> list[dict]:
    from moescope.place import compare_placements

    rows = []
    for name, kw in cases:
        kw = dict(kw)
        rep = compare_placements(kw.pop("trace"), list(DEVICES), ["coact-refined"], params=params, **kw)
        for d in DEVICES:
            row = rep.row(d, "coact-refined")
            mm_x = row.score.mean_max_mean - row.baseline.mean_max_mean
            rows.append(
                {
                    "case": name,
                    "devices": d,
                    "vs_frequency": round(row.vs_frequency, 5),
                    "cv_excess": round(row.cv_excess, 5),
                    "max_mean_excess": round(mm_x, 5),
                    "held": bool(row.within(params)),
                }
            )
    return rows


def _summary(rows) -> dict:
    return {
        "cases": len(rows),
        "held": int(sum(r["held"] for r in rows)),
        "mean_vs_frequency": round(float(np.mean([r["vs_frequency"] for r in rows])), 5),
        "mean_cv_excess": round(float(np.mean([r["cv_excess"] for r in rows])), 5),
    }


def measure() -> dict:
    import dataclasses

    import moescope
    from moescope import fixture
    from moescope.place import PlaceParams

    trace = moescope.read(fixture.TRACE)
    cases = _cases(trace)
    t0 = time.perf_counter()
    base = PlaceParams(late_weight=3, coact_lambda=5.0)  # the hand-set values the study started from

    def split(rows: list[dict]) -> dict:
        return {
            "all": _summary(rows),
            "halves": _summary([r for r in rows if r["case"].startswith("halves/")]),
            "labels": _summary([r for r in rows if r["case"].startswith("labels/")]),
        }

    late = {w: split(_run(cases, dataclasses.replace(base, late_weight=w))) for w in LATE_WEIGHTS}
    chosen_w = min(LATE_WEIGHTS, key=lambda w: (-late[w]["all"]["held"], late[w]["all"]["mean_vs_frequency"], w))
    with_w = dataclasses.replace(base, late_weight=chosen_w)
    lam = {x: split(_run(cases, dataclasses.replace(with_w, coact_lambda=x))) for x in COACT_LAMBDAS}
    chosen_l = min(COACT_LAMBDAS, key=lambda x: (-lam[x]["all"]["held"], lam[x]["all"]["mean_vs_frequency"], x != 5.0))
    return {
        "input": str(fixture.TRACE),
        "rule": "coact-refined's scored load CV within frequency's + cv_margin, max/mean within + max_mean_margin",
        "late_weight": {"by_value": {str(w): v for w, v in late.items()}, "chosen": chosen_w},
        "coact_lambda": {"by_value": {str(x): v for x, v in lam.items()}, "chosen": chosen_l},
        "started_from": {"late_weight": base.late_weight, "coact_lambda": base.coact_lambda},
        "seconds": round(time.perf_counter() - t0, 1),
    }
