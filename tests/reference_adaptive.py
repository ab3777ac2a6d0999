"""Slow, obviously-correct versions of the adaptive cache kernels (`moescope.cache.kernels_adaptive`).

Plain lists and sets, one access at a time, groups served hits first (see `tests/reference.py`). Each
function returns ``(hits, demand_misses, 0, 0)`` like the kernels.
"""

from __future__ import annotations

import math

from reference import SPLITMIX_GAMMA, SPLITMIX_M2, _segments, hash_uniform, splitmix64


def lirs_split(capacity: int) -> tuple[int, int]:
    """(LIR limit, HIR resident limit): 1% of the capacity for resident HIR items, at least 1 (libCacheSim)."""
    hirs = max(1, int(0.01 * capacity))
    return capacity - hirs, hirs


def _lirs_prune(s: list[int], lir: set[int], resident: set[int], nh: list[int]) -> None:
    """Stack pruning: drop HIR entries from the bottom of S (non-resident ones leave NH too)."""
    while s and s[0] not in lir:
        y = s.pop(0)
        if y not in resident:
            nh.remove(y)


def _to_top(s: list[int], x: int) -> None:
    if x in s:
        s.remove(x)
    s.append(x)


def _lirs_demote(s: list[int], q: list[int], lir: set[int], resident: set[int], nh: list[int]) -> None:
    """The bottom of S (an LIR item, S being pruned) becomes a resident HIR item at the end of Q."""
    y = s.pop(0)
    lir.discard(y)
    q.append(y)
    _lirs_prune(s, lir, resident, nh)


def cache_lirs(req, reset, capacity):
    """LIRS (Jiang & Zhang 2002) with stack S (bottom first), queue Q of resident HIR items (front first) and
    the list NH of non-resident HIR items in S (oldest first), S bounded at 2 x capacity entries."""
    lir_limit, _ = lirs_split(capacity)
    hits = misses = 0
    for seg in _segments(req, reset):
        s: list[int] = []  # bottom .. top
        q: list[int] = []  # front .. end
        nh: list[int] = []  # oldest .. newest
        lir: set[int] = set()
        resident: set[int] = set()

        for group in seg:
            for x in group:
                if x not in resident:
                    continue
                hits += 1
                if x in lir:
                    _to_top(s, x)
                    _lirs_prune(s, lir, resident, nh)
                elif x in s and lir_limit > 0:  # a resident HIR item with a short reuse distance: to LIR
                    _to_top(s, x)
                    q.remove(x)
                    lir.add(x)
                    if len(lir) > lir_limit:
                        _lirs_demote(s, q, lir, resident, nh)
                else:  # a resident HIR item not in S (or no LIR set): stays HIR, refreshed in S and Q
                    _to_top(s, x)
                    q.remove(x)
                    q.append(x)
            for x in group:
                if x in resident:
                    continue
                misses += 1
                if len(resident) == capacity:
                    victims = [y for y in q if y not in group]
                    if victims:
                        v = victims[0]
                        q.remove(v)
                        if v in s:
                            nh.append(v)
                    else:  # every resident HIR item is needed: evict the bottom LIR item (not needed)
                        v = s.pop(0)
                        assert v not in group
                        lir.discard(v)
                        _lirs_prune(s, lir, resident, nh)
                    resident.discard(v)
                resident.add(x)
                if x in s and lir_limit > 0:  # a non-resident HIR item in S: to LIR
                    nh.remove(x)
                    _to_top(s, x)
                    lir.add(x)
                    if len(lir) > lir_limit:
                        _lirs_demote(s, q, lir, resident, nh)
                elif len(lir) < lir_limit:
                    if x in s:
                        nh.remove(x)
                    _to_top(s, x)
                    lir.add(x)
                else:
                    if x in s:
                        nh.remove(x)
                    _to_top(s, x)
                    q.append(x)
            while len(s) > 2 * capacity and nh:
                s.remove(nh.pop(0))
    return hits, misses, 0, 0


def wtinylfu_sizes(capacity: int) -> tuple[int, int, int]:
    """(window, main, protected): a 1% window (at least 1), the main SLRU 80% protected."""
    window = max(1, int(0.01 * capacity))
    main = capacity - window
    return window, main, int(0.8 * main)


