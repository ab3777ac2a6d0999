"""Numba kernels of adaptive online cache policies, with the group rule of `moescope.cache.kernels`.

A stream is ``req: [groups, k] int32`` item ids (one token's k experts, needed together) and ``reset:
[groups] bool`` (True where the cache empties). Each kernel returns ``stats: [4] int64 = (hits,
demand_misses, 0, 0)``, and its ``_name(..., per_group)`` variant also writes each group's demand misses to
``per_group: [groups] int64`` when that array is not empty. The group rule: within a group, hits are served
first (each updating the policy's state in slot order), then the misses are loaded in slot order, and a
victim is never an item the group needs (possible because capacity >= k). Kernels never allocate per access
and do no scan over the cache: lists are doubly linked lists over item ids, LeCaR's LFU order a binary heap;
a victim walk skips at most k - 1 needed items. Naive references: tests/reference_adaptive.py. This module
does not validate (the callers do: `moescope.cache.simulate`).

LIRS (Jiang & Zhang, "LIRS: an efficient low inter-reference recency set replacement policy", SIGMETRICS
2002), parameters as libCacheSim's ``LIRS.c``:

- Resident items are LIR (low inter-reference recency) or resident HIR. The HIR share is 1% of the capacity,
  at least 1 item (``hirs = max(1, int(0.01 * capacity))``, libCacheSim's ``hirs_ratio = 0.01``; the paper
  suggests 1% too); the LIR set holds the rest. Not tuned on any trace.
- Stack S holds LIR items, resident HIR items and non-resident HIR items in recency order; its bottom is
  always an LIR item (stack pruning drops HIR entries from the bottom). Queue Q holds the resident HIR items;
  a victim is the front of Q. A non-resident HIR item still in S that is accessed again becomes LIR, and the
  bottom LIR item is demoted to the end of Q. S is bounded at 2 x capacity entries by dropping the oldest
  non-resident HIR entries (libCacheSim's ``limitStack``), checked at the end of each group.
- Until the LIR set is full a loaded item becomes LIR; a resident HIR item hit while in S becomes LIR; one
  hit while not in S stays HIR and moves to the end of Q (the paper's rule).
- Group rule: the victim is the first item of Q the group does not need (at most k - 1 are skipped). If
  every item of Q is needed, the bottom LIR item of S is evicted instead: every LIR item the group touched
  was moved to the top of S, so the bottom LIR item is one the group does not need. With capacity 1 there
  is no LIR set and LIRS is LRU over Q.
- Known difference from libCacheSim 0.3.5 (k = 1), from our reading of its LIRS.c: on a hit to a resident
  HIR item that is not in S, libCacheSim also demotes the bottom LIR item, evicting the front of Q when Q
  is full; with a 1-item Q (capacities below 200) that is the item just hit, which it then re-enters in S
  marked resident but uncounted, so it can serve hits from one item more than its capacity. We keep the
  paper's rule; tests/test_cache_adaptive.py bounds the difference (large only at capacity 2).

W-TinyLFU (Einziger, Friedman & Manes, "TinyLFU: a highly efficient cache admission policy", ACM TOS
2017; layout of libCacheSim's ``WTinyLFU.c`` and Caffeine):

- A window LRU of 1% of the capacity, at least 1 item (the paper's and libCacheSim's ``window-size=0.01``;
  libCacheSim truncates to 0 and refuses capacities below 100), and a main SLRU of the rest, 80% of it
  protected (libCacheSim's ``seg-size=1:4``, Caffeine's 80%). A miss enters the window; the window's least
  recent item (the candidate) enters probation while main has room, else only if its frequency estimate
  beats main's victim's (probation's least recent item, else protected's), strictly (ties keep the victim,
  as in libCacheSim and Caffeine). A probation hit moves to protected; protected's overflow returns to
  probation.
- Frequency sketch: a count-min sketch of 4 rows (Caffeine's 4 hashes) of 4-bit counters (cap 15, the
  paper's and Caffeine's), width ``2^ceil(log2(max(capacity, 16)))``, conservative update (libCacheSim's
  minimal-increment filter), and a doorkeeper bit array of 8 x width bits (the paper's doorkeeper: a first
  access only sets its bit, the estimate adds the bit). Every access is recorded; every ``10 x capacity``
  recorded accesses (Caffeine's sample size) all counters halve and the doorkeeper empties (the paper's
  reset). Columns are ``moescope._rng.hash2(row, item)``: deterministic, no seed. libCacheSim's sketch
  hashes and is fed differently (see the bound in tests/test_cache_adaptive.py), so agreement with it is
  a bound on the miss ratio, not equality.
- Group rule: the group's accesses enter the sketch first (slot order); the candidate is the window's least
  recent item the group does not need, main's victim the least recent unneeded item of probation, else of
  protected. If the window has no unneeded item, main's victim is evicted (the window then runs over its
  share until later candidates drain it); if main has none, the candidate is evicted.

LeCaR (Vietri et al., "Driving cache replacement with ML-based LeCaR", HotStorage 2018; libCacheSim's
``LeCaR.c``):

- Two experts, LRU and LFU (uses since the item was loaded, ties by the earliest to reach that count, as
  libCacheSim's frequency buckets). Each eviction draws u in (0, 1) and asks LRU if u < w_lru, else LFU.
  The evicted item enters a history of `capacity` ghosts (oldest dropped first) marked by its expert; a
  miss on a ghost evicted by expert E at time t0 multiplies w_E by exp(-lr * dr ** (now - t0)) and
  renormalises (libCacheSim's formula, with its 1e-10 floors). Defaults: lr = 0.45, dr = 0.005 **
  (1 / capacity), w_lru = w_lfu = 0.5 at every reset (the paper's and libCacheSim's). Time is the access
  index ``g * k + slot``.
- The draw is ``moescope._rng.uniform(seed, access index)`` (splitmix64 of (seed, index)), so a run is
  reproducible and the reference draws the same numbers; libCacheSim's draw is unseeded.
- Group rule: LRU's victim is the least recent item the group does not need; LFU's the smallest
  (count, stamp) item it does not need (a heap; needed roots are parked until the group ends, as in
  `moescope.cache.kernels.heap_run`). A group's hits update both experts in slot order first.

Cacheus (Rodriguez et al., "Learning cache replacement with CACHEUS", FAST 2021; libCacheSim's ``Cacheus.c``,
``SR_LRU.c``, ``CR_LFU.c``). No parameter is tuned on any trace; each is the paper's or libCacheSim's:

- Two experts over the same cached items. SR-LRU (scan resistant): lists SR and R, SR's share ``sr_size``
  starting at capacity // 2 (libCacheSim), R's limit capacity - sr_size, and a history H of evicted items
  (at most capacity - 1: libCacheSim trims H while it holds >= capacity). A miss outside H enters SR
  (marked new), one in H enters R; an SR hit moves to R; R's overflow moves from R's least recent end to
  SR's most recent end (marked demoted); SR's victim is its least recent item, R's if SR is empty, and when
  SR is over its share after a miss that had to evict, its least recent items leave the cache for H too
  (libCacheSim; it does so with free room as well, so a cache that can hold every item misses more than the
  cold misses there; ours never evicts with room to spare). A hit
  on a demoted item shrinks SR by max(1, C_new // C_demoted + 0.5), a miss on a new item in H grows it by
  max(1, C_demoted // C_new + 0.5) up to the occupancy - 1 (libCacheSim's formulas and truncation; C_new
  counts new items in H, C_demoted demoted items cached). CR-LFU (churn resistant): fewest uses, ties by
  the item that reached that count last (libCacheSim's bucket tail); an item back from H resumes its count
  + 1 (libCacheSim keeps the count in H).
- Each eviction draws u in (0, 1) and takes SR-LRU's victim if u < w_lru, else CR-LFU's; if the two differ
  the victim enters the chosen expert's ghost list (capacity // 2 entries each, oldest dropped:
  libCacheSim's ghost_list_factor 1). A miss on a ghost multiplies that expert's weight by exp(-lr); the
  weights are renormalised on every miss (w_lfu = 1 - w_lru), 0.5 each at every reset.
- Adaptive learning rate (libCacheSim's ``update_lr``, the paper's): every `capacity` accesses, with h the
  interval's hit rate, lr moves by |lr x (lr - previous lr)|, up if h moved the same way as lr, else down
  (to 0.0001 below 0.001); if lr did not change, 10 intervals without improvement re-draw it. The first lr
  and re-draws are 0.001 + floor(1000 u) / 1000 (libCacheSim's ``0.001 + (rand % 1000) / 1000``).
- Draws: eviction ``uniform(seed, access index)``, first lr ``uniform(hash2(seed, 1), index)``, re-draws
  ``uniform(hash2(seed, 2), index)``; libCacheSim's draws are unseeded. Time is the access index ``g * k +
  slot``; hits and misses each count one access towards the lr interval.
- Group rule: SR-LRU's victim is SR's least recent unneeded item, else R's; CR-LFU's the smallest (uses,
  -stamp) unneeded item (a heap, needed roots parked as in LeCaR); SR's overflow evicts only unneeded items
  (it stops when SR holds only needed ones). A group's hits update both experts in slot order first.
- Known differences from libCacheSim 0.3.5 (k = 1), from our reading of its C: (1) its SR-LRU moves an item
  between SR, R and H by creating a new object, which loses the new and demoted flags, so SR's adaptation
  never fires there and SR stays at capacity // 2; we carry the flags (the paper's SR-LRU). (2) It computes
  the interval's hit rate with integer division (0 unless every access hit); we divide in floating point.
  (3) For odd capacities it gives R capacity // 2 too (one slot unused); ours gets capacity - sr_size.
  Disabling (1) and (2) in the reference moves ours to within about 0.01 of libCacheSim; the bounds are in
  tests/test_cache_adaptive.py.
"""

