"""Slow, obviously-correct versions of the queue-based cache kernels (`moescope.cache.kernels_queue`):
SIEVE, S3-FIFO, 2Q and SLRU.

Each queue is a plain Python list, oldest first; a group's items are protected from eviction by a membership
test. Each ``*_groups`` function returns the demand misses of every group; ``cache_*`` packages them as
(hits, demand_misses, 0, 0) like the references in tests/reference.py.
"""

from __future__ import annotations

from reference import _segments


def _stats(req, per_group: list[int]) -> tuple[int, int, int, int]:
    misses = sum(per_group)
    return req.size - misses, misses, 0, 0


def _ghost_add(ghost: list[int], y: int, size: int) -> None:
    """A ghost FIFO of `size` ids: add y at the new end, drop the oldest beyond size."""
    if size > 0:
        ghost.append(y)
        if len(ghost) > size:
            ghost.pop(0)


# -- SIEVE --------------------------------------------------------------------------------------------
def sieve_groups(req, reset, capacity) -> list[int]:
    """SIEVE: new items at the new end unvisited, a hit sets visited; the hand walks from the old end to the
    new end (wrapping), clears visited bits, skips the group's items untouched, and evicts the first other
    item; it then rests on the item after the victim (the old end when the victim was the newest)."""
    out: list[int] = []
    for seg in _segments(req, reset):
        queue: list[int] = []  # oldest first
        visited: dict[int, bool] = {}
        hand = 0  # an index into queue; 0 (the old end) after a wrap
        for group in seg:
            n = 0
            for x in group:
                if x in queue:
                    visited[x] = True
            for x in group:
                if x in queue:
                    continue
                n += 1
                if len(queue) == capacity:
                    i = hand
                    while queue[i] in group or visited[queue[i]]:
                        if queue[i] not in group:
                            visited[queue[i]] = False
                        i = (i + 1) % len(queue)
                    queue.pop(i)
                    hand = i if i < len(queue) else 0
                queue.append(x)
                visited[x] = False
            out.append(n)
    return out


def cache_sieve(req, reset, capacity):
    return _stats(req, sieve_groups(req, reset, capacity))


# -- S3-FIFO ------------------------------------------------------------------------------------------
def _s3_evict_small(small, main, ghost, freq, group, ghost_size) -> bool:
    """Small's oldest items: frequency >= 2 to main, else (not in the group) to the ghost, and stop."""
    i = 0
    while i < len(small):
        y = small[i]
        if freq[y] >= 2:
            small.pop(i)
            main.append(y)
            freq[y] = 0
        elif y in group:
            i += 1
        else:
            small.pop(i)
            _ghost_add(ghost, y, ghost_size)
            return True
    return False


def _s3_evict_main(main, freq, group) -> bool:
    """Main's oldest items: frequency >= 1 reinserted with one less, else (not in the group) evicted, and stop."""
    i = 0
    while i < len(main):
        y = main[i]
        if freq[y] >= 1:
            main.append(main.pop(i))
            freq[y] -= 1
        elif y in group:
            i += 1
        else:
            main.pop(i)
            return True
    return False


