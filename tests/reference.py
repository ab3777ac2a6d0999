"""Slow, obviously-correct versions of the fast kernels, for comparison in tests.

Synthetic traces (`moescope.synth`): `synth_routing` is the sampling kernel written out with Python ints and
floats, plain lists and linear scans, driven by the same counter-based uniforms; it must equal `synth_trace`
bit for bit (experts) and to float rounding (weights). `plackett_luce_inclusion` enumerates every ordered
k-tuple.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from moescope import synth


def first_bad_selection(experts: np.ndarray, n_experts: int) -> tuple[int, int, int, int]:
    """Reference of `moescope.trace._first_bad_selection`: (code, token, layer, slot)."""
    for t in range(experts.shape[0]):
        for layer in range(experts.shape[1]):
            seen: set[int] = set()
            for s in range(experts.shape[2]):
                e = int(experts[t, layer, s])
                if not 0 <= e < n_experts:
                    return 1, t, layer, s
                if e in seen:
                    return 2, t, layer, s
                seen.add(e)
    return 0, -1, -1, -1


def expert_mass(experts: np.ndarray, n_experts: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Reference of `moescope.trace.expert_mass`: [layers, experts] counts or gate mass."""
    out = np.zeros((experts.shape[1], n_experts), dtype=np.float64 if weights is not None else np.int64)
    for t in range(experts.shape[0]):
        for layer in range(experts.shape[1]):
            for s in range(experts.shape[2]):
                out[layer, experts[t, layer, s]] += 1 if weights is None else float(weights[t, layer, s])
    return out


def split_tokens(seq_starts: np.ndarray, n_tokens: int, part: str) -> list[int]:
    """Token indices of the train (first half) or test (second half) part of every sequence."""
    out: list[int] = []
    bounds = [*seq_starts.tolist(), n_tokens]
    for a, b in itertools.pairwise(bounds):
        mid = a + (b - a) // 2
        out.extend(range(a, mid) if part == "train" else range(mid, b))
    return out


# -- moescope.synth ---------------------------------------------------------------------------------
SPLITMIX_MASK = (1 << 64) - 1
SPLITMIX_GAMMA, SPLITMIX_M1, SPLITMIX_M2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def splitmix64(z: int) -> int:
    """splitmix64's finaliser on Python ints."""
    z &= SPLITMIX_MASK
    z = ((z ^ (z >> 30)) * SPLITMIX_M1) & SPLITMIX_MASK
    z = ((z ^ (z >> 27)) * SPLITMIX_M2) & SPLITMIX_MASK
    return z ^ (z >> 31)


def hash_uniform(state: int, j: int) -> float:
    return ((splitmix64(state + (j + 1) * SPLITMIX_GAMMA) >> 11) + 0.5) * 2.0**-53


def running_sum(xs: list[float]) -> list[float]:
    out, acc = [], 0.0
    for x in xs:
        acc += x
        out.append(acc)
    return out


def first_above(cum: list[float], x: float) -> int:
    """Inverse CDF: the first index whose cumulative value exceeds x (the last index if none does)."""
    for i, c in enumerate(cum):
        if c > x:
            return i
    return len(cum) - 1


