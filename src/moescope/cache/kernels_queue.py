"""Numba kernels of four queue-based online cache policies: SIEVE, S3-FIFO, 2Q and SLRU.

Same contract as `moescope.cache.kernels`: a stream is ``req: [groups, k] int32`` item ids (a group is one
token's k experts, needed together) and ``reset: [groups] bool`` (True where the cache empties); each kernel
returns ``stats: [4] int64 = (hits, demand_misses, 0, 0)``, and its ``_name`` variant also writes each
group's demand misses to ``per_group: [groups] int64`` when that array is not empty. The caller validates
(capacity >= k, ids < n_items).

- **SIEVE** (Zhang et al., "SIEVE is simpler than LRU", NSDI'24): one FIFO queue, a visited bit per item
  (set by a hit, clear on insert) and a hand. To evict, the hand moves from the oldest end toward the newest
  (wrapping), clearing visited bits, and evicts the first unvisited item; it then rests on the next newer
  item. As libCacheSim's ``Sieve.c``.
- **S3-FIFO** (Yang et al., "FIFO queues are all you need for cache eviction", SOSP'23): a small FIFO
  (capacity // 10, at least 1), a main FIFO (the rest) and a ghost FIFO of evicted ids (9 * capacity // 10),
  with frequencies capped at 3. As libCacheSim's ``S3FIFO.c`` (its default version): a miss on a ghost id
  enters main, any other miss enters small (or main while small is full before the first eviction ever);
  evict from main if main is over its size or small is empty, else from small. Small's oldest item moves to
  main (frequency 0) if its frequency is >= 2, else it goes to the ghost; main's oldest item is reinserted
  with its frequency - 1 if that is >= 1, else evicted. libCacheSim refuses capacities below 10 (a small
  FIFO of 0 items) and, from 10 to 19 (a small FIFO of 1), never admits a new item there (its C code
  refuses an object as big as the small FIFO); here small holds at least 1 item and admits it, so the two
  agree from capacity 20 up.
- **2Q** (Johnson & Shasha, VLDB'94; libCacheSim's ``TwoQ.c``): Ain, a FIFO of first-time items (capacity
  // 4, at least 1), Am, an LRU of items seen again (the rest), and Aout, a ghost FIFO of ids evicted from
  Ain (capacity // 2, at least 1). A hit in Ain changes nothing, a hit in Am makes it most recent. A miss on
  an Aout id enters Am (evicting Am's least recent while Am is at its size), other misses enter Ain. To make
  room, Ain's oldest goes to Aout while Ain is over its size, else Am's least recent is evicted.
  libCacheSim admits nothing below capacity 4 (its Ain would hold 0 items); the two agree from 4 up.
- **SLRU** (segmented LRU, Karedla et al., IEEE Computer 1994; libCacheSim's ``SLRU.c``): 4 LRU segments
  of capacity // 4 (segment 0, the lowest, also takes the remainder here). A miss enters the lowest segment
  with room, evicting the least recent item of the lowest non-empty segment when the cache is full; a hit
  moves an item to the most recent end of the next segment up (of its own in the top one), and a segment
  over its size demotes its least recent item to the most recent end of the one below. libCacheSim lets the
  remainder of capacity % 4 items overflow segment 0, where a later promotion evicts on a hit; with segment
  sizes that sum to the capacity a hit never evicts. The two agree when 4 divides the capacity.

**The group rule** (as every kernel here): a group's hits are served first, then its misses are loaded one
by one, and no eviction takes an item the group needs (possible since capacity >= k). SIEVE's hand passes
the group's items without touching their bits. S3-FIFO's walks pass the group's items they would evict (and
still move or reinsert those they would keep), and a walk that evicts nothing hands over to the other queue.
2Q takes the oldest (least recent) item of the chosen queue that the group does not need, or of the other
queue if it has none; Am's own eviction on a ghost hit is skipped when every item of Am is needed. SLRU
evicts the least recent item, of the lowest segment, that the group does not need, and the new item enters
the lowest segment with room (segment 0 when the victim was there, as in libCacheSim). With
k = 1 (no item to protect) every policy is the published one, checked against libCacheSim in
tests/test_cache_queue.py. Naive references: tests/reference_queue.py.

Each queue is a circular doubly linked list through ``nxt``, ``prv: [n_items + queues]`` with one sentinel
node past the items per queue (``nxt[sentinel]`` the oldest, ``prv[sentinel]`` the newest); an item is in at
most one queue (``where``). Nothing is allocated per access; each access costs O(1) amortised plus O(k) steps
past the group's own items per eviction.
"""

