"""The co-activation nulls: a layer's routing with every pairing destroyed and each expert's selections kept.

Two nulls (the trade-off is in `moescope.analyze.coact`'s docstring): ``"swap"`` deals the ``N k``
selections into N tokens of exactly k distinct experts (a configuration model, then degree-preserving swaps
for repeats); ``"shuffle"`` moves each expert's selections to a uniform random subset of tokens of its
size, independently (Floyd's algorithm). Both are numba kernels over many null layers at once, drawing
from counter-based streams (`moescope._rng`), so a null layer depends only on its seed and marginals.
This module only builds null co-activation counts; clustering and verdicts live in `coact`.

    >>> nulls = null_counts(n_sel, n_tokens, k, stream_keys(seed, layer_id, 0, 0, E), "swap")
"""

from __future__ import annotations

import numpy as np

from moescope._jit import njit, njit_parallel, prange
from moescope._rng import uniform as _uniform
from moescope.errors import UsageError

_DEBRUIJN, _ONE, _S58 = np.uint64(0x03F79D71B4CB0A89), np.uint64(1), np.uint64(58)
_DEBRUIJN_INDEX = np.zeros(64, dtype=np.int64)  # bit index of a power of two p: [(p * _DEBRUIJN) >> 58]
_DEBRUIJN_INDEX[[((1 << b) * int(_DEBRUIJN) % 2**64) >> 58 for b in range(64)]] = np.arange(64)


def _symmetrize(upper: np.ndarray) -> np.ndarray:
    """[..., E, E] full symmetric counts from what the kernels fill: each unordered pair counted once at
    ``[i, j]`` or ``[j, i]``, selections on the diagonal."""
    diag = np.einsum("...ii->...i", upper).copy()
    full = upper + np.swapaxes(upper, -1, -2)
    idx = np.arange(upper.shape[-1])
    full[..., idx, idx] = diag
    return full


@njit
def _shuffled_pairs(n_sel, n_tokens, keys, out):
    """One shuffle null: add the co-selections of a shuffled layer to ``out [E, E]`` (pairs once, at [i, j] or [j, i]).

    n_sel : [E] int64 selections of each expert (each <= n_tokens); keys : [E] uint64 random stream of each
    expert. Expert e lands on a uniform random n_sel[e]-subset of the tokens (Floyd's algorithm: draw d
    picks t uniform in 0..j, j = N - n + d, or j itself if t was taken), independently of other experts.
    The shuffled layer is a bitset ``[E / 64, N]`` (bit e of token t: e holds t), which also serves as
    Floyd's "taken" marks: O(N E / 8) bytes, one random access per draw.
    """
    n_exp = n_sel.shape[0]
    n_words = (n_exp + 63) // 64
    bits = np.zeros((n_words, n_tokens), dtype=np.uint64)
    for e in range(n_exp):
        row, bit = bits[e >> 6], _ONE << np.uint64(e & 63)
        n = n_sel[e]
        for d in range(n):
            j = n_tokens - n + d
            t = int(_uniform(keys[e], d) * (j + 1))
            if row[t] & bit:
                t = j
            row[t] |= bit
    members = np.empty(n_exp, dtype=np.int64)
    for t in range(n_tokens):
        m = 0
        for w in range(n_words):
            x = bits[w, t]
            while x:
                low = x & (~x + _ONE)
                members[m] = 64 * w + _DEBRUIJN_INDEX[(low * _DEBRUIJN) >> _S58]
                m += 1
                x ^= low
        for a in range(m):
            i = members[a]
            out[i, i] += 1
            for b in range(a + 1, m):
                out[i, members[b]] += 1