def synth_routing(spec: synth.SynthSpec) -> tuple[np.ndarray, np.ndarray]:
    """Experts [tokens, layers, k] int16 and float32 weights of `spec`, one token-layer at a time.

    Takes the sequence plan from `synth._plan` and the planted distributions from `synth.truth`.
    """
    starts, domains, key = synth._plan(spec)
    t = synth.truth(spec)
    n_exp, k, ts_all, stick = spec.n_experts, spec.top_k, spec.team_strength, spec.stickiness
    n_teams = spec.n_teams
    experts = np.zeros((spec.n_tokens, spec.n_layers, k), dtype=np.int16)
    weights = np.zeros((spec.n_tokens, spec.n_layers, k), dtype=np.float32)
    for layer in range(spec.n_layers):
        teams = t["teams"][layer]
        group_of = [n_teams] * n_exp
        for g, members in enumerate(teams):
            for c in members:
                group_of[c] = g
        for seq in range(len(starts) - 1):
            d = int(domains[seq])
            p = t["popularity"][layer][d]
            base_cdf = running_sum(p)
            gmass = [
                running_sum([p[c] if group_of[c] == g else 0.0 for c in range(n_exp)])[-1] for g in range(n_teams + 1)
            ]
            group_cdf = running_sum(gmass)
            stream = splitmix64(splitmix64(int(key) + seq * SPLITMIX_GAMMA) + (layer + 1) * SPLITMIX_M1)
            for pos in range(int(starts[seq + 1] - starts[seq])):
                tok = int(starts[seq]) + pos
                st = splitmix64(stream + (pos + 1) * SPLITMIX_M2)
                draws = itertools.count()
                g = n_teams
                if n_teams and ts_all > 0:
                    g = first_above(group_cdf, hash_uniform(st, next(draws)) * group_cdf[-1])
                ts = ts_all if g < n_teams else 0.0

                chosen: list[int] = []
                prev = [int(x) for x in experts[tok - 1, layer]] if pos else []
                for _slot in range(k):
                    e = -1
                    if pos and stick > 0 and hash_uniform(st, next(draws)) < stick:
                        free = [c for c in prev if c not in chosen]
                        e = free[int(hash_uniform(st, next(draws)) * len(free))]
                    for _ in range(synth.MAX_TRIES if e < 0 else 0):
                        u = hash_uniform(st, next(draws))
                        if u < ts:
                            team_cdf = running_sum([p[c] for c in teams[g]])
                            c = teams[g][first_above(team_cdf, u / ts * team_cdf[-1])]
                        else:
                            c = first_above(base_cdf, (u - ts) / (1.0 - ts) * base_cdf[-1])
                        if c not in chosen:
                            e = c
                            break
                    if e < 0:  # exact draw over the remaining mass
                        total = 0.0
                        for c in range(n_exp):
                            if c not in chosen:
                                total += synth_draw_mass(c, g, ts, p, group_of, gmass)
                        x, acc = hash_uniform(st, next(draws)) * total, 0.0
                        for c in range(n_exp):
                            m = synth_draw_mass(c, g, ts, p, group_of, gmass)
                            if c not in chosen and m > 0.0:
                                e, acc = c, acc + m
                                if acc > x:
                                    break
                    chosen.append(e)
                experts[tok, layer] = chosen
                j = next(draws)
                x, spacings = 0.0, [0.0] * k
                for q in range(k):
                    x -= math.log(hash_uniform(st, j + q)) / (k - q)
                    spacings[k - 1 - q] = x
                total = running_sum(spacings[::-1])[-1] + k * synth._WEIGHT_FLOOR
                weights[tok, layer] = [(s + synth._WEIGHT_FLOOR) / total for s in spacings]
    return experts, weights


def synth_draw_mass(c: int, g: int, ts: float, p: list[float], group_of: list[int], gmass: list[float]) -> float:
    """Unnormalised draw mass of expert c when the token-layer drew group g (team strength ts)."""
    m = (1.0 - ts) * p[c]
    if ts > 0.0 and group_of[c] == g:
        m += ts * p[c] / gmass[g]
    return m


def plackett_luce_inclusion(rates: list[float], k: int) -> list[float]:
    """P(expert among the first k draws without replacement, each draw ∝ rates of the rest), enumerated."""
    total = sum(rates)
    out = [0.0] * len(rates)
    for order in itertools.permutations(range(len(rates)), k):
        prob, left = 1.0, total
        for e in order:
            prob *= rates[e] / left
            left -= rates[e]
        for e in order:
            out[e] += prob
    return out


# -- moescope.analyze.concentration ---------------------------------------------------------------------
def hot_experts(row: list[float], coverage: float) -> int:
    """Experts, hottest first, until their summed share reaches `coverage` (shares sum to 1)."""
    total, n = 0.0, 0
    for share in sorted(row, reverse=True):
        total += share
        n += 1
        if total >= coverage - 1e-9:
            return n
    return n


