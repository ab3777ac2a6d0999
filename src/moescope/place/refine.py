"""Local search on the exact objective: swap experts between devices to cut devices per token.

Per MoE layer, the train tokens are deduplicated into weighted expert sets ``sets [H, k]`` with weights
``w [H]`` (the hypergraph: one hyperedge per distinct top-k set; a set's weight is the summed weight of
its tokens). For an assignment ``assign [E]`` the objective is ``sum_h w_h * lambda_h``, ``lambda_h`` =
distinct devices of set ``h`` -- with unit token weights exactly the train total of distinct devices per
token (the connectivity ``lambda - 1`` objective plus a constant).

Balance is held by up to three caps per layer: the **load CV** (std / mean over devices of the summed train
load ``eload`` of their experts), the **max/mean load** (the most loaded device over the mean) and,
optionally, the **drift CV** ``sqrt(sum_d 1_d^T cov 1_d / D) / mean load`` for a drift covariance
``cov [E, E]`` (`moescope.place.data`). The *excess* of an assignment is how far these exceed their caps,
summed.

`refine_layer` runs three phases, each taking the best single step until none helps:

0. **Capacity repair** (a device holds more than ``slots`` experts, e.g. after a partitioner that balances
   load, not counts): the cheapest move of an expert from an over-full device to a device with room.
1. **Balance repair** (the excess is positive): the swap or move with the least objective increase per
   unit of excess removed, until the excess is 0 or nothing lowers it.
2. **Improvement**: the swap of two experts on different devices (slot counts kept), or the move into a
   free slot, that lowers the objective most while each capped figure stays within ``max(cap, current)``.

Then ``kicks`` rounds of iterated local search: ``KICK_SWAPS`` random swaps of experts of similar train load
(at most ``KICK_REACH`` places apart in load order, so a kick barely moves the balance), phases 1-2 again;
the result is kept when its excess is lower, or equal with a lower objective; else the round's steps are
undone.
Random swaps come from a counter-based hash of ``(seed, round)``, so results do not depend on threads.
`refine_all` runs the phases from several starts per layer, in parallel across layers, and kicks the best.

Gains are exact and incremental: per set a count of its experts on each device ``cnt [H, D]``, and per
expert the objective change of leaving its device (``rem [E]``), of joining each device (``pen [E, D]``)
and the correction for sets two swapped experts share (``xcor [E, E]``); a step updates only the sets
containing the experts it moves (and the drift sums ``mcov [E, D]`` in O(E)). Kernels only; the methods
that call them live in `methods`.
"""

from __future__ import annotations

import numpy as np

from moescope._jit import njit, njit_parallel, prange
from moescope._rng import GAMMA as _GAMMA
from moescope._rng import hash2 as _hash

# How a kick perturbs: set by hand with the first version of the search and not re-chosen on a development set
# (they shape the perturbation, and the search is near-converged: `moescope.place.methods.KICKS`).
KICK_SWAPS = 3  # random swaps per iterated-local-search round
KICK_REACH = 16  # a kick swaps an expert with one at most this many places away in train-load order
UNDO_STEPS = 256  # steps a rejected round may take and still be undone step by step (else: rebuild)


@njit
def token_sets(experts, layer, tw):
    """Deduplicate one layer's tokens into weighted expert sets.

    experts : [tokens, layers, k] int ids; layer : index along the layer axis; tw : [tokens] int64 weight of
    each token (empty: 1 each).
    Returns ``sets [H, k] int32`` (each row ascending; rows ordered by a hash of the set, ties in token
    order) and ``w [H] int64`` summed token weights per set.
    """
    n_tok, k = experts.shape[0], experts.shape[2]
    rows = np.empty((n_tok, k), dtype=np.int32)
    keys = np.empty(n_tok, dtype=np.uint64)
    for t in range(n_tok):
        for j in range(k):
            v = np.int32(experts[t, layer, j])
            i = j
            while i > 0 and rows[t, i - 1] > v:
                rows[t, i] = rows[t, i - 1]
                i -= 1
            rows[t, i] = v
        h = np.uint64(k)
        for j in range(k):
            h = (h ^ np.uint64(rows[t, j] + 1)) * _GAMMA
            h ^= h >> np.uint64(29)
        keys[t] = h
    order = np.argsort(keys, kind="mergesort")
    sets = np.empty((n_tok, k), dtype=np.int32)
    w = np.zeros(n_tok, dtype=np.int64)
    n = 0
    for i in range(n_tok):
        t = order[i]
        same = n > 0 and keys[t] == keys[order[i - 1]]
        if same:
            for j in range(k):
                same = same and rows[t, j] == sets[n - 1, j]
        wt = tw[t] if tw.shape[0] else 1
        if same:
            w[n - 1] += wt
        else:
            for j in range(k):
                sets[n, j] = rows[t, j]
            w[n] = wt
            n += 1
    return sets[:n].copy(), w[:n].copy()