@njit
def _swapped_pairs(n_sel, k, keys, stubs, out):
    """One swap null: add the co-selections of a layer re-dealt with fixed set sizes to ``out [E, E]``.

    n_sel : [E] int64 selections (summing to N k); keys : [E] uint64 (keys[0] deals, keys[1] repairs);
    stubs : [N k] scratch (uint8 when E <= 256: half the cache misses of int16). The selections are dealt
    at random into N tokens of k slots (an inside-out Fisher-Yates shuffle of the sorted selections: the
    configuration model), then each slot repeating an expert of its token is swapped with the next slot
    (of another token) where the swap repeats nothing (a degree-preserving edge switch). Returns 0, or
    -1 when a repeat found no partner in a whole sweep (near-saturated experts).
    """
    n_stub = stubs.shape[0]
    n_tokens = n_stub // k
    value, left = 0, n_sel[0]  # the i-th selection in expert order is `value`
    for i in range(n_stub):
        while left == 0:
            value += 1
            left = n_sel[value]
        left -= 1
        j = int(_uniform(keys[0], i) * (i + 1))
        stubs[i] = stubs[j]
        stubs[j] = value
    # the partner of a repeat is the slot under a cursor that walks the (already random) deal from a random
    # start: as random as a fresh draw, and sequential in memory (a random slot costs a cache miss)
    cursor = int(_uniform(keys[1], 0) * n_stub)
    for t in range(n_tokens):
        row = t * k
        for a in range(k):
            e = stubs[row + a]
            dup = False
            for c in range(a):
                dup = dup or stubs[row + c] == e
            tries = 0
            while dup:
                if tries == n_stub:
                    return -1
                tries += 1
                cursor = cursor + 1 if cursor + 1 < n_stub else 0
                u = cursor // k
                if u == t:
                    continue
                f = stubs[cursor]
                ok = True
                for c in range(k):
                    ok = ok and (c == a or stubs[row + c] != f) and stubs[u * k + c] != e
                if ok:
                    stubs[cursor], stubs[row + a] = e, f
                    dup = False
    for t in range(n_tokens):
        row = t * k
        for a in range(k):
            i = stubs[row + a]
            out[i, i] += 1
            for b in range(a + 1, k):
                out[i, stubs[row + b]] += 1
    return 0


@njit_parallel
def _null_pair_counts(n_sel, n_tokens, k, keys, stubs, out, status):
    """Nulls side by side: ``n_sel [m, E]``, ``keys [m, E]`` uint64, ``out [m, E, E]`` (pairs once);
    ``stubs [m, N k]``: scratch for fixed set sizes (`_swapped_pairs`), or ``[m, 0]`` for independent
    experts (`_shuffled_pairs`); ``status [m]`` gets each swap null's return code."""
    for q in prange(n_sel.shape[0]):
        if stubs.shape[1] > 0:
            status[q] = _swapped_pairs(n_sel[q], k, keys[q], stubs[q], out[q])
        else:
            _shuffled_pairs(n_sel[q], n_tokens, keys[q], out[q])


def _stream_keys(seed: int, layer_id: int, replicate: int, purpose: int, n: int) -> np.ndarray:
    """[n] uint64 independent stream keys for (seed, model layer id, replicate, purpose)."""
    return np.random.SeedSequence([seed, layer_id, replicate, purpose]).generate_state(n, dtype=np.uint64)


def _null_counts(n_sel: np.ndarray, n_tokens: int, k: int, keys: np.ndarray, null: str) -> np.ndarray:
    """[m, E, E] int64 symmetric null counts; ``n_sel [m, E]`` int64, ``keys [m, E]`` uint64."""
    out = np.zeros((n_sel.shape[0], n_sel.shape[1], n_sel.shape[1]), dtype=np.int64)
    status = np.zeros(n_sel.shape[0], dtype=np.int64)
    width = n_tokens * k if null == "swap" else 0
    stubs = np.empty((n_sel.shape[0], width), dtype=np.uint8 if n_sel.shape[1] <= 256 else np.int16)
    with np.errstate(over="ignore"):  # the uint64 hash wraps on purpose (numpy warns only without JIT)
        _null_pair_counts(n_sel, n_tokens, k, keys, stubs, out, status)
    if status.min() < 0:
        raise UsageError(
            "the swap null could not deal the selections into distinct experts per token (some experts are "
            "chosen by nearly every token); use the shuffle null (--null shuffle)"
        )
    return _symmetrize(out)