from __future__ import annotations

import numpy as np

from moescope._jit import njit, njit_inline
from moescope._rng import hash2, uniform
from moescope.cache.kernels import _PARKED, _sift_down, _sift_up

LIRS_HIR_SHARE = 0.01  # libCacheSim's hirs_ratio (LIRS.c), the paper's 1%


@njit
def lirs_split(capacity):
    """(LIR limit, resident HIR limit) of an LIRS cache of `capacity` items."""
    hirs = max(1, int(LIRS_HIR_SHARE * capacity))
    return capacity - hirs, hirs


# -- doubly linked lists over item ids: node n_items is the sentinel (nxt[s] the oldest, prv[s] the newest)
@njit_inline
def _unlink(prv, nxt, x):
    a, b = prv[x], nxt[x]
    nxt[a], prv[b] = b, a


@njit_inline
def _append(prv, nxt, s, x):
    t = prv[s]
    prv[x], nxt[x], nxt[t], prv[s] = t, s, x, x


@njit
def lirs(req, reset, n_items, capacity):
    """LIRS (see the module docstring): stack S, queue Q of resident HIR items, victims from the front of Q."""
    return _lirs(req, reset, n_items, capacity, np.empty(0, dtype=np.int64))


@njit
def _lirs(req, reset, n_items, capacity, per_group):
    """`lirs`, also writing each group's demand misses to ``per_group [groups]`` when it is not empty.

    S, Q and NH (the non-resident HIR items of S, oldest first, for the 2 x capacity bound) are circular
    doubly linked lists through ``s_prv, s_nxt``, ``q_prv, q_nxt``, ``h_prv, h_nxt: [n_items + 1]`` with
    sentinel n_items (S: nxt[s] the bottom, prv[s] the top). Pruning removes each entry at most once after
    it entered S, so every access costs O(k) amortised.
    """
    s_prv, s_nxt, q_prv, q_nxt, h_prv, h_nxt, in_s, is_lir, resident, need, sc = lirs_state(n_items)
    lirs_run(req, reset, 0, capacity, s_prv, s_nxt, q_prv, q_nxt, h_prv, h_nxt, in_s, is_lir, resident, need, sc,
             per_group)  # fmt: skip
    return sc[:4].copy()


@njit
def lirs_state(n_items):
    """A fresh LIRS cache for `lirs_run`: ``(s_prv, s_nxt, q_prv, q_nxt, h_prv, h_nxt, in_s, is_lir, resident,
    need, sc)``; ``sc[:4]`` the stats so far, ``sc[4:7]`` the sizes of S, of its LIR items and of the resident
    set."""
    lists = np.full((6, n_items + 1), n_items, dtype=np.int64)  # each list empty: its sentinel links to itself
    need = np.full(n_items + 1, -1, dtype=np.int64)  # need[s] stays -1: a walk stops at the sentinel
    flags = np.zeros((3, n_items), dtype=np.bool_)
    return (lists[0], lists[1], lists[2], lists[3], lists[4], lists[5], flags[0], flags[1], flags[2], need,
            np.zeros(7, dtype=np.int64))  # fmt: skip