def objective(sets: np.ndarray, w: np.ndarray, assign: np.ndarray) -> int:
    """``sum_h w_h * lambda_h``: tokens times distinct devices, for ``assign [E]`` device of each expert."""
    devs = assign[sets]  # [H, k]
    lam = (np.diff(np.sort(devs, axis=1), axis=1) != 0).sum(axis=1) + 1
    return int((w * lam).sum())


@njit
def _contrib(h, sign, sets, w, assign, cnt, rem, pen, xcor, cols):
    """Add (sign +1) or remove (-1) set h's terms in rem, pen (only the devices in ``cols``) and xcor."""
    k = sets.shape[1]
    wh = sign * w[h]
    for j in range(k):
        e = sets[h, j]
        a = assign[e]
        if cnt[h, a] == 1:
            rem[e] += wh
            for j2 in range(k):
                if j2 != j:
                    xcor[e, sets[h, j2]] += wh
        for c in range(cols.shape[0]):
            b = cols[c]
            if cnt[h, b] == 0:
                pen[e, b] += wh


@njit
def _build(sets, w, assign, eload, cnt, rem, pen, xcor, dload, dcount):
    """Fill every table from scratch for ``assign``; returns the objective."""
    n_set, k = sets.shape
    cnt[:] = 0
    rem[:] = 0
    pen[:] = 0
    xcor[:] = 0
    dload[:] = 0.0
    dcount[:] = 0
    for e in range(assign.shape[0]):
        dload[assign[e]] += eload[e]
        dcount[assign[e]] += 1
    for h in range(n_set):
        for j in range(k):
            cnt[h, assign[sets[h, j]]] += 1
    all_cols = np.arange(cnt.shape[1])
    obj = 0
    for h in range(n_set):
        _contrib(h, 1, sets, w, assign, cnt, rem, pen, xcor, all_cols)
        lam = 0
        for d in range(cnt.shape[1]):
            lam += cnt[h, d] > 0
        obj += w[h] * lam
    return obj


@njit
def _cv(sumsq, total, n_dev):
    mean = total / n_dev
    if mean <= 0:
        return 0.0
    var = sumsq / n_dev - mean * mean
    return np.sqrt(var) / mean if var > 0 else 0.0


@njit
def _gain(e, f, b, assign, rem, pen, xcor):
    """Objective change of moving e to device b and, when f >= 0, f to e's device."""
    a = assign[e]
    if f < 0:
        return -rem[e] + pen[e, b]
    return -rem[e] + pen[e, b] - rem[f] + pen[f, a] + xcor[e, f] + xcor[f, e]