from __future__ import annotations

import numpy as np

from moescope._jit import njit, njit_inline

_NONE, _Q1, _Q2, _GHOST = 0, 1, 2, 3  # `where` codes; node n_items + code - 1 is that queue's sentinel


@njit_inline
def _unlink(nxt, prv, x):
    a, b = prv[x], nxt[x]
    nxt[a], prv[b] = b, a


@njit_inline
def _push(nxt, prv, s, x):
    """Put x at the newest end of the queue with sentinel s."""
    t = prv[s]
    prv[x], nxt[x], nxt[t], prv[s] = t, s, x, x


@njit_inline
def _ghost_add(nxt, prv, where, cnt, sg, y, ghost_size):
    """Add id y at the newest end of the ghost queue (sentinel sg), dropping its oldest id beyond ghost_size."""
    where[y] = _NONE
    if ghost_size <= 0:
        return
    _push(nxt, prv, sg, y)
    where[y] = _GHOST
    cnt[_GHOST] += 1
    if cnt[_GHOST] > ghost_size:
        z = nxt[sg]
        _unlink(nxt, prv, z)
        where[z] = _NONE
        cnt[_GHOST] -= 1


@njit_inline
def _first_free(nxt, need, s, g):
    """The oldest item of the queue with sentinel s that group g does not need, or s if there is none."""
    v = nxt[s]
    while v != s and need[v] == g:
        v = nxt[v]
    return v


# -- SIEVE --------------------------------------------------------------------------------------------
@njit
def sieve(req, reset, n_items, capacity):
    """SIEVE: a FIFO queue, a visited bit per item and a hand that evicts the first unvisited item."""
    return _sieve(req, reset, n_items, capacity, np.empty(0, dtype=np.int64))


@njit
def _sieve(req, reset, n_items, capacity, per_group):
    """`sieve`, also writing each group's demand misses to ``per_group [groups]`` when it is not empty."""
    nxt, prv, cached, visited, need, sc = sieve_state(n_items)
    sieve_run(req, reset, 0, capacity, nxt, prv, cached, visited, need, sc, per_group)
    return sc[:4].copy()


@njit
def sieve_state(n_items):
    """A fresh SIEVE cache for `sieve_run`: ``(nxt, prv, cached, visited, need, sc)``; ``sc[:4]`` the stats
    so far, ``sc[4]`` the hand, ``sc[5]`` the number of cached items."""
    s = n_items
    nxt = np.empty(n_items + 1, dtype=np.int64)
    prv = np.empty(n_items + 1, dtype=np.int64)
    nxt[s], prv[s] = s, s
    sc = np.zeros(6, dtype=np.int64)
    sc[4] = s  # s: start at the oldest end
    need = np.full(n_items + 1, -1, dtype=np.int64)
    return nxt, prv, np.zeros(n_items, dtype=np.bool_), np.zeros(n_items, dtype=np.bool_), need, sc


@njit
def sieve_run(req, reset, g0, capacity, nxt, prv, cached, visited, need, sc, per_group):
    """`sieve` over one window of a stream (first group: stream group `g0`) with the cache of `sieve_state`
    carried from the previous window."""
    g_n, k = req.shape
    s = cached.shape[0]
    hits, misses, hand, size = sc[0], sc[1], sc[4], sc[5]
    for gl in range(g_n):
        g = g0 + gl  # stream-wide, as `need` is
        if reset[gl]:
            cached[:] = False
            nxt[s], prv[s] = s, s
            size, hand = 0, s
        m0 = misses
        for j in range(k):
            x = req[gl, j]
            need[x] = g
            if cached[x]:
                hits += 1
                visited[x] = True
        for j in range(k):
            x = req[gl, j]
            if cached[x]:
                continue
            misses += 1
            if size == capacity:  # capacity >= k: an item the group does not need exists, so the walk ends
                v = nxt[s] if hand == s else hand
                while need[v] == g or visited[v]:
                    if need[v] != g:
                        visited[v] = False
                    v = nxt[v]
                    if v == s:
                        v = nxt[s]
                hand = nxt[v]
                _unlink(nxt, prv, v)
                cached[v] = False
            else:
                size += 1
            _push(nxt, prv, s, x)
            cached[x] = True
            visited[x] = False
        if per_group.shape[0]:
            per_group[gl] = misses - m0
    sc[0], sc[1], sc[4], sc[5] = hits, misses, hand, size