@njit
def lirs_run(req, reset, g0, capacity, s_prv, s_nxt, q_prv, q_nxt, h_prv, h_nxt, in_s, is_lir, resident, need, sc,
             per_group):  # fmt: skip
    """`lirs` over one window of a stream (first group: stream group `g0`) with the cache of `lirs_state`
    carried from the previous window."""
    g_n, k = req.shape
    lir_limit, _ = lirs_split(capacity)
    s = in_s.shape[0]
    hits, misses, n_s, n_lir, n_res = sc[0], sc[1], sc[4], sc[5], sc[6]
    for gl in range(g_n):
        g = g0 + gl  # stream-wide, as `need` is
        if reset[gl]:
            in_s[:] = False
            is_lir[:] = False
            resident[:] = False
            s_prv[s], s_nxt[s], q_prv[s], q_nxt[s], h_prv[s], h_nxt[s] = s, s, s, s, s, s
            n_s, n_lir, n_res = 0, 0, 0
        m0 = misses
        for j in range(k):
            x = req[gl, j]
            need[x] = g
            if not resident[x]:
                continue
            hits += 1
            if is_lir[x]:
                _unlink(s_prv, s_nxt, x)
                _append(s_prv, s_nxt, s, x)
                n_s = _prune(s_prv, s_nxt, h_prv, h_nxt, s, in_s, is_lir, resident, n_s)
            elif in_s[x] and lir_limit > 0:  # a resident HIR item with a short reuse distance: to LIR
                _unlink(s_prv, s_nxt, x)
                _append(s_prv, s_nxt, s, x)
                _unlink(q_prv, q_nxt, x)
                is_lir[x] = True
                n_lir += 1
                if n_lir > lir_limit:
                    n_s = _demote(s_prv, s_nxt, q_prv, q_nxt, h_prv, h_nxt, s, in_s, is_lir, resident, n_s)
                    n_lir -= 1
            else:  # stays HIR: to the top of S and the end of Q
                if in_s[x]:
                    _unlink(s_prv, s_nxt, x)
                else:
                    in_s[x] = True
                    n_s += 1
                _append(s_prv, s_nxt, s, x)
                _unlink(q_prv, q_nxt, x)
                _append(q_prv, q_nxt, s, x)
        for j in range(k):
            x = req[gl, j]
            if resident[x]:
                continue
            misses += 1
            if n_res == capacity:
                v = q_nxt[s]
                while need[v] == g:
                    v = q_nxt[v]
                if v != s:  # the first item of Q the group does not need
                    _unlink(q_prv, q_nxt, v)
                    if in_s[v]:
                        _append(h_prv, h_nxt, s, v)
                else:  # every item of Q is needed: evict the bottom LIR item of S (not needed)
                    v = s_nxt[s]
                    _unlink(s_prv, s_nxt, v)
                    in_s[v] = False
                    is_lir[v] = False
                    n_s -= 1
                    n_lir -= 1
                    n_s = _prune(s_prv, s_nxt, h_prv, h_nxt, s, in_s, is_lir, resident, n_s)
                resident[v] = False
                n_res -= 1
            resident[x] = True
            n_res += 1
            was_in_s = in_s[x]
            if was_in_s:  # a non-resident HIR item of S: out of NH, to the top of S
                _unlink(h_prv, h_nxt, x)
                _unlink(s_prv, s_nxt, x)
            else:
                in_s[x] = True
                n_s += 1
            _append(s_prv, s_nxt, s, x)
            if was_in_s and lir_limit > 0:  # its reuse distance beats the bottom LIR item's: to LIR
                is_lir[x] = True
                n_lir += 1
                if n_lir > lir_limit:
                    n_s = _demote(s_prv, s_nxt, q_prv, q_nxt, h_prv, h_nxt, s, in_s, is_lir, resident, n_s)
                    n_lir -= 1
            elif n_lir < lir_limit:
                is_lir[x] = True
                n_lir += 1
            else:
                _append(q_prv, q_nxt, s, x)
        while n_s > 2 * capacity and h_nxt[s] != s:  # bound S: drop the oldest non-resident HIR entries
            y = h_nxt[s]
            _unlink(h_prv, h_nxt, y)
            _unlink(s_prv, s_nxt, y)
            in_s[y] = False
            n_s -= 1
        if per_group.shape[0]:
            per_group[gl] = misses - m0
    sc[0], sc[1], sc[4], sc[5], sc[6] = hits, misses, n_s, n_lir, n_res


@njit_inline
def _prune(s_prv, s_nxt, h_prv, h_nxt, s, in_s, is_lir, resident, n_s):
    """Stack pruning: drop HIR entries from the bottom of S until an LIR item (or nothing) is there.
    Returns the new size of S."""
    y = s_nxt[s]
    while y != s and not is_lir[y]:
        _unlink(s_prv, s_nxt, y)
        in_s[y] = False
        n_s -= 1
        if not resident[y]:
            _unlink(h_prv, h_nxt, y)
        y = s_nxt[s]
    return n_s


@njit_inline
def _demote(s_prv, s_nxt, q_prv, q_nxt, h_prv, h_nxt, s, in_s, is_lir, resident, n_s):
    """The bottom LIR item of S becomes a resident HIR item at the end of Q; S is pruned. Returns |S|."""
    y = s_nxt[s]
    _unlink(s_prv, s_nxt, y)
    in_s[y] = False
    is_lir[y] = False
    _append(q_prv, q_nxt, s, y)
    return _prune(s_prv, s_nxt, h_prv, h_nxt, s, in_s, is_lir, resident, n_s - 1)


# -- W-TinyLFU ----------------------------------------------------------------------------------------
WTLFU_WINDOW_SHARE = 0.01  # the window LRU's share of the capacity (paper and libCacheSim: 1%), at least 1
WTLFU_PROTECTED_SHARE = 0.8  # of the main SLRU (libCacheSim "seg-size=1:4", Caffeine 80%)
WTLFU_SAMPLE_PER_SLOT = 10  # accesses per slot between two halvings of the sketch (Caffeine: 10 x size)
WTLFU_MAX_COUNT = 15  # 4-bit counters (TinyLFU paper, Caffeine)
WTLFU_ROWS = 4  # count-min rows (Caffeine: 4 hashes)
_W, _B, _P = 1, 2, 3  # window, probation, protected: the list codes in `where` (node n_items + code - 1)


@njit
def wtinylfu_sizes(capacity):
    """(window, main, protected) item limits of a W-TinyLFU cache of `capacity` items."""
    window = max(1, int(WTLFU_WINDOW_SHARE * capacity))
    main = capacity - window
    return window, main, int(WTLFU_PROTECTED_SHARE * main)


