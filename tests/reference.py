"""Slow, obviously-correct versions of the fast kernels, for comparison in tests."""

from __future__ import annotations

import itertools

import numpy as np


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
