"""Numba kernels of the learned eviction policy (`moescope.cache.policies_learned`), with the group rule of
`moescope.cache.kernels`.

The policy evicts the cached item whose *predicted* next use is furthest, LRB-style (Song et al., "Learning
relaxed Belady for content distribution network caching", NSDI 2020), with a model small enough to run at
every miss: a linear model of log2 next-use distance (in groups) over features a runtime has at that moment,

- ``log2(1 + recency)``: groups since the item's last use;
- ``crf_i`` for each rate in `RATES`: log2 of the item's recency-weighted use count at that rate (LRFU's
  CRF relative to now: ``log2 sum_u 2^(-rate (g - u))`` over its past uses u in the segment), floored at
  `FLOOR`; the rates span LRFU's fixed grid log-evenly (fast to slow decay), fixed a priori. Checked by
  validation inside the train split only (ESFT train halves split again; gap to Belady closed at C 8 / 16 /
  32): these four 21.1 / 22.0 / 31.9%, with a rate-0 CRF added 20.5 / 21.2 / 31.1%, LRFU's eight rates
  20.1 / 20.7 / 30.7%, every pairwise product of the features added 20.6 / 21.3 / 31.0%;
- ``gap``, ``twice``: log2(1 + groups between the item's last two uses) and 1 once it was used twice in the
  segment (0 and 0 before): LRB's second delta. Added after validating inside the fitting data only, with the
  online refits on (gap closed at C 8 / 16 / 32, without -> with): ESFT train halves split again 22.7 / 22.9 /
  32.6% -> 23.0 / 23.3 / 32.8%; across tasks (fit on one ESFT task, replay another; each pair is the inner
  fold of one leave-one-task-out split) intent to law 17.7 / 10.5 / 14.7 -> 18.4 / 10.8 / 14.8, summary to
  law 18.4 / 11.7 / 16.2 -> 19.0 / 12.0 / 16.2, law to intent 33.3 / 31.7 / 42.4 -> 33.5 / 32.0 / 42.6,
  summary to intent 32.9 / 31.5 / 42.3 -> 32.9 / 31.7 / 42.7, intent to summary 25.0 / 28.1 / 28.5 -> 25.1
  / 28.2 / 28.5, law to summary 25.8 / 28.9 / 29.4 unchanged: never worse, so kept. Two variants fixed
  alongside it were not: the item's count of uses in the current sequence (+0.7 to +0.8 points on the
  halves, up to -1.1 across tasks) and labels clipped at 2^5 / 2^7 / 2^9 groups (the eviction only needs the
  order of far next uses, LRB's Belady boundary; 0 to -2.5 points on the halves).

``coef = [bias, recency, crf_0 .. crf_3, gap, twice]``: 8 floats per layer. Per access it costs four CRF
updates (LRFU's log-add at each rate) and one log2, and per miss one prediction per cached item (8
multiply-adds): about 4 times LRFU's time with its fit and the online refits (`bench/cache_e2e.py`, 1M tokens
x top-8 of 128, three capacities, 6 features: 11 CPU s per layer, LRFU 2.6; with the gap features, 1M tokens x
4 layers, `moescope cache` user time 32-35 s against LRFU's 9.4-9.6, and 42 s with 6 features). Fitting
(`samples`) replays the train stream with no cache (the features do not depend on the cache), samples every
item seen so far in the segment at evenly spaced groups, and labels each with its next-use distance (`horizon`
groups when it is not used again in the segment).

With the router's near misses (``near [groups, m]``, m > 0; `moescope.cache.simulate.near_misses`) one
more feature: each item's near-miss CRF at `NEAR_RATE` (log2, relative to now, floored), updated after each
group like the use CRFs; ``coef`` then has `N_COEF` + 1 values.

Online refits (LRB retrains on recent requests the same way): while replaying, every `ONLINE_EVERY` groups
each item seen in the segment and not needed gets a row of its features (when it has none waiting); the row
is labelled, as in `samples`, when the item is next used (log2 of the groups since), or at a sampling group
once `horizon` groups passed without a use (log2 horizon). Every `ONLINE_REFIT` groups the normal equations
(the train rows', weighted, plus every labelled replayed row) decay by `ONLINE_DECAY` and are solved again
(`RIDGE` on the diagonal). Only what a runtime has seen is used: a label is added when its next use happens.
The three periods were fixed a priori, then checked by the same validation inside the fitting data as the
gap features (the ESFT train halves split again and the six cross-task pairs, gap closed at C 8 / 16 / 32): a
512-group half-life gains up to 2.0 points replaying intent and loses up to 1.6 elsewhere (halves 23.5 /
23.0 / 31.2% against 23.0 / 23.3 / 32.8%), an 8,192-group one loses up to 0.8, refits every 16 groups change
nothing by more than 0.1, samples every group lose up to 1.4 (halves 21.7 / 22.1 / 32.0%): kept.

Group rule: hits first, then misses in slot order; the victim is the highest prediction among cached items
the group does not need (ties: the lowest slot). Naive references: tests/reference_learned.py. This module
does not validate (the callers do).
"""