def _hash2(seed: int, i: int) -> int:
    """`moescope._rng.hash2` on Python ints."""
    return splitmix64(seed * SPLITMIX_GAMMA + (i + 1) * SPLITMIX_M2)


def cache_wtinylfu(req, reset, capacity):
    """W-TinyLFU: window LRU, main SLRU (probation, protected), a 4-row count-min sketch of 4-bit counters
    with conservative update and a doorkeeper bit, halved (doorkeeper emptied) every 10 x capacity accesses;
    a window victim enters probation only if its estimate beats main's victim's."""
    n_win, n_main, n_prot = wtinylfu_sizes(capacity)
    width = 16
    while width < capacity:
        width *= 2
    rows = 4

    def col(r: int, x: int) -> int:
        return _hash2(r, x) & (width * (8 if r == rows else 1) - 1)

    def est(cms: list[list[int]], door: set[int], x: int) -> int:
        return min(cms[r][col(r, x)] for r in range(rows)) + (col(rows, x) in door)

    hits = misses = 0
    for seg in _segments(req, reset):
        cms = [[0] * width for _ in range(rows)]
        door: set[int] = set()
        recorded = 0
        window: list[int] = []  # least recent first
        prob: list[int] = []
        prot: list[int] = []

        for group in seg:
            for x in group:
                if col(rows, x) not in door:
                    door.add(col(rows, x))
                else:
                    m = min(cms[r][col(r, x)] for r in range(rows))
                    for r in range(rows):
                        if cms[r][col(r, x)] == m and m < 15:
                            cms[r][col(r, x)] += 1
                recorded += 1
                if recorded == 10 * capacity:
                    recorded = 0
                    cms = [[v // 2 for v in row] for row in cms]
                    door.clear()
            for x in group:
                if x in window:
                    hits += 1
                    window.remove(x)
                    window.append(x)
                elif x in prot or (x in prob and n_prot > 0):
                    hits += 1
                    if x in prot:
                        prot.remove(x)
                    else:
                        prob.remove(x)
                    prot.append(x)
                    if len(prot) > n_prot:
                        prob.append(prot.pop(0))
                elif x in prob:
                    hits += 1
                    prob.remove(x)
                    prob.append(x)
            for x in group:
                if x in window or x in prob or x in prot:
                    continue
                misses += 1
                window.append(x)
                cands = [y for y in window if y not in group]
                if len(window) + len(prob) + len(prot) > capacity:
                    victs = [y for y in prob if y not in group] + [y for y in prot if y not in group]
                    if not cands or (victs and est(cms, door, cands[0]) > est(cms, door, victs[0])):
                        v = victs[0]
                        (prob if v in prob else prot).remove(v)
                        if cands:
                            window.remove(cands[0])
                            prob.append(cands[0])
                    else:
                        window.remove(cands[0])
                elif len(window) > n_win and len(prob) + len(prot) < n_main and cands:
                    window.remove(cands[0])
                    prob.append(cands[0])
    return hits, misses, 0, 0


def cache_lecar(req, reset, capacity, seed=0):
    """LeCaR: on each eviction a uniform draw ``hash_uniform(seed, access index)`` below the LRU weight picks
    the least recent item, else the least frequent (uses since load, earliest to reach them); evicted items
    enter a history of `capacity` ghosts marked by who evicted them; a miss on a ghost shrinks that expert's
    weight by exp(-0.45 * 0.005 ** (time since eviction / capacity)) (libCacheSim's formula)."""
    dr = 0.005 ** (1.0 / capacity)
    hits = misses = 0
    g = 0
    for seg in _segments(req, reset):
        lru: list[int] = []  # least recent first
        freq: dict[int, int] = {}
        stamp: dict[int, int] = {}
        ghosts: list[int] = []  # oldest first
        ghost_by: dict[int, str] = {}
        ghost_t: dict[int, int] = {}
        w = {"lru": 0.5, "lfu": 0.5}
        clock = 0
        for group in seg:
            for x in group:
                if x in freq:
                    hits += 1
                    lru.remove(x)
                    lru.append(x)
                    freq[x] += 1
                    stamp[x] = clock
                    clock += 1
            for j, x in enumerate(group):
                if x in freq:
                    continue
                misses += 1
                now = g * len(group) + j
                if x in ghost_by:
                    bad = ghost_by.pop(x)
                    other = "lfu" if bad == "lru" else "lru"
                    ghosts.remove(x)
                    r = dr ** (now - ghost_t[x])
                    wb = w[bad] * math.exp(-0.45 * r) + 1e-10
                    total = wb + w[other] + 2e-10
                    w[bad], w[other] = wb / total, (w[other] + 1e-10) / total
                if len(freq) == capacity:
                    if hash_uniform(seed, now) < w["lru"]:
                        v = next(y for y in lru if y not in group)
                        by = "lru"
                    else:
                        v = min((y for y in freq if y not in group), key=lambda y: (freq[y], stamp[y]))
                        by = "lfu"
                    lru.remove(v)
                    del freq[v]
                    ghosts.append(v)
                    ghost_by[v] = by
                    ghost_t[v] = now
                    if len(ghosts) > capacity:
                        del ghost_by[ghosts.pop(0)]
                lru.append(x)
                freq[x] = 1
                stamp[x] = clock
                clock += 1
            g += 1
    return hits, misses, 0, 0


class _Cacheus:
    """One segment of Cacheus: SR-LRU (lists SR and R, history H), CR-LFU (uses, the most recent to reach
    the smallest count evicted), ghost lists of the two experts, weights and learning rate (libCacheSim's
    Cacheus.c, SR_LRU.c, CR_LFU.c; see `moescope.cache.kernels_adaptive`)."""

    def __init__(self, capacity: int, seed: int, t0: int) -> None:
        self.c, self.seed = capacity, seed
        self.sr: list[int] = []  # least recent first
        self.r: list[int] = []
        self.new: set[int] = set()  # entered SR on a miss outside H, not hit since
        self.dem: set[int] = set()  # demoted from R to SR, not hit since
        self.hist: list[int] = []  # oldest first
        self.h_new: set[int] = set()
        self.h_freq: dict[int, int] = {}
        self.c_new = self.c_dem = 0
        self.sr_size = capacity // 2
        self.freq: dict[int, int] = {}
        self.stamp: dict[int, int] = {}
        self.clock = 0
        self.lru_g: list[int] = []
        self.lfu_g: list[int] = []
        self.w_lru, self.w_lfu = 0.5, 0.5
        self.lr = self._draw_lr(1, t0)
        self.lr_prev = self.hr_prev = 0.0
        self.unlearn = self.num_hit = self.nreq = 0

    def _draw_lr(self, stream: int, t: int) -> float:
        return 0.001 + int(hash_uniform(_hash2(self.seed, stream), t) * 1000) / 1000

    def _demote(self, extra: int) -> None:
        """R's least recent items to SR (marked demoted) until R has room for `extra` more."""
        while len(self.r) + extra > self.c - self.sr_size:
            y = self.r.pop(0)
            self.sr.append(y)
            self.dem.add(y)
            self.c_dem += 1

    def _to_history(self, y: int) -> None:
        """y leaves the cache (SR or R, and CR-LFU) for H, with its flags and its count."""
        (self.sr if y in self.sr else self.r).remove(y)
        self.hist.append(y)
        if y in self.new:
            self.new.discard(y)
            self.h_new.add(y)
            self.c_new += 1
        if y in self.dem:
            self.dem.discard(y)
            self.c_dem -= 1
        self.h_freq[y] = self.freq.pop(y)
        del self.stamp[y]
        while len(self.hist) >= self.c:
            z = self.hist.pop(0)
            if z in self.h_new:
                self.h_new.discard(z)
                self.c_new -= 1
            del self.h_freq[z]

    def _tick(self, t: int) -> None:
        self.nreq += 1
        if self.nreq % self.c:
            return
        hr = self.num_hit / self.c
        dhr, dlr = hr - self.hr_prev, self.lr - self.lr_prev
        self.lr_prev, self.hr_prev = self.lr, hr
        if dlr != 0:
            sign = 1 if dhr / dlr > 0 else -1
            step = sign * abs(self.lr * dlr)
            self.lr = self.lr + step if self.lr + step > 0.001 else 0.0001
            self.unlearn = 0
        elif hr == 0 or dhr <= 0:
            self.unlearn += 1
        elif self.unlearn >= 10:
            self.unlearn = 0
            self.lr = self._draw_lr(2, t)
        self.num_hit = 0

    def hit(self, x: int, t: int) -> None:
        if x in self.sr:
            self.sr.remove(x)
            self.r.append(x)
            self.new.discard(x)
            self._demote(0)
            if x in self.dem:
                delta = max(1.0, self.c_new // self.c_dem + 0.5)
                self.sr_size = int(self.sr_size - delta) if self.sr_size - delta > 1 else min(self.sr_size, 1)
                self.dem.discard(x)
                self.c_dem -= 1
        else:
            self.r.remove(x)
            self.r.append(x)
        self.freq[x] += 1
        self.stamp[x] = self.clock
        self.clock += 1
        self.num_hit += 1
        self._tick(t)

    def miss(self, x: int, t: int, group: list[int]) -> None:
        w_old = self.w_lru
        if x in self.lru_g:
            self.w_lru *= math.exp(-self.lr)
            self.lru_g.remove(x)
        elif x in self.lfu_g:
            self.w_lfu *= math.exp(-self.lr)
            self.lfu_g.remove(x)
        # exp(-lr) may underflow (lr is unbounded): 0 / 0 normalises to the unchanged weights, as in exact arithmetic
        total = self.w_lru + self.w_lfu
        self.w_lru = self.w_lru / total if total > 0 else w_old
        self.w_lfu = 1 - self.w_lru
        full = len(self.freq) == self.c
        if full:
            free = [y for y in self.sr if y not in group] or [y for y in self.r if y not in group]
            lru_v = free[0]
            lfu_v = min((y for y in self.freq if y not in group), key=lambda y: (self.freq[y], -self.stamp[y]))
            v = lru_v if hash_uniform(self.seed, t) < self.w_lru else lfu_v
            self._to_history(v)
            if lru_v != lfu_v and self.c // 2 > 0:
                ghost = self.lru_g if v == lru_v else self.lfu_g
                ghost.append(v)
                if len(ghost) > self.c // 2:
                    ghost.pop(0)
        self.freq[x] = self.h_freq[x] + 1 if x in self.hist else 1
        self.stamp[x] = self.clock
        self.clock += 1
        if x in self.hist:
            self.hist.remove(x)
            del self.h_freq[x]
            self._demote(1)
            self.r.append(x)
            if x in self.h_new:
                delta = max(1.0, self.c_dem // self.c_new + 0.5)
                occ = len(self.sr) + len(self.r)
                self.sr_size = occ - 1 if self.sr_size + delta > occ - 1 else int(self.sr_size + delta)
                self.h_new.discard(x)
                self.c_new -= 1
        else:
            self.sr.append(x)
            self.new.add(x)
        while full and len(self.sr) > self.sr_size:  # SR over its share of a full cache: unneeded items leave
            free = [y for y in self.sr if y not in group]
            if not free:
                break
            self._to_history(free[0])
        self._tick(t)


def cache_cacheus(req, reset, capacity, seed=0):
    """Cacheus (Rodriguez et al. 2021) as libCacheSim's Cacheus.c with the paper's SR-LRU adaptation: each
    eviction draws ``hash_uniform(seed, access index)``; below w_lru SR-LRU's victim goes, else CR-LFU's."""
    hits = misses = 0
    g = 0
    for seg in _segments(req, reset):
        k = len(seg[0])
        c = _Cacheus(capacity, seed, g * k)
        for group in seg:
            for j, x in enumerate(group):
                if x in c.freq:
                    hits += 1
                    c.hit(x, g * k + j)
            for j, x in enumerate(group):
                if x not in c.freq:
                    misses += 1
                    c.miss(x, g * k + j, group)
            g += 1
    return hits, misses, 0, 0