@njit
def _step(e, f, b, sets, w, ptr, idx, assign, eload, cnt, rem, pen, xcor, dload, dcount, stamp, tick):
    """Move e to device b (and f, when >= 0, to e's device), updating every table; ``tick`` must be fresh."""
    a = assign[e]
    cols = np.empty(2, dtype=np.int64)
    cols[0], cols[1] = a, b
    for x in (e, f):
        if x < 0:
            continue
        for p in range(ptr[x], ptr[x + 1]):
            h = idx[p]
            if stamp[h] != tick:
                stamp[h] = tick
                _contrib(h, -1, sets, w, assign, cnt, rem, pen, xcor, cols)
    for x, src, dst in ((e, a, b), (f, b, a)):
        if x < 0:
            continue
        for p in range(ptr[x], ptr[x + 1]):
            cnt[idx[p], src] -= 1
            cnt[idx[p], dst] += 1
        assign[x] = dst
        dload[src] -= eload[x]
        dload[dst] += eload[x]
        dcount[src] -= 1
        dcount[dst] += 1
    for x in (e, f):
        if x < 0:
            continue
        for p in range(ptr[x], ptr[x + 1]):
            h = idx[p]
            if stamp[h] == tick:
                stamp[h] = -tick
                _contrib(h, 1, sets, w, assign, cnt, rem, pen, xcor, cols)


@njit
def _excess(cv, dv, mm, prm, total, n_dev):
    """Summed excess of the load CV, the drift CV and max/mean load over their caps (a cap < 0: off)."""
    x = max(0.0, cv - prm[1]) if prm[1] >= 0 else 0.0
    if prm[3] >= 0:
        x += max(0.0, np.sqrt(max(dv, 0.0) / n_dev) / (total / n_dev) - prm[3])
    if prm[4] >= 0:
        x += max(0.0, mm - prm[4])
    return x


@njit
def _top3(dload):
    """The three largest device loads' indices (-1 where D < 3), largest first."""
    i0, i1, i2 = -1, -1, -1
    for d in range(dload.shape[0]):
        v = dload[d]
        if i0 < 0 or v > dload[i0]:
            i0, i1, i2 = d, i0, i1
        elif i1 < 0 or v > dload[i1]:
            i1, i2 = d, i1
        elif i2 < 0 or v > dload[i2]:
            i2 = d
    return i0, i1, i2


@njit
def _max_mean(dload, a, b, la, lb, i0, i1, i2, mean):
    """max/mean load after devices a and b change to loads la and lb (the others from the top three)."""
    m = max(la, lb)
    for i in (i0, i1, i2):
        if i >= 0 and i != a and i != b:
            m = max(m, dload[i])
            break
    return m / mean if mean > 0 else 0.0