@njit
def wtinylfu_sketch_hashes(n_items, capacity):
    """``[WTLFU_ROWS + 1, n_items] int64``: each item's counter column in each count-min row, then its
    doorkeeper bit; ``hash2(row, item)`` masked to the width (``2^ceil(log2(max(capacity, 16)))``) or to
    the doorkeeper's 8 x width bits."""
    width = 16
    while width < capacity:
        width *= 2
    out = np.empty((WTLFU_ROWS + 1, n_items), dtype=np.int64)
    for r in range(WTLFU_ROWS + 1):
        mask = np.uint64(width * (8 if r == WTLFU_ROWS else 1) - 1)
        for x in range(n_items):
            out[r, x] = np.int64(hash2(r, x) & mask)
    return out


@njit
def wtinylfu(req, reset, n_items, capacity):
    """W-TinyLFU (see the module docstring): a 1% window LRU, a main SLRU, admission by a sketch estimate."""
    return _wtinylfu(req, reset, n_items, capacity, np.empty(0, dtype=np.int64))


@njit
def _wtinylfu(req, reset, n_items, capacity, per_group):
    """`wtinylfu`, also writing each group's demand misses to ``per_group [groups]`` when it is not empty."""
    hx, cms, door, prv, nxt, where, need, sc = wtinylfu_state(n_items, capacity)
    wtinylfu_run(req, reset, 0, capacity, hx, cms, door, prv, nxt, where, need, sc, per_group)
    return sc[:4].copy()


@njit
def wtinylfu_state(n_items, capacity):
    """A fresh W-TinyLFU cache for `wtinylfu_run`: ``(hx, cms, door, prv, nxt, where, need, sc)``; ``sc[:4]``
    the stats so far, ``sc[4:8]`` the sizes of window, probation and protected and the accesses recorded
    since the sketch's last halving."""
    width = 16
    while width < capacity:
        width *= 2
    prv = np.empty(n_items + 3, dtype=np.int64)
    nxt = np.empty(n_items + 3, dtype=np.int64)
    for z in range(n_items, n_items + 3):
        prv[z], nxt[z] = z, z
    need = np.full(n_items + 3, -1, dtype=np.int64)  # -1 at the sentinels: a walk stops there
    return (wtinylfu_sketch_hashes(n_items, capacity), np.zeros((WTLFU_ROWS, width), dtype=np.int64),
            np.zeros(8 * width, dtype=np.bool_), prv, nxt, np.zeros(n_items, dtype=np.int64), need,
            np.zeros(8, dtype=np.int64))  # fmt: skip


@njit
def wtinylfu_run(req, reset, g0, capacity, hx, cms, door, prv, nxt, where, need, sc, per_group):
    """`wtinylfu` over one window of a stream (first group: stream group `g0`) with the cache of
    `wtinylfu_state` carried from the previous window.

    Window, probation and protected are circular doubly linked lists through ``prv, nxt: [n_items + 3]``
    (sentinel n_items + code - 1; nxt[sentinel] the least recent). The sketch is ``cms: [WTLFU_ROWS,
    width] int64`` and ``door: [8 x width] bool``; a halving touches every counter once per
    ``10 x capacity`` recorded accesses, O(1) amortised per access.
    """
    g_n, k = req.shape
    n_items = where.shape[0]
    n_win, n_main, n_prot_max = wtinylfu_sizes(capacity)
    sample = WTLFU_SAMPLE_PER_SLOT * capacity
    sw, sb, sp = n_items, n_items + 1, n_items + 2
    hits, misses, n_w, n_b, n_p, recorded = sc[0], sc[1], sc[4], sc[5], sc[6], sc[7]
    for gl in range(g_n):
        g = g0 + gl  # stream-wide, as `need` is
        if reset[gl]:
            where[:] = 0
            for z in range(sw, sp + 1):
                prv[z], nxt[z] = z, z
            cms[:] = 0
            door[:] = False
            n_w, n_b, n_p, recorded = 0, 0, 0, 0
        m0 = misses
        for j in range(k):  # the group's accesses enter the sketch first, in slot order
            x = req[gl, j]
            need[x] = g
            d = hx[WTLFU_ROWS, x]
            if not door[d]:
                door[d] = True
            else:  # conservative update: only the smallest counters grow
                m = _estimate(cms, hx, x)
                if m < WTLFU_MAX_COUNT:
                    for r in range(WTLFU_ROWS):
                        if cms[r, hx[r, x]] == m:
                            cms[r, hx[r, x]] = m + 1
            recorded += 1
            if recorded == sample:  # aging: halve every counter, empty the doorkeeper
                recorded = 0
                cms //= 2
                door[:] = False
        for j in range(k):
            x = req[gl, j]
            w = where[x]
            if w == 0:
                continue
            hits += 1
            _unlink(prv, nxt, x)
            if w == _W:
                _append(prv, nxt, sw, x)
            elif w == _P or n_prot_max > 0:  # to the most recent end of protected
                _append(prv, nxt, sp, x)
                if w == _B:
                    where[x] = _P
                    n_b -= 1
                    n_p += 1
                    if n_p > n_prot_max:  # protected's least recent item back to probation
                        y = nxt[sp]
                        _unlink(prv, nxt, y)
                        _append(prv, nxt, sb, y)
                        where[y] = _B
                        n_p -= 1
                        n_b += 1
            else:  # no protected segment: probation is an LRU
                _append(prv, nxt, sb, x)
        for j in range(k):
            x = req[gl, j]
            if where[x] != 0:
                continue
            misses += 1
            _append(prv, nxt, sw, x)
            where[x] = _W
            n_w += 1
            cand = nxt[sw]  # the window's least recent item the group does not need (sw if none)
            while need[cand] == g:
                cand = nxt[cand]
            if n_w + n_b + n_p > capacity:
                vict = nxt[sb]  # main's victim: probation's least recent unneeded item, else protected's
                while need[vict] == g:
                    vict = nxt[vict]
                if vict == sb:
                    vict = nxt[sp]
                    while need[vict] == g:
                        vict = nxt[vict]
                    if vict == sp:
                        vict = -1
                if cand == sw or (
                    vict >= 0
                    and _estimate(cms, hx, cand) + door[hx[WTLFU_ROWS, cand]]
                    > _estimate(cms, hx, vict) + door[hx[WTLFU_ROWS, vict]]
                ):
                    # the victim goes (the candidate, if any, is admitted to probation)
                    if where[vict] == _B:
                        n_b -= 1
                    else:
                        n_p -= 1
                    _unlink(prv, nxt, vict)
                    where[vict] = 0
                    if cand != sw:
                        _unlink(prv, nxt, cand)
                        _append(prv, nxt, sb, cand)
                        where[cand] = _B
                        n_w -= 1
                        n_b += 1
                else:  # the candidate loses (or main has nothing to give): it leaves the cache
                    _unlink(prv, nxt, cand)
                    where[cand] = 0
                    n_w -= 1
            elif n_w > n_win and n_b + n_p < n_main and cand != sw:  # filling: overflow to probation
                _unlink(prv, nxt, cand)
                _append(prv, nxt, sb, cand)
                where[cand] = _B
                n_w -= 1
                n_b += 1
        if per_group.shape[0]:
            per_group[gl] = misses - m0
    sc[0], sc[1], sc[4], sc[5], sc[6], sc[7] = hits, misses, n_w, n_b, n_p, recorded


