"""A naive, event-by-event reference of `moescope.cache.timeline`'s prefetch kernel: Python lists for the
caches (most recent first), one clock, one FIFO link."""

from __future__ import annotations


def prefetch_timeline(experts, pred, distance, capacity, t_gpu, t_pcie, t_dense, latency, overlap):
    """Same inputs and outputs as `timeline._prefetch_timeline` (a list instead of an array)."""
    n_tok, n_lay, _ = experts.shape
    lru = [[] for _ in range(n_lay)]  # most recent first
    ready = [{} for _ in range(n_lay)]
    unused = [set() for _ in range(n_lay)]
    now = stall = link = busy = 0.0
    hits = misses = loads = wasted = 0

    def evict(layer, protect):
        nonlocal wasted
        victim = next(x for x in reversed(lru[layer]) if x not in protect)
        lru[layer].remove(victim)
        if victim in unused[layer]:
            unused[layer].discard(victim)
            wasted += 1

    for t in range(n_tok):
        for layer in range(n_lay):
            t0, wait, step_hits = now, now, 0
            group = [int(x) for x in experts[t, layer]]
            for x in group:
                if x in lru[layer]:
                    step_hits += 1
                    unused[layer].discard(x)
                    wait = max(wait, ready[layer][x])
                    lru[layer].remove(x)
                    lru[layer].insert(0, x)
            for x in group:
                if x in lru[layer]:
                    continue
                misses += 1
                busy += t_pcie[layer]
                link = max(link, t0) + latency + t_pcie[layer]
                wait = max(wait, link)
                if len(lru[layer]) == capacity[layer]:
                    evict(layer, set(group))
                lru[layer].insert(0, x)
                ready[layer][x] = link
            for x in reversed(group):  # as the `lru` policy: slot 0 ends most recent
                lru[layer].remove(x)
                lru[layer].insert(0, x)
            target = layer + distance
            if target < n_lay:
                wanted = [int(v) for v in pred[t, layer] if v >= 0]
                for x in wanted:  # resident predictions refreshed first, as hits are
                    if x in lru[target]:
                        lru[target].remove(x)
                        lru[target].insert(0, x)
                for x in wanted:
                    if x in lru[target]:
                        continue
                    loads += 1
                    busy += t_pcie[target]
                    link = max(link, t0) + latency + t_pcie[target]
                    if len(lru[target]) == capacity[target]:
                        evict(target, set())
                    lru[target].insert(0, x)
                    unused[target].add(x)
                    ready[target][x] = link
            compute = t_dense[layer] + step_hits * t_gpu[layer]
            if overlap:
                end = max(t0 + compute, wait)
                stall += max(0.0, wait - (t0 + compute))
            else:
                end = t0 + compute + (wait - t0)
                stall += wait - t0
            now = end
            hits += step_hits
    wasted += sum(len(u) for u in unused)
    return [now, stall, hits, misses, loads, wasted, busy]


def top_rows(src, valid, table, p):
    """`timeline._top_rows`: per token, the p experts with the highest summed table rows (score > 0; ties to
    the lower id), -1 padded; all -1 where not valid."""
    out = []
    for t in range(len(src)):
        row = [-1] * p
        if valid[t]:
            score = [sum(int(table[e][x]) for e in src[t]) for x in range(len(table[0]))]
            ranked = sorted((x for x in range(len(score)) if score[x] > 0), key=lambda x: (-score[x], x))[:p]
            row[: len(ranked)] = ranked
        out.append(row)
    return out


def ubatch_lru(lay, starts, stops, ubatch, capacity, n_exp, big):
    """`timeline._ubatch_lru` with sets: per micro-batch, the distinct experts and those not resident after the
    previous batch; the resident set is the `capacity` most recently used (ties to the lower id); the batches
    of `big` tokens or more and their distinct experts apart."""
    last = {}  # expert -> batch index of its last use
    resident: set[int] = set()
    distinct = loads = b = d_big = b_big = 0
    for a0, z in zip(starts, stops, strict=True):
        for a in range(int(a0), int(z), ubatch):
            rows = range(a, min(a + ubatch, int(z)))
            used = {int(x) for t in rows for x in lay[t]}
            distinct += len(used)
            loads += len(used - resident)
            if len(rows) >= big:
                d_big += len(used)
                b_big += 1
            for x in used:
                last[x] = b
            resident = set(sorted(last, key=lambda x: (-last[x], x))[:capacity])
            b += 1
    return distinct, loads, b, d_big, b_big