# -- S3-FIFO ------------------------------------------------------------------------------------------
@njit
def s3fifo(req, reset, n_items, capacity):
    """S3-FIFO: a small FIFO filters one-hit items, a main FIFO with 2-bit frequencies, a ghost FIFO."""
    return _s3fifo(req, reset, n_items, capacity, np.empty(0, dtype=np.int64))


@njit_inline
def _s3_evict_small(nxt, prv, where, freq, need, cnt, g, ss, sm, sg, ghost_size):
    """Small's oldest items with frequency >= 2 move to main; the first other item the group does not need
    goes to the ghost. False if small has no such item."""
    v = nxt[ss]
    while v != ss:
        nx = nxt[v]
        if freq[v] >= 2:
            _unlink(nxt, prv, v)
            _push(nxt, prv, sm, v)
            where[v] = _Q2
            freq[v] = 0
            cnt[_Q1] -= 1
            cnt[_Q2] += 1
        elif need[v] != g:
            _unlink(nxt, prv, v)
            cnt[_Q1] -= 1
            _ghost_add(nxt, prv, where, cnt, sg, v, ghost_size)
            return True
        v = nx
    return False


@njit_inline
def _s3_evict_main(nxt, prv, where, freq, need, cnt, g, sm):
    """Main's oldest items with frequency >= 1 are reinserted with frequency - 1; the first other item the
    group does not need is evicted. False if main has no such item."""
    v = nxt[sm]
    while v != sm:
        if freq[v] >= 1:
            freq[v] -= 1
            nx = nxt[v]
            if nx != sm:  # else v is the newest already and is looked at again
                _unlink(nxt, prv, v)
                _push(nxt, prv, sm, v)
                v = nx
        elif need[v] == g:
            v = nxt[v]
        else:
            _unlink(nxt, prv, v)
            where[v] = _NONE
            cnt[_Q2] -= 1
            return True
    return False


@njit
def _s3fifo(req, reset, n_items, capacity, per_group):
    """`s3fifo`, also writing each group's demand misses to ``per_group [groups]`` when it is not empty."""
    nxt, prv, where, freq, need, cnt, sc = s3fifo_state(n_items)
    s3fifo_run(req, reset, 0, capacity, nxt, prv, where, freq, need, cnt, sc, per_group)
    return sc[:4].copy()


@njit
def s3fifo_state(n_items):
    """A fresh S3-FIFO cache for `s3fifo_run`: ``(nxt, prv, where, freq, need, cnt, sc)``; ``cnt`` the items
    per queue (by `where` code), ``sc[:4]`` the stats so far, ``sc[4]`` 1 once anything was evicted."""
    nxt = np.empty(n_items + 3, dtype=np.int64)
    prv = np.empty(n_items + 3, dtype=np.int64)
    for z in range(n_items, n_items + 3):
        nxt[z], prv[z] = z, z
    return (nxt, prv, np.zeros(n_items, dtype=np.int64), np.zeros(n_items, dtype=np.int64),
            np.full(n_items, -1, dtype=np.int64), np.zeros(4, dtype=np.int64), np.zeros(5, dtype=np.int64))  # fmt: skip