from __future__ import annotations

import numpy as np

from moescope._jit import njit, njit_inline
from moescope.cache.kernels import log2_add

RATES = np.array([2.0**-1, 2.0**-4, 2.0**-7, 2.0**-10])  # LRFU_GRID's span, log-even; fixed a priori
NEAR_RATE = 2.0**-4  # the near-miss CRF's rate: the middle of RATES, fixed a priori
FLOOR = -64.0  # log2 CRF floor: an item unused for long (or never) has every crf at FLOOR, not -inf
N_COEF = 4 + RATES.shape[0]  # without near misses; with them one more (the near-miss CRF)


@njit_inline
def _features(y, g, key, last, rates, aux, out):
    """The features of item y at group g (it was used in this segment: ``last[y] >= 0``) into ``out [F]``;
    ``aux [2, items]``: row 0 the near-miss CRF sums, row 1 log2(1 + groups between the last two uses) (-inf
    before a second use). With ``F = N_COEF + 1`` the last feature is the near-miss CRF (at `NEAR_RATE`)."""
    r = rates.shape[0]
    out[0] = 1.0
    out[1] = np.log2(1.0 + (g - last[y]))
    for i in range(r):
        out[2 + i] = max(key[i, y] - rates[i] * g, FLOOR)
    if aux[1, y] > -np.inf:
        out[2 + r] = aux[1, y]
        out[3 + r] = 1.0
    else:
        out[2 + r] = 0.0
        out[3 + r] = 0.0
    if out.shape[0] > 4 + r:
        out[4 + r] = max(aux[0, y] - NEAR_RATE * g, FLOOR)


@njit_inline
def _use(req, near, gl, g, key, last, rates, aux):
    """Record row gl of the window, stream group g: each requested item's gap since its previous use
    (``aux[1]``, log2 of 1 + groups), last use and log-domain CRF sums (LRFU's update), and each near miss's
    CRF (``aux[0]``; ``near [groups, m]``, -1: none)."""
    for j in range(req.shape[1]):
        x = req[gl, j]
        if last[x] >= 0:
            aux[1, x] = np.log2(1.0 + (g - last[x]))
        last[x] = g
        for i in range(rates.shape[0]):
            key[i, x] = log2_add(key[i, x], rates[i] * g)
    for j in range(near.shape[1]):
        x = near[gl, j]
        if x >= 0:
            aux[0, x] = log2_add(aux[0, x], NEAR_RATE * g)


ONLINE_EVERY = 4  # groups between online samples of every seen item (fixed a priori)
ONLINE_REFIT = 64  # groups between online refits (fixed a priori)
ONLINE_DECAY = 2.0 ** (-ONLINE_REFIT / 2048)  # per refit: a labelled row weighs half after 2,048 groups
RIDGE = 1e-6  # added to the normal equations' diagonal, so a refit with few rows stays solvable


@njit
def solve(a, b):
    """``x`` with ``a x = b`` (square ``a``), Gaussian elimination with partial pivoting; a zero pivot's
    unknown is 0. numba's ``np.linalg.solve`` needs scipy, which moescope does not depend on."""
    n = b.shape[0]
    m = np.empty((n, n + 1))
    m[:, :n] = a
    m[:, n] = b
    for i in range(n):
        p = i
        for r in range(i + 1, n):
            if abs(m[r, i]) > abs(m[p, i]):
                p = r
        if p != i:
            for c in range(n + 1):
                m[i, c], m[p, c] = m[p, c], m[i, c]
        if m[i, i] == 0.0:
            continue
        for r in range(n):
            if r != i:
                fac = m[r, i] / m[i, i]
                for c in range(i, n + 1):
                    m[r, c] -= fac * m[i, c]
    x = np.zeros(n)
    for i in range(n):
        if m[i, i] != 0.0:
            x[i] = m[i, n] / m[i, i]
    return x