@njit_inline
def _estimate(cms, hx, x):
    """The count-min estimate of item x (without its doorkeeper bit)."""
    m = cms[0, hx[0, x]]
    for r in range(1, WTLFU_ROWS):
        m = min(m, cms[r, hx[r, x]])
    return m


# -- LeCaR ------------------------------------------------------------------------------------------------
LECAR_LEARNING_RATE = 0.45  # the paper's and libCacheSim's lr
LECAR_DISCOUNT_BASE = 0.005  # discount rate = 0.005 ** (1 / capacity) (paper, libCacheSim)
_BY_LRU, _BY_LFU = 1, 2  # which expert evicted a ghost


@njit
def lecar(req, reset, n_items, capacity, seed):
    """LeCaR (see the module docstring): LRU or LFU evicts, drawn by learned weights; ghosts teach the weights."""
    return _lecar(req, reset, n_items, capacity, seed, np.empty(0, dtype=np.int64))


@njit
def _lecar(req, reset, n_items, capacity, seed, per_group):
    """`lecar`, also writing each group's demand misses to ``per_group [groups]`` when it is not empty."""
    st = lecar_state(n_items, capacity, req.shape[1])
    lecar_run(req, reset, 0, capacity, seed, st[0], st[1], st[2], st[3], st[4], st[5], st[6], st[7], st[8], st[9],
              st[10], st[11], st[12], st[13], st[14], st[15], per_group)  # fmt: skip
    return st[14][:4].copy()


@njit
def lecar_state(n_items, capacity, k):
    """A fresh LeCaR cache for `lecar_run`: ``(prv, nxt, g_prv, g_nxt, ghost_by, ghost_t, h_x, h_a, h_b, pos,
    freq, stamp, need, p_x, sc, wts)``; ``sc[:4]`` the stats so far, ``sc[4:8]`` the heap, resident and ghost
    sizes and the clock, ``wts`` the weights of LRU and LFU."""
    links = np.full((4, n_items + 1), n_items, dtype=np.int64)  # prv, nxt, g_prv, g_nxt: each list empty
    heap = np.empty((3, capacity), dtype=np.int64)
    return (links[0], links[1], links[2], links[3], np.zeros(n_items, dtype=np.int64),
            np.zeros(n_items, dtype=np.int64), heap[0], heap[1], heap[2], np.full(n_items, -1, dtype=np.int64),
            np.zeros(n_items, dtype=np.int64), np.zeros(n_items, dtype=np.int64),
            np.full(n_items + 1, -1, dtype=np.int64), np.empty(k, dtype=np.int64), np.zeros(8, dtype=np.int64),
            np.full(2, 0.5))  # fmt: skip


@njit
def lecar_run(req, reset, g0, capacity, seed, prv, nxt, g_prv, g_nxt, ghost_by, ghost_t, h_x, h_a, h_b, pos, freq,
              stamp, need, p_x, sc, wts, per_group):  # fmt: skip
    """`lecar` over one window of a stream (first group: stream group `g0`) with the cache of `lecar_state`
    carried from the previous window.

    Recency: a circular doubly linked list through ``prv, nxt: [n_items + 1]``; frequency: a binary min-heap
    of the cached items by (uses since load, stamp of the last change), as in `kernels.heap_run` (roots
    the group needs and the group's loads are parked until the group ends); the ghost history: a list
    through ``g_prv, g_nxt: [n_items + 1]``, oldest first, at most `capacity` entries. O(k log capacity)
    per miss, O(log capacity) per hit.
    """
    g_n, k = req.shape
    s = pos.shape[0]
    dr = LECAR_DISCOUNT_BASE ** (1.0 / capacity)
    state = np.uint64(seed)
    hits, misses, n_h, n_res, n_ghost, clock = sc[0], sc[1], sc[4], sc[5], sc[6], sc[7]
    w_lru, w_lfu = wts[0], wts[1]
    n_p = 0
    for gl in range(g_n):
        g = g0 + gl  # stream-wide: `need`, and the access index `now` the draws and the regret decay use
        if reset[gl]:
            pos[:] = -1
            ghost_by[:] = 0
            prv[s], nxt[s], g_prv[s], g_nxt[s] = s, s, s, s
            n_h, n_res, n_ghost = 0, 0, 0
            w_lru, w_lfu = 0.5, 0.5
        m0 = misses
        for j in range(k):
            x = req[gl, j]
            need[x] = g
            if pos[x] < 0:
                continue
            hits += 1
            _unlink(prv, nxt, x)
            _append(prv, nxt, s, x)
            freq[x] += 1
            stamp[x] = clock
            clock += 1
            _sift_down(h_x, h_a, h_b, pos, n_h, pos[x], x, freq[x], stamp[x])
        n_p = 0
        for j in range(k):
            x = req[gl, j]
            if pos[x] != -1:
                continue
            misses += 1
            now = g * k + j
            if ghost_by[x] != 0:  # a ghost hit: the expert that evicted x loses weight
                r = dr ** (now - ghost_t[x])
                if ghost_by[x] == _BY_LRU:
                    w_lru, w_lfu = _penalise(w_lru, w_lfu, r)
                else:
                    w_lfu, w_lru = _penalise(w_lfu, w_lru, r)
                ghost_by[x] = 0
                _unlink(g_prv, g_nxt, x)
                n_ghost -= 1
            if n_res == capacity:
                if uniform(state, now) < w_lru:  # LRU: the least recent item the group does not need
                    v = nxt[s]
                    while need[v] == g:
                        v = nxt[v]
                    i = pos[v]
                    n_h -= 1
                    if i < n_h:  # the last entry fills the hole, sifting up or down
                        lx, la, lb = h_x[n_h], h_a[n_h], h_b[n_h]
                        _sift_up(h_x, h_a, h_b, pos, i, lx, la, lb)
                        if pos[lx] == i:
                            _sift_down(h_x, h_a, h_b, pos, n_h, i, lx, la, lb)
                    by = _BY_LRU
                else:  # LFU: fewest uses since load, then earliest to reach that count; needed roots parked
                    while need[h_x[0]] == g:
                        p_x[n_p] = h_x[0]
                        pos[h_x[0]] = _PARKED
                        n_p += 1
                        n_h -= 1  # an unneeded item is in the heap (capacity >= k), so n_h stays > 0
                        _sift_down(h_x, h_a, h_b, pos, n_h, 0, h_x[n_h], h_a[n_h], h_b[n_h])
                    v = h_x[0]
                    n_h -= 1
                    if n_h > 0:
                        _sift_down(h_x, h_a, h_b, pos, n_h, 0, h_x[n_h], h_a[n_h], h_b[n_h])
                    by = _BY_LFU
                pos[v] = -1
                _unlink(prv, nxt, v)
                n_res -= 1
                ghost_by[v] = by
                ghost_t[v] = now
                _append(g_prv, g_nxt, s, v)
                n_ghost += 1
                if n_ghost > capacity:  # the history holds `capacity` ghosts
                    y = g_nxt[s]
                    _unlink(g_prv, g_nxt, y)
                    ghost_by[y] = 0
                    n_ghost -= 1
            _append(prv, nxt, s, x)
            n_res += 1
            freq[x] = 1
            stamp[x] = clock
            clock += 1
            p_x[n_p] = x
            pos[x] = _PARKED
            n_p += 1
        for t in range(n_p):  # parked items rejoin the heap
            y = p_x[t]
            _sift_up(h_x, h_a, h_b, pos, n_h, y, freq[y], stamp[y])
            n_h += 1
        if per_group.shape[0]:
            per_group[gl] = misses - m0
    sc[0], sc[1], sc[4], sc[5], sc[6], sc[7] = hits, misses, n_h, n_res, n_ghost, clock
    wts[0], wts[1] = w_lru, w_lfu