def concentration_score(row: list[float]) -> float:
    """1 - entropy / log(E)."""
    if len(row) == 1:
        return 1.0
    return 1.0 - sum(-p * math.log(p) for p in row if p > 0) / math.log(len(row))


def gini(row: list[float]) -> float:
    """Mean absolute difference over all ordered pairs, divided by twice the mean."""
    n, mean = len(row), sum(row) / len(row)
    return sum(abs(a - b) for a in row for b in row) / (2 * n * n * mean) if mean > 0 else 0.0


# -- moescope.analyze.ranking ---------------------------------------------------------------------------
def ranking(experts: np.ndarray, n_experts: int, layer: int) -> list[int]:
    """Experts of one layer index, most selected first, ties by lower id."""
    counts = [0] * n_experts
    for row in experts[:, layer, :]:
        for e in row:
            counts[int(e)] += 1
    return sorted(range(n_experts), key=lambda e: (-counts[e], e))


def group_mass(experts: np.ndarray, layer: int, group: set[int]) -> tuple[float, float]:
    """(selections inside / all selections, tokens with every slot inside / all tokens) of one layer index."""
    inside = total = full = 0
    for row in experts[:, layer, :]:
        hits = sum(int(e) in group for e in row)
        inside += hits
        total += len(row)
        full += hits == len(row)
    return inside / total, full / experts.shape[0]


# -- moescope.cache -------------------------------------------------------------------------------------
# Each takes req [groups, k] and reset [groups] and returns (hits, demand_misses, prefetch_loads, wasted).
def _segments(req: np.ndarray, reset: np.ndarray) -> list[list[list[int]]]:
    segs: list[list[list[int]]] = []
    for g, row in enumerate(req.tolist()):
        if reset[g] or not segs:
            segs.append([])
        segs[-1].append(row)
    return segs


def cache_lru(req, reset, capacity):
    hits = misses = 0
    for seg in _segments(req, reset):
        order: list[int] = []  # most recent first
        for group in seg:
            for x in group:
                if x in order:
                    hits += 1
                else:
                    misses += 1
            keep = [y for y in order if y not in group][: capacity - len(group)]
            order = list(group) + keep
    return hits, misses, 0, 0


def cache_lru_misses_all(req, reset, n_items, k):
    """Demand misses of LRU at every capacity k..n_items, one replay each."""
    return {c: cache_lru(req, reset, c)[1] for c in range(k, n_items + 1)}


def _evicting(req, reset, capacity, choose, on_hit=None, on_load=None, on_reset=None, tick=None):
    """Generic demand cache: `choose(cached, group, g)` picks the victim among cached items not in group."""
    hits = misses = 0
    for seg in _segments(req, reset):
        cached: set[int] = set()
        if on_reset:
            on_reset()
        for group in seg:
            g = tick()
            for x in group:
                if x in cached:
                    hits += 1
                    if on_hit:
                        on_hit(x, g)
            for x in group:
                if x in cached:
                    continue
                misses += 1
                if len(cached) == capacity:
                    cached.remove(choose([y for y in cached if y not in group], g))
                cached.add(x)
                if on_load:
                    on_load(x, g)
    return hits, misses, 0, 0


def cache_fifo(req, reset, capacity):
    loaded: dict[int, int] = {}
    clock = iter(range(10**12))
    return _evicting(
        req,
        reset,
        capacity,
        lambda cand, g: min(cand, key=lambda y: (loaded[y], y)),
        on_load=lambda x, g: loaded.__setitem__(x, g),
        tick=lambda: next(clock),
    )


