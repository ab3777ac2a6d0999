"""Numba kernels of the expert-cache simulator: one replay of one request stream per call.

A stream is ``req: [groups, k] int32`` item ids (a group = one token at one MoE layer: the k experts it
needs together) and ``reset: [groups] bool`` (True where the cache is emptied before the group: the start
of the stream, and every sequence start with ``--reset-per-sequence``). Items are expert ids of one layer
(per-layer caches) or ``layer * E + expert`` (one pooled cache). Every kernel returns

    stats: [4] int64 = (hits, demand_misses, prefetch_loads, wasted_prefetches)

with ``hits + demand_misses == groups * k``. Within a group, hits are served first, then misses are loaded,
evicting only items the group does not need (possible because capacity >= k). Kernels never allocate per
access; the caller validates (`moescope.cache.simulate`). Naive references: tests/reference.py.
"""

from __future__ import annotations

import numpy as np

from moescope._jit import njit, njit_inline

HITS, MISSES, PREFETCHES, WASTED = 0, 1, 2, 3
NEVER = np.iinfo(np.int64).max  # next use of an item that is not used again (in its segment)


@njit
def next_use(req, reset, n_items):
    """[groups, k] int64: the next group (same segment) that needs each request's item, or NEVER."""
    out = np.empty(req.shape, dtype=np.int64)
    next_use_into(req, reset, 0, np.full(n_items, NEVER, dtype=np.int64), out)
    return out


@njit
def next_use_into(req, reset, g0, last, out):
    """`next_use` of one window of a stream whose first group is group `g0`, windows taken last to first:
    ``last: [n_items]`` (NEVER at the start) holds each item's first use in the windows after this one and
    is updated; ``out`` [groups, k] receives the stream-wide group indices."""
    g_n, k = req.shape
    for g in range(g_n - 1, -1, -1):
        for j in range(k):
            x = req[g, j]
            out[g, j] = last[x]
            last[x] = g0 + g
        if reset[g]:
            last[:] = NEVER


# -- LRU: a doubly linked list over item ids, O(1) per access -------------------------------------
@njit
def lru(req, reset, n_items, capacity):
    """LRU. At the end of a group its items are the most recent, slot 0 first (same order as `lru_depths`)."""
    return _lru(req, reset, n_items, capacity, np.empty(0, dtype=np.int64))


@njit
def _lru(req, reset, n_items, capacity, per_group):
    """`lru`, also writing each group's demand misses to ``per_group [groups]`` when it is not empty."""
    prv, nxt, cached, sc = lru_state(n_items)
    lru_run(req, reset, capacity, prv, nxt, cached, sc, per_group)
    return sc[:4].copy()


@njit
def lru_state(n_items):
    """A fresh (empty) LRU cache for `lru_run`: ``(prv, nxt, cached, sc)``; ``sc[:4]`` is the stats so far,
    ``sc[4:7]`` the list's head, tail and size."""
    sc = np.zeros(7, dtype=np.int64)
    sc[4], sc[5] = -1, -1
    return np.full(n_items, -1, dtype=np.int64), np.full(n_items, -1, dtype=np.int64), np.zeros(n_items, np.bool_), sc


@njit
def lru_run(req, reset, capacity, prv, nxt, cached, sc, per_group):
    """Replay one window of a stream through the LRU cache ``(prv, nxt, cached, sc)`` (`lru_state`), carried
    from the previous window: the windows of a stream, replayed in order, count as the whole stream does."""
    g_n, k = req.shape
    hits, misses, head, tail, size = sc[0], sc[1], sc[4], sc[5], sc[6]
    for g in range(g_n):
        if reset[g]:
            cached[:] = False
            head, tail, size = -1, -1, 0
        m0 = misses
        for j in range(k):  # hits to the front first, so the tail is never an item this group needs
            x = req[g, j]
            if cached[x]:
                hits += 1
                if head != x:
                    p, n = prv[x], nxt[x]
                    nxt[p] = n
                    if n >= 0:
                        prv[n] = p
                    else:
                        tail = p
                    prv[x], nxt[x] = -1, head
                    prv[head] = x
                    head = x
        for j in range(k):
            x = req[g, j]
            if not cached[x]:
                misses += 1
                if size == capacity:  # the tail is never needed by this group: its cached items are at the head
                    v = tail
                    tail = prv[v]
                    if tail >= 0:
                        nxt[tail] = -1
                    else:
                        head = -1
                    cached[v] = False
                    size -= 1
                cached[x] = True
                size += 1
                prv[x], nxt[x] = -1, head
                if head >= 0:
                    prv[head] = x
                head = x
                if tail < 0:
                    tail = x
        for j in range(k - 1, -1, -1):  # move to the front in reverse slot order: slot 0 ends most recent
            x = req[g, j]
            if head == x:
                continue
            p, n = prv[x], nxt[x]
            nxt[p] = n
            if n >= 0:
                prv[n] = p
            else:
                tail = p
            prv[x], nxt[x] = -1, head
            prv[head] = x
            head = x
        if per_group.shape[0]:
            per_group[g] = misses - m0
    sc[0], sc[1], sc[4], sc[5], sc[6] = hits, misses, head, tail, size


@njit
def lru_depths(req, reset, n_items):
    """LRU stack depths, for every capacity at once (LRU is a stack algorithm here too).

    Returns ``hist: [n_items + 1] int64``: hist[d] = accesses whose item was at depth d (0 = most recent)
    of the recency stack before its group, hist[n_items] = cold accesses (first use in the segment). An LRU
    cache of capacity C >= k misses exactly ``hist[C:].sum()`` times.
    """
    hist, stack, on_stack, in_group, sc = depths_state(n_items)
    depths_run(req, reset, hist, stack, on_stack, in_group, sc)
    return hist


