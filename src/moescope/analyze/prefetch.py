"""Next-token prefetch and cross-layer prediction, learned on the train split and scored on the test split.

The split is the package's (`moescope.slicing.split_bounds`): every sequence's first half (``n // 2`` tokens)
is *train*, the rest *test*; a pair of consecutive tokens counts only when both lie in the same half of the
same sequence (the pair straddling the midpoint is in neither). Nothing learned here ever sees a test token.

Learned tables, per layer (all counts over train tokens, additive over chunks of whole sequences):

- ``counts[e]``: selections of expert ``e``;
- ``coact[e, e']``: tokens selecting both ``e`` and ``e' != e`` (diagonal 0);
- ``transition[e, e']``: consecutive train pairs ``(t, t+1)`` with ``e`` in ``S_t`` and ``e'`` in ``S_{t+1}``;
- ``cross[e, e']`` (layer ``l`` to the next entry ``l+1`` of the trace's layer axis): train tokens selecting
  ``e`` at ``l`` and ``e'`` at ``l+1``.

A predictor is a linear scorer built from one layer's tables (the registry `PREDICTORS`)::

    score[e'] = base[e'] + self_weight * [e' in S_t] + sum over e in S_t of rows[e, e']

and predicts the ``B`` highest-scoring experts (ties: lower expert id first). Its hit rate at budget ``B``
is ``|predicted ∩ S_{t+1}| / k`` averaged over test pairs; chance is ``B / E``. Hits are counted without
sorting: the rank of a target expert is the number of experts with a higher (score, -id) key, and the
target is a hit at every budget above its rank, so one pass scores every budget. Scoring costs ``O(k E)``
per token for predictors with rows (co-activation, transition, cross-layer; integer keys, int32 when the
counts allow, vectorised), ``O(k^2)`` for ``last`` and ``O(k)`` for static ones (LFU).

No I/O; no oracle predictors (every predictor here could run online). The LRU stack distance and cache
simulation live elsewhere.

    >>> tables = learn_tables(trace)
    >>> hits = hit_counts(trace, tables, budgets=(8, 16), predictors=("lfu", "coact"))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from moescope._jit import njit, njit_parallel, prange
from moescope.errors import UsageError
from moescope.slicing import split_ranges
from moescope.trace import RoutingTrace

# ----------------------------------------------------------------------------------------------
# learned tables


@dataclasses.dataclass(frozen=True)
class LayerTables:
    """One layer's train-split tables: ``counts [E]``, ``coact [E, E]``, ``transition [E, E]`` (int64)."""

    counts: np.ndarray
    coact: np.ndarray
    transition: np.ndarray


@dataclasses.dataclass(frozen=True)
class TrainTables:
    """Train-split tables for every layer; additive (`+`) over chunks made of whole sequences.

    counts : [layers, E] int64 selections per expert.
    coact : [layers, E, E] int64 same-token co-selections (symmetric, diagonal 0).
    transition : [layers, E, E] int64 next-token transitions ``e`` at ``t`` -> ``e'`` at ``t+1``.
    cross : [layers - 1, E, E] int64 same-token ``e`` at layer ``l`` -> ``e'`` at layer ``l + 1``.
    tokens, pairs : train tokens and train consecutive pairs the tables were counted over.
    """

    counts: np.ndarray
    coact: np.ndarray
    transition: np.ndarray
    cross: np.ndarray
    tokens: int
    pairs: int

    def layer(self, i: int) -> LayerTables:
        """The tables of layer index `i` (position along the trace's layer axis)."""
        return LayerTables(self.counts[i], self.coact[i], self.transition[i])

    def __add__(self, other: TrainTables) -> TrainTables:
        if self.counts.shape != other.counts.shape:
            raise UsageError(f"cannot add tables of shapes {self.counts.shape} and {other.counts.shape}")
        return TrainTables(
            self.counts + other.counts,
            self.coact + other.coact,
            self.transition + other.transition,
            self.cross + other.cross,
            self.tokens + other.tokens,
            self.pairs + other.pairs,
        )