@njit_inline
def _add_row(a, b, row, label):
    """Add one labelled row to the normal equations ``a += row row^T``, ``b += row label``."""
    for i in range(row.shape[0]):
        b[i] += row[i] * label
        for j in range(row.shape[0]):
            a[i, j] += row[i] * row[j]


@njit
def learned(req, reset, n_items, capacity, rates, coef, near, a0, b0, horizon, refit):
    """Replay with eviction by the highest predicted next-use distance (module docstring); ``near [groups,
    m]`` the near misses (m = 0: none; then ``coef`` has `N_COEF` values, else one more). With ``refit > 0``
    the model is refitted online every `refit` groups (module docstring) from the normal equations ``a0 [F,
    F]``, ``b0 [F]`` (the train rows', weighted) plus the replayed stream's own labelled rows."""
    return _learned(req, reset, n_items, capacity, rates, coef, near, a0, b0, horizon, refit, np.empty(0, np.int64))


@njit
def _learned(req, reset, n_items, capacity, rates, coef0, near, a0, b0, horizon, refit, per_group):
    """`learned`, also writing each group's demand misses to ``per_group [groups]`` when it is not empty."""
    key, aux, last, cached, need, slots, coef, a, b, pend, pend_g, sc = learned_state(n_items, capacity, rates, coef0,
                                                                                       a0, b0)  # fmt: skip
    learned_run(req, reset, 0, capacity, rates, near, horizon, refit, key, aux, last, cached, need, slots, coef, a, b,
                pend, pend_g, sc, per_group)  # fmt: skip
    return sc[:4].copy()


@njit
def learned_state(n_items, capacity, rates, coef0, a0, b0):
    """A fresh learned-eviction cache for `learned_run`: ``(key, aux, last, cached, need, slots, coef, a, b,
    pend, pend_g, sc)``, the model starting at ``coef0`` and the normal equations at ``a0``, ``b0``; ``sc[:4]``
    the stats so far, ``sc[4]`` the number of cached items."""
    n_f = coef0.shape[0]
    ints = np.full((3, n_items), -1, dtype=np.int64)  # last, need, pend_g
    return (np.full((rates.shape[0], n_items), -np.inf), np.full((2, n_items), -np.inf), ints[0],
            np.zeros(n_items, dtype=np.bool_), ints[1], np.full(capacity, -1, dtype=np.int64), coef0.copy(),
            a0.copy(), b0.copy(), np.zeros((n_items, n_f)), ints[2], np.zeros(5, dtype=np.int64))  # fmt: skip


@njit
def learned_run(req, reset, g0, capacity, rates, near, horizon, refit, key, aux, last, cached, need, slots, coef, a, b,
                pend, pend_g, sc, per_group):  # fmt: skip
    """`learned` over one window of a stream (first group: stream group `g0`, so the CRF clock, the sampling
    and the refit periods run on across windows) with the cache and model of `learned_state` carried from the
    previous window; ``pend`` holds each item's unlabelled online row (at most one), ``pend_g`` its group."""
    g_n, k = req.shape
    n_items = last.shape[0]
    n_f = coef.shape[0]
    f = np.empty(n_f)
    ridge = RIDGE * np.eye(n_f)
    far = np.log2(float(horizon))
    hits, misses, size = sc[0], sc[1], sc[4]
    for gl in range(g_n):
        g = g0 + gl
        if reset[gl]:
            for i in range(size):
                cached[slots[i]] = False
            key[:] = -np.inf
            aux[:] = -np.inf
            last[:] = -1
            pend_g[:] = -1
            size = 0
        m0 = misses
        for j in range(k):
            x = req[gl, j]
            need[x] = g
            if refit > 0 and pend_g[x] >= 0:  # its row's label is known now
                _add_row(a, b, pend[x], np.log2(float(g - pend_g[x])))
                pend_g[x] = -1
        for j in range(k):
            x = req[gl, j]
            if cached[x]:
                hits += 1
                continue
            misses += 1
            if size < capacity:
                s = size
                size += 1
            else:
                s, best = -1, 0.0
                for i in range(capacity):
                    y = slots[i]
                    if need[y] == g:
                        continue
                    _features(y, g, key, last, rates, aux, f)
                    v = 0.0
                    for c in range(n_f):
                        v += coef[c] * f[c]
                    if s < 0 or v > best:
                        s, best = i, v
                cached[slots[s]] = False
            slots[s] = x
            cached[x] = True
        if refit > 0:
            if g % ONLINE_EVERY == 0:
                for y in range(n_items):
                    if last[y] < 0 or need[y] == g:
                        continue
                    if pend_g[y] >= 0 and g - pend_g[y] >= horizon:  # unused for the horizon: labelled far
                        _add_row(a, b, pend[y], far)
                        pend_g[y] = -1
                    if pend_g[y] < 0:
                        _features(y, g, key, last, rates, aux, pend[y])
                        pend_g[y] = g
            if g > 0 and g % refit == 0:
                a *= ONLINE_DECAY
                b *= ONLINE_DECAY
                coef[:] = solve(a + ridge, b)
        _use(req, near, gl, g, key, last, rates, aux)
        if per_group.shape[0]:
            per_group[gl] = misses - m0
    sc[0], sc[1], sc[4] = hits, misses, size