@njit
def depths_state(n_items):
    """A fresh recency stack for `depths_run`: ``(hist, stack, on_stack, in_group, sc)``, ``hist`` the
    histogram so far, ``sc[0]`` the stack's depth."""
    return (
        np.zeros(n_items + 1, dtype=np.int64),
        np.empty(n_items, dtype=np.int64),
        np.zeros(n_items, dtype=np.bool_),
        np.zeros(n_items, dtype=np.bool_),
        np.zeros(1, dtype=np.int64),
    )


@njit
def depths_run(req, reset, hist, stack, on_stack, in_group, sc):
    """`lru_depths` of one window of a stream, adding to ``hist`` with the stack of `depths_state` carried from
    the previous window."""
    g_n, k = req.shape
    n_items = stack.shape[0]
    depth = sc[0]
    for g in range(g_n):
        if reset[g]:
            for i in range(depth):
                on_stack[stack[i]] = False
            depth = 0
        deepest, n_cold = -1, 0
        for j in range(k):
            x = req[g, j]
            in_group[x] = True
            if not on_stack[x]:
                hist[n_items] += 1
                n_cold += 1
        found = 0
        for i in range(depth):  # depths in the old stack; stop once every cached item of the group is seen
            if found == k - n_cold:
                break
            if in_group[stack[i]]:
                hist[i] += 1
                found += 1
                deepest = i
        # rebuild: the group (slot order) on top, then the old stack without the group's items; the part
        # below the deepest group item moves down by n_cold first, then the part above it is compacted
        if n_cold:
            for i in range(depth - 1, deepest, -1):
                stack[i + n_cold] = stack[i]
        w = deepest
        for i in range(deepest, -1, -1):
            y = stack[i]
            if not in_group[y]:
                stack[w + n_cold] = y
                w -= 1
        for j in range(k):
            x = req[g, j]
            stack[j] = x
            on_stack[x] = True
            in_group[x] = False
        depth += n_cold
    sc[0] = depth


@njit
def belady_depths(req, reset, n_items):
    """Belady's stack depths, for every capacity at once: ``hist`` as `lru_depths`'s, so that the Belady cache
    of `scan_policy` (``SCAN_BELADY``) at any capacity C >= k misses exactly ``hist[C:].sum()`` times.

    Belady with the group rule is a priority algorithm (Mattson et al. 1970, "Evaluation techniques for
    storage hierarchies"): at each eviction the victim is the lowest item of one total order that does not
    depend on the capacity -- the group's items first (needed now), then the nearest next use, ties by the
    larger id (`heap_run` evicts the furthest next use, ties by the smallest id, never an item the group
    needs). So a cache of C holds the top C of one stack at every capacity (inclusion), and one pass finds
    each access's depth. For C >= k a group item's depth before its group decides its hit at C (a miss
    evicts a non-group item, so the group's other items keep their place in every cache of C >= k).
    O(depth) per access (`belady_depths_run`)."""
    nu = next_use(req, reset, n_items)
    hist, stack, pos, pri, sc = belady_depths_state(n_items)
    belady_depths_run(req, reset, 0, nu, hist, stack, pos, pri, sc)
    return hist


@njit
def belady_depths_state(n_items):
    """A fresh Belady stack for `belady_depths_run`: ``(hist, stack, pos, pri, sc)``; ``pos`` each item's
    stack position (-1: not on it), ``pri`` its next use, ``sc[0]`` the stack's depth."""
    return (
        np.zeros(n_items + 1, dtype=np.int64),
        np.empty(n_items, dtype=np.int64),
        np.full(n_items, -1, dtype=np.int64),
        np.zeros(n_items, dtype=np.int64),
        np.zeros(1, dtype=np.int64),
    )


@njit_inline
def _keeps(a, b, pri):
    """Whether item a ranks above item b in Belady's order (`belady_depths`): nearer next use, ties larger id."""
    return pri[a] < pri[b] or (pri[a] == pri[b] and a > b)


@njit
def belady_depths_run(req, reset, g0, nu, hist, stack, pos, pri, sc):
    """`belady_depths` of one window of a stream (first group: stream group `g0`; ``nu`` the window's
    `next_use`, stream-wide), adding to ``hist`` with the stack of `belady_depths_state` carried from the
    previous window. Each access moves its item to the top; below it, down to its old place (the stack's end
    for a cold item), each level keeps the higher-ranked of what it held and what came down from above, the
    lower one going on down: the level's cache evicts the lowest-ranked item it held."""
    g_n, k = req.shape
    n_items = stack.shape[0]
    size = sc[0]
    for gl in range(g_n):
        g = g0 + gl
        if reset[gl]:
            for i in range(size):
                pos[stack[i]] = -1
            size = 0
        for j in range(k):  # depths before the group; the group's items rank first while it is served
            x = req[gl, j]
            hist[n_items if pos[x] < 0 else pos[x]] += 1
            pri[x] = g
        for j in range(k):
            x = req[gl, j]
            p = pos[x]
            if p < 0:  # cold: it comes down to the end of a stack one deeper
                p = size
                size += 1
            if p == 0:
                stack[0] = x
                pos[x] = 0
                continue
            carry = stack[0]
            stack[0] = x
            pos[x] = 0
            for i in range(1, p):
                y = stack[i]
                if _keeps(carry, y, pri):
                    stack[i] = carry
                    pos[carry] = i
                    carry = y
            stack[p] = carry
            pos[carry] = p
        for j in range(k):
            pri[req[gl, j]] = nu[gl, j]
    sc[0] = size


# -- FIFO, LFU and Belady: `scan_policy` (a linked list for FIFO, a binary min-heap for LFU and Belady) --
SCAN_FIFO, SCAN_LFU, SCAN_BELADY = 0, 1, 2  # the `kind` of `scan_policy`
_PARKED = -2  # `heap_run`'s pos[x] for a cached item held out of the heap until its group ends


