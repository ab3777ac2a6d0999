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
    """[1, log2(1 + recency), log2 CRF at each rate (floored), log2(1 + gap between the last two uses) and 1
    when it was used twice (else 0, 0)] of an item used at groups `uses` (before g), and with `near_uses` (the
    groups where it was a near miss) its near-miss CRF."""
    out = [1.0, math.log2(1.0 + (g - uses[-1]))] + [_crf(uses, g, lam) for lam in rates]
    out += [math.log2(1.0 + (uses[-1] - uses[-2])), 1.0] if len(uses) >= 2 else [0.0, 0.0]
    if near_uses is not None:
        out.append(_crf(near_uses, g, NEAR_RATE))
    return out


ONLINE_EVERY, ONLINE_REFIT, RIDGE = 4, 64, 1e-6
ONLINE_DECAY = 2.0 ** (-ONLINE_REFIT / 2048)


def solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting (a zero pivot's unknown is 0), as the kernel's."""
    n = len(b)
    m = [[*a[i], b[i]] for i in range(n)]
    for i in range(n):
        p = max(range(i, n), key=lambda r: (abs(m[r][i]), -r))
        m[i], m[p] = m[p], m[i]
        if m[i][i] == 0.0:
            continue
        for r in range(n):
            if r != i:
                fac = m[r][i] / m[i][i]
                for c in range(i, n + 1):
                    m[r][c] -= fac * m[i][c]
    return [m[i][n] / m[i][i] if m[i][i] != 0.0 else 0.0 for i in range(n)]


def _record(uses: dict, nears: dict, group: list[int], near, g: int) -> None:
    """Group g's uses, and its near misses (``near [groups, m]``, -1 padded) when given."""
    for x in group:
        uses.setdefault(x, []).append(g)
    if near is not None:
        for x in near[g]:
            if x >= 0:
                nears.setdefault(int(x), []).append(g)


def cache_learned(req, reset, capacity, rates, coef, near=None, a0=None, b0=None, horizon=2, refit=0):
    """Evict the cached item (not needed by the group) with the highest coef . features; ties: lowest slot.
    `near` [groups, m] (-1 padded): the near misses, for the extra feature. With ``refit > 0`` the model is
    refitted online: every `ONLINE_EVERY` groups each seen item not needed gets a row (if it has none
    pending), labelled log2 of the groups to its next use when that comes (log2 horizon once the horizon
    passes at a sampling group); every `refit` groups the normal equations (from ``a0``, ``b0``) decay and are
    solved again."""
    hits = misses = 0
    g = -1
    n_f = len(coef)
    coef = list(coef)
    a = [list(r) for r in a0] if a0 is not None else None
    b = list(b0) if b0 is not None else None
    far = math.log2(float(horizon))

    def add(row, label):
        for i in range(n_f):
            b[i] += row[i] * label
            for j in range(n_f):
                a[i][j] += row[i] * row[j]

    for seg in _segments(req, reset):
        uses: dict[int, list[int]] = {}
        nears: dict[int, list[int]] = {}
        pend: dict[int, tuple[list[float], int]] = {}
        slots: list[int] = []
        for group in seg:
            g += 1
            for x in group:
                if refit and x in pend:
                    row, g0 = pend.pop(x)
                    add(row, math.log2(float(g - g0)))
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
            if refit:
                if g % ONLINE_EVERY == 0:
                    for y in sorted(uses):
                        if y in group:
                            continue
                        if y in pend and g - pend[y][1] >= horizon:
                            add(pend.pop(y)[0], far)
                        if y not in pend:
                            pend[y] = (features(uses[y], g, rates, None if near is None else nears.get(y, [])), g)
                if g > 0 and g % refit == 0:
                    a = [[v * ONLINE_DECAY for v in r] for r in a]
                    b = [v * ONLINE_DECAY for v in b]
                    coef = solve([[a[i][j] + (RIDGE if i == j else 0.0) for j in range(n_f)] for i in range(n_f)], b)
            _record(uses, nears, group, near, g)
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
            _record(uses, nears, group, near, g)
    return np.array(rows).reshape(-1, 4 + len(rates) + (near is not None)), np.array(labels)