@njit_inline
def _penalise(w_bad, w_other, r):
    """libCacheSim's LeCaR update: the weight of the expert whose eviction was regretted shrinks by
    exp(-lr * r) (r = dr ** time since the eviction); both are renormalised (1e-10 keeps them above 0)."""
    w_bad = w_bad * np.exp(-LECAR_LEARNING_RATE * r) + 1e-10
    total = w_bad + w_other + 2e-10
    return w_bad / total, (w_other + 1e-10) / total


# -- Cacheus --------------------------------------------------------------------------------------------
CACHEUS_LR_MIN = 0.001  # lr draws are 0.001 + (a uniform in [0, 1) quantised to 1/1000) (libCacheSim)
CACHEUS_LR_FLOOR = 0.0001  # where the learning rate lands when a step would take it below 0.001 (libCacheSim)
CACHEUS_UNLEARN = 10  # update intervals without improvement before the learning rate is re-drawn (libCacheSim)
_SR, _R, _H = 1, 2, 3  # SR-LRU's lists in `where` (node n_items + code - 1)


@njit_inline
def _cacheus_lr(state, t):
    """A learning-rate draw: 0.001 + floor(1000 u) / 1000 (libCacheSim's ``0.001 + (rand % 1000) / 1000``)."""
    return CACHEUS_LR_MIN + np.floor(uniform(state, t) * 1000.0) / 1000.0


@njit
def cacheus(req, reset, n_items, capacity, seed):
    """Cacheus (see the module docstring): SR-LRU or CR-LFU evicts, drawn by weights learned from ghost hits."""
    return _cacheus(req, reset, n_items, capacity, seed, np.empty(0, dtype=np.int64))


@njit
def _cacheus(req, reset, n_items, capacity, seed, per_group):
    """`cacheus`, also writing each group's demand misses to ``per_group [groups]`` when it is not empty."""
    st = cacheus_state(n_items, capacity, req.shape[1])
    cacheus_run(req, reset, 0, capacity, seed, st[0], st[1], st[2], st[3], st[4], st[5], st[6], st[7], st[8], st[9],
                st[10], st[11], st[12], st[13], st[14], st[15], st[16], per_group)  # fmt: skip
    return st[15][:4].copy()


@njit
def cacheus_state(n_items, capacity, k):
    """A fresh Cacheus cache for `cacheus_run`: ``(prv, nxt, g_prv, g_nxt, where, ghost, is_new, is_dem, h_x,
    h_a, h_b, pos, freq, stamp, need, sc, fl)``; ``sc[:4]`` the stats so far, ``sc[4:]`` the list sizes,
    counters and clocks, ``fl`` the experts' weights and the learning rates (`cacheus_run` names them)."""
    heap = np.empty((3, capacity), dtype=np.int64)
    flags = np.zeros((2, n_items), dtype=np.bool_)
    return (np.empty(n_items + 3, dtype=np.int64), np.empty(n_items + 3, dtype=np.int64),
            np.empty(n_items + 2, dtype=np.int64), np.empty(n_items + 2, dtype=np.int64),
            np.zeros(n_items, dtype=np.int64), np.zeros(n_items, dtype=np.int64), flags[0], flags[1], heap[0],
            heap[1], heap[2], np.full(n_items, -1, dtype=np.int64), np.zeros(n_items, dtype=np.int64),
            np.zeros(n_items, dtype=np.int64), np.full(n_items + 3, -1, dtype=np.int64),
            np.zeros(18, dtype=np.int64), np.array([0.5, 0.5, 0.0, 0.0, 0.0]))  # fmt: skip