@njit
def s3fifo_run(req, reset, g0, capacity, nxt, prv, where, freq, need, cnt, sc, per_group):
    """`s3fifo` over one window of a stream (first group: stream group `g0`) with the cache of `s3fifo_state`
    carried from the previous window."""
    g_n, k = req.shape
    n_items = where.shape[0]
    small_size = max(1, capacity // 10)
    main_size = capacity - small_size
    ghost_size = 9 * capacity // 10
    ss, sm, sg = n_items, n_items + 1, n_items + 2
    hits, misses, has_evicted = sc[0], sc[1], sc[4] != 0
    for gl in range(g_n):
        g = g0 + gl  # stream-wide, as `need` is
        if reset[gl]:
            where[:] = _NONE
            for z in (ss, sm, sg):
                nxt[z], prv[z] = z, z
            cnt[:] = 0
            has_evicted = False
        m0 = misses
        for j in range(k):
            x = req[gl, j]
            need[x] = g
            if where[x] in (_Q1, _Q2):
                hits += 1
                freq[x] = min(freq[x] + 1, 3)
        for j in range(k):
            x = req[gl, j]
            w = where[x]
            if w in (_Q1, _Q2):
                continue
            misses += 1
            if w == _GHOST:
                _unlink(nxt, prv, x)
                cnt[_GHOST] -= 1
            while cnt[_Q1] + cnt[_Q2] >= capacity:
                has_evicted = True
                if cnt[_Q2] > main_size or cnt[_Q1] == 0:
                    if not _s3_evict_main(nxt, prv, where, freq, need, cnt, g, sm):
                        _s3_evict_small(nxt, prv, where, freq, need, cnt, g, ss, sm, sg, ghost_size)
                elif not _s3_evict_small(nxt, prv, where, freq, need, cnt, g, ss, sm, sg, ghost_size):
                    _s3_evict_main(nxt, prv, where, freq, need, cnt, g, sm)
            if w == _GHOST or (not has_evicted and cnt[_Q1] >= small_size):
                _push(nxt, prv, sm, x)
                where[x] = _Q2
                cnt[_Q2] += 1
            else:
                _push(nxt, prv, ss, x)
                where[x] = _Q1
                cnt[_Q1] += 1
            freq[x] = 0
        if per_group.shape[0]:
            per_group[gl] = misses - m0
    sc[0], sc[1], sc[4] = hits, misses, 1 if has_evicted else 0


# -- 2Q -----------------------------------------------------------------------------------------------
@njit
def twoq(req, reset, n_items, capacity):
    """2Q: first-time items in a FIFO (Ain), items seen again in an LRU (Am), a ghost FIFO (Aout)."""
    return _twoq(req, reset, n_items, capacity, np.empty(0, dtype=np.int64))


@njit
def _twoq(req, reset, n_items, capacity, per_group):
    """`twoq`, also writing each group's demand misses to ``per_group [groups]`` when it is not empty."""
    nxt, prv, where, need, cnt, sc = twoq_state(n_items)
    twoq_run(req, reset, 0, capacity, nxt, prv, where, need, cnt, sc, per_group)
    return sc[:4].copy()


@njit
def twoq_state(n_items):
    """A fresh 2Q cache for `twoq_run`: ``(nxt, prv, where, need, cnt, sc)``; ``sc`` the stats so far."""
    nxt = np.empty(n_items + 3, dtype=np.int64)
    prv = np.empty(n_items + 3, dtype=np.int64)
    for z in range(n_items, n_items + 3):
        nxt[z], prv[z] = z, z
    need = np.full(n_items + 3, -1, dtype=np.int64)  # -1 at the sentinels: `_first_free` stops there
    return nxt, prv, np.zeros(n_items, dtype=np.int64), need, np.zeros(4, dtype=np.int64), np.zeros(4, np.int64)


@njit
def twoq_run(req, reset, g0, capacity, nxt, prv, where, need, cnt, sc, per_group):
    """`twoq` over one window of a stream (first group: stream group `g0`) with the cache of `twoq_state`
    carried from the previous window."""
    g_n, k = req.shape
    n_items = where.shape[0]
    ain_size = max(1, capacity // 4)
    am_size = capacity - ain_size
    aout_size = max(1, capacity // 2)
    sa, sm, sg = n_items, n_items + 1, n_items + 2  # Ain (_Q1), Am (_Q2), Aout (_GHOST)
    hits, misses = sc[0], sc[1]
    for gl in range(g_n):
        g = g0 + gl  # stream-wide, as `need` is
        if reset[gl]:
            where[:] = _NONE
            for z in (sa, sm, sg):
                nxt[z], prv[z] = z, z
            cnt[:] = 0
        m0 = misses
        for j in range(k):
            x = req[gl, j]
            need[x] = g
            if where[x] == _Q1:
                hits += 1
            elif where[x] == _Q2:
                hits += 1
                _unlink(nxt, prv, x)
                _push(nxt, prv, sm, x)
        for j in range(k):
            x = req[gl, j]
            w = where[x]
            if w in (_Q1, _Q2):
                continue
            misses += 1
            if w == _GHOST:
                _unlink(nxt, prv, x)
                cnt[_GHOST] -= 1
            while cnt[_Q1] + cnt[_Q2] >= capacity:
                y = _first_free(nxt, need, sa, g) if cnt[_Q1] > ain_size else sa
                if y == sa:
                    y = _first_free(nxt, need, sm, g)
                    if y != sm:
                        _unlink(nxt, prv, y)
                        where[y] = _NONE
                        cnt[_Q2] -= 1
                        continue
                    y = _first_free(nxt, need, sa, g)  # Am is all needed: Ain has a free item
                _unlink(nxt, prv, y)
                cnt[_Q1] -= 1
                _ghost_add(nxt, prv, where, cnt, sg, y, aout_size)
            if w == _GHOST:
                while cnt[_Q2] >= am_size:
                    y = _first_free(nxt, need, sm, g)
                    if y == sm:
                        break
                    _unlink(nxt, prv, y)
                    where[y] = _NONE
                    cnt[_Q2] -= 1
                _push(nxt, prv, sm, x)
                where[x] = _Q2
                cnt[_Q2] += 1
            else:
                _push(nxt, prv, sa, x)
                where[x] = _Q1
                cnt[_Q1] += 1
        if per_group.shape[0]:
            per_group[gl] = misses - m0
    sc[0], sc[1] = hits, misses


# -- SLRU ---------------------------------------------------------------------------------------------
SLRU_SEGMENTS = 4


@njit
def slru(req, reset, n_items, capacity):
    """Segmented LRU: 4 LRU segments; a hit moves an item one segment up, overflow demotes one segment down."""
    return _slru(req, reset, n_items, capacity, np.empty(0, dtype=np.int64))


@njit
def _slru(req, reset, n_items, capacity, per_group):
    """`slru`, also writing each group's demand misses to ``per_group [groups]`` when it is not empty.

    Segment i is the list with sentinel n_items + i (0 the lowest); ``level: [n_items]`` is an item's segment
    or -1. Every segment stays within its size, so a hit never evicts (see the module docstring)."""
    nxt, prv, level, need, cnt, sc = slru_state(n_items)
    slru_run(req, reset, 0, capacity, nxt, prv, level, need, cnt, sc, per_group)
    return sc[:4].copy()


@njit
def slru_state(n_items):
    """A fresh SLRU cache for `slru_run`: ``(nxt, prv, level, need, cnt, sc)``; ``cnt`` the items per segment,
    ``sc[:4]`` the stats so far, ``sc[4]`` the number of cached items."""
    n_seg = SLRU_SEGMENTS
    nxt = np.empty(n_items + n_seg, dtype=np.int64)
    prv = np.empty(n_items + n_seg, dtype=np.int64)
    for z in range(n_items, n_items + n_seg):
        nxt[z], prv[z] = z, z
    need = np.full(n_items + n_seg, -1, dtype=np.int64)  # -1 at the sentinels: `_first_free` stops there
    return (nxt, prv, np.full(n_items, -1, dtype=np.int64), need, np.zeros(n_seg, dtype=np.int64),
            np.zeros(5, dtype=np.int64))  # fmt: skip


@njit
def slru_run(req, reset, g0, capacity, nxt, prv, level, need, cnt, sc, per_group):
    """`slru` over one window of a stream (first group: stream group `g0`) with the cache of `slru_state`
    carried from the previous window."""
    g_n, k = req.shape
    n_items = level.shape[0]
    n_seg = SLRU_SEGMENTS
    size = np.full(n_seg, capacity // n_seg, dtype=np.int64)
    size[0] = capacity - (n_seg - 1) * (capacity // n_seg)
    hits, misses, total = sc[0], sc[1], sc[4]
    for gl in range(g_n):
        g = g0 + gl  # stream-wide, as `need` is
        if reset[gl]:
            level[:] = -1
            for i in range(n_seg):
                nxt[n_items + i], prv[n_items + i] = n_items + i, n_items + i
            cnt[:] = 0
            total = 0
        m0 = misses
        for j in range(k):
            x = req[gl, j]
            need[x] = g
            i = level[x]
            if i < 0:
                continue
            hits += 1
            up = min(i + 1, n_seg - 1)
            _unlink(nxt, prv, x)
            _push(nxt, prv, n_items + up, x)
            level[x] = up
            cnt[i] -= 1
            cnt[up] += 1
            if cnt[up] > size[up]:  # demote the least recent item of that segment (up >= 1 here)
                y = nxt[n_items + up]
                _unlink(nxt, prv, y)
                _push(nxt, prv, n_items + up - 1, y)
                level[y] = up - 1
                cnt[up] -= 1
                cnt[up - 1] += 1
        for j in range(k):
            x = req[gl, j]
            if level[x] >= 0:
                continue
            misses += 1
            if total == capacity:  # capacity >= k: some segment holds an item the group does not need
                i = 0
                v = _first_free(nxt, need, n_items, g)
                while v == n_items + i:
                    i += 1
                    v = _first_free(nxt, need, n_items + i, g)
                _unlink(nxt, prv, v)
                level[v] = -1
                cnt[i] -= 1
                total -= 1
            i = 0
            while cnt[i] >= size[i]:  # total < capacity = sum(size): a segment has room
                i += 1
            _push(nxt, prv, n_items + i, x)
            level[x] = i
            cnt[i] += 1
            total += 1
        if per_group.shape[0]:
            per_group[gl] = misses - m0
    sc[0], sc[1], sc[4] = hits, misses, total
