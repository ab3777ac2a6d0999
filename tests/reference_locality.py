"""Slow, obviously-correct versions of the locality and prefetch kernels (`moescope.analyze.locality`,
`moescope.analyze.prefetch`), written with Python sets, dicts and loops over the definitions.

Every function takes ``experts: [tokens, layers, k]``, ``seq_starts: [sequences]`` and a layer index.
"""

from __future__ import annotations

import itertools
import math

import numpy as np


def sequences(seq_starts: np.ndarray, n_tokens: int) -> list[tuple[int, int]]:
    """[(start, end)] of every sequence."""
    bounds = [*[int(s) for s in seq_starts], n_tokens]
    return list(itertools.pairwise(bounds))


def token_sets(experts: np.ndarray, layer: int) -> list[set[int]]:
    return [{int(e) for e in experts[t, layer]} for t in range(experts.shape[0])]


def reuse(experts, seq_starts, layer) -> tuple[int, int]:
    """(sum over consecutive pairs in a sequence of |S_t ∩ S_{t-1}|, number of such pairs)."""
    sets = token_sets(experts, layer)
    overlap = pairs = 0
    for a, b in sequences(seq_starts, len(sets)):
        for t in range(a + 1, b):
            overlap += len(sets[t] & sets[t - 1])
            pairs += 1
    return overlap, pairs


def shuffled_expected(experts, seq_starts, layer) -> float:
    """Expected overlaps summed over sequences when each sequence's tokens are randomly permuted: each of
    the n - 1 consecutive positions holds a uniformly random ordered pair of distinct tokens."""
    sets = token_sets(experts, layer)
    total = 0.0
    for a, b in sequences(seq_starts, len(sets)):
        n = b - a
        if n < 2:
            continue
        pair_sum = sum(len(sets[i] & sets[j]) for i in range(a, b) for j in range(a, b) if i != j)
        total += (n - 1) * pair_sum / (n * (n - 1))
    return total


def shuffled_by_enumeration(experts, seq_starts, layer) -> float:
    """The same expectation by enumerating every permutation of every (short) sequence."""
    sets = token_sets(experts, layer)
    total = 0.0
    for a, b in sequences(seq_starts, len(sets)):
        perms = list(itertools.permutations(range(a, b)))
        acc = 0
        for p in perms:
            acc += sum(len(sets[p[i]] & sets[p[i - 1]]) for i in range(1, len(p)))
        total += acc / len(perms)
    return total


def independent(experts, layer) -> float:
    """Mean |S_i ∩ S_j| / k over all ordered pairs of tokens (i, j), i == j included."""
    sets = token_sets(experts, layer)
    k = experts.shape[2]
    total = sum(len(si & sj) for si in sets for sj in sets)
    return total / (len(sets) ** 2 * k)


def gaps(experts, seq_starts, layer) -> tuple[list[int], int]:
    """(gap of every warm selection: tokens back to the previous use in the sequence, cold selections)."""
    sets = token_sets(experts, layer)
    warm, cold = [], 0
    for a, b in sequences(seq_starts, len(sets)):
        for t in range(a, b):
            for e in sets[t]:
                back = next((t - u for u in range(t - 1, a - 1, -1) if e in sets[u]), None)
                if back is None:
                    cold += 1
                else:
                    warm.append(back)
    return warm, cold


def working_sets(experts, seq_starts, layer) -> list[tuple[int, int]]:
    """[(sequence length, distinct experts used in it)]."""
    sets = token_sets(experts, layer)
    return [(b - a, len(set().union(*sets[a:b]))) for a, b in sequences(seq_starts, len(sets))]


def window_sum(experts, seq_starts, layer, w) -> tuple[int, int]:
    """(distinct experts summed over every window of w consecutive tokens inside a sequence, windows)."""
    sets = token_sets(experts, layer)
    total = count = 0
    for a, b in sequences(seq_starts, len(sets)):
        for x in range(a, b - w + 1):
            total += len(set().union(*sets[x : x + w]))
            count += 1
    return total, count