@njit
def samples(req, reset, n_items, rates, near, every, horizon, x_out, y_out):
    """Fit rows from a train stream: at every `every`-th group g, for each item seen in the segment and not
    needed by g, its features (``x_out [rows, F]``) and log2 of the groups until its next use in the segment
    (``y_out [rows]``; `horizon` when there is none). Returns the number of rows written (``x_out`` must hold
    ``ceil(groups / every) * n_items`` rows; ``near [groups, m]`` as `learned`'s, with m > 0 one more
    feature)."""
    st = samples_state(n_items, rates, x_out.shape[0])
    samples_run(req, reset, 0, rates, near, every, horizon, st[0], st[1], st[2], st[3], st[4], st[5], st[6], st[7],
                x_out, y_out)  # fmt: skip
    samples_finish(st[4], st[5], y_out, horizon)
    return st[7][0]


@njit
def samples_state(n_items, rates, rows):
    """A fresh sampling pass for `samples_run`: ``(key, aux, last, need, head, link, born, sc)``; ``head`` each
    item's newest unlabelled row, ``link`` a row's previous unlabelled row of its item, ``born`` the group it
    was sampled at, ``sc[0]`` the rows written."""
    return (np.full((rates.shape[0], n_items), -np.inf), np.full((2, n_items), -np.inf),
            np.full(n_items, -1, dtype=np.int64), np.full(n_items, -1, dtype=np.int64),
            np.full(n_items, -1, dtype=np.int64), np.empty(rows, dtype=np.int64), np.empty(rows, dtype=np.int64),
            np.zeros(1, dtype=np.int64))  # fmt: skip


@njit
def samples_run(req, reset, g0, rates, near, every, horizon, key, aux, last, need, head, link, born, sc, x_out,
                y_out):  # fmt: skip
    """`samples` over one window of the train stream (first group: stream group `g0`) with the state of
    `samples_state` carried from the previous window; `samples_finish` labels what is left at the end."""
    g_n, k = req.shape
    n_items = last.shape[0]
    n = sc[0]
    for gl in range(g_n):
        g = g0 + gl
        if reset[gl]:  # a segment ends: its unlabelled rows are never used again
            samples_finish(head, link, y_out, horizon)
            key[:] = -np.inf
            aux[:] = -np.inf
            last[:] = -1
        for j in range(k):
            x = req[gl, j]
            need[x] = g
            r = head[x]
            while r >= 0:
                y_out[r] = np.log2(float(g - born[r]))
                r = link[r]
            head[x] = -1
        if g % every == 0:
            for y in range(n_items):
                if last[y] < 0 or need[y] == g:
                    continue
                _features(y, g, key, last, rates, aux, x_out[n])
                born[n] = g
                link[n] = head[y]
                head[y] = n
                n += 1
        _use(req, near, gl, g, key, last, rates, aux)
    sc[0] = n


@njit
def samples_finish(head, link, y_out, horizon):
    """Label every row still waiting (its item not used again in the segment) with log2 `horizon`."""
    never = np.log2(float(horizon))
    for y in range(head.shape[0]):
        r = head[y]
        while r >= 0:
            y_out[r] = never
            r = link[r]
        head[y] = -1