def cache_lfu(req, reset, capacity, aging=0):
    uses: dict[int, int] = {}
    last: dict[int, int] = {}
    clock = iter(range(10**12))

    def tick():
        g = next(clock)
        if aging and g and g % aging == 0:
            for y in uses:
                uses[y] //= 2
        return g

    def use(x, g):
        uses[x] = uses.get(x, 0) + 1
        last[x] = g

    # counts restart with each segment; the clock (and the aging schedule) does not
    return _evicting(
        req,
        reset,
        capacity,
        lambda cand, g: min(cand, key=lambda y: (uses.get(y, 0), last.get(y, -1), y)),
        on_hit=use,
        on_load=use,
        on_reset=uses.clear,
        tick=tick,
    )


def cache_belady(req, reset, capacity):
    rows = req.tolist()
    seg_id = np.cumsum(reset) if len(reset) else reset

    def next_use(x, g):
        for h in range(g + 1, len(rows)):
            if seg_id[h] != seg_id[g]:
                break
            if x in rows[h]:
                return h
        return float("inf")

    clock = iter(range(10**12))
    return _evicting(
        req, reset, capacity, lambda cand, g: max(cand, key=lambda y: (next_use(y, g), -y)), tick=lambda: next(clock)
    )


def cache_static(req, reset, pinned: set[int]):
    """Pinned experts load at their first use after a reset (a cold miss), then always hit; others miss."""
    hits, loaded = 0, set()
    for row, r in zip(req.tolist(), reset.tolist(), strict=True):
        if r:
            loaded = set()
        for x in row:
            if x in pinned:
                hits += x in loaded
                loaded.add(x)
    return hits, req.size - hits, 0, 0


def _arc_lru(lst, group):
    """Least recently used entry of an ARC list that the current group does not need."""
    return next((y for y in lst if y not in group), None)


def _arc_replace(lists, p, x_in_b2, group):
    t1, t2, b1, b2 = lists
    from_t1 = len(t1) > 0 and (len(t1) > p or (x_in_b2 and len(t1) == p))
    src, dst = (t1, b1) if from_t1 else (t2, b2)
    y = _arc_lru(src, group)
    if y is None:
        src, dst = (t2, b2) if from_t1 else (t1, b1)
        y = _arc_lru(src, group)
    del src[y]
    dst[y] = True


def cache_arc(req, reset, capacity):
    """ARC as published (Megiddo & Modha 2003, Fig. 4), lists as OrderedDicts (LRU first), groups served
    hits first; a resident victim is never an item of the current group."""
    from collections import OrderedDict

    c = capacity
    hits = misses = 0
    for seg in _segments(req, reset):
        lists = t1, t2, b1, b2 = OrderedDict(), OrderedDict(), OrderedDict(), OrderedDict()
        p = 0.0
        for group in seg:
            for x in group:
                if x in t1 or x in t2:
                    hits += 1
                    t1.pop(x, None)
                    t2.pop(x, None)
                    t2[x] = True
            for x in group:
                if x in t1 or x in t2:
                    continue
                misses += 1
                full = len(t1) + len(t2) >= c
                if x in b1:
                    p = min(float(c), p + max(len(b2) / len(b1), 1.0))
                    del b1[x]
                    if full:
                        _arc_replace(lists, p, False, group)
                    t2[x] = True
                elif x in b2:
                    p = max(0.0, p - max(len(b1) / len(b2), 1.0))
                    del b2[x]
                    if full:
                        _arc_replace(lists, p, True, group)
                    t2[x] = True
                else:
                    if len(t1) + len(b1) == c:
                        if len(t1) < c:
                            b1.popitem(last=False)
                        else:
                            del t1[_arc_lru(t1, group)]
                    elif len(t1) + len(t2) + len(b1) + len(b2) >= 2 * c and b2:
                        b2.popitem(last=False)
                    if len(t1) + len(t2) >= c:
                        _arc_replace(lists, p, False, group)
                    t1[x] = True
    return hits, misses, 0, 0


def _evict_lru(order: list[int], pending: set[int], protect: set[int]) -> int:
    """Drop the least recently used unprotected item; 1 if it was an unused prefetch."""
    for y in reversed(order):
        if y not in protect:
            order.remove(y)
            if y in pending:
                pending.discard(y)
                return 1
            return 0
    raise AssertionError("no evictable item")