@njit
def _learn_layer(lay, starts, stops, counts, coact, transition):
    """Count one layer's tables over token ranges ``[starts[r], stops[r])`` of ``lay: [tokens, k]``."""
    k = lay.shape[1]
    for r in range(starts.size):
        a, b = starts[r], stops[r]
        for t in range(a, b):
            for i in range(k):
                e = lay[t, i]
                counts[e] += 1
                for j in range(i + 1, k):  # upper half only; symmetrised by the caller
                    coact[e, lay[t, j]] += 1
                if t + 1 < b:
                    for j in range(k):
                        transition[e, lay[t + 1, j]] += 1


@njit
def _learn_cross(src, dst, starts, stops, cross):
    """Same-token counts ``cross[e, e']``: ``e`` in ``src[t]`` (layer l), ``e'`` in ``dst[t]`` (layer l+1)."""
    k = src.shape[1]
    for r in range(starts.size):
        for t in range(starts[r], stops[r]):
            for i in range(k):
                row = cross[src[t, i]]
                for j in range(k):
                    row[dst[t, j]] += 1


@njit_parallel
def _learn_block(slab, n_own, starts, stops, counts, coact, transition, cross):
    """Tables of the first `n_own` layers of ``slab: [m, tokens, k]`` and cross tables ``l -> l+1`` for
    every ``l < n_own`` with ``l + 1 < m``; counts for all `m` layers (the last may belong to the next block).
    """
    m, k = slab.shape[0], slab.shape[2]
    for i in prange(n_own):  # one iteration per own layer (equal work); the extra layer's counts ride along
        _learn_layer(slab[i], starts, stops, counts[i], coact[i], transition[i])
        if i + 1 < m:
            _learn_cross(slab[i], slab[i + 1], starts, stops, cross[i])
        if i == n_own - 1:
            for x in range(n_own, m):
                for r in range(starts.size):
                    for t in range(starts[r], stops[r]):
                        for j in range(k):
                            counts[x, slab[x, t, j]] += 1