@njit
def _descend(
    phase,
    sets,
    w,
    ptr,
    idx,
    assign,
    eload,
    cov,
    mcov,
    dvar,
    cnt,
    rem,
    pen,
    xcor,
    dload,
    dcount,
    stamp,
    clock,
    prm,
    log,
    nlog,
):
    """Phases ``phase``..2 of the module docstring; returns (objective change, steps, final excess).

    prm : [slots, cv_cap, max_steps, drift_cap, max_mean_cap] float64 (a cap < 0: unconstrained); clock : [1] int64 tick
    counter; cov : [E, E] drift covariance; mcov : [E, D] its sums over each device's experts; dvar : [1];
    log : [M, 3] int64 steps taken as (e, f, e's device before), ``nlog [1]`` of them (M + 1: overflowed).
    """
    n_exp, n_dev = pen.shape
    slots, cv_cap, max_steps, drift_cap, mm_cap = int(prm[0]), prm[1], int(prm[2]), prm[3], prm[4]
    total = dload.sum()
    mean = total / n_dev
    change, steps = 0, 0
    while True:
        sumsq = 0.0
        over = False
        for d in range(n_dev):
            sumsq += dload[d] * dload[d]
            over = over or dcount[d] > slots
        cv = _cv(sumsq, total, n_dev)
        i0, i1, i2 = _top3(dload)
        mm = dload[i0] / mean if mean > 0 else 0.0
        excess = _excess(cv, dvar[0], mm, prm, total, n_dev)
        if phase == 0 and not over:
            phase = 1
        if phase == 1 and excess <= 0:
            phase = 2
        if phase == 2 and steps >= max_steps:
            break
        limit = max(cv_cap, cv) if cv_cap >= 0 else np.inf
        dlimit = max(drift_cap * drift_cap * mean * mean * n_dev, dvar[0]) if drift_cap >= 0 else np.inf
        mlimit = max(mm_cap, mm) if mm_cap >= 0 else np.inf
        best_e, best_f, best_b, best_score = -1, -1, -1, 0.0
        for e in range(n_exp):
            a = assign[e]
            if phase == 0 and dcount[a] <= slots:
                continue
            for f in range(e + 1 if phase > 0 else n_exp, n_exp + n_dev):
                # f < E: swap e and f; f >= E: move e into a free slot of device f - E
                if f < n_exp:
                    b, g, shift = assign[f], f, eload[e] - eload[f]
                else:
                    b, g, shift = f - n_exp, -1, eload[e]
                    if dcount[b] >= slots:
                        continue
                if b == a:
                    continue
                delta = _gain(e, g, b, assign, rem, pen, xcor)
                if phase == 2 and (delta >= 0 or (best_e >= 0 and delta >= best_score)):
                    continue  # cannot be the best improving step: skip the balance arithmetic
                la, lb = dload[a] - shift, dload[b] + shift
                cv2 = _cv(sumsq - dload[a] ** 2 - dload[b] ** 2 + la * la + lb * lb, total, n_dev)
                dv2 = dvar[0]
                if drift_cap >= 0:
                    if g < 0:
                        dv2 += 2.0 * (mcov[e, b] - mcov[e, a]) + 2.0 * cov[e, e]
                    else:
                        dv2 += 2.0 * (mcov[e, b] - mcov[e, a] + mcov[g, a] - mcov[g, b]) + 2.0 * (
                            cov[e, e] + cov[g, g] - 2.0 * cov[e, g]
                        )
                # the max/mean after the step, only where a cap reads it (phase 0 looks at the CV alone)
                mm2 = _max_mean(dload, a, b, la, lb, i0, i1, i2, mean) if mm_cap >= 0 and phase > 0 else 0.0
                if phase == 0:
                    score, ok = delta + 1e-9 * cv2, True
                elif phase == 1:
                    ex2 = _excess(cv2, dv2, mm2, prm, total, n_dev)
                    ok = ex2 < excess - 1e-12
                    score = delta / (excess - ex2) if ok else 0.0
                else:
                    score, ok = float(delta), delta < 0 and cv2 <= limit and dv2 <= dlimit and mm2 <= mlimit
                if ok and (best_e < 0 or score < best_score):
                    best_e, best_f, best_b, best_score = e, g, b, score
        if best_e < 0:
            if phase == 1:
                phase = 2
                continue
            break  # phase 0 always finds a move (D * slots >= E); phase 2: a local optimum
        change += _gain(best_e, best_f, best_b, assign, rem, pen, xcor)
        a = assign[best_e]
        _log(log, nlog, best_e, best_f, a)
        _drift_step(best_e, best_f, a, best_b, cov, mcov, dvar)
        clock[0] += 1
        _step(
            best_e,
            best_f,
            best_b,
            sets,
            w,
            ptr,
            idx,
            assign,
            eload,
            cnt,
            rem,
            pen,
            xcor,
            dload,
            dcount,
            stamp,
            clock[0],
        )
        if phase == 2:
            steps += 1
    sumsq = 0.0
    for d in range(n_dev):
        sumsq += dload[d] * dload[d]
    mm = dload.max() / mean if mean > 0 else 0.0
    return change, steps, _excess(_cv(sumsq, total, n_dev), dvar[0], mm, prm, total, n_dev)


@njit
def _log(log, nlog, e, f, a):
    if nlog[0] < log.shape[0]:
        log[nlog[0], 0], log[nlog[0], 1], log[nlog[0], 2] = e, f, a
        nlog[0] += 1
    else:
        nlog[0] = log.shape[0] + 1


@njit
def _drift_step(e, f, a, b, cov, mcov, dvar):
    """Update the drift tables for e moving a -> b (and f, when >= 0, b -> a)."""
    if cov.shape[0] == 0:
        return
    if f < 0:
        dvar[0] += 2.0 * (mcov[e, b] - mcov[e, a]) + 2.0 * cov[e, e]
        for x in range(cov.shape[0]):
            mcov[x, a] -= cov[x, e]
            mcov[x, b] += cov[x, e]
        return
    dvar[0] += 2.0 * (mcov[e, b] - mcov[e, a] + mcov[f, a] - mcov[f, b]) + 2.0 * (
        cov[e, e] + cov[f, f] - 2.0 * cov[e, f]
    )
    for x in range(cov.shape[0]):
        mcov[x, a] += cov[x, f] - cov[x, e]
        mcov[x, b] += cov[x, e] - cov[x, f]


