"""Slow, obviously-correct version of the learned eviction kernels (`moescope.cache.kernels_learned`).

Features recomputed from each item's list of past uses at every decision (no incremental state); groups
served hits first (see `tests/reference.py`).
"""

from __future__ import annotations

import math

import numpy as np

from reference import _segments

FLOOR = -64.0


NEAR_RATE = 2.0**-4


def _crf(times: list[int], g: int, lam: float) -> float:
    crf = math.fsum(2.0 ** (-lam * (g - u)) for u in times)
    return max(math.log2(crf), FLOOR) if crf > 0 else FLOOR


def features(uses: list[int], g: int, rates, near_uses: list[int] | None = None) -> list[float]:
    """[1, log2(1 + recency), log2 CRF at each rate (floored)] of an item used at groups `uses` (before g),
    and with `near_uses` (the groups where it was a near miss) its near-miss CRF."""
    out = [1.0, math.log2(1.0 + (g - uses[-1]))] + [_crf(uses, g, lam) for lam in rates]
    if near_uses is not None:
        out.append(_crf(near_uses, g, NEAR_RATE))
    return out


def cache_learned(req, reset, capacity, rates, coef, near=None):
    """Evict the cached item (not needed by the group) with the highest coef . features; ties: lowest slot.
    `near` [groups, m] (-1 padded): the near misses, for the extra feature."""
    hits = misses = 0
    g = -1
    for seg in _segments(req, reset):
        uses: dict[int, list[int]] = {}
        nears: dict[int, list[int]] = {}
        slots: list[int] = []
        for group in seg:
            g += 1
            for x in group:
                if x in slots:
                    hits += 1
            for x in group:
                if x in slots:
                    continue
                misses += 1
                if len(slots) < capacity:
                    slots.append(x)
                    continue
                best, best_v = -1, 0.0
                for i, y in enumerate(slots):
                    if y in group:
                        continue
                    f = features(uses[y], g, rates, None if near is None else nears.get(y, []))
                    v = sum(c * fi for c, fi in zip(coef, f, strict=True))
                    if best < 0 or v > best_v:
                        best, best_v = i, v
                slots[best] = x
            for x in group:
                uses.setdefault(x, []).append(g)
            if near is not None:
                for x in near[g]:
                    if x >= 0:
                        nears.setdefault(int(x), []).append(g)
    return hits, misses, 0, 0


def learned_samples(req, reset, n_items, rates, every, horizon, near=None):
    """(rows [n, F], labels [n]) as `kernels_learned.samples`: at every `every`-th group, each item used
    earlier in the segment and not needed now, with log2 of the groups to its next use in the segment
    (log2 horizon when none)."""
    rows, labels = [], []
    g = -1
    for seg in _segments(req, reset):
        start = g + 1
        uses: dict[int, list[int]] = {}
        nears: dict[int, list[int]] = {}
        for i, group in enumerate(seg):
            g += 1
            if g % every == 0:
                for y in range(n_items):
                    if y not in uses or y in group:
                        continue
                    rows.append(features(uses[y], g, rates, None if near is None else nears.get(y, [])))
                    later = [start + j for j in range(i + 1, len(seg)) if y in seg[j]]
                    labels.append(math.log2(later[0] - g) if later else math.log2(horizon))
            for x in group:
                uses.setdefault(x, []).append(g)
            if near is not None:
                for x in near[g]:
                    if x >= 0:
                        nears.setdefault(int(x), []).append(g)
    return np.array(rows).reshape(-1, 2 + len(rates) + (near is not None)), np.array(labels)