@njit
def scan_policy(req, reset, n_items, capacity, kind, aging):
    """FIFO (kind `SCAN_FIFO`), LFU (`SCAN_LFU`) or Belady/MIN (`SCAN_BELADY`).

    - FIFO evicts the item loaded longest ago (hits do not refresh it).
    - LFU evicts the item with the fewest uses since the segment began (uses counted while evicted too,
      "perfect" LFU), ties by least recent use, then by id; with ``aging > 0`` every count is halved every
      ``aging`` groups.
    - Belady evicts the item whose next use is furthest (never used again first): the offline optimum for
      demand loading with the whole group needed together.

    Every kind evicts only items the group does not need, ties by smallest id. FIFO runs in `fifo_run` (a linked
    list, O(k) per miss), LFU and Belady in `heap_run` (a heap, O(k log capacity) per miss).
    """
    return _scan_policy(req, reset, n_items, capacity, kind, aging, np.empty(0, dtype=np.int64))


@njit
def _scan_policy(req, reset, n_items, capacity, kind, aging, per_group):
    """`scan_policy`, also writing each group's demand misses to ``per_group [groups]`` when it is not empty."""
    if kind == SCAN_FIFO:
        nxt, prv, cached, need, new, sc = fifo_state(n_items, req.shape[1])
        fifo_run(req, reset, 0, capacity, nxt, prv, cached, need, new, sc, per_group)
        return sc[:4].copy()
    belady = kind == SCAN_BELADY
    nu = next_use(req, reset, n_items) if belady else np.empty((1, 1), dtype=np.int64)
    h_x, h_a, h_b, pos, need, uses, p_x, p_a, p_b, sc = heap_state(n_items, capacity, req.shape[1])
    heap_run(req, reset, 0, n_items, capacity, belady, aging, nu, h_x, h_a, h_b, pos, need, uses, p_x, p_a, p_b, sc,
             per_group)  # fmt: skip
    return sc[:4].copy()


@njit
def heap_state(n_items, capacity, k):
    """A fresh (empty) LFU / Belady cache for `heap_run`: ``(h_x, h_a, h_b, pos, need, uses, p_x, p_a, p_b,
    sc)``; ``sc[:4]`` is the stats so far, ``sc[4]`` the heap's size."""
    return (
        np.empty(capacity, dtype=np.int64),
        np.empty(capacity, dtype=np.int64),
        np.empty(capacity, dtype=np.int64),
        np.full(n_items, -1, dtype=np.int64),
        np.full(n_items, -1, dtype=np.int64),
        np.zeros(n_items, dtype=np.int64),
        np.empty(k, dtype=np.int64),
        np.empty(k, dtype=np.int64),
        np.empty(k, dtype=np.int64),
        np.zeros(5, dtype=np.int64),
    )


@njit
def heap_run(req, reset, g0, n_items, capacity, belady, aging, nu, h_x, h_a, h_b, pos, need, uses, p_x, p_a, p_b, sc,
             per_group):  # fmt: skip
    """LFU (or Belady when `belady`) for `_scan_policy`, one window of the stream (first group: stream group
    `g0`) through the cache state of `heap_state`, carried from the previous window; Belady reads `nu`, the
    window's `next_use` in stream-wide group indices. Evict the cached item with the smallest (key1, key2)
    that the group does not need. LFU: (uses, last use group * n_items + id); Belady: (-(next use), id).

    The cached items form a binary min-heap by position ``h_x, h_a, h_b: [capacity]`` (item, key1, key2;
    keys are distinct, as key2 is, so the victim is the same as a scan's), with ``pos: [n_items]`` the heap
    position of each item, -1 if it is not cached, `_PARKED` if it is cached but held out. A hit updates
    its item's key in place. A miss pops the root; a root the group needs (at most k - 1 of them) is parked
    with its key, as is each item the group loads, and the parked items rejoin the heap when the group ends.
    """
    # The sifts are `njit_inline` helpers, compiled into this loop (a plain jitted call that takes arrays
    # costs about as much as a whole sift here). Keys only grow on an LFU hit (sift down) and only shrink on
    # a Belady hit (its next use moves later, sift up). Halving the LFU counts (aging) keeps their order but
    # can tie counts that differed, so that the heap is rebuilt then, and stays exact.
    # uses: LFU counts, kept for items not cached; p_x, p_a, p_b: the parked items of the group and their keys
    g_n, k = req.shape
    hits, misses, n_h = sc[0], sc[1], sc[4]
    for gl in range(g_n):
        g = g0 + gl  # stream-wide: `need`, LFU's stamps and the aging period count across windows
        if reset[gl]:
            for i in range(n_h):
                pos[h_x[i]] = -1
            n_h = 0
            if not belady:
                uses[:] = 0
        if not belady and aging > 0 and g > 0 and g % aging == 0:
            uses //= 2
            for i in range(n_h):
                h_a[i] = uses[h_x[i]]
            _heapify(h_x, h_a, h_b, pos, n_h)
        m0 = misses
        for j in range(k):
            x = req[gl, j]
            need[x] = g
            if not belady:
                uses[x] += 1
            i = pos[x]
            if i < 0:
                continue
            hits += 1
            if belady:  # the new key is smaller
                _sift_up(h_x, h_a, h_b, pos, i, x, -nu[gl, j], x)
            else:  # the new key is larger
                _sift_down(h_x, h_a, h_b, pos, n_h, i, x, uses[x], g * n_items + x)
        n_p = 0
        for j in range(k):
            x = req[gl, j]
            if pos[x] != -1:
                continue
            misses += 1
            while n_h + n_p == capacity:  # pop the root; capacity >= k: an unneeded root comes before n_h = 0
                v, va, vb = h_x[0], h_a[0], h_b[0]
                n_h -= 1
                if n_h > 0:  # the last entry sifts down from the root
                    _sift_down(h_x, h_a, h_b, pos, n_h, 0, h_x[n_h], h_a[n_h], h_b[n_h])
                if need[v] == g:
                    p_x[n_p], p_a[n_p], p_b[n_p] = v, va, vb
                    pos[v] = _PARKED
                    n_p += 1
                else:
                    pos[v] = -1
            if belady:
                p_a[n_p], p_b[n_p] = -nu[gl, j], x
            else:
                p_a[n_p], p_b[n_p] = uses[x], g * n_items + x
            p_x[n_p] = x
            pos[x] = _PARKED
            n_p += 1
        for t in range(n_p):  # the parked items rejoin the heap: sift up from the end
            _sift_up(h_x, h_a, h_b, pos, n_h, p_x[t], p_a[t], p_b[t])
            n_h += 1
        if per_group.shape[0]:
            per_group[gl] = misses - m0
    sc[0], sc[1], sc[4] = hits, misses, n_h