@njit
def _drift_build(assign, cov, mcov, dvar):
    n_exp = mcov.shape[0]
    mcov[:] = 0.0
    dvar[0] = 0.0
    if cov.shape[0] == 0:
        return
    for x in range(n_exp):
        for f in range(n_exp):
            mcov[x, assign[f]] += cov[x, f]
    for e in range(n_exp):
        dvar[0] += mcov[e, assign[e]]


@njit
def refine_layer(sets, w, assign, eload, n_dev, slots, cv_cap, max_steps, kicks, seed, cov, drift_cap, mm_cap):
    """Run the phases and kicks of the module docstring on one layer; ``assign [E]`` is updated in place.

    sets : [H, k] int32 expert sets; w : [H] int64 tokens per set; assign : [E] int64 device of each expert
    (a device may hold more than ``slots``: phase 0 repairs it); eload : [E] float64 train load per expert;
    cv_cap : train load-CV cap (< 0: unconstrained); max_steps : phase-2 steps per descent at most (0: only
    repairs); kicks : iterated-local-search rounds; seed : their random stream; cov : [E, E] float64 drift
    covariance (``[0, 0]``: none); drift_cap : cap on the drift CV (< 0: unconstrained); mm_cap : cap on the
    max/mean device load (< 0: unconstrained).

    Returns ``[objective before, objective after, phase-2 steps]`` as int64 (objective = sum_h w_h lambda_h).
    """
    n_set, k = sets.shape
    n_exp = assign.shape[0]
    deg = np.zeros(n_exp + 1, dtype=np.int64)
    for h in range(n_set):
        for j in range(k):
            deg[sets[h, j] + 1] += 1
    ptr = np.cumsum(deg)
    idx = np.empty(ptr[n_exp], dtype=np.int64)
    fill = ptr[:-1].copy()
    for h in range(n_set):
        for j in range(k):
            e = sets[h, j]
            idx[fill[e]] = h
            fill[e] += 1
    cnt = np.zeros((n_set, n_dev), dtype=np.int32)
    rem = np.zeros(n_exp, dtype=np.int64)
    pen = np.zeros((n_exp, n_dev), dtype=np.int64)
    xcor = np.zeros((n_exp, n_exp), dtype=np.int64)
    dload = np.zeros(n_dev)
    dcount = np.zeros(n_dev, dtype=np.int64)
    stamp = np.zeros(n_set, dtype=np.int64)
    clock = np.zeros(1, dtype=np.int64)
    mcov = np.zeros((n_exp, n_dev))
    dvar = np.zeros(1)
    if cov.shape[0] == 0:
        drift_cap = -1.0
    prm = np.array([float(slots), float(cv_cap), float(max_steps), float(drift_cap), float(mm_cap)])
    obj0 = _build(sets, w, assign, eload, cnt, rem, pen, xcor, dload, dcount)
    _drift_build(assign, cov, mcov, dvar)
    log = np.zeros((UNDO_STEPS, 3), dtype=np.int64)
    nlog = np.zeros(1, dtype=np.int64)
    tables = (sets, w, ptr, idx, assign, eload, cov, mcov, dvar, cnt, rem, pen, xcor, dload, dcount, stamp, clock, prm)
    change, steps, excess = _descend(0, *tables, log, nlog)
    obj = obj0 + change
    best = assign.copy()
    best_obj, best_excess = obj, excess
    by_load = np.argsort(eload, kind="mergesort")
    pos = np.empty(n_exp, dtype=np.int64)
    pos[by_load] = np.arange(n_exp)
    for r in range(kicks if max_steps > 0 else 0):
        nlog[0] = 0
        for i in range(KICK_SWAPS):
            # a random expert and one of its 3 nearest in train load on either side: the swap barely moves
            # the balance, so the descent spends its steps on locality rather than on repairing the CV
            z = _hash(seed, r * KICK_SWAPS + i)
            e = np.int64(z % np.uint64(n_exp))
            step = 1 + np.int64((z >> np.uint64(32)) % np.uint64(KICK_REACH))
            p = pos[e] + (step if (z >> np.uint64(40)) & np.uint64(1) else -step)
            f = np.int64(by_load[min(max(p, 0), n_exp - 1)])
            a, b = assign[e], assign[f]
            if a == b:
                continue
            obj += _gain(e, f, b, assign, rem, pen, xcor)
            _log(log, nlog, e, f, a)
            _drift_step(e, f, a, b, cov, mcov, dvar)
            clock[0] += 1
            _step(e, f, b, sets, w, ptr, idx, assign, eload, cnt, rem, pen, xcor, dload, dcount, stamp, clock[0])
        change, s2, excess = _descend(1, *tables, log, nlog)
        obj += change
        steps += s2
        if excess < best_excess or (excess <= best_excess and obj < best_obj):
            best[:] = assign
            best_obj, best_excess = obj, excess
        elif nlog[0] <= log.shape[0]:
            # undo the round's steps, newest first (cheaper than rebuilding every table)
            for q in range(nlog[0] - 1, -1, -1):
                e, f, a = log[q, 0], log[q, 1], log[q, 2]
                b = assign[e]
                _drift_step(e, f, b, a, cov, mcov, dvar)
                clock[0] += 1
                _step(e, f, a, sets, w, ptr, idx, assign, eload, cnt, rem, pen, xcor, dload, dcount, stamp, clock[0])
            obj = best_obj
        else:
            assign[:] = best
            obj = _build(sets, w, assign, eload, cnt, rem, pen, xcor, dload, dcount)
            _drift_build(assign, cov, mcov, dvar)
    assign[:] = best
    out = np.empty(3, dtype=np.int64)
    out[0], out[1], out[2] = obj0, best_obj, steps
    return out