@njit
def cacheus_run(req, reset, g0, capacity, seed, prv, nxt, g_prv, g_nxt, where, ghost, is_new, is_dem, h_x, h_a, h_b,
                pos, freq, stamp, need, sc, fl, per_group):  # fmt: skip
    """`cacheus` over one window of a stream (first group: stream group `g0`) with the cache of
    `cacheus_state` carried from the previous window.

    SR-LRU's lists SR, R and its history H are circular doubly linked lists through ``prv, nxt:
    [n_items + 3]`` (sentinel n_items + code - 1, nxt[sentinel] the least recent; an item is in at most one);
    the ghost lists of the two experts through ``g_prv, g_nxt: [n_items + 2]``. CR-LFU is a binary min-heap
    of the cached items by (uses, -stamp of reaching that count), as in `_lecar` (needed roots and the
    group's loads parked until the group ends). O(k log capacity) per miss, O(log capacity) per hit, O(1)
    amortised list moves (each SR overflow or R demotion follows an insertion into that list).
    """
    g_n, k = req.shape
    n_items = where.shape[0]
    s_sr, s_r, s_h = n_items, n_items + 1, n_items + 2
    gl_lru, gl_lfu = n_items, n_items + 1
    n_ghost_max = capacity // 2  # libCacheSim: ghost_list_factor 1 x cache_size / 2 per expert
    state = np.uint64(seed)
    lr_first, lr_again = hash2(seed, 1), hash2(seed, 2)
    p_x = np.empty(k, dtype=np.int64)
    hits, misses = sc[0], sc[1]
    n_sr, n_r, n_hist, n_lru_g, n_lfu_g, c_new, c_dem, sr_size = (
        sc[4],
        sc[5],
        sc[6],
        sc[7],
        sc[8],
        sc[9],
        sc[10],
        sc[11],
    )
    n_h, clock, nreq, num_hit, unlearn = sc[12], sc[13], sc[14], sc[15], sc[16]
    n_p = 0
    w_lru, w_lfu, lr, lr_prev, hr_prev = fl[0], fl[1], fl[2], fl[3], fl[4]
    for gl in range(g_n):
        g = g0 + gl  # stream-wide: `need`, and the access index the draws and learning-rate updates use
        if reset[gl]:
            pos[:] = -1
            where[:] = 0
            ghost[:] = 0
            is_new[:] = False
            is_dem[:] = False
            for z in range(s_sr, s_h + 1):
                prv[z], nxt[z] = z, z
            g_prv[gl_lru], g_nxt[gl_lru], g_prv[gl_lfu], g_nxt[gl_lfu] = gl_lru, gl_lru, gl_lfu, gl_lfu
            n_sr, n_r, n_hist, n_lru_g, n_lfu_g, c_new, c_dem, sr_size = 0, 0, 0, 0, 0, 0, 0, capacity // 2
            n_h, nreq, num_hit, unlearn = 0, 0, 0, 0
            w_lru, w_lfu, lr, lr_prev, hr_prev = 0.5, 0.5, _cacheus_lr(lr_first, g * k), 0.0, 0.0
        m0 = misses
        for j in range(k):
            x = req[gl, j]
            need[x] = g
            if pos[x] < 0:
                continue
            hits += 1
            if where[x] == _SR:  # an SR hit moves to R; R's overflow is demoted to SR
                _unlink(prv, nxt, x)
                _append(prv, nxt, s_r, x)
                where[x] = _R
                n_sr -= 1
                n_r += 1
                is_new[x] = False
                n_sr, n_r, c_dem = _cacheus_demote(
                    prv, nxt, where, is_dem, s_sr, s_r, n_sr, n_r, c_dem, capacity - sr_size
                )
                if is_dem[x]:  # a demoted item was reused: SR shrinks
                    delta = max(1.0, c_new // c_dem + 0.5)
                    sr_size = int(sr_size - delta) if sr_size - delta > 1 else min(sr_size, 1)
                    is_dem[x] = False
                    c_dem -= 1
            else:
                _unlink(prv, nxt, x)
                _append(prv, nxt, s_r, x)
            freq[x] += 1
            stamp[x] = clock
            clock += 1
            _sift_down(h_x, h_a, h_b, pos, n_h, pos[x], x, freq[x], -stamp[x])
            num_hit += 1
            nreq += 1
            if nreq % capacity == 0:
                lr, lr_prev, hr_prev, unlearn = _cacheus_update_lr(
                    lr, lr_prev, hr_prev, unlearn, num_hit / capacity, lr_again, g * k + j
                )
                num_hit = 0
        n_p = 0
        for j in range(k):
            x = req[gl, j]
            if pos[x] != -1:
                continue
            misses += 1
            now = g * k + j
            w_old = w_lru
            if ghost[x] == _BY_LRU:  # a ghost hit: the expert that evicted x loses weight
                w_lru *= np.exp(-lr)
                _unlink(g_prv, g_nxt, x)
                n_lru_g -= 1
            elif ghost[x] == _BY_LFU:
                w_lfu *= np.exp(-lr)
                _unlink(g_prv, g_nxt, x)
                n_lfu_g -= 1
            ghost[x] = 0
            # The learning rate is unbounded (it can reach the thousands), so exp(-lr) may underflow: a
            # penalised weight of 1 against a weight of 0 then becomes 0 / 0. In exact arithmetic the
            # normalised weights are unchanged (positive / positive = 1, 0 / positive = 0): keep them.
            w_lru = w_lru / (w_lru + w_lfu) if w_lru + w_lfu > 0.0 else w_old
            w_lfu = 1 - w_lru
            full = n_sr + n_r == capacity
            if full:
                lru_v = nxt[s_sr]  # SR-LRU: SR's least recent unneeded item, else R's
                while need[lru_v] == g:
                    lru_v = nxt[lru_v]
                if lru_v == s_sr:
                    lru_v = nxt[s_r]
                    while need[lru_v] == g:
                        lru_v = nxt[lru_v]
                while need[h_x[0]] == g:  # CR-LFU: fewest uses, the latest to reach them; needed roots parked
                    p_x[n_p] = h_x[0]
                    pos[h_x[0]] = _PARKED
                    n_p += 1
                    n_h -= 1
                    _sift_down(h_x, h_a, h_b, pos, n_h, 0, h_x[n_h], h_a[n_h], h_b[n_h])
                lfu_v = h_x[0]
                v = lru_v if uniform(state, now) < w_lru else lfu_v
                n_h = _heap_remove(h_x, h_a, h_b, pos, n_h, v)
                n_sr, n_r, n_hist, c_new, c_dem = _cacheus_to_history(
                    prv, nxt, where, is_new, is_dem, s_h, v, n_sr, n_r, n_hist, c_new, c_dem, capacity
                )
                if lru_v != lfu_v and n_ghost_max > 0:  # the chosen expert's ghost list remembers v
                    if v == lru_v:
                        _append(g_prv, g_nxt, gl_lru, v)
                        ghost[v] = _BY_LRU
                        n_lru_g += 1
                        if n_lru_g > n_ghost_max:
                            y = g_nxt[gl_lru]
                            _unlink(g_prv, g_nxt, y)
                            ghost[y] = 0
                            n_lru_g -= 1
                    else:
                        _append(g_prv, g_nxt, gl_lfu, v)
                        ghost[v] = _BY_LFU
                        n_lfu_g += 1
                        if n_lfu_g > n_ghost_max:
                            y = g_nxt[gl_lfu]
                            _unlink(g_prv, g_nxt, y)
                            ghost[y] = 0
                            n_lfu_g -= 1
            if where[x] == _H:  # back from SR-LRU's history: to R, with CR-LFU's count restored
                freq[x] += 1
                _unlink(prv, nxt, x)
                n_hist -= 1
                n_sr, n_r, c_dem = _cacheus_demote(
                    prv, nxt, where, is_dem, s_sr, s_r, n_sr, n_r + 1, c_dem, capacity - sr_size
                )
                n_r -= 1
                _append(prv, nxt, s_r, x)
                where[x] = _R
                n_r += 1
                if is_new[x]:  # a new item came back from history: SR grows
                    delta = max(1.0, c_dem // c_new + 0.5)
                    occ = n_sr + n_r
                    sr_size = occ - 1 if sr_size + delta > occ - 1 else int(sr_size + delta)
                    is_new[x] = False
                    c_new -= 1
            else:
                freq[x] = 1
                _append(prv, nxt, s_sr, x)
                where[x] = _SR
                n_sr += 1
                is_new[x] = True
            is_dem[x] = False
            stamp[x] = clock
            clock += 1
            p_x[n_p] = x
            pos[x] = _PARKED
            n_p += 1
            while full and n_sr > sr_size:  # SR over its share of a full cache: its least recent unneeded go
                y = nxt[s_sr]
                while need[y] == g:
                    y = nxt[y]
                if y == s_sr:
                    break
                n_h = _heap_remove(h_x, h_a, h_b, pos, n_h, y)
                n_sr, n_r, n_hist, c_new, c_dem = _cacheus_to_history(
                    prv, nxt, where, is_new, is_dem, s_h, y, n_sr, n_r, n_hist, c_new, c_dem, capacity
                )
            nreq += 1
            if nreq % capacity == 0:
                lr, lr_prev, hr_prev, unlearn = _cacheus_update_lr(
                    lr, lr_prev, hr_prev, unlearn, num_hit / capacity, lr_again, now
                )
                num_hit = 0
        for t in range(n_p):  # parked items rejoin the heap
            y = p_x[t]
            _sift_up(h_x, h_a, h_b, pos, n_h, y, freq[y], -stamp[y])
            n_h += 1
        if per_group.shape[0]:
            per_group[gl] = misses - m0
    sc[0], sc[1] = hits, misses
    sc[4], sc[5], sc[6], sc[7], sc[8], sc[9], sc[10], sc[11] = (
        n_sr,
        n_r,
        n_hist,
        n_lru_g,
        n_lfu_g,
        c_new,
        c_dem,
        sr_size,
    )
    sc[12], sc[13], sc[14], sc[15], sc[16] = n_h, clock, nreq, num_hit, unlearn
    fl[0], fl[1], fl[2], fl[3], fl[4] = w_lru, w_lfu, lr, lr_prev, hr_prev


@njit_inline
def _heap_remove(h_x, h_a, h_b, pos, n_h, v):
    """Take item v out of the heap (the last entry fills its hole, sifting up or down); returns the size."""
    i = pos[v]
    n_h -= 1
    if i < n_h:
        lx, la, lb = h_x[n_h], h_a[n_h], h_b[n_h]
        _sift_up(h_x, h_a, h_b, pos, i, lx, la, lb)
        if pos[lx] == i:
            _sift_down(h_x, h_a, h_b, pos, n_h, i, lx, la, lb)
    pos[v] = -1
    return n_h


@njit_inline
def _cacheus_demote(prv, nxt, where, is_dem, s_sr, s_r, n_sr, n_r, c_dem, r_limit):
    """SR-LRU: R's least recent items move to SR's most recent end, marked demoted, while R holds more than
    `r_limit`. Returns (|SR|, |R|, demoted count)."""
    while n_r > r_limit:
        y = nxt[s_r]
        _unlink(prv, nxt, y)
        _append(prv, nxt, s_sr, y)
        where[y] = _SR
        is_dem[y] = True
        n_r -= 1
        n_sr += 1
        c_dem += 1
    return n_sr, n_r, c_dem


@njit_inline
def _cacheus_to_history(prv, nxt, where, is_new, is_dem, s_h, y, n_sr, n_r, n_hist, c_new, c_dem, capacity):
    """SR-LRU: cached item y (already out of CR-LFU's heap, its count kept) leaves SR or R for the newest end
    of H with its new flag; H keeps its newest capacity - 1 entries (libCacheSim trims while |H| >= size).
    Returns (|SR|, |R|, |H|, new count in H, demoted count in cache)."""
    if where[y] == _SR:
        n_sr -= 1
    else:
        n_r -= 1
    _unlink(prv, nxt, y)
    _append(prv, nxt, s_h, y)
    where[y] = _H
    n_hist += 1
    if is_new[y]:
        c_new += 1
    if is_dem[y]:
        is_dem[y] = False
        c_dem -= 1
    while n_hist >= capacity:
        z = nxt[s_h]
        _unlink(prv, nxt, z)
        where[z] = 0
        n_hist -= 1
        if is_new[z]:
            is_new[z] = False
            c_new -= 1
    return n_sr, n_r, n_hist, c_new, c_dem


@njit_inline
def _cacheus_update_lr(lr, lr_prev, hr_prev, unlearn, hr, lr_again, t):
    """libCacheSim's Cacheus ``update_lr`` at the end of an interval with hit rate hr: lr steps by |lr x its
    last change|, up if the hit rate moved the same way as lr, else down (floor 0.0001 below 0.001); with
    no change, after 10 intervals without improvement it is re-drawn. Returns (lr, lr_prev, hr_prev,
    unlearn)."""
    dhr = hr - hr_prev
    dlr = lr - lr_prev
    lr_prev = lr
    if dlr != 0:
        step = abs(lr * dlr) if dhr / dlr > 0 else -abs(lr * dlr)
        lr = lr + step if lr + step > CACHEUS_LR_MIN else CACHEUS_LR_FLOOR
        unlearn = 0
    elif hr == 0 or dhr <= 0:
        unlearn += 1
    elif unlearn >= CACHEUS_UNLEARN:
        unlearn = 0
        lr = _cacheus_lr(lr_again, t)
    return lr, lr_prev, hr, unlearn