@njit_parallel
def _gather_layers(experts, lo, out):
    """``out[j, t, :] = experts[t, lo + j, :]`` for ``out: [m, tokens, k]`` (parallel over token chunks)."""
    m, n, k = out.shape
    chunk = 1 << 16
    for c in prange((n + chunk - 1) // chunk):
        for t in range(c * chunk, min(n, (c + 1) * chunk)):
            for j in range(m):
                for s in range(k):
                    out[j, t, s] = experts[t, lo + j, s]


def layer_slab(experts: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """``[hi - lo, tokens, k]`` contiguous copy of layers ``lo:hi`` of ``experts: [tokens, layers, k]``."""
    out = np.empty((hi - lo, experts.shape[0], experts.shape[2]), dtype=experts.dtype)
    _gather_layers(experts, lo, out)
    return out


def _learn_slab(slab: np.ndarray, n_own: int, n_experts: int, starts: np.ndarray, stops: np.ndarray):
    m = slab.shape[0]
    counts = np.zeros((m, n_experts), dtype=np.int64)
    coact = np.zeros((n_own, n_experts, n_experts), dtype=np.int64)
    transition = np.zeros_like(coact)
    cross = np.zeros((min(n_own, m - 1), n_experts, n_experts), dtype=np.int64)
    _learn_block(slab, n_own, starts, stops, counts, coact, transition, cross)
    coact += coact.transpose(0, 2, 1)
    return counts, coact, transition, cross


def learn_tables(trace: RoutingTrace, ranges: tuple[np.ndarray, np.ndarray] | None = None) -> TrainTables:
    """Count the train-split tables of every layer (see the module docstring).

    Parameters
    ----------
    trace : the routing; its ``experts: [tokens, layers, k]``.
    ranges : ``(starts, stops)`` [r] int64 token ranges to learn from; default the train split
        (``split_ranges(trace, "train")``). Pairs are counted within a range only.

    Returns
    -------
    `TrainTables` with ``counts [layers, E]``, ``coact`` / ``transition [layers, E, E]``, ``cross [layers-1, E, E]``.
    """
    starts, stops = split_ranges(trace, "train") if ranges is None else (np.asarray(r, dtype=np.int64) for r in ranges)
    n_lay = trace.n_layers
    slab = layer_slab(trace.experts, 0, n_lay)
    counts, coact, transition, cross = _learn_slab(slab, n_lay, trace.n_experts, starts, stops)
    lengths = np.maximum(stops - starts, 0)
    return TrainTables(counts, coact, transition, cross, int(lengths.sum()), int(np.maximum(lengths - 1, 0).sum()))


# ----------------------------------------------------------------------------------------------
# predictors: linear scorers built from one layer's tables


@dataclasses.dataclass(frozen=True)
class Scorer:
    """``score[e'] = base[e'] + self_weight * [e' in S_t] + sum_{e in S_t} rows[e, e']``; top-B, ties by id.

    base : [E] int64.  rows : [E, E] int64, or None for a scorer without rows.
    A scorer with neither rows nor self weight is static (the same set for every token).
    """

    base: np.ndarray
    self_weight: int = 0
    rows: np.ndarray | None = None


def lfu_predictor(tables: LayerTables) -> Scorer:
    """lfu: the train split's B most frequent experts of the layer (static)."""
    return Scorer(tables.counts)


def coact_predictor(tables: LayerTables) -> Scorer:
    """coact: the B experts with the most train co-activations with the current token's experts."""
    # an expert does not co-activate with itself (diagonal 0): the current experts compete like any other
    return Scorer(np.zeros_like(tables.counts), 0, tables.coact)


def transition_predictor(tables: LayerTables) -> Scorer:
    """transition: the B experts most often following the current token's experts in train pairs."""
    return Scorer(np.zeros_like(tables.counts), 0, tables.transition)


def last_predictor(tables: LayerTables) -> Scorer:
    """last: the current token's experts, then the most frequent others (LFU order), up to B."""
    # a self weight above any count puts S_t first; among themselves and after them, LFU order
    return Scorer(tables.counts, int(tables.counts.sum()) + 1)


PREDICTORS: dict[str, Callable[[LayerTables], Scorer]] = {
    "lfu": lfu_predictor,
    "coact": coact_predictor,
    "transition": transition_predictor,
    "last": last_predictor,
}
"""Predictor name -> builder from one layer's train tables (the CLI's ``--predictor`` choices)."""


def check_predictors(names: Sequence[str]) -> tuple[str, ...]:
    """The names as a tuple, or a `UsageError` listing the registered predictors."""
    names = tuple(names)
    unknown = [n for n in names if n not in PREDICTORS]
    if unknown or not names or len(set(names)) != len(names):
        raise UsageError(
            f"predictor list {list(names)} is not a non-empty list of distinct names from "
            f"{', '.join(PREDICTORS)}; pick from those, e.g. --predictor lfu,coact"
        )
    return names


def check_budgets(budgets: Sequence[int], n_experts: int) -> tuple[int, ...]:
    """The budgets sorted and deduplicated, or a `UsageError` naming the first out of ``1..n_experts``."""
    out = []
    for b in budgets:
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 1 <= b <= n_experts:
            raise UsageError(
                f"prefetch budget {b!r} is not an expert count in 1..{n_experts}; "
                f"give budgets like --budget 8,16,32 no larger than the layer's experts"
            )
        out.append(int(b))
    if not out:
        raise UsageError("no prefetch budget given; pass e.g. --budget 8,16,32")
    return tuple(sorted(set(out)))


# ----------------------------------------------------------------------------------------------
# scoring

_STATIC, _SELF_FIRST, _ROWS = 0, 1, 2  # how a job is scored (see `_score_job`)
_INT32_LIMIT = 2**31 - 1


@njit
def _key_ranks(key):
    """[E] int64 rank of each expert by ``key: [E]`` (distinct values, descending): 0 = predicted first."""
    order = np.argsort(-key)
    rank = np.empty(key.size, dtype=np.int64)
    for i in range(key.size):
        rank[order[i]] = i
    return rank


@njit
def _score_job(src, dst, starts, stops, shift, mode, keybase, self_key, rows, out):
    """Add to ``out [E]`` the targets by rank for one scorer predicting ``dst[t + shift]`` from ``src[t]``.

    A target of rank ``r`` (0 = predicted first) is a hit at every budget ``B > r``: hits at ``B`` are
    ``out[:B].sum()``. src, dst : [tokens, k] expert ids (one array with shift 1 for next-token prediction;
    layers l and l+1 with shift 0 for cross-layer prediction); ``t`` runs over ``[starts[r], stops[r] - shift)``.
    keybase : [E] ``base * E + (E - 1 - e)``, one integer key that orders by score, then by lower id.
    self_key : ``self_weight * E``; rows : [E, E] ``rows * E`` (used in mode `_ROWS` only).
    Modes: `_STATIC` ranks once; `_SELF_FIRST` (self weight above any base difference, no rows) puts the
    current experts first in static order, O(k^2) per token; `_ROWS` builds the key, O(k E) per token.
    """
    n = keybase.size
    k = dst.shape[1]
    hist = np.zeros(n, dtype=np.int64)  # local: increments through the caller's row view measured ~8x slower
    if mode != _ROWS:
        rank = _key_ranks(keybase)
        mark = np.full(n, -1, dtype=np.int64)
        mine = np.empty(k, dtype=np.int64)
        for r in range(starts.size):
            for t in range(starts[r], stops[r] - shift):
                if mode == _STATIC:
                    for j in range(k):
                        hist[rank[dst[t + shift, j]]] += 1
                    continue
                for i in range(k):
                    mine[i] = rank[src[t, i]]
                    mark[src[t, i]] = t
                for j in range(k):
                    d = dst[t + shift, j]
                    rd = rank[d]
                    above = 0
                    for i in range(k):
                        above += mine[i] < rd
                    hist[above if mark[d] == t else k + rd - above] += 1
    else:
        key = np.empty(n, dtype=keybase.dtype)
        for r in range(starts.size):
            for t in range(starts[r], stops[r] - shift):
                # two rows per pass: half the loads and stores of the key
                if k >= 2:
                    ra, rb = rows[np.intp(src[t, 0])], rows[np.intp(src[t, 1])]
                    for e in range(n):
                        key[e] = keybase[e] + (ra[e] + rb[e])
                    j = 2
                else:
                    for e in range(n):
                        key[e] = keybase[e]
                    j = 0
                while j + 1 < k:
                    ra, rb = rows[np.intp(src[t, j])], rows[np.intp(src[t, j + 1])]
                    for e in range(n):
                        key[e] += ra[e] + rb[e]
                    j += 2
                if j < k:
                    ra = rows[np.intp(src[t, j])]
                    for e in range(n):
                        key[e] += ra[e]
                if self_key != 0:
                    for i in range(k):
                        key[src[t, i]] += self_key
                for j in range(k):
                    kt = key[dst[t + shift, j]]
                    rk = 0
                    for e in range(n):  # a full scan vectorises; an early exit for misses did not pay
                        rk += key[e] > kt
                    hist[rk] += 1
    for e in range(n):
        out[e] += hist[e]


@njit_parallel
def _score_block(slab, starts, stops, src, dst, shift, mode, keybase, self_key, rows, row_of, worker, n_workers,
                 out):  # fmt: skip
    """Run every job ``j`` (layers ``src[j]`` -> ``dst[j]`` of ``slab: [m, tokens, k]``) on its worker.

    keybase : [jobs, E]; self_key : [jobs]; rows : [R, E, E] with ``row_of[j]`` its index (0 when unused);
    out : [jobs, E] int64 targets by rank (`_score_job`), filled in place.
    """
    for w in prange(n_workers):
        for j in range(src.size):
            if worker[j] == w:
                _score_job(slab[src[j]], slab[dst[j]], starts, stops, shift[j], mode[j], keybase[j], self_key[j],
                           rows[row_of[j]], out[j])  # fmt: skip


@dataclasses.dataclass(frozen=True)
class _Job:
    src: int
    dst: int
    shift: int
    scorer: Scorer


def _mode(s: Scorer) -> int:
    if s.rows is not None:
        return _ROWS
    if s.self_weight == 0:
        return _STATIC
    spread = int(s.base.max()) - int(s.base.min()) if s.base.size else 0
    return _SELF_FIRST if s.self_weight > spread else _ROWS


def _run_jobs(slab: np.ndarray, jobs: list[_Job], starts, stops, n_workers: int) -> np.ndarray:
    """[jobs, E] int64 cumulative hits: ``[j, B - 1]`` = hits of job j at budget B. Longest jobs dealt first."""
    n_exp, k = jobs[0].scorer.base.size, slab.shape[2]
    modes = [_mode(j.scorer) for j in jobs]
    # keys fit int32 (twice the SIMD lanes) unless a score could exceed it
    top = max(
        int(j.scorer.base.max()) + j.scorer.self_weight + (0 if j.scorer.rows is None else k * int(j.scorer.rows.max()))
        for j in jobs
    )
    dtype = np.int32 if (top + 1) * n_exp < _INT32_LIMIT else np.int64
    ids = np.arange(n_exp, dtype=np.int64)
    keybase = np.stack([np.asarray(j.scorer.base, dtype=np.int64) * n_exp + (n_exp - 1 - ids) for j in jobs])
    zero = np.zeros((n_exp, n_exp), dtype=np.int64)
    mats = [zero if j.scorer.rows is None else j.scorer.rows for j, m in zip(jobs, modes, strict=True) if m == _ROWS]
    rows = (np.stack(mats) * n_exp).astype(dtype) if mats else np.zeros((1, n_exp, n_exp), dtype=dtype)
    row_of = np.cumsum([m == _ROWS for m in modes]) - 1
    row_of = np.where(np.array(modes) == _ROWS, row_of, 0).astype(np.int64)
    cost = [{_ROWS: 2 * k * n_exp, _SELF_FIRST: k * k, _STATIC: k}[m] for m in modes]
    load = np.zeros(n_workers)
    worker = np.zeros(len(jobs), dtype=np.int64)
    for idx in sorted(range(len(jobs)), key=lambda x: -cost[x]):
        w = int(np.argmin(load))
        worker[idx] = w
        load[w] += cost[idx]
    out = np.zeros((len(jobs), n_exp), dtype=np.int64)
    _score_block(
        slab,
        np.asarray(starts, dtype=np.int64),
        np.asarray(stops, dtype=np.int64),
        np.array([j.src for j in jobs], dtype=np.int64),
        np.array([j.dst for j in jobs], dtype=np.int64),
        np.array([j.shift for j in jobs], dtype=np.int64),
        np.asarray(modes, dtype=np.int64),
        keybase.astype(dtype),
        np.array([j.scorer.self_weight * n_exp for j in jobs], dtype=dtype),
        rows,
        row_of,
        worker,
        n_workers,
        out,
    )
    return np.cumsum(out, axis=1)


@dataclasses.dataclass(frozen=True)
class HitCounts:
    """Raw hit counts on the test split (additive over chunks of whole sequences, given the same tables).

    next_token : [layers, predictors, budgets] int64 hits predicting ``S_{t+1}`` from ``S_t``.
    cross : [layers - 1] int64 hits predicting ``S_t(l+1)`` from ``S_t(l)`` with the top-k cross scorer.
    cross_frequency : [layers - 1] int64 hits of the static top-k of layer ``l+1``'s train counts.
    pairs : test pairs scored per layer; tokens : test tokens scored per layer pair.
    """

    next_token: np.ndarray
    cross: np.ndarray
    cross_frequency: np.ndarray
    pairs: int
    tokens: int
    budgets: tuple[int, ...]
    predictors: tuple[str, ...]

    def __add__(self, other: HitCounts) -> HitCounts:
        """Hits of two chunks of whole sequences scored with the same tables, budgets and predictors."""
        if (self.budgets, self.predictors) != (other.budgets, other.predictors):
            raise UsageError("cannot add hit counts of different budgets or predictors")
        return HitCounts(
            self.next_token + other.next_token,
            self.cross + other.cross,
            self.cross_frequency + other.cross_frequency,
            self.pairs + other.pairs,
            self.tokens + other.tokens,
            self.budgets,
            self.predictors,
        )


def block_hits(
    slab: np.ndarray,
    n_own: int,
    layer_tables: Sequence[LayerTables],
    cross_tables: np.ndarray,
    next_counts: np.ndarray | None,
    ranges: tuple[np.ndarray, np.ndarray],
    budgets: tuple[int, ...],
    predictors: tuple[str, ...],
    top_k: int,
    n_workers: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hits of the layers of one slab (see `_learn_block` for the slab layout).

    Returns ``(next_token [n_own, predictors, budgets], cross [c], cross_frequency [c])`` int64 with
    ``c = cross_tables.shape[0]`` (layer pairs inside the slab) and `next_counts` the train counts of
    slab layer ``1..c`` (the targets of the cross jobs).
    """
    jobs: list[_Job] = []
    for i in range(n_own):
        jobs.extend(_Job(i, i, 1, PREDICTORS[name](layer_tables[i])) for name in predictors)
    n_cross = cross_tables.shape[0]
    for i in range(n_cross):
        zero = np.zeros(cross_tables.shape[1], dtype=np.int64)
        jobs.append(_Job(i, i + 1, 0, Scorer(zero, 0, cross_tables[i])))
        jobs.append(_Job(i + 1, i + 1, 0, Scorer(next_counts[i])))
    hits = _run_jobs(slab, jobs, ranges[0], ranges[1], max(1, n_workers))
    cols = [b - 1 for b in budgets]
    kcol = top_k - 1
    n_next = n_own * len(predictors)
    next_token = hits[:n_next, cols].reshape(n_own, len(predictors), len(budgets))
    return next_token, hits[n_next::2, kcol], hits[n_next + 1 :: 2, kcol]


def hit_counts(
    trace: RoutingTrace,
    tables: TrainTables,
    budgets: Sequence[int],
    predictors: Sequence[str] = tuple(PREDICTORS),
    ranges: tuple[np.ndarray, np.ndarray] | None = None,
) -> HitCounts:
    """Score every predictor at every budget, and the cross-layer scorer at budget k, on the test split.

    Parameters
    ----------
    trace : the routing; its ``experts: [tokens, layers, k]``.
    tables : learned on the train split (`learn_tables`); never on the ranges scored here.
    budgets : experts prefetched per token, each in ``1..E``.
    predictors : names from `PREDICTORS`.
    ranges : ``(starts, stops)`` token ranges to score; default the test split (``split_ranges(trace, "test")``).
    """
    import numba

    budgets = check_budgets(budgets, trace.n_experts)
    predictors = check_predictors(predictors)
    starts, stops = split_ranges(trace, "test") if ranges is None else (np.asarray(r, dtype=np.int64) for r in ranges)
    n_lay = trace.n_layers
    slab = layer_slab(trace.experts, 0, n_lay)
    layer_tables = [tables.layer(i) for i in range(n_lay)]
    nt, cr, cf = block_hits(
        slab, n_lay, layer_tables, tables.cross, tables.counts[1:], (starts, stops), budgets, predictors,
        trace.top_k, numba.get_num_threads(),
    )  # fmt: skip
    lengths = np.maximum(stops - starts, 0)
    return HitCounts(nt, cr, cf, int(np.maximum(lengths - 1, 0).sum()), int(lengths.sum()), budgets, predictors)


# ----------------------------------------------------------------------------------------------
# results


@dataclasses.dataclass(frozen=True)
class CrossLayer:
    """Layer ``layer``'s experts predicting layer ``next_layer``'s for the same test token (precision@k)."""

    layer: int
    next_layer: int
    tokens: int
    precision: float  # top-k by summed train cross counts from S_t(layer)
    frequency: float  # the train split's k most frequent experts of next_layer
    chance: float  # k / E

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class LayerPrefetch:
    """Hit rate ``|predicted ∩ S_{t+1}| / k`` over test pairs, per predictor (one value per budget)."""

    layer: int
    pairs: int
    hit_rate: Mapping[str, tuple[float, ...]]

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "pairs": self.pairs, "hit_rate": {k: list(v) for k, v in self.hit_rate.items()}}


def results_from_hits(
    hits: HitCounts, layer_ids: Sequence[int], top_k: int, n_experts: int
) -> tuple[tuple[LayerPrefetch, ...], tuple[CrossLayer, ...]]:
    """Per-layer prefetch rows and per-layer-pair cross rows from raw hit counts."""
    per_pair = max(hits.pairs * top_k, 1)
    per_tok = max(hits.tokens * top_k, 1)
    ids = [int(x) for x in layer_ids]
    pre = tuple(
        LayerPrefetch(
            lid,
            hits.pairs,
            {p: tuple(float(h) / per_pair for h in hits.next_token[i, pi]) for pi, p in enumerate(hits.predictors)},
        )
        for i, lid in enumerate(ids)
    )
    cross = tuple(
        CrossLayer(
            layer=ids[i],
            next_layer=ids[i + 1],
            tokens=hits.tokens,
            precision=float(hits.cross[i]) / per_tok,
            frequency=float(hits.cross_frequency[i]) / per_tok,
            chance=top_k / n_experts,
        )
        for i in range(len(ids) - 1)
    )
    return pre, cross
