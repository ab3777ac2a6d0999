"""Temporal and cross-layer locality of routing: do consecutive tokens reuse experts, and can it be prefetched?

Per MoE layer, with ``S_t`` the set of ``k`` experts token ``t`` selects there; consecutive pairs and gaps
are taken within a sequence only, never across a sequence boundary:

- **Next-token reuse**: mean ``|S_t ∩ S_{t-1}| / k`` over consecutive pairs. Baselines:
  *shuffled* -- the same sequences with their tokens in random order: the exact expectation over all
  within-sequence permutations (``sum_e c_e (c_e - 1) / n`` overlaps per sequence of ``n`` tokens where expert
  ``e`` is used ``c_e`` times), plus one seeded permutation as a check; *independent* -- two tokens drawn
  independently from the whole trace, ``sum_e (n_e / N)^2 / k`` (``n_e`` selections of ``e`` over ``N``
  tokens); *uniform* -- ``k / E``. ``ratio = reuse / shuffled`` (the exact expectation): above 1, order matters.
- **Reuse distance**: for each selection, the gap in tokens since the same expert was last selected in
  the same sequence (1 = the previous token); the first use in a sequence is *cold*. Histogram over log2
  bins (1, 2, 3-4, 5-8, ...), cold share, median gap over warm selections (exact up to `GAP_EXACT` tokens;
  a median beyond is reported as ``GAP_EXACT + 1``). This is not the LRU stack distance (the cache
  simulator computes that).
- **Working set**: distinct experts per sequence (mean, median, fraction of E, by sequence length), and
  the windowed working set ``W(w)``: mean distinct experts over every window of ``w`` consecutive tokens
  inside a sequence (``W(1) = k``), for the trace and for the seeded shuffle.
- **Cross-layer predictability** and **prefetch hit rates** with the train/test split: see
  `moescope.analyze.prefetch`.

Kernels are O(tokens x k) per layer (prefetch scoring O(tokens x k x E) for row predictors), parallel
across layers in blocks (progress is reported per block), and keep additive sums (`TemporalCounts`,
`TrainTables`, `HitCounts`: chunks of whole sequences add up to the whole). No I/O.

    >>> result = locality(trace, budgets=(8, 16, 32), seed=0)
    >>> result.summary["reuse_ratio"].median, result.prefetch_overall["coact"]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from moescope._jit import njit, njit_parallel, prange
from moescope._rng import token_keys
from moescope.analyze.prefetch import (
    PREDICTORS,
    CrossLayer,
    HitCounts,
    LayerPrefetch,
    LayerTables,
    _learn_slab,
    block_hits,
    check_budgets,
    check_predictors,
    layer_slab,
    results_from_hits,
)
from moescope.errors import UsageError
from moescope.slicing import split_ranges
from moescope.trace import RoutingTrace

WIDTHS = (1, 2, 4, 8, 16, 32, 64)
"""Default window widths of the windowed working set W(w)."""
GAP_EXACT = 1 << 16
"""Reuse gaps up to this are histogrammed exactly (for the median); longer ones by log2 bin only."""
_BITS = 64
_MIN_BLOCK = 4  # layers per block at least: fewer passes over the trace, scratch memory still bounded


# ----------------------------------------------------------------------------------------------
# kernels


@njit
def _bit_length(v):
    n = 0
    while v > 0:
        v >>= 1
        n += 1
    return n


@njit
def _temporal_layer(lay, starts, ends, n_experts, widths, gap_cap, scal, gap_exact, gap_over, tail_gaps, win,
                    ws_hist, ws_len, sel):  # fmt: skip
    """One layer's temporal sums over sequences ``[starts[s], ends[s])`` of ``lay: [tokens, k]``.

    Fills ``scal = [overlaps with the previous token, cold selections]`` and adds to the histograms:
    ``gap_exact [gap_cap + 1]`` (by gap), ``gap_over [64]`` (gaps > gap_cap by bit_length(gap - 1)),
    ``tail_gaps [max(widths) + 1]`` (gaps, capped at max(widths), of warm selections in the last
    max(widths) - 1 tokens of their sequence), ``win [widths]`` (window sums of the cold selections and of
    the tail; a warm selection further from the end is first in ``min(w, gap)`` windows, added by the
    caller from the gap histograms), ``ws_hist [E + 1]`` (sequences by distinct experts), ``ws_len [64]``
    (distinct experts summed by bit_length(sequence length) - 1), ``sel [E]`` (selections). Returns the
    sum over sequences of ``sum_e c_e (c_e - 1) / n`` (the expected overlaps under a within-sequence shuffle).
    """
    k = lay.shape[1]
    nw = widths.size
    wmax = 0
    for wi in range(nw):
        wmax = max(wmax, widths[wi])
    last = np.zeros(n_experts, dtype=np.int64)
    cnt = np.zeros(n_experts, dtype=np.int64)
    fresh = np.empty(n_experts, dtype=np.int64)
    overlap = 0
    cold = 0
    shuf = 0.0
    for s in range(starts.size):
        a, b = starts[s], ends[s]
        n_new = 0
        cc = 0
        for t in range(a, b):
            tail = t > b - wmax
            for j in range(k):
                e = lay[t, j]
                c = cnt[e]
                cc += 2 * c  # c (c - 1) grows by 2c when c -> c + 1
                cnt[e] = c + 1
                if c > 0:
                    g = t - last[e]
                    overlap += g == 1
                    if g <= gap_cap:
                        gap_exact[g] += 1
                    else:
                        gap_over[_bit_length(g - 1)] += 1
                    lo0 = last[e] + 1
                    if tail:
                        tail_gaps[min(g, wmax)] += 1
                else:
                    fresh[n_new] = e
                    n_new += 1
                    lo0 = a
                    if not tail:
                        for wi in range(nw):
                            win[wi] += min(widths[wi], t - a + 1)
                last[e] = t
                if tail:
                    # windows [x, x + w - 1] inside the sequence in which t is e's first use
                    for wi in range(nw):
                        w = widths[wi]
                        lo = max(t - w + 1, lo0)
                        hi = min(t, b - w)
                        if hi >= lo:
                            win[wi] += hi - lo + 1
        cold += n_new
        for i in range(n_new):
            e = fresh[i]
            sel[e] += cnt[e]
            cnt[e] = 0
        shuf += cc / (b - a)
        ws_hist[n_new] += 1
        ws_len[_bit_length(b - a) - 1] += n_new
    scal[0] = overlap
    scal[1] = cold
    return shuf


@njit_parallel
def _temporal_block(slab, order, starts, ends, n_experts, widths, gap_cap, scal, shuf, gap_exact, gap_over,
                    tail_gaps, win, ws_hist, ws_len, sel):  # fmt: skip
    """`_temporal_layer` for every layer of ``slab: [m, tokens, k]``; with ``order: [tokens]`` non-empty,
    on the tokens taken in that order (a within-sequence permutation)."""
    for i in prange(slab.shape[0]):
        if order.size:
            n, k = slab.shape[1], slab.shape[2]
            lay = np.empty((n, k), dtype=slab.dtype)
            for t in range(n):
                for j in range(k):
                    lay[t, j] = slab[i, order[t], j]
            shuf[i] = _temporal_layer(lay, starts, ends, n_experts, widths, gap_cap, scal[i], gap_exact[i],
                                      gap_over[i], tail_gaps[i], win[i], ws_hist[i], ws_len[i], sel[i])  # fmt: skip
        else:
            shuf[i] = _temporal_layer(slab[i], starts, ends, n_experts, widths, gap_cap, scal[i], gap_exact[i],
                                      gap_over[i], tail_gaps[i], win[i], ws_hist[i], ws_len[i], sel[i])  # fmt: skip


# ----------------------------------------------------------------------------------------------
# additive sums


@dataclasses.dataclass(frozen=True)
class TemporalCounts:
    """Additive temporal sums per layer (chunks of whole sequences add up to the whole trace).

    overlap, cold : [layers] int64 selections shared with the previous token; first uses in a sequence.
    shuffle_expected : [layers] float64 expected overlaps under a within-sequence shuffle.
    gap_exact : [layers, GAP_EXACT + 1] int64 warm selections by gap (index 0 unused).
    gap_over : [layers, 64] int64 gaps above GAP_EXACT by bit_length(gap - 1).
    window_sum : [layers, widths] int64 distinct experts summed over all windows of each width.
    ws_hist : [layers, E + 1] int64 sequences by distinct experts used.
    ws_by_length : [layers, 64] int64 distinct experts summed over sequences of length in [2^j, 2^(j+1)).
    selections : [layers, E] int64 selections per expert.
    windows : [widths] int64 windows of each width; seqs_by_length : [64] int64 sequences per length bin.
    """

    widths: tuple[int, ...]
    tokens: int
    pairs: int
    overlap: np.ndarray
    cold: np.ndarray
    shuffle_expected: np.ndarray
    gap_exact: np.ndarray
    gap_over: np.ndarray
    window_sum: np.ndarray
    ws_hist: np.ndarray
    ws_by_length: np.ndarray
    selections: np.ndarray
    windows: np.ndarray
    seqs_by_length: np.ndarray

    _PER_LAYER = (
        "overlap", "cold", "shuffle_expected", "gap_exact", "gap_over", "window_sum", "ws_hist", "ws_by_length",
        "selections",
    )  # fmt: skip

    def __add__(self, other: TemporalCounts) -> TemporalCounts:
        """Sums of two chunks of whole sequences (same layers, experts and widths)."""
        if self.widths != other.widths or self.selections.shape != other.selections.shape:
            raise UsageError("cannot add temporal counts over different layers, experts or window widths")
        fields = {f: getattr(self, f) + getattr(other, f) for f in (*self._PER_LAYER, "windows", "seqs_by_length")}
        return TemporalCounts(self.widths, self.tokens + other.tokens, self.pairs + other.pairs, **fields)

    @staticmethod
    def stack(parts: Sequence[TemporalCounts]) -> TemporalCounts:
        """Blocks of layers over the same tokens, joined along the layer axis."""
        first = parts[0]
        fields = {f: np.concatenate([getattr(p, f) for p in parts]) for f in first._PER_LAYER}
        return dataclasses.replace(first, **fields)


def _windows_and_lengths(starts: np.ndarray, ends: np.ndarray, widths: tuple[int, ...]):
    lengths = ends - starts
    windows = np.array([np.maximum(lengths - w + 1, 0).sum() for w in widths], dtype=np.int64)
    bins = np.floor(np.log2(np.maximum(lengths, 1))).astype(np.int64)
    return windows, np.bincount(bins, minlength=_BITS).astype(np.int64)[:_BITS]


def _temporal_slab(slab, order, starts, ends, n_experts, widths) -> TemporalCounts:
    m = slab.shape[0]
    w_arr = np.asarray(widths, dtype=np.int64)
    scal = np.zeros((m, 2), dtype=np.int64)
    shuf = np.zeros(m, dtype=np.float64)
    gap_exact = np.zeros((m, GAP_EXACT + 1), dtype=np.int64)
    gap_over = np.zeros((m, _BITS), dtype=np.int64)
    tail_gaps = np.zeros((m, int(w_arr.max()) + 1), dtype=np.int64)
    win = np.zeros((m, w_arr.size), dtype=np.int64)
    ws_hist = np.zeros((m, n_experts + 1), dtype=np.int64)
    ws_len = np.zeros((m, _BITS), dtype=np.int64)
    sel = np.zeros((m, n_experts), dtype=np.int64)
    order = np.zeros(0, dtype=np.int64) if order is None else order
    _temporal_block(slab, order, starts, ends, n_experts, w_arr, GAP_EXACT, scal, shuf, gap_exact, gap_over,
                    tail_gaps, win, ws_hist, ws_len, sel)  # fmt: skip
    # a warm selection at least max(widths) tokens before its sequence's end, with gap g, is its expert's
    # first use in min(w, g) windows of width w: histogram all gaps (capped), less those of the tail
    wmax = int(w_arr.max())
    capped = gap_exact[:, : wmax + 1].copy()
    capped[:, wmax] += gap_exact[:, wmax + 1 :].sum(axis=1) + gap_over.sum(axis=1)
    g = np.arange(wmax + 1, dtype=np.int64)
    win += (capped - tail_gaps) @ np.minimum(g[:, None], w_arr[None, :])
    windows, seqs = _windows_and_lengths(starts, ends, widths)
    lengths = ends - starts
    return TemporalCounts(
        tuple(widths), int(lengths.sum()), int((lengths - 1).sum()), scal[:, 0].copy(), scal[:, 1].copy(), shuf,
        gap_exact, gap_over, win, ws_hist, ws_len, sel, windows, seqs,
    )  # fmt: skip


def check_widths(widths: Sequence[int]) -> tuple[int, ...]:
    """Window widths as a sorted tuple of distinct positive ints, or a `UsageError`."""
    ws = tuple(widths)
    ints = all(not isinstance(w, bool) and isinstance(w, (int, np.integer)) for w in ws)
    if not ws or not ints or not all(1 <= w <= GAP_EXACT for w in ws):
        raise UsageError(f"window widths {list(ws)} must be integers in 1..{GAP_EXACT}, e.g. 1,2,4,...,64")
    return tuple(sorted({int(w) for w in ws}))


def temporal_counts(
    trace: RoutingTrace, order: np.ndarray | None = None, widths: Sequence[int] = WIDTHS
) -> TemporalCounts:
    """Temporal sums of every layer (reuse, gaps, working sets), optionally on a within-sequence permutation.

    Parameters
    ----------
    trace : the routing; its ``experts: [tokens, layers, k]`` and sequence bounds.
    order : [tokens] int64 token order, a permutation within each sequence (`shuffle_within_sequences`);
        None for the trace's own order.
    widths : window widths for the windowed working set.
    """
    widths = check_widths(widths)
    if order is not None:
        order = _check_order(order, trace)
    slab = layer_slab(trace.experts, 0, trace.n_layers)
    return _temporal_slab(slab, order, trace.seq_starts, trace.seq_ends, trace.n_experts, widths)


def _check_order(order: np.ndarray, trace: RoutingTrace) -> np.ndarray:
    order = np.asarray(order, dtype=np.int64)
    seq = trace.token_sequence()
    if order.shape != (trace.n_tokens,) or not np.array_equal(np.sort(order), np.arange(trace.n_tokens)):
        raise UsageError(f"token order must be a permutation of 0..{trace.n_tokens - 1}")
    if not np.array_equal(seq[order], seq):
        raise UsageError("token order moves a token to another sequence; permute within sequences only")
    return order


def shuffle_within_sequences(seq_starts: np.ndarray, n_tokens: int, seed: int, offset: int = 0) -> np.ndarray:
    """[tokens] int64: a seeded random order of the tokens that keeps every token in its sequence.

    Parameters
    ----------
    seq_starts : [sequences] int64 first token of each sequence.
    n_tokens : tokens in the trace.
    seed : the shuffle's seed.
    offset : absolute index of token 0 (a chunk of a larger trace).

    Each token's sort key is a counter-based hash of (seed, absolute token index), so a sequence's order
    does not depend on the other sequences: a chunk of whole sequences starting at token `offset` gets
    exactly its part of the whole trace's order (chunked analyses equal whole-trace ones).
    """
    lengths = np.diff(np.append(np.asarray(seq_starts, dtype=np.int64), n_tokens))
    seq = np.repeat(np.arange(lengths.size), lengths)
    return np.lexsort((token_keys(seed, offset, n_tokens), seq)).astype(np.int64)


# ----------------------------------------------------------------------------------------------
# results


@dataclasses.dataclass(frozen=True)
class Spread:
    """Mean and median of a per-layer figure over layers (None where no layer defines it)."""

    mean: float | None
    median: float | None


@dataclasses.dataclass(frozen=True)
class LayerLocality:
    """Temporal locality of one layer (see the module docstring for each figure)."""

    layer: int
    pairs: int
    reuse: float
    reuse_shuffled: float  # one seeded within-sequence shuffle
    reuse_shuffled_expected: float  # exact expectation over within-sequence shuffles
    reuse_independent: float
    reuse_uniform: float
    reuse_ratio: float | None  # reuse / reuse_shuffled_expected (None when that is 0)
    gap_hist: tuple[int, ...]  # warm selections per gap bin (`Locality.gap_bins`)
    cold: int
    cold_share: float
    median_gap: float | None
    median_gap_shuffled: float | None
    working_set_mean: float
    working_set_median: float
    working_set_frac: float
    window: tuple[float | None, ...]  # W(w) for `Locality.widths` (None: no sequence has w tokens)
    window_shuffled: tuple[float | None, ...]

    def to_dict(self) -> dict[str, Any]:
        return _finite(dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class LengthRow:
    """Sequences with length in ``[min_len, max_len]`` and their distinct experts (mean over layers)."""

    min_len: int
    max_len: int
    sequences: int
    working_set_mean: float
    working_set_frac: float


@dataclasses.dataclass(frozen=True)
class Locality:
    """Everything `locality` measures: per layer, per layer pair, and over layers (`summary`)."""

    model: str | None
    n_experts: int
    top_k: int
    tokens: int
    sequences: int
    seed: int
    widths: tuple[int, ...]
    gap_bins: tuple[str, ...]
    budgets: tuple[int, ...]
    predictors: tuple[str, ...]
    layers: tuple[LayerLocality, ...]
    working_set_by_length: tuple[LengthRow, ...]
    cross: tuple[CrossLayer, ...]
    prefetch: tuple[LayerPrefetch, ...]
    test_pairs: int
    test_tokens: int
    prefetch_chance: tuple[float, ...]  # B / E per budget
    prefetch_overall: Mapping[str, tuple[Spread, ...]]  # per predictor, per budget, over layers
    summary: Mapping[str, Spread]
    lookahead: tuple[LookaheadRow, ...] = ()  # when the trace has captured lookahead

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["layers"] = [r.to_dict() for r in self.layers]
        d["working_set_by_length"] = [dataclasses.asdict(r) for r in self.working_set_by_length]
        d["cross"] = [r.to_dict() for r in self.cross]
        d["prefetch"] = [r.to_dict() for r in self.prefetch]
        d["prefetch_overall"] = {p: [dataclasses.asdict(s) for s in v] for p, v in self.prefetch_overall.items()}
        d["summary"] = {name: dataclasses.asdict(s) for name, s in self.summary.items()}
        d["lookahead"] = [r.to_dict() for r in self.lookahead]
        return _finite(d)


@dataclasses.dataclass(frozen=True)
class LookaheadRow:
    """How well the captured lookahead predicts a later layer's experts (test halves).

    layer : the MoE layer whose router input the prediction is made from; distance : MoE layers ahead;
    target : the layer predicted; tokens : test tokens scored; recall : ``|lookahead ∩ S_t(target)| / k``;
    id_only : the id-only predictors at budget k for the same target, from what a runtime also knows then:
    each next-token predictor (the previous token's experts at the target layer, learned on train halves)
    and, at distance 1, ``cross-layer`` (the same token's experts at this layer through the learned table).
    """

    layer: int
    distance: int
    target: int
    tokens: int
    recall: float
    id_only: Mapping[str, float]

    @property
    def best_id_only(self) -> tuple[str, float] | None:
        return max(self.id_only.items(), key=lambda kv: kv[1]) if self.id_only else None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["id_only"] = dict(self.id_only)
        return d


def lookahead_rows(
    trace: RoutingTrace, test: tuple[np.ndarray, np.ndarray], id_only: Mapping[int, Mapping[str, float]]
) -> tuple[LookaheadRow, ...]:
    """Recall of ``trace.extras["lookahead"] [tokens, layers, distance, k]`` on the `test` token ranges, per
    layer and distance, beside `id_only` (target layer index -> predictor -> rate at budget k)."""
    la = trace.extras["lookahead"]
    idx = np.concatenate([np.arange(a, b) for a, b in zip(*test, strict=True)]) if len(test[0]) else np.zeros(0, int)
    k, rows = trace.top_k, []
    for i in range(trace.n_layers):
        for d in range(1, la.shape[2] + 1):
            if i + d >= trace.n_layers or not (la[:, i, d - 1] >= 0).any():
                continue  # past the last layer, or not captured (a layer selection skipped past the depth)
            hits = 0
            for lo in range(0, idx.size, 1 << 16):
                t = idx[lo : lo + (1 << 16)]
                pred, want = la[t, i, d - 1], trace.experts[t, i + d]
                hits += int((pred[:, :, None] == want[:, None, :]).any(axis=2).sum())
            rows.append(
                LookaheadRow(
                    layer=int(trace.layer_ids[i]),
                    distance=d,
                    target=int(trace.layer_ids[i + d]),
                    tokens=int(idx.size),
                    recall=hits / max(idx.size * k, 1),
                    id_only={
                        name: rate for name, rate in id_only.get(i + d, {}).items() if name != "cross-layer" or d == 1
                    },
                )
            )
    return tuple(rows)


def _finite(x: Any) -> Any:
    """JSON-safe copy: tuples to lists, NaN to None."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def hist_median(counts: np.ndarray, values: np.ndarray | None = None) -> float | None:
    """Median (as `numpy.median`) of data given as ``counts [n]`` of each of ``values [n]`` (ascending;
    default ``0..n-1``); None when there is no data."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return None
    values = np.arange(counts.size) if values is None else np.asarray(values)
    cum = np.cumsum(counts)
    lo = values[int(np.searchsorted(cum, (total - 1) // 2 + 1))]
    hi = values[int(np.searchsorted(cum, total // 2 + 1))]
    return (float(lo) + float(hi)) / 2


def _median_gap(gap_exact: np.ndarray, gap_over: np.ndarray) -> float | None:
    over = int(gap_over.sum())
    return hist_median(np.append(gap_exact, over), np.arange(gap_exact.size + 1))


def _gap_bins(gap_exact: np.ndarray, gap_over: np.ndarray) -> np.ndarray:
    """[..., 64] warm selections per log2 gap bin ``bit_length(gap - 1)``."""
    g = np.arange(1, gap_exact.shape[-1], dtype=np.int64)
    bins = np.zeros(g.size, dtype=np.int64)
    bins[1:] = np.floor(np.log2(g[1:] - 1)).astype(np.int64) + 1  # bit_length(g - 1); exact at powers of 2
    out = np.zeros((*gap_exact.shape[:-1], _BITS), dtype=np.int64)
    for b in np.unique(bins):
        out[..., b] = gap_exact[..., 1:][..., bins == b].sum(axis=-1)
    return out + gap_over


def _bin_label(j: int) -> str:
    return "1" if j == 0 else ("2" if j == 1 else f"{2 ** (j - 1) + 1}-{2**j}")


def reuse_sentence(summary: Mapping[str, Any]) -> str:
    """The headline of next-token reuse, one definition for every command: medians over layers of the reuse,
    of the within-sequence shuffle's expectation, and of the per-layer ratio between the two (the median of
    ratios, not the ratio of the medians: each layer is compared with its own shuffle)."""
    reuse, shuffled, ratio = (summary[k].median for k in ("reuse", "reuse_shuffled_expected", "reuse_ratio"))
    if reuse is None or shuffled is None:
        return "no consecutive tokens to compare"
    times = "n/a" if ratio is None else f"{ratio:.2f}x"
    return (
        f"consecutive tokens share {reuse:.1%} of their experts vs {shuffled:.1%} with each sequence's tokens "
        f"shuffled (medians over layers); per layer, reuse is {times} the shuffle's (median of the layer ratios)"
    )


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def spread(values: Sequence[float | None]) -> Spread:
    v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    return Spread(float(v.mean()), float(np.median(v))) if v.size else Spread(None, None)


def layer_rows(
    layer_ids: Sequence[int], top_k: int, n_experts: int, real: TemporalCounts, shuf: TemporalCounts
) -> tuple[tuple[LayerLocality, ...], tuple[str, ...]]:
    """Per-layer temporal figures from the sums of the trace (`real`) and of one seeded shuffle (`shuf`),
    and the labels of the gap bins used (up to the largest gap seen)."""
    used = np.flatnonzero(_gap_bins(real.gap_exact, real.gap_over).sum(axis=0))
    n_bins = int(used[-1]) + 1 if used.size else 1
    k, n_exp, n_tok = top_k, n_experts, real.tokens
    bins = _gap_bins(real.gap_exact, real.gap_over)
    rows = []
    per_pair = max(real.pairs * k, 1)
    for i, lid in enumerate([int(x) for x in layer_ids]):
        expected = float(real.shuffle_expected[i]) / per_pair
        reuse = float(real.overlap[i]) / per_pair
        ws = real.ws_hist[i]
        ws_mean = float((ws * np.arange(ws.size)).sum() / max(ws.sum(), 1))
        rows.append(
            LayerLocality(
                layer=int(lid),
                pairs=real.pairs,
                reuse=reuse,
                reuse_shuffled=float(shuf.overlap[i]) / per_pair,
                reuse_shuffled_expected=expected,
                reuse_independent=float(((real.selections[i] / n_tok) ** 2).sum() / k),
                reuse_uniform=k / n_exp,
                reuse_ratio=_ratio(reuse, expected),
                gap_hist=tuple(int(x) for x in bins[i, :n_bins]),
                cold=int(real.cold[i]),
                cold_share=float(real.cold[i]) / (n_tok * k),
                median_gap=_median_gap(real.gap_exact[i], real.gap_over[i]),
                median_gap_shuffled=_median_gap(shuf.gap_exact[i], shuf.gap_over[i]),
                working_set_mean=ws_mean,
                working_set_median=float(hist_median(ws)),
                working_set_frac=ws_mean / n_exp,
                window=tuple(_ratio(float(s), float(n)) for s, n in zip(real.window_sum[i], real.windows, strict=True)),
                window_shuffled=tuple(
                    _ratio(float(s), float(n)) for s, n in zip(shuf.window_sum[i], shuf.windows, strict=True)
                ),
            )
        )
    return tuple(rows), tuple(_bin_label(j) for j in range(n_bins))


TEMPORAL_SUMMARY = (
    "reuse", "reuse_shuffled", "reuse_shuffled_expected", "reuse_independent", "reuse_uniform", "reuse_ratio",
    "cold_share", "median_gap", "working_set_mean", "working_set_frac",
)  # fmt: skip


def length_rows(real: TemporalCounts, n_experts: int) -> tuple[LengthRow, ...]:
    """Working sets by sequence length bin (mean over layers), from the trace's temporal sums."""
    n_tokens = real.tokens
    out = []
    n_lay = real.ws_by_length.shape[0]
    for j in np.flatnonzero(real.seqs_by_length).tolist():
        mean = float(real.ws_by_length[:, j].sum()) / (n_lay * int(real.seqs_by_length[j]))
        out.append(LengthRow(2**j, min(2 ** (j + 1) - 1, n_tokens), int(real.seqs_by_length[j]), mean,
                             mean / n_experts))  # fmt: skip
    return tuple(out)


def default_budgets(top_k: int, n_experts: int) -> tuple[int, ...]:
    """``(k, 2k, 4k)`` capped at the expert count."""
    return tuple(sorted({min(m * top_k, n_experts) for m in (1, 2, 4)}))


def locality(
    trace: RoutingTrace,
    *,
    budgets: Sequence[int] | None = None,
    predictors: Sequence[str] = tuple(PREDICTORS),
    seed: int = 0,
    widths: Sequence[int] = WIDTHS,
    model: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Locality:
    """Temporal locality, cross-layer predictability and prefetch hit rates of every layer.

    Parameters
    ----------
    trace : the routing; its ``experts: [tokens, layers, k]`` and sequence bounds (order kept).
    budgets : experts prefetched per token, each in ``1..E``; default ``(k, 2k, 4k)`` capped at E.
    predictors : names from `moescope.analyze.prefetch.PREDICTORS`.
    seed : seed of the within-sequence shuffle baseline.
    widths : window widths of the windowed working set.
    model : a name for the report (default: the trace's metadata).
    progress : called as ``progress(layers_done, layers)`` after each block of layers.

    Returns
    -------
    `Locality`. Prefetch and cross-layer tables are learned on the first half of every sequence and
    scored on the second half.
    """
    import numba

    n_tok, n_lay, k, n_exp = trace.n_tokens, trace.n_layers, trace.top_k, trace.n_experts
    budgets = check_budgets(default_budgets(k, n_exp) if budgets is None else budgets, n_exp)
    predictors = check_predictors(predictors)
    widths = check_widths(widths)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UsageError(f"seed is {seed!r}; expected an integer >= 0, e.g. --seed 0")
    if n_tok - trace.n_sequences <= 0:
        raise UsageError(
            f"the trace has {n_tok} tokens in {trace.n_sequences} sequences: no two consecutive tokens share a "
            f"sequence, so there is no order to measure; import it with its sequence boundaries"
        )
    train, test = split_ranges(trace, "train"), split_ranges(trace, "test")
    test_len = test[1] - test[0]
    test_pairs = int(np.maximum(test_len - 1, 0).sum())
    if test_pairs == 0:
        raise UsageError(
            "no sequence has two tokens in its second half (the test split), so prefetch cannot be scored; "
            "give sequences of at least 3 tokens"
        )
    order = shuffle_within_sequences(trace.seq_starts, n_tok, seed)
    n_workers = max(1, numba.get_num_threads())
    block = max(_MIN_BLOCK, n_workers)
    starts, ends = trace.seq_starts, trace.seq_ends
    reals, shufs, hits = [], [], []
    for lo in range(0, n_lay, block):
        hi = min(lo + block, n_lay)
        slab = layer_slab(trace.experts, lo, min(hi + 1, n_lay))
        own = slab[: hi - lo]
        reals.append(_temporal_slab(own, None, starts, ends, n_exp, widths))
        shufs.append(_temporal_slab(own, order, starts, ends, n_exp, widths))
        counts, coact, transition, cross = _learn_slab(slab, hi - lo, n_exp, *train)
        tables = [LayerTables(counts[i], coact[i], transition[i]) for i in range(hi - lo)]
        next_counts = counts[1 : 1 + cross.shape[0]]
        hits.append(block_hits(slab, hi - lo, tables, cross, next_counts, test, budgets, predictors, k, n_workers))
        if progress is not None:
            progress(hi, n_lay)
    real, shuf = TemporalCounts.stack(reals), TemporalCounts.stack(shufs)
    raw = HitCounts(
        np.concatenate([h[0] for h in hits]), np.concatenate([h[1] for h in hits]),
        np.concatenate([h[2] for h in hits]), test_pairs, int(test_len.sum()), budgets, predictors,
    )  # fmt: skip
    pre, cross_rows = results_from_hits(raw, trace.layer_ids, k, n_exp)
    rows, gap_bins = layer_rows(trace.layer_ids, k, n_exp, real, shuf)
    summary = {name: spread([getattr(r, name) for r in rows]) for name in TEMPORAL_SUMMARY}
    summary["cross_precision"] = spread([c.precision for c in cross_rows])
    summary["cross_frequency"] = spread([c.frequency for c in cross_rows])
    overall = {p: tuple(spread([r.hit_rate[p][b] for r in pre]) for b in range(len(budgets))) for p in predictors}
    ahead: tuple[LookaheadRow, ...] = ()
    if "lookahead" in trace.extras:
        at_k = {}  # target layer index -> id-only predictor -> rate at budget k
        if k in budgets:
            b = budgets.index(k)
            at_k = {i: {p: r.hit_rate[p][b] for p in predictors} for i, r in enumerate(pre)}
        for i, c in enumerate(cross_rows):
            at_k.setdefault(i + 1, {})["cross-layer"] = c.precision
        ahead = lookahead_rows(trace, test, at_k)
        for d in sorted({r.distance for r in ahead}):
            summary[f"lookahead_recall_d{d}"] = spread([r.recall for r in ahead if r.distance == d])
    return Locality(
        model=model or trace.meta.model,
        n_experts=n_exp,
        top_k=k,
        tokens=n_tok,
        sequences=trace.n_sequences,
        seed=int(seed),
        widths=widths,
        gap_bins=gap_bins,
        budgets=budgets,
        predictors=predictors,
        layers=rows,
        working_set_by_length=length_rows(real, n_exp),
        cross=cross_rows,
        prefetch=pre,
        test_pairs=test_pairs,
        test_tokens=int(test_len.sum()),
        prefetch_chance=tuple(b / n_exp for b in budgets),
        prefetch_overall=overall,
        summary=summary,
        lookahead=ahead,
    )
