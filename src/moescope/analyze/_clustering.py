"""Kernels of the balanced clustering behind `moescope.analyze.coact.balanced_groups`.

Partition E experts into groups of fixed sizes maximising the intra-group sum of an affinity matrix ``w``:
greedy growth, then best-improvement moves and swaps that keep the sizes (Kernighan-Lin style passes), from
the greedy start and from seeded random partitions; the best partition wins. Pure numba over arrays.
"""

from __future__ import annotations

import numpy as np

from moescope._jit import njit, njit_parallel, prange
from moescope._rng import uniform as _uniform


@njit
def _greedy_groups(w, sizes):
    """[E] int64 labels: group g grows from the unassigned expert with the most positive affinity left,
    adding the unassigned expert with the largest summed ``w`` to the group, until ``sizes[g]``."""
    n = w.shape[0]
    labels = np.full(n, -1, dtype=np.int64)
    affinity = np.zeros(n)
    for g in range(sizes.shape[0]):
        best, seed = -np.inf, -1
        for x in range(n):
            if labels[x] >= 0:
                continue
            v = 0.0
            for y in range(n):
                if labels[y] < 0 and y != x and w[x, y] > 0.0:
                    v += w[x, y]
            if v > best:
                best, seed = v, x
        labels[seed] = g
        for x in range(n):
            affinity[x] = w[x, seed]
        for _ in range(sizes[g] - 1):
            best, pick = -np.inf, -1
            for x in range(n):
                if labels[x] < 0 and affinity[x] > best:
                    best, pick = affinity[x], x
            labels[pick] = g
            for x in range(n):
                affinity[x] += w[x, pick]
    return labels


@njit
def _random_groups(sizes, key, n):
    """[n] int64 labels of a seeded uniform random partition with the given group sizes (Fisher-Yates)."""
    perm = np.arange(n)
    for i in range(n - 1, 0, -1):
        j = int(_uniform(key, i) * (i + 1))
        perm[i], perm[j] = perm[j], perm[i]
    labels = np.empty(n, dtype=np.int64)
    pos = 0
    for g in range(sizes.shape[0]):
        for _ in range(sizes[g]):
            labels[perm[pos]] = g
            pos += 1
    return labels


@njit
def _apply_step(w, labels, m, size, a, b, h):
    """Swap experts a and b (b >= 0), or move a to group h; keep ``m[x, g]`` (summed w between x and
    group g) and ``size [D]`` up to date."""
    ga = labels[a]
    gb = labels[b] if b >= 0 else h
    for x in range(w.shape[0]):
        m[x, ga] -= w[x, a]
        m[x, gb] += w[x, a]
        if b >= 0:
            m[x, ga] += w[x, b]
            m[x, gb] -= w[x, b]
    labels[a] = gb
    if b >= 0:
        labels[b] = ga
    else:
        size[ga] -= 1
        size[gb] += 1


@njit
def _best_step(w, labels, m, size, locked):
    """(gain, a, b, h) of the best step among unlocked experts (a = -1 if none): swap a (in g) and b (in
    h), gain ``m[a,h] - m[a,g] + m[b,g] - m[b,h] - 2 w[a,b]``; or, b = -1, move a from g to h where
    ``size[g] == size[h] + 1`` (sizes stay one multiset), gain ``m[a,h] - m[a,g]``."""
    best, ba, bb, bh = -np.inf, -1, -1, -1
    for a in range(w.shape[0]):
        if locked[a]:
            continue
        ga = labels[a]
        for h in range(size.shape[0]):
            if size[ga] == size[h] + 1 and m[a, h] - m[a, ga] > best:
                best, ba, bb, bh = m[a, h] - m[a, ga], a, -1, h
        for b in range(a + 1, w.shape[0]):
            gb = labels[b]
            if gb != ga and not locked[b]:
                d = m[a, gb] - m[a, ga] + m[b, ga] - m[b, gb] - 2.0 * w[a, b]
                if d > best:
                    best, ba, bb, bh = d, a, b, gb
    return best, ba, bb, bh


@njit
def _swap_refine(w, labels, n_groups, tol):
    """Refine ``labels [E]`` in place; return the objective, the sum of ``w`` over intra-group pairs i < j.

    Best-improvement steps (`_best_step`) to a local optimum, then Kernighan-Lin passes (the best step
    among unlocked experts, even a losing one, locking those moved, E / 2 times; keep the best prefix)
    while a pass gains.
    """
    n = w.shape[0]
    m = np.zeros((n, n_groups))
    size = np.zeros(n_groups, dtype=np.int64)
    for x in range(n):
        size[labels[x]] += 1
        for y in range(n):
            if y != x:
                m[x, labels[y]] += w[x, y]
    locked = np.zeros(n, dtype=np.bool_)
    while True:
        d, a, b, h = _best_step(w, labels, m, size, locked)
        if a < 0 or d <= tol:
            break
        _apply_step(w, labels, m, size, a, b, h)
    steps = np.empty((n, 3), dtype=np.int64)  # (a, b, group a left) of each step of a pass
    for _ in range(4 * n):  # each kept pass gains: this bound is a guard, not a budget
        locked[:] = False
        total, best, keep, done = 0.0, tol, 0, 0
        for step in range(n // 2):
            d, a, b, h = _best_step(w, labels, m, size, locked)
            if a < 0:
                break
            steps[step, 0], steps[step, 1], steps[step, 2] = a, b, labels[a]
            _apply_step(w, labels, m, size, a, b, h)
            locked[a] = True
            if b >= 0:
                locked[b] = True
            done, total = step + 1, total + d
            if total > best:
                best, keep = total, step + 1
        for step in range(done - 1, keep - 1, -1):  # undo the steps after the best prefix
            a, b = steps[step, 0], steps[step, 1]
            _apply_step(w, labels, m, size, a, b, steps[step, 2])
        if keep == 0:
            break
    obj = 0.0
    for x in range(n):
        obj += m[x, labels[x]]
    return 0.5 * obj


@njit_parallel
def _cluster_many(w, sizes, keys, labels_out):
    """Cluster each ``w [M, E, E]`` into groups of ``sizes [D]``; ``keys [M, R-1]`` seed the random restarts."""
    n = w.shape[1]
    for q in prange(w.shape[0]):
        wq = w[q]
        tol = 1e-12 * (np.abs(wq).sum() + 1e-300)
        best_labels = _greedy_groups(wq, sizes)
        best = _swap_refine(wq, best_labels, sizes.shape[0], tol)
        for r in range(keys.shape[1]):
            labels = _random_groups(sizes, keys[q, r], n)
            obj = _swap_refine(wq, labels, sizes.shape[0], tol)
            if obj > best + tol:
                best, best_labels = obj, labels
        labels_out[q] = best_labels