def s3fifo_groups(req, reset, capacity) -> list[int]:
    """S3-FIFO as libCacheSim's S3FIFO.c: small FIFO (capacity // 10, at least 1), main FIFO (the rest),
    ghost FIFO (9 * capacity // 10 ids), frequencies capped at 3 (a hit adds 1).

    A miss on a ghost id goes to main; other misses go to small (to main while small is full before the
    first eviction). Eviction: from main if main exceeds its size or small is empty, else from small.
    Small: its oldest item moves to main (frequency 0) if its frequency >= 2, else it is evicted to the ghost.
    Main: its oldest item is reinserted with frequency - 1 if its frequency >= 1, else evicted. Group rule:
    both walks pass over the group's items that they would evict; a walk that evicts nothing hands over to
    the other queue.
    """
    small_size = max(1, capacity // 10)
    main_size = capacity - small_size
    ghost_size = 9 * capacity // 10
    out: list[int] = []
    for seg in _segments(req, reset):
        small: list[int] = []
        main: list[int] = []
        ghost: list[int] = []
        freq: dict[int, int] = {}
        has_evicted = False

        for group in seg:
            n = 0
            for x in group:
                if x in small or x in main:
                    freq[x] = min(freq[x] + 1, 3)
            for x in group:
                if x in small or x in main:
                    continue
                n += 1
                ghost_hit = x in ghost
                if ghost_hit:
                    ghost.remove(x)
                while len(small) + len(main) >= capacity:
                    has_evicted = True
                    if len(main) > main_size or not small:
                        if not _s3_evict_main(main, freq, group):
                            _s3_evict_small(small, main, ghost, freq, group, ghost_size)
                    elif not _s3_evict_small(small, main, ghost, freq, group, ghost_size):
                        _s3_evict_main(main, freq, group)
                if ghost_hit or (not has_evicted and len(small) >= small_size):
                    main.append(x)
                else:
                    small.append(x)
                freq[x] = 0
            out.append(n)
    return out


def cache_s3fifo(req, reset, capacity):
    return _stats(req, s3fifo_groups(req, reset, capacity))


# -- 2Q -----------------------------------------------------------------------------------------------
def twoq_groups(req, reset, capacity) -> list[int]:
    """2Q as libCacheSim's TwoQ.c: Ain FIFO (capacity // 4, at least 1), Am LRU (the rest), Aout ghost FIFO
    (capacity // 2 ids, at least 1). A hit in Ain changes nothing; a hit in Am makes it most recent. A miss
    on an Aout id goes to Am (evicting Am's least recent while Am is at its size), other misses to Ain.
    Eviction: Ain's oldest to Aout while Ain exceeds its size, else Am's least recent. Group rule: every
    victim is the oldest (least recent) item the group does not need; a queue with none hands over to the
    other (Am's own eviction is skipped then)."""
    ain_size = max(1, capacity // 4)
    am_size = capacity - ain_size
    aout_size = max(1, capacity // 2)
    out: list[int] = []
    for seg in _segments(req, reset):
        ain: list[int] = []  # oldest first
        am: list[int] = []  # least recent first
        aout: list[int] = []

        def first_free(lst, group):
            return next((y for y in lst if y not in group), None)

        for group in seg:
            n = 0
            for x in group:
                if x in am:
                    am.remove(x)
                    am.append(x)
            for x in group:
                if x in ain or x in am:
                    continue
                n += 1
                ghost_hit = x in aout
                if ghost_hit:
                    aout.remove(x)
                while len(ain) + len(am) >= capacity:
                    y = first_free(ain, group) if len(ain) > ain_size else None
                    if y is not None:
                        ain.remove(y)
                        _ghost_add(aout, y, aout_size)
                        continue
                    y = first_free(am, group)
                    if y is not None:
                        am.remove(y)
                        continue
                    y = first_free(ain, group)
                    ain.remove(y)
                    _ghost_add(aout, y, aout_size)
                if ghost_hit:
                    while len(am) >= am_size:
                        y = first_free(am, group)
                        if y is None:
                            break
                        am.remove(y)
                    am.append(x)
                else:
                    ain.append(x)
            out.append(n)
    return out


def cache_twoq(req, reset, capacity):
    return _stats(req, twoq_groups(req, reset, capacity))


# -- SLRU ---------------------------------------------------------------------------------------------
def _level(segs: list[list[int]], x: int) -> int | None:
    """The segment holding x, or None."""
    return next((i for i, s in enumerate(segs) if x in s), None)


def slru_groups(req, reset, capacity, n_seg: int = 4) -> list[int]:
    """Segmented LRU as libCacheSim's SLRU.c (4 segments of capacity // 4; segment 0 also takes the rest).
    A hit moves an item to the most recent end of the next segment up (of its own in the top one); a segment
    over its size then demotes its least recent item to the most recent end of the one below. A miss evicts
    the least recent item, of the lowest segment, that the group does not need, and enters the lowest
    segment with room."""
    sizes = [capacity - (n_seg - 1) * (capacity // n_seg)] + [capacity // n_seg] * (n_seg - 1)
    out: list[int] = []
    for seg in _segments(req, reset):
        segs: list[list[int]] = [[] for _ in range(n_seg)]  # each least recent first

        for group in seg:
            n = 0
            for x in group:
                i = _level(segs, x)
                if i is None:
                    continue
                segs[i].remove(x)
                up = min(i + 1, n_seg - 1)
                segs[up].append(x)
                if len(segs[up]) > sizes[up]:
                    segs[up - 1].append(segs[up].pop(0))
            for x in group:
                if _level(segs, x) is not None:
                    continue
                n += 1
                if sum(len(s) for s in segs) == capacity:
                    victim = next(y for s in segs for y in s if y not in group)
                    segs[_level(segs, victim)].remove(victim)
                segs[next(i for i in range(n_seg) if len(segs[i]) < sizes[i])].append(x)
            out.append(n)
    return out


def cache_slru(req, reset, capacity):
    return _stats(req, slru_groups(req, reset, capacity))


REFERENCES = {"sieve": cache_sieve, "s3-fifo": cache_s3fifo, "2q": cache_twoq, "slru": cache_slru}
"""Policy name -> reference, each ``(req, reset, capacity) -> (hits, demand_misses, 0, 0)``."""
PER_GROUP = {"sieve": sieve_groups, "s3-fifo": s3fifo_groups, "2q": twoq_groups, "slru": slru_groups}
"""Policy name -> reference of each group's demand misses, ``(req, reset, capacity) -> list[int]``."""