@njit_parallel
def refine_all(
    experts, tw, starts, eload, n_dev, slots, cv_cap, max_steps, kicks, seed, keys, cov, drift_cap, mm_cap, out, stats
):
    """Per layer of ``experts [tokens, layers, k]`` (in parallel): descend from each start without kicks, keep
    the lowest objective (the first such start on ties), then run the kicks from it into ``out [layers, E]``.

    tw : [tokens] int64 token weights; starts : [S, layers, E] int64 assignments; eload : [layers, E] float64
    train load; cv_cap : [layers] float64 (< 0: unconstrained); cov : [layers, E, E] drift covariance
    (``[layers, 0, 0]``: none); drift_cap, mm_cap : [layers] (< 0: unconstrained); stats : [layers, S + 1, 3]
    int64 output (objective before, after, steps) of each descent and of the kicks. keys : [layers] int64 (the
    model layer ids): the kicks of layer i use the random stream ``seed * 1_000_003 + keys[i]``, so a layer's
    result does not depend on which other layers are refined beside it (a Dask task may take any subset).
    """
    n_starts = starts.shape[0]
    for layer in prange(experts.shape[1]):
        sets, w = token_sets(experts, layer, tw)
        best = -1
        for s in range(n_starts):
            a = starts[s, layer].copy()
            stats[layer, s] = refine_layer(
                sets,
                w,
                a,
                eload[layer],
                n_dev,
                slots,
                cv_cap[layer],
                max_steps,
                0,
                0,
                cov[layer],
                drift_cap[layer],
                mm_cap[layer],
            )
            if best < 0 or stats[layer, s, 1] < best:
                best = stats[layer, s, 1]
                out[layer] = a
        stats[layer, n_starts] = refine_layer(
            sets,
            w,
            out[layer],
            eload[layer],
            n_dev,
            slots,
            cv_cap[layer],
            max_steps,
            kicks,
            seed * 1_000_003 + keys[layer],
            cov[layer],
            drift_cap[layer],
            mm_cap[layer],
        )