def halves(seq_starts, n_tokens, part) -> list[tuple[int, int]]:
    """Token ranges of the train (first n // 2 tokens) or test (the rest) half of every sequence."""
    out = []
    for a, b in sequences(seq_starts, n_tokens):
        mid = a + (b - a) // 2
        out.append((a, mid) if part == "train" else (mid, b))
    return out


def tables(experts, seq_starts, n_experts, layer) -> dict[str, np.ndarray]:
    """Train-split counts [E], coact [E, E], transition [E, E] and cross (to layer + 1) [E, E]."""
    n_tok = experts.shape[0]
    counts = np.zeros(n_experts, dtype=np.int64)
    coact = np.zeros((n_experts, n_experts), dtype=np.int64)
    trans = np.zeros_like(coact)
    cross = np.zeros_like(coact)
    for a, b in halves(seq_starts, n_tok, "train"):
        for t in range(a, b):
            now = [int(e) for e in experts[t, layer]]
            for e in now:
                counts[e] += 1
                for f in now:
                    if f != e:
                        coact[e, f] += 1
                if t + 1 < b:
                    for f in experts[t + 1, layer]:
                        trans[e, int(f)] += 1
                if layer + 1 < experts.shape[1]:
                    for f in experts[t, layer + 1]:
                        cross[e, int(f)] += 1
    return {"counts": counts, "coact": coact, "transition": trans, "cross": cross}


def top(score: dict[int, float], budget: int) -> set[int]:
    """The `budget` experts with the highest score, ties to the lower id."""
    return set(sorted(score, key=lambda e: (-score[e], e))[:budget])


def predict(name: str, tab: dict[str, np.ndarray], current: list[int], budget: int) -> set[int]:
    """The set a predictor names for the next token, from the current token's experts."""
    n = tab["counts"].size
    freq = {e: int(tab["counts"][e]) for e in range(n)}
    if name == "lfu":
        return top(freq, budget)
    if name == "last":
        order = sorted(current, key=lambda e: (-freq[e], e))
        order += [e for e in sorted(range(n), key=lambda e: (-freq[e], e)) if e not in current]
        return set(order[:budget])
    table = {"coact": tab["coact"], "transition": tab["transition"]}[name]
    return top({f: sum(int(table[e, f]) for e in current) for f in range(n)}, budget)


def prefetch_hits(experts, seq_starts, n_experts, layer, name, budget) -> tuple[int, int]:
    """(hits, test pairs) of predictor `name` at `budget`: pairs inside the test half of every sequence."""
    tab = tables(experts, seq_starts, n_experts, layer)
    hits = pairs = 0
    for a, b in halves(seq_starts, experts.shape[0], "test"):
        for t in range(a, b - 1):
            pred = predict(name, tab, [int(e) for e in experts[t, layer]], budget)
            hits += len(pred & {int(e) for e in experts[t + 1, layer]})
            pairs += 1
    return hits, pairs


def cross_hits(experts, seq_starts, n_experts, layer) -> tuple[int, int, int]:
    """(hits of the cross-layer top-k, hits of layer + 1's k most frequent train experts, test tokens)."""
    k = experts.shape[2]
    tab = tables(experts, seq_starts, n_experts, layer)
    nxt = tables(experts, seq_starts, n_experts, layer + 1)["counts"]
    freq_pick = top({e: int(nxt[e]) for e in range(n_experts)}, k)
    hits = freq = tokens = 0
    for a, b in halves(seq_starts, experts.shape[0], "test"):
        for t in range(a, b):
            score = {f: sum(int(tab["cross"][int(e), f]) for e in experts[t, layer]) for f in range(n_experts)}
            actual = {int(e) for e in experts[t, layer + 1]}
            hits += len(top(score, k) & actual)
            freq += len(freq_pick & actual)
            tokens += 1
    return hits, freq, tokens


def median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def isclose(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
