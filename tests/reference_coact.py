"""Slow, obviously-correct versions of `moescope.analyze.coact`'s fast paths, for comparison in tests.

Plain Python ints, lists, sets and loops. The two nulls replay the kernels' algorithms (Floyd's sampling;
Fisher-Yates deal + cursor repair) driven by the same counter-based uniforms (`reference.hash_uniform`),
so they must agree exactly. `best_partitions` enumerates every partition with the given group sizes.
"""

from __future__ import annotations

import itertools

import numpy as np

from reference import hash_uniform


def coact_counts(experts: np.ndarray, n_experts: int) -> np.ndarray:
    """[E, E] or [layers, E, E]: tokens selecting both i and j; selections of i on the diagonal."""
    ex = experts[:, None, :] if experts.ndim == 2 else experts
    out = [[[0] * n_experts for _ in range(n_experts)] for _ in range(ex.shape[1])]
    for t in range(ex.shape[0]):
        for layer in range(ex.shape[1]):
            ids = [int(e) for e in ex[t, layer]]
            for i in ids:
                for j in ids:
                    out[layer][i][j] += 1
    arr = np.array(out, dtype=np.int64)
    return arr[0] if experts.ndim == 2 else arr


def counts_of_sets(sets: list[set[int]], n_experts: int) -> np.ndarray:
    """[E, E] co-activation counts of per-token expert sets."""
    out = np.zeros((n_experts, n_experts), dtype=np.int64)
    for s in sets:
        for i in s:
            for j in s:
                out[i, j] += 1
    return out


def shuffle_null(n_sel: list[int], n_tokens: int, keys: list[int]) -> np.ndarray:
    """Each expert e on the subset of n_sel[e] tokens Floyd's algorithm picks with stream keys[e]."""
    sets: list[set[int]] = [set() for _ in range(n_tokens)]
    for e, n in enumerate(n_sel):
        chosen: set[int] = set()
        for d in range(n):
            j = n_tokens - n + d
            t = int(hash_uniform(int(keys[e]), d) * (j + 1))
            if t in chosen:
                t = j
            chosen.add(t)
        assert len(chosen) == n
        for t in chosen:
            sets[t].add(e)
    return counts_of_sets(sets, len(n_sel))


def swap_null(n_sel: list[int], k: int, keys: list[int]) -> np.ndarray | None:
    """The N k selections dealt by an inside-out Fisher-Yates shuffle (stream keys[0]) into N tokens of k
    slots; a slot repeating its token's expert is swapped with the next slot, from a cursor (start from
    keys[1]), whose swap repeats nothing. None when a repeat finds no partner in a whole sweep."""
    values = [e for e, n in enumerate(n_sel) for _ in range(n)]
    n_stub = len(values)
    stubs = [-1] * n_stub
    for i, value in enumerate(values):  # inside-out Fisher-Yates: a uniform permutation of `values`
        j = int(hash_uniform(int(keys[0]), i) * (i + 1))
        stubs[i] = stubs[j]
        stubs[j] = value
    cursor = int(hash_uniform(int(keys[1]), 0) * n_stub)
    for t in range(n_stub // k):
        for a in range(k):
            e = stubs[t * k + a]
            tries = 0
            while e in stubs[t * k : t * k + a]:
                if tries == n_stub:
                    return None
                tries += 1
                cursor = (cursor + 1) % n_stub
                u = cursor // k
                f = stubs[cursor]
                others = stubs[t * k : t * k + a] + stubs[t * k + a + 1 : t * k + k]
                if u != t and f not in others and e not in stubs[u * k : u * k + k]:
                    stubs[cursor], stubs[t * k + a] = e, f
                    e = f
    sets = [set(stubs[t * k : t * k + k]) for t in range(n_stub // k)]
    assert all(len(s) == k for s in sets)
    return counts_of_sets(sets, len(n_sel))


def gain(counts: np.ndarray, n_tokens: int, labels: list[int]) -> tuple[float, float, float, float]:
    """(gain, intra share observed, intra share expected, pair ratio) by loops over pairs i < j."""
    n = [int(counts[i, i]) for i in range(counts.shape[0])]
    obs_all = obs_in = exp_all = exp_in = 0.0
    for i in range(len(n)):
        for j in range(i + 1, len(n)):
            x = n[i] * n[j] / n_tokens
            obs_all += int(counts[i, j])
            exp_all += x
            if labels[i] == labels[j]:
                obs_in += int(counts[i, j])
                exp_in += x
    share_obs, share_exp = obs_in / obs_all, exp_in / exp_all
    return share_obs / share_exp, share_obs, share_exp, obs_all / exp_all


def objective(counts: np.ndarray, labels: list[int]) -> float:
    """Sum over intra-group pairs i < j of C_ij / sum C - n_i n_j / sum n n (sums over i != j)."""
    size = counts.shape[0]
    n = [int(counts[i, i]) for i in range(size)]
    pairs = [(i, j) for i in range(size) for j in range(size) if i != j]
    c_tot = sum(int(counts[i, j]) for i, j in pairs)
    x_tot = sum(n[i] * n[j] for i, j in pairs)
    return sum(
        int(counts[i, j]) / c_tot - n[i] * n[j] / x_tot
        for i in range(size)
        for j in range(i + 1, size)
        if labels[i] == labels[j]
    )


def partitions(items: list[int], sizes: list[int]):
    """Every partition of `items` into unlabelled groups with these sizes (a multiset), each listed once:
    the group holding the smallest item left is chosen first, with each size it can have."""
    if not sizes:
        yield []
        return
    first, rest = items[0], items[1:]
    for size in sorted(set(sizes)):
        left_sizes = list(sizes)
        left_sizes.remove(size)
        for others in itertools.combinations(rest, size - 1):
            left = [x for x in rest if x not in others]
            for tail in partitions(left, left_sizes):
                yield [[first, *others], *tail]


def labels_of(groups: list[list[int]], n: int) -> list[int]:
    labels = [0] * n
    for g, members in enumerate(groups):
        for e in members:
            labels[e] = g
    return labels


def best_partitions(counts: np.ndarray, sizes: list[int]) -> tuple[float, list[list[int]]]:
    """The best objective over all partitions with these group sizes, and the labels reaching it."""
    n = counts.shape[0]
    scored = [(objective(counts, labels_of(p, n)), labels_of(p, n)) for p in partitions(list(range(n)), sizes)]
    best = max(s for s, _ in scored)
    return best, [lab for s, lab in scored if s >= best - 1e-12]


def adjusted_rand_index(a: list[int], b: list[int]) -> float:
    """Hubert-Arabie adjusted Rand index of two labelings (1 = the same partition)."""

    def pairs(x: int) -> float:
        return x * (x - 1) / 2

    table: dict[tuple[int, int], int] = {}
    for x, y in zip(a, b, strict=True):
        table[(x, y)] = table.get((x, y), 0) + 1
    rows: dict[int, int] = {}
    cols: dict[int, int] = {}
    for (x, y), c in table.items():
        rows[x] = rows.get(x, 0) + c
        cols[y] = cols.get(y, 0) + c
    index = sum(pairs(c) for c in table.values())
    sum_rows, sum_cols = sum(pairs(c) for c in rows.values()), sum(pairs(c) for c in cols.values())
    expected = sum_rows * sum_cols / pairs(len(a))
    top = (sum_rows + sum_cols) / 2
    return 1.0 if top == expected else (index - expected) / (top - expected)
