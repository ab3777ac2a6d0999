"""Slow, obviously-correct versions of the placement kernels (`moescope.place`), for comparison in tests.

Plain Python loops over lists and sets; each function names the fast function it checks.
"""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np


def route(table: np.ndarray, experts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference of `moescope.place.metrics.route`: (hist [layers, min(k, D) + 1], load [layers, D]).

    Per token: every device subset holding all its experts is a candidate; the winner has the fewest
    devices, then the least summed current load of each expert's least-loaded copy in it, then the
    smallest sorted tuple of devices. Each expert is served by its least-loaded copy in the winner (lower
    device on ties); loads are updated after the token.
    """
    n_lay, n_dev, _ = table.shape
    n_tok, _, k = experts.shape
    hist = np.zeros((n_lay, min(k, n_dev) + 1), dtype=np.int64)
    load = np.zeros((n_lay, n_dev), dtype=np.int64)
    for layer in range(n_lay):
        holders: dict[int, list[int]] = {}
        for d in range(n_dev):
            for e in table[layer, d].tolist():
                if e >= 0:
                    holders.setdefault(e, []).append(d)
        cur = [0] * n_dev
        for t in range(n_tok):
            row = [int(e) for e in experts[t, layer]]

            best = None
            for size in range(1, n_dev + 1):
                for chosen in itertools.combinations(range(n_dev), size):
                    if all(any(d in chosen for d in holders[e]) for e in row):
                        key = (size, sum(cur[_serve(holders[e], chosen, cur)] for e in row), chosen)
                        best = key if best is None or key < best else best
                if best is not None:
                    break
            chosen = best[2]
            hist[layer, len(chosen)] += 1
            picks = [_serve(holders[e], chosen, cur) for e in row]
            for d in picks:
                cur[d] += 1
        load[layer] = cur
    return hist, load


def _serve(holding: list[int], chosen: tuple[int, ...], cur: list[int]) -> int:
    """The least-loaded device of `chosen` holding the expert (lower device on ties)."""
    return min((d for d in holding if d in chosen), key=lambda d: (cur[d], d))


def token_sets(experts: np.ndarray, layer: int, tw: np.ndarray | None = None) -> Counter:
    """Reference of `moescope.place.refine.token_sets`: Counter of sorted expert tuples -> summed token weight."""
    out: Counter = Counter()
    for t in range(experts.shape[0]):
        out[tuple(sorted(int(e) for e in experts[t, layer]))] += 1 if tw is None or len(tw) == 0 else int(tw[t])
    return out


def objective(sets: np.ndarray, w: np.ndarray, assign: np.ndarray) -> int:
    """Reference of `moescope.place.refine.objective`: sum over sets of weight x distinct devices."""
    return sum(int(w[h]) * len({int(assign[e]) for e in sets[h]}) for h in range(sets.shape[0]))


def loads(experts: np.ndarray, n_experts: int) -> np.ndarray:
    """Reference of `TrainData.load`: [layers, E] selections."""
    out = np.zeros((experts.shape[1], n_experts), dtype=np.int64)
    for t in range(experts.shape[0]):
        for layer in range(experts.shape[1]):
            for e in experts[t, layer]:
                out[layer, int(e)] += 1
    return out


def coact(experts: np.ndarray, n_experts: int) -> np.ndarray:
    """Reference of `TrainData.coact`: [layers, E, E] tokens choosing both (selections on the diagonal)."""
    out = np.zeros((experts.shape[1], n_experts, n_experts), dtype=np.int64)
    for t in range(experts.shape[0]):
        for layer in range(experts.shape[1]):
            row = [int(e) for e in experts[t, layer]]
            for i in row:
                for j in row:
                    out[layer, i, j] += 1
    return out


def drift_cov(experts: np.ndarray, seq_starts: np.ndarray, n_experts: int) -> np.ndarray:
    """Reference of `TrainData.drift_cov`: sum over sequences (2+ tokens) of d d^T, d = second-half minus
    first-half selections of the sequence, per layer."""
    n_tok, n_lay, _ = experts.shape
    bounds = [*seq_starts.tolist(), n_tok]
    out = np.zeros((n_lay, n_experts, n_experts))
    for a, b in itertools.pairwise(bounds):
        if b - a < 2:
            continue
        mid = a + (b - a) // 2
        for layer in range(n_lay):
            d = [0.0] * n_experts
            for t in range(a, b):
                for e in experts[t, layer]:
                    d[int(e)] += 1.0 if t >= mid else -1.0
            for i in range(n_experts):
                for j in range(n_experts):
                    out[layer, i, j] += d[i] * d[j]
    return out


def lpt(load: list[float], n_devices: int, slots: int) -> list[int]:
    """Reference of `moescope.place.methods._lpt`: experts by descending load (stable), each to the
    least-loaded device with a free slot (lower device on ties)."""
    order = sorted(range(len(load)), key=lambda e: -load[e])
    dev_load = [0.0] * n_devices
    count = [0] * n_devices
    out = [-1] * len(load)
    for e in order:
        d = min((d for d in range(n_devices) if count[d] < slots), key=lambda d: (dev_load[d], d))
        out[e] = d
        dev_load[d] += load[e]
        count[d] += 1
    return out


def load_cv(dev_load: list[float]) -> float:
    """Population std / mean of one layer's device loads."""
    n = len(dev_load)
    mean = sum(dev_load) / n
    var = sum((x - mean) ** 2 for x in dev_load) / n
    return (var**0.5) / mean if mean > 0 else 0.0


def label_loads(experts: np.ndarray, seq_starts: np.ndarray, seq_labels: list[str], n_experts: int) -> dict:
    """{label: [layers, E] selections by the tokens of that label's sequences}, token by token."""
    ends = [*seq_starts[1:].tolist(), experts.shape[0]]
    out: dict = {}
    for lo, hi, lab in zip(seq_starts, ends, seq_labels, strict=True):
        table = out.setdefault(lab, np.zeros((experts.shape[1], n_experts), dtype=np.int64))
        for t in range(lo, hi):
            for layer in range(experts.shape[1]):
                for e in experts[t, layer]:
                    table[layer, e] += 1
    return out


def load_correlation(a: np.ndarray, b: np.ndarray) -> tuple[float | None, int]:
    """Mean of np.corrcoef over the layers where neither row is constant."""
    rs = [np.corrcoef(x, y)[0, 1] for x, y in zip(a, b, strict=True) if np.ptp(x) > 0 and np.ptp(y) > 0]
    return (float(np.mean(rs)) if rs else None), len(rs)
