"""Naive, obviously-correct references for `moescope.analyze.compare` (one token and layer at a time)."""

from __future__ import annotations

import math

import numpy as np


def agreement(a, b, near_tie):
    """Per common layer id: dict of identical, overlap, top1, weight_error, disagreements, first, margins."""
    out = {}
    for lid in [int(x) for x in a.layer_ids if int(x) in b.layer_ids.tolist()]:
        i, j = a.layer_ids.tolist().index(lid), b.layer_ids.tolist().index(lid)
        same = overlap = top1 = 0
        errs, margins, first, disagree = [], [], None, 0
        for t in range(a.n_tokens):
            ea, eb = [int(x) for x in a.experts[t, i]], [int(x) for x in b.experts[t, j]]
            wa = None if a.weights is None else [float(x) for x in a.weights[t, i]]
            wb = None if b.weights is None else [float(x) for x in b.weights[t, j]]
            inter = set(ea) & set(eb)
            overlap += len(inter) / min(len(ea), len(eb))
            ta = ea[0] if wa is None else ea[wa.index(max(wa))]
            tb = eb[0] if wb is None else eb[wb.index(max(wb))]
            top1 += ta == tb
            if len(ea) == len(eb) and set(ea) == set(eb):
                same += 1
                if wa is not None and wb is not None:
                    errs += [abs(wa[ea.index(e)] - wb[eb.index(e)]) for e in ea]
                continue
            disagree += 1
            first = t if first is None else first
            if wa is None or wb is None or len(ea) != len(eb) or not inter:
                continue
            ref = max(inter, key=lambda e: (wa[ea.index(e)], -ea.index(e)))
            la = sorted((math.log(wa[ea.index(e)] / wa[ea.index(ref)]) for e in ea if e not in inter), reverse=True)
            lb = sorted((math.log(wb[eb.index(e)] / wb[eb.index(ref)]) for e in eb if e not in inter), reverse=True)
            margins.append(max(abs(x - y) for x, y in zip(la, lb, strict=True)))
        n = a.n_tokens
        out[lid] = {
            "identical": same / n,
            "overlap": overlap / n,
            "top1": top1 / n,
            "weight_error": float(np.mean(errs)) if errs else None,
            "disagreements": disagree,
            "first": first,
            "near_tie": float(np.mean(np.array(margins) < near_tie)) if margins else None,
            "median_margin": float(np.median(margins)) if margins else None,
        }
    return out