@njit
def _heapify(h_x, h_a, h_b, pos, n):
    """Restore the min-heap order by (h_a, h_b) of the first n entries of `heap_run`'s heap, in O(n)."""
    for r in range(n // 2 - 1, -1, -1):
        _sift_down(h_x, h_a, h_b, pos, n, r, h_x[r], h_a[r], h_b[r])


@njit_inline
def _sift_up(h_x, h_a, h_b, pos, i, x, a, b):
    """Put item x with key (a, b) at heap position i, or above it while its parent's key is larger."""
    while i > 0:
        q = (i - 1) >> 1
        qa = h_a[q]
        if qa < a or (qa == a and h_b[q] < b):
            break
        y = h_x[q]
        h_x[i], h_a[i], h_b[i] = y, qa, h_b[q]
        pos[y] = i
        i = q
    h_x[i], h_a[i], h_b[i] = x, a, b
    pos[x] = i


@njit_inline
def _sift_down(h_x, h_a, h_b, pos, n, i, x, a, b):
    """Put item x with key (a, b) at heap position i of a heap of n, or below it while a child's key is smaller."""
    while True:
        c = 2 * i + 1
        if c >= n:
            break
        ca, cb = h_a[c], h_b[c]
        if c + 1 < n:
            da, db = h_a[c + 1], h_b[c + 1]
            if da < ca or (da == ca and db < cb):
                c, ca, cb = c + 1, da, db
        if ca > a or (ca == a and cb > b):
            break
        y = h_x[c]
        h_x[i], h_a[i], h_b[i] = y, ca, cb
        pos[y] = i
        i = c
    h_x[i], h_a[i], h_b[i] = x, a, b
    pos[x] = i


@njit
def fifo_state(n_items, k):
    """A fresh (empty) FIFO cache for `fifo_run`: ``(nxt, prv, cached, need, new, sc)``; ``sc[:4]`` is the
    stats so far, ``sc[4]`` the number of cached items."""
    nxt = np.empty(n_items + 1, dtype=np.int64)
    prv = np.empty(n_items + 1, dtype=np.int64)
    nxt[n_items], prv[n_items] = n_items, n_items
    need = np.full(n_items + 1, -1, dtype=np.int64)  # need[s] stays -1: a walk never passes the sentinel
    return nxt, prv, np.zeros(n_items, dtype=np.bool_), need, np.empty(k, dtype=np.int64), np.zeros(5, dtype=np.int64)


@njit
def fifo_run(req, reset, g0, capacity, nxt, prv, cached, need, new, sc, per_group):
    """FIFO for `_scan_policy`, one window of the stream (first group: stream group `g0`) through the cache
    state of `fifo_state`, carried from the previous window: evict the cached item with the smallest (load
    group, id) the group does not need.

    The cached items form one circular doubly linked list through ``nxt``, ``prv: [n_items + 1]`` (node
    n_items is the sentinel: nxt[s] the oldest, prv[s] the newest) kept in (load group, id) order: a group's
    misses are collected, sorted by id (insertion sort, k is small) and appended after its miss loop. The
    victim is the first entry not needed by the group; the only needed entries are the group's hits (at most
    k - 1 of them: its new items join the list after the loop), so each miss walks at most k steps.
    """
    g_n, k = req.shape
    s = cached.shape[0]  # the sentinel; `new`: this group's misses, ascending id
    hits, misses, size = sc[0], sc[1], sc[4]
    for gl in range(g_n):
        g = g0 + gl  # stream-wide, as `need` is
        if reset[gl]:
            cached[:] = False
            nxt[s], prv[s] = s, s
            size = 0
        m0 = misses
        for j in range(k):
            x = req[gl, j]
            need[x] = g
            if cached[x]:
                hits += 1
        m = 0
        for j in range(k):
            x = req[gl, j]
            if cached[x]:
                continue
            misses += 1
            if size == capacity:  # capacity >= k: an unneeded entry exists, so v never reaches the sentinel
                v = nxt[s]
                while need[v] == g:
                    v = nxt[v]
                a, b = prv[v], nxt[v]
                nxt[a], prv[b] = b, a
                cached[v] = False
            else:
                size += 1
            cached[x] = True
            i = m
            while i > 0 and new[i - 1] > x:
                new[i] = new[i - 1]
                i -= 1
            new[i] = x
            m += 1
        for i in range(m):
            x = new[i]
            t = prv[s]
            prv[x], nxt[x], nxt[t], prv[s] = t, s, x, x
        if per_group.shape[0]:
            per_group[gl] = misses - m0
    sc[0], sc[1], sc[4] = hits, misses, size


@njit
def static_set(req, reset, pinned):
    """A fixed resident set (``pinned: [n_items] bool``, chosen beforehand): every other access is a miss,
    served without entering the cache (bypass). A pinned expert is loaded at its first use after a reset, a
    cold miss counted as every other policy counts its own (a pre-filled cache would start warm for free)."""
    return _static_set(req, reset, pinned, np.empty(0, dtype=np.int64))


@njit
def _static_set(req, reset, pinned, per_group):
    """`static_set`, also writing each group's misses to ``per_group [groups]`` when it is not empty."""
    loaded, sc = static_state(pinned.shape[0])
    static_run(req, reset, pinned, loaded, sc, per_group)
    return sc


@njit
def static_state(n_items):
    """A fresh static set for `static_run`: ``(loaded, sc)``, ``sc`` the stats so far."""
    return np.zeros(n_items, dtype=np.bool_), np.zeros(4, dtype=np.int64)


@njit
def static_run(req, reset, pinned, loaded, sc, per_group):
    """`static_set` over one window of a stream, with the state of `static_state` carried from the previous one."""
    g_n, k = req.shape
    hits = 0
    for g in range(g_n):
        if reset[g]:
            loaded[:] = False
        h0 = hits
        for j in range(k):
            x = req[g, j]
            if pinned[x]:
                if loaded[x]:
                    hits += 1
                loaded[x] = True
        if per_group.shape[0]:
            per_group[g] = k - (hits - h0)
    sc[0] += hits
    sc[1] += g_n * k - hits


# -- ARC (Megiddo & Modha, FAST 2003), with the group constraint ---------------------------------
_T1, _T2, _B1, _B2 = 1, 2, 3, 4  # list codes in `where` (0: in no list); node n_items + code is a sentinel


@njit
def arc(req, reset, n_items, capacity):
    """Adaptive Replacement Cache: resident lists T1 (seen once) and T2 (seen again), ghost lists B1, B2
    remember recent evictions and steer the target size p of T1. Evictions skip items the group needs."""
    return _arc(req, reset, n_items, capacity, np.empty(0, dtype=np.int64))


@njit
def _arc(req, reset, n_items, capacity, per_group):
    """`arc`, also writing each group's demand misses to ``per_group [groups]`` when it is not empty."""
    nxt, prv, where, need, sc, pf = arc_state(n_items)
    arc_run(req, reset, 0, capacity, nxt, prv, where, need, sc, pf, per_group)
    return sc[:4].copy()


@njit
def arc_state(n_items):
    """A fresh ARC cache for `arc_run`: ``(nxt, prv, where, need, sc, pf)``; ``sc[:4]`` the stats so far,
    ``sc[4:8]`` the sizes of T1, T2, B1, B2, ``pf[0]`` the target size p of T1."""
    nxt = np.empty(n_items + 5, dtype=np.int64)
    prv = np.empty(n_items + 5, dtype=np.int64)
    for z in range(n_items + _T1, n_items + _B2 + 1):
        nxt[z], prv[z] = z, z
    need = np.full(n_items + 5, -1, dtype=np.int64)  # -1 at the sentinels: a walk stops at its sentinel
    return nxt, prv, np.zeros(n_items, dtype=np.int64), need, np.zeros(8, dtype=np.int64), np.zeros(1)


@njit
def arc_run(req, reset, g0, capacity, nxt, prv, where, need, sc, pf, per_group):
    """`arc` over one window of a stream (first group: stream group `g0`) with the cache of `arc_state`
    carried from the previous window.

    Each list is a circular doubly linked list through ``nxt``, ``prv: [n_items + 5]`` with the sentinel
    node n_items + code (nxt[sentinel] the least recent end, prv[sentinel] the most recent), so a victim is
    found by walking from the least recent end past the (at most k - 1) items the group needs: O(k) per miss.
    """
    # Every list stays in recency order: the order of a clock stamp given to an item each time it enters T1
    # or T2 (a load or a hit), which a move to a ghost list keeps. Hence "least recent" below is "least stamp".
    # - T1, T2: an item enters only with a new stamp, the largest so far, at the most recent end.
    # - B1 (B2, alike): an item enters only from T1 (T2), as the least recent item of T1 (T2) that the group
    #   does not need; the items of T1 (T2) the group needs were all stamped during this group (its hits
    #   went to T2 with new stamps, its loads got new stamps), after every item it does not need. So every
    #   stamp in T1 (T2) exceeds every stamp in B1 (B2), before and after each move, and an item appended
    #   to a B list is its most recent. This holds as well when the chosen T list has no item to give (all
    #   needed, or empty) and the other T list gives its least recent unneeded item instead.
    # - B1 and B2 are trimmed at their least recent end without regard to the group (a ghost holds no slot).
    # Removal from anywhere keeps an order; a reset empties every list.
    g_n, k = req.shape
    c = capacity
    n_items = where.shape[0]
    s1, s2, sb1, sb2 = n_items + _T1, n_items + _T2, n_items + _B1, n_items + _B2
    hits, misses, n_t1, n_t2, n_b1, n_b2 = sc[0], sc[1], sc[4], sc[5], sc[6], sc[7]  # n_*: list sizes
    p = pf[0]
    for gl in range(g_n):
        g = g0 + gl  # stream-wide, as `need` is
        if reset[gl]:
            where[:] = 0
            for z in range(s1, sb2 + 1):
                nxt[z], prv[z] = z, z
            n_t1, n_t2, n_b1, n_b2 = 0, 0, 0, 0
            p = 0.0
        m0 = misses
        for j in range(k):
            x = req[gl, j]
            need[x] = g
            w = where[x]
            if w in (_T1, _T2):  # a hit: to the most recent end of T2
                hits += 1
                if w == _T1:
                    n_t1 -= 1
                    n_t2 += 1
                    where[x] = _T2
                a, b = prv[x], nxt[x]
                nxt[a], prv[b] = b, a
                t = prv[s2]
                prv[x], nxt[x], nxt[t], prv[s2] = t, s2, x, x
        for j in range(k):
            x = req[gl, j]
            w = where[x]
            if w in (_T1, _T2):
                continue
            misses += 1
            if w == _B1:
                p = min(float(c), p + max(n_b2 / n_b1, 1.0))
            elif w == _B2:
                p = max(0.0, p - max(n_b1 / n_b2, 1.0))
            elif n_t1 + n_b1 == c:
                if n_t1 < c:  # drop B1's least recent ghost (B1 is not empty: n_b1 = c - n_t1 > 0)
                    y = nxt[sb1]
                    n_b1 -= 1
                else:  # T1 fills the cache: drop its least recent unneeded page without a ghost
                    y = nxt[s1]
                    while need[y] == g:
                        y = nxt[y]
                    n_t1 -= 1
                a, b = prv[y], nxt[y]
                nxt[a], prv[b] = b, a
                where[y] = 0
            elif n_t1 + n_t2 + n_b1 + n_b2 >= 2 * c and n_b2 > 0:  # drop B2's least recent ghost
                y = nxt[sb2]
                a, b = prv[y], nxt[y]
                nxt[a], prv[b] = b, a
                where[y] = 0
                n_b2 -= 1
            if w != 0:  # a ghost hit: out of its ghost list
                if w == _B1:
                    n_b1 -= 1
                else:
                    n_b2 -= 1
                a, b = prv[x], nxt[x]
                nxt[a], prv[b] = b, a
                where[x] = 0
            if n_t1 + n_t2 >= c:  # REPLACE: evict from T1 or T2 into its ghost list
                from_t1 = n_t1 > 0 and (n_t1 > p or (w == _B2 and n_t1 == p))
                src = s1 if from_t1 else s2
                y = nxt[src]
                while need[y] == g:
                    y = nxt[y]
                if y == src:  # every page of that list is needed by this group: take the other list
                    from_t1 = not from_t1
                    src = s1 if from_t1 else s2
                    y = nxt[src]  # resident >= c >= k > needed resident: this walk finds a page
                    while need[y] == g:
                        y = nxt[y]
                if from_t1:
                    dst = sb1
                    n_t1 -= 1
                    n_b1 += 1
                else:
                    dst = sb2
                    n_t2 -= 1
                    n_b2 += 1
                a, b = prv[y], nxt[y]
                nxt[a], prv[b] = b, a
                t = prv[dst]
                prv[y], nxt[y], nxt[t], prv[dst] = t, dst, y, y
                where[y] = dst - n_items
            if w == 0:
                dst = s1
                n_t1 += 1
            else:
                dst = s2
                n_t2 += 1
            t = prv[dst]
            prv[x], nxt[x], nxt[t], prv[dst] = t, dst, x, x
            where[x] = dst - n_items
        if per_group.shape[0]:
            per_group[gl] = misses - m0
    sc[0], sc[1], sc[4], sc[5], sc[6], sc[7] = hits, misses, n_t1, n_t2, n_b1, n_b2
    pf[0] = p


# -- the co-activation prefetcher on top of LRU ----------------------------------------------------
@njit
def _victim(slot_item, need, g, key1, key2, largest):
    """Slot of the cached item not needed by group g with the smallest (or largest) (key1, key2)."""
    best = -1
    for s in range(slot_item.shape[0]):
        x = slot_item[s]
        if x < 0 or need[x] == g:
            continue
        if best < 0:
            best = s
            continue
        b = slot_item[best]
        if largest:
            better = key1[x] > key1[b] or (key1[x] == key1[b] and key2[x] > key2[b])
        else:
            better = key1[x] < key1[b] or (key1[x] == key1[b] and key2[x] < key2[b])
        if better:
            best = s
    return best


@njit
def _load(x, slot_item, slot_of, need, g, recent, ids, pending, free):
    """Put item x in a free slot, or in place of the least recently used item group g does not need.
    Returns (free slots left, 1 if the evicted item was a prefetch never used else 0)."""
    capacity = slot_item.shape[0]
    lost = 0
    if free > 0:
        s = capacity - free
        free -= 1
    else:
        s = _victim(slot_item, need, g, recent, ids, False)
        v = slot_item[s]
        if pending[v]:
            lost = 1
            pending[v] = False
        slot_of[v] = -1
    slot_item[s] = x
    slot_of[x] = s
    return free, lost


@njit
def _unused_prefetches(slot_item, pending):
    """Cached prefetches never used (counted as wasted when the cache empties or the replay ends); clears them."""
    n = 0
    for s in range(slot_item.shape[0]):
        x = slot_item[s]
        if x >= 0 and pending[x]:
            n += 1
            pending[x] = False
    return n


@njit
def coact_prefetch(req, reset, n_items, capacity, coact, n_experts, budget):
    """LRU plus prefetch: after each group, load the `budget` experts (of the same layer) most co-activated
    with the group's experts (``coact: [layers, E, E]`` counts learned on the train split; item x is expert
    ``x % E`` of layer ``x // E``), evicting least recently used items the group does not need. Prefetched
    items enter at the LRU end (below every used item; a later prefetch below an earlier one), as prefetched
    blocks usually do, so a wrong guess evicts another guess before a hot expert; a hit moves an item to the
    top. Candidates already cached are left alone. A prefetched item evicted (or left at a reset or the end)
    before any use is wasted."""
    st = coact_prefetch_state(n_items, capacity, n_experts)
    coact_prefetch_run(req, reset, 0, capacity, coact, n_experts, budget, st[0], st[1], st[2], st[3], st[4], st[5],
                       st[6], st[7], st[8])  # fmt: skip
    return coact_prefetch_stats(st[0], st[5], st[8])


@njit
def coact_prefetch_state(n_items, capacity, n_experts):
    """A fresh cache for `coact_prefetch_run`: ``(slot_item, slot_of, need, recent, ids, pending, score, chosen,
    sc)``; ``sc[:4]`` the stats so far (before the unused prefetches left at the end, `coact_prefetch_stats`),
    ``sc[4]`` the free slots, ``sc[5]`` the recency clock."""
    sc = np.zeros(6, dtype=np.int64)
    sc[4] = capacity
    return (np.full(capacity, -1, dtype=np.int64), np.full(n_items, -1, dtype=np.int64),
            np.full(n_items, -1, dtype=np.int64), np.zeros(n_items, dtype=np.int64),
            np.arange(n_items).astype(np.int64), np.zeros(n_items, dtype=np.bool_),
            np.zeros(n_experts, dtype=np.float64), np.zeros(n_experts, dtype=np.bool_), sc)  # fmt: skip


@njit
def coact_prefetch_stats(slot_item, pending, sc):
    """The stats of a stream replayed to its end: the prefetches still unused then are wasted."""
    out = sc[:4].copy()
    out[3] += _unused_prefetches(slot_item, pending)
    return out


@njit
def coact_prefetch_run(req, reset, g0, capacity, coact, n_experts, budget, slot_item, slot_of, need, recent, ids,
                       pending, score, chosen, sc):  # fmt: skip
    """`coact_prefetch` over one window of a stream (first group: stream group `g0`) with the cache of
    `coact_prefetch_state` carried from the previous window."""
    g_n, k = req.shape
    hits, misses, loads, wasted, free, clock = sc[0], sc[1], sc[2], sc[3], sc[4], sc[5]
    b = min(budget, capacity - k)
    for gl in range(g_n):
        g = g0 + gl  # stream-wide, as `need` is
        if reset[gl]:
            wasted += _unused_prefetches(slot_item, pending)
            slot_item[:] = -1
            slot_of[:] = -1
            free = capacity
        for j in range(k):
            x = req[gl, j]
            need[x] = g
            if slot_of[x] >= 0:
                hits += 1
                pending[x] = False
        for j in range(k):
            x = req[gl, j]
            if slot_of[x] >= 0:
                continue
            misses += 1
            free, lost = _load(x, slot_item, slot_of, need, g, recent, ids, pending, free)
            wasted += lost
        for j in range(k - 1, -1, -1):  # recency as in `lru`: slot 0 most recent
            clock += 1
            recent[req[gl, j]] = clock
        if b <= 0:
            continue
        layer = req[gl, 0] // n_experts
        base = layer * n_experts
        score[:] = 0.0
        chosen[:] = False
        for j in range(k):
            e = req[gl, j] - base
            chosen[e] = True  # the group's own experts are cached already
            for f in range(n_experts):
                score[f] += coact[layer, e, f]
        for _ in range(b):  # the b best candidates, ties by expert id
            best = -1
            for f in range(n_experts):
                if not chosen[f] and (best < 0 or score[f] > score[best]):
                    best = f
            if best < 0 or score[best] <= 0.0:
                break
            chosen[best] = True
            y = base + best
            need[y] = g  # protect this round's prefetches from each other
            clock += 1
            if slot_of[y] >= 0:
                continue
            loads += 1
            free, lost = _load(y, slot_item, slot_of, need, g, recent, ids, pending, free)
            wasted += lost
            recent[y] = -clock  # at the LRU end: an unused prefetch is the first to go, not a hot expert
            pending[y] = True
    sc[0], sc[1], sc[2], sc[3], sc[4], sc[5] = hits, misses, loads, wasted, free, clock


@njit
def allocate_slots(misses, caps, budget):
    """argmin over per-layer choices j_l of sum_l misses[l, j_l] subject to sum_l caps[j_l] <= budget.

    misses: [layers, choices] int64; caps: [choices] int64 ascending. Returns [layers] int64 choice indices.
    Dynamic programme over (layer, slots used), O(layers x budget x choices); ties prefer fewer slots.
    """
    n_layers, n_choices = misses.shape
    inf = np.iinfo(np.int64).max
    best = np.full(budget + 1, inf, dtype=np.int64)
    best[0] = 0
    pick = np.full((n_layers, budget + 1), -1, dtype=np.int64)
    for i in range(n_layers):
        new = np.full(budget + 1, inf, dtype=np.int64)
        for b in range(budget + 1):
            if best[b] == inf:
                continue
            for j in range(n_choices):
                nb = b + caps[j]
                if nb > budget:
                    break
                v = best[b] + misses[i, j]
                if v < new[nb]:
                    new[nb] = v
                    pick[i, nb] = j
        best = new
    b = 0
    for c in range(budget + 1):
        if best[c] < best[b]:
            b = c
    out = np.empty(n_layers, dtype=np.int64)
    for i in range(n_layers - 1, -1, -1):
        j = pick[i, b]
        out[i] = j
        b -= caps[j]
    return out


# -- LRFU: a recency-weighted use count, one decay rate ------------------------------------------
@njit_inline
def log2_add(old, now):
    """``log2(2^old + 2^now)`` computed around the larger term (``old = -inf``: an empty sum, gives ``now``):
    LRFU's CRF update in the log domain, where the weights 2^(rate x group) grow instead of decaying."""
    if old == -np.inf:
        return now
    hi, lo = (old, now) if old > now else (now, old)
    return hi + np.log2(1.0 + 2.0 ** (lo - hi))


@njit
def lrfu(req, reset, n_items, capacity, lam):
    """LRFU (Lee et al., IEEE ToC 2001): every item's combined recency-frequency value is ``CRF(t) = sum over
    its past uses u of 2^(-lam (t - u))`` (t in groups); evict the cached item with the smallest CRF that the
    group does not need, ties by smallest slot. ``lam`` 0 is perfect LFU (counts), large ``lam`` tends to
    LRU. Values restart with each segment.

    Kept as ``key = log2 CRF(t) + lam t``, which orders items as CRF(t) does at any t and changes only on use
    (``key = log2(2^key + 2^(lam t))``), so it needs no decay pass. Eviction scans the capacity's slots
    (O(capacity) per miss: capacities are experts per layer, at most E).
    """
    return _lrfu(req, reset, n_items, capacity, lam, NO_WEIGHTS, np.empty(0, dtype=np.int64))


NO_WEIGHTS = np.empty((0, 0))  # `lrfu_run`'s log2 gate weights when every use counts 1 (plain LRFU)


@njit
def gate_lrfu(req, reset, n_items, capacity, lam, lw):
    """`lrfu` with each use counted by its gate weight: ``CRF(t) = sum over past uses u of w_u 2^(-lam (t -
    u))``, ``lw [groups, k]`` the log2 gate weight of each requested item (-inf for a weight of 0, which
    counts nothing)."""
    return _lrfu(req, reset, n_items, capacity, lam, lw, np.empty(0, dtype=np.int64))


@njit
def _lrfu(req, reset, n_items, capacity, lam, lw, per_group):
    """`lrfu` (`gate_lrfu` when ``lw`` has rows), also writing each group's demand misses to ``per_group
    [groups]`` when it is not empty."""
    key, cached, need, slots, sc = lrfu_state(n_items, capacity)
    lrfu_run(req, reset, 0, capacity, lam, lw, key, cached, need, slots, sc, per_group)
    return sc[:4].copy()


@njit
def lrfu_state(n_items, capacity):
    """A fresh LRFU cache for `lrfu_run`: ``(key, cached, need, slots, sc)``; ``sc[:4]`` the stats so far,
    ``sc[4]`` the number of cached items."""
    return (
        np.full(n_items, -np.inf),
        np.zeros(n_items, dtype=np.bool_),
        np.full(n_items, -1, dtype=np.int64),
        np.full(capacity, -1, dtype=np.int64),
        np.zeros(5, dtype=np.int64),
    )


@njit
def lrfu_run(req, reset, g0, capacity, lam, lw, key, cached, need, slots, sc, per_group):
    """`lrfu` over one window of a stream (first group: stream group `g0`, so the CRF clock runs on across
    windows) with the cache of `lrfu_state` carried from the previous window; each use weighs 2^lw (the
    window's rows of ``lw``, `gate_lrfu`), or 1 when ``lw`` has no rows."""
    g_n, k = req.shape
    hits, misses, size = sc[0], sc[1], sc[4]
    for gl in range(g_n):
        g = g0 + gl
        if reset[gl]:
            for i in range(size):
                cached[slots[i]] = False
            key[:] = -np.inf
            size = 0
        now = lam * g
        m0 = misses
        for j in range(k):
            need[req[gl, j]] = g
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
                s = _lrfu_victim(slots, capacity, key, need, g)
                cached[slots[s]] = False
            slots[s] = x
            cached[x] = True
        for j in range(k):
            x = req[gl, j]
            key[x] = log2_add(key[x], now + lw[gl, j] if lw.shape[0] else now)
        if per_group.shape[0]:
            per_group[gl] = misses - m0
    sc[0], sc[1], sc[4] = hits, misses, size


@njit
def adaptive_lrfu(req, reset, n_items, capacity, rates, decay):
    """LRFU whose decay rate follows the leader: one shadow LRFU cache per rate in ``rates`` replays the same
    requests; before each group the real cache takes the rate whose shadow has the fewest recent demand
    misses (each group's misses added to a score multiplied by ``decay`` per group; ties: the first rate)
    and evicts by that rate's CRF. Only past requests steer it (the shadows see what the real cache saw).
    Everything restarts with each segment. Cost: ``len(rates) + 1`` LRFU replays."""
    return _adaptive_lrfu(req, reset, n_items, capacity, rates, decay, np.empty(0, dtype=np.int64))


@njit
def _lrfu_victim(slots, capacity, key, need, g):
    """The slot of the smallest ``key`` among items the group ``g`` does not need (ties: smallest slot)."""
    s, low = -1, np.inf
    for i in range(capacity):
        y = slots[i]
        if need[y] != g and (s < 0 or key[y] < low):
            s, low = i, key[y]
    return s


@njit
def _adaptive_lrfu(req, reset, n_items, capacity, rates, decay, per_group):
    """`adaptive_lrfu`, also writing each group's demand misses to ``per_group [groups]`` when not empty."""
    key, need, cached, slots, size, score, sc = adaptive_lrfu_state(n_items, capacity, rates.shape[0])
    adaptive_lrfu_run(req, reset, 0, capacity, rates, decay, key, need, cached, slots, size, score, sc, per_group)
    return sc[:4].copy()


@njit
def adaptive_lrfu_state(n_items, capacity, m_n):
    """A fresh adaptive LRFU cache (and its `m_n` shadows) for `adaptive_lrfu_run`: ``(key, need, cached,
    slots, size, score, sc)``; ``sc[:4]`` the stats so far. Row `m_n` of ``cached``, ``slots``, ``size`` is
    the real cache."""
    return (
        np.full((m_n, n_items), -np.inf),
        np.full(n_items, -1, dtype=np.int64),
        np.zeros((m_n + 1, n_items), dtype=np.bool_),
        np.full((m_n + 1, capacity), -1, dtype=np.int64),
        np.zeros(m_n + 1, dtype=np.int64),
        np.zeros(m_n),
        np.zeros(4, dtype=np.int64),
    )


@njit
def adaptive_lrfu_run(req, reset, g0, capacity, rates, decay, key, need, cached, slots, size, score, sc, per_group):
    """`adaptive_lrfu` over one window of a stream (first group: stream group `g0`) with the caches of
    `adaptive_lrfu_state` carried from the previous window."""
    g_n, k = req.shape
    m_n = rates.shape[0]
    hits, misses = sc[0], sc[1]
    for gl in range(g_n):
        g = g0 + gl
        if reset[gl]:
            cached[:] = False
            key[:] = -np.inf
            size[:] = 0
            score[:] = 0.0
        m0 = misses
        for j in range(k):
            need[req[gl, j]] = g
        lead = int(np.argmin(score))
        for m in range(m_n + 1):
            kr = lead if m == m_n else m
            if m < m_n:
                score[m] *= decay
            for j in range(k):
                x = req[gl, j]
                if cached[m, x]:
                    if m == m_n:
                        hits += 1
                    continue
                if m == m_n:
                    misses += 1
                else:
                    score[m] += 1.0
                if size[m] < capacity:
                    s = size[m]
                    size[m] += 1
                else:
                    s = _lrfu_victim(slots[m], capacity, key[kr], need, g)
                    cached[m, slots[m, s]] = False
                slots[m, s] = x
                cached[m, x] = True
        for m in range(m_n):
            now = rates[m] * g
            for j in range(k):
                x = req[gl, j]
                key[m, x] = log2_add(key[m, x], now)
        if per_group.shape[0]:
            per_group[gl] = misses - m0
    sc[0], sc[1] = hits, misses