def cache_coact_prefetch(req, reset, capacity, coact, n_experts, budget):
    """LRU (group on top, slot 0 most recent) + after each group load the `budget` experts with the highest
    summed co-activation with it (ties by id, score > 0) at the LRU end (cached ones untouched); wasted =
    loaded by prefetch and evicted (or left at a reset or the end) without a hit."""
    hits = misses = loads = wasted = 0
    b = min(budget, capacity - req.shape[1])
    for seg in _segments(req, reset):
        order: list[int] = []
        pending: set[int] = set()
        for group in seg:
            for x in group:
                if x in order:
                    hits += 1
                    pending.discard(x)
            for x in group:
                if x not in order:
                    misses += 1
                    if len(order) == capacity:
                        wasted += _evict_lru(order, pending, set(group))
                    order.insert(0, x)
            order = list(group) + [y for y in order if y not in group]
            if b <= 0:
                continue
            layer = group[0] // n_experts
            base = layer * n_experts
            score = [sum(float(coact[layer, x - base, f]) for x in group) for f in range(n_experts)]
            cands = sorted((f for f in range(n_experts) if base + f not in group), key=lambda f: (-score[f], f))
            protect = set(group)
            for f in cands[:b]:
                if score[f] <= 0:
                    break
                y = base + f
                protect.add(y)
                if y in order:
                    continue
                loads += 1
                if len(order) == capacity:
                    wasted += _evict_lru(order, pending, protect)
                order.append(y)  # the LRU end
                pending.add(y)
        wasted += len(pending)
    return hits, misses, loads, wasted


def cache_lrfu(req, reset, capacity, lam, weights=None):
    """LRFU the plain way: CRF(t) = sum over past uses u of w_u 2^(-lam (t - u)) recomputed at every eviction
    (w_u the use's gate weight from ``weights [groups, k]``, or 1); the victim is the smallest CRF not needed
    by the group, ties by the slot it was loaded into."""
    hits = misses = 0
    g = -1
    for seg in _segments(req, reset):
        uses: dict[int, list[tuple[int, float]]] = {}
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
                crf = [math.fsum(w * 2.0 ** (-lam * (g - u)) for u, w in uses.get(y, [])) for y in slots]
                best = min((i for i, y in enumerate(slots) if y not in group), key=lambda i: crf[i])
                slots[best] = x
            for j, x in enumerate(group):
                uses.setdefault(x, []).append((g, 1.0 if weights is None else float(weights[g, j])))
    return hits, misses, 0, 0


def cache_adaptive_lrfu(req, reset, capacity, rates, decay):
    """Adaptive LRFU the plain way: one LRFU shadow per rate (CRF recomputed from use lists), a decayed miss
    score each; before each group the real cache evicts by the CRF of the rate whose score is lowest (first on
    ties)."""
    hits = misses = 0
    g = -1
    m_n = len(rates)
    for seg in _segments(req, reset):
        uses: dict[int, list[int]] = {}
        caches: list[list[int]] = [[] for _ in range(m_n + 1)]
        score = [0.0] * m_n
        for group in seg:
            g += 1
            lead = min(range(m_n), key=lambda m: score[m])
            for m in range(m_n + 1):
                lam = rates[lead if m == m_n else m]
                if m < m_n:
                    score[m] *= decay
                slots = caches[m]
                for x in group:
                    if x in slots:
                        hits += m == m_n
                        continue
                    if m == m_n:
                        misses += 1
                    else:
                        score[m] += 1.0
                    if len(slots) < capacity:
                        slots.append(x)
                        continue
                    crf = [math.fsum(2.0 ** (-lam * (g - u)) for u in uses.get(y, [])) for y in slots]
                    best = min((i for i, y in enumerate(slots) if y not in group), key=lambda i: crf[i])
                    slots[best] = x
            for x in group:
                uses.setdefault(x, []).append(g)
    return hits, misses, 0, 0
