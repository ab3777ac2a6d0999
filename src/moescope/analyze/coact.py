"""Co-activation: are some experts selected *together* more often than their popularity explains?

Per MoE layer (``E`` experts, ``N`` tokens, top-``k``, ``n_i`` selections of expert ``i``):

- **Co-activation** ``C [E, E]``: ``C[i, j]`` tokens whose top-k holds both i and j, ``C[i, i] = n_i``;
  counted pair by pair (no ``[tokens, E]`` one-hot), additive over token chunks, parallel across layers.
- **Chance** ``X[i, j] = n_i n_j / N`` (independent experts with these marginals); ``lift = C / X``. A
  top-k holds ``N k (k-1) / 2`` pairs whatever the routing, fewer than chance (``pair_ratio = sum C / sum X``
  off the diagonal; ``(k-1) E / (k (E-1))`` for uniform routing, 0.53 at k=2 of 16), so the gain below
  compares *shares* of pairs: a fixed k alone does not read as anti-structure.
- **Groups**: ``D`` groups of ``E / D`` experts (the first ``E mod D`` one larger when D does not divide E)
  maximising the intra-group sum of ``W = C / sum C - X / sum X`` (off-diagonal; modularity under a size
  constraint): greedy growth, then best-improvement swaps of two experts (sizes kept) until none helps,
  also from ``restarts - 1`` seeded random partitions; the best wins. Deterministic given the seed.
- **Gain** ``= intra_share_observed / intra_share_expected``: the share of co-selected pairs inside the
  groups, observed over chance. 1 = the groups hold what popularity explains (``gain * pair_ratio =
  sum_intra C / sum_intra X``).
- **Null**: the same layer with every pairing destroyed and each ``n_i`` kept exactly, clustered the same
  way; its gain is what clustering finds in noise (above 1: groups fitted to noise always find some).
  ``"swap"`` (default) deals the ``N k`` selections at random into N tokens of exactly k distinct experts
  (configuration model + degree-preserving swaps for repeats). ``"shuffle"`` moves each expert's
  selections to a uniform random ``n_i``-subset of tokens, independently (Floyd; ``E[C] = X`` exactly;
  token set sizes vary). Why swap: a top-k is a fixed-size draw, and fixed size alone makes popular pairs
  rarer than ``X`` (sampling without replacement); clustering exploits that systematic pattern in a real
  layer but not in a shuffled one. Independent synthetic top-k routing (Plackett-Luce, no teams) reads
  ``excess`` up to 1.35 against the shuffle null (k=2 of 16, Zipf 1.5-2), 1.07 at k=4, but within
  0.98-1.02 against the swap null at k = 2..8, E = 16..128, Zipf 0..2.
- **Pair test, without clustering** (the verdict; it needs no group count): rank the pairs whose expected
  count ``X'`` (chance scaled so ``sum X' = sum C``, the fixed-k deficit removed) is at least
  ``MIN_PAIR_COUNT`` by lift ``C / X'``; the *top-pair lift* is ``sum C / sum X'`` over the top ``E`` of them
  (at most a quarter of them): how much more often the most-linked pairs fire together than chance. The
  null layers get the same statistic (their own top pairs, so selection by noise is matched), and
  ``pair_excess = top-pair lift / null mean``. Fewer than 16 eligible pairs (too few tokens): untested.
- **Verdict**: a layer has real pairwise structure when ``pair_excess >= min_pair_excess`` and, with
  ``n_null >= 2``, the lift clears the null mean by 5 null std; when the pair test is untested, when the
  clustering does: ``excess = gain / mean null gain >= min_excess`` (1.10 by default, five times the swap
  null's worst miss above) and ``gain >= null mean + 5 null std``. The model is structured when more than
  half its layers are. The clustering at D groups always reports what D groups capture (``grouped``): a
  structure can be real yet not fit D groups (teams of 4 among 128 experts, 8 groups of 16: the README's
  ``trace synth --teams 8``, pair excess 1.2-1.7, clustering excess about 1).

Not done here: placing experts on devices (capacities, traffic: the placement planner), and anything
across layers or along time (reuse between tokens is locality). No I/O except `write_coact_npz` (atomic).

    >>> result = coactivation(trace, groups=8, n_null=3, seed=0)
    >>> result.median_excess, result.structured
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numba
import numpy as np

from moescope import _atomic
from moescope._jit import njit_parallel, prange
from moescope.analyze._clustering import _cluster_many
from moescope.analyze._nulls import _null_counts, _stream_keys, _symmetrize
from moescope.errors import UsageError
from moescope.trace import RoutingTrace, layer_positions

DEFAULT_GROUPS = 8  # one node's expert-parallel degree; capped at E // 2 (groups of at least 2)
DEFAULT_N_NULL = 3
DEFAULT_NULL = "swap"
DEFAULT_RESTARTS = 4
DEFAULT_MIN_EXCESS = 1.10
# Chosen on synthetic independent routing (Plackett-Luce top-k, no teams: k 2/4/8, E 16/64/128, Zipf 0/1/2,
# 5k and 50k tokens, 2 layers each, swap null x3; never on a real trace): pair_excess ranged 0.978-1.028;
# five times the worst miss above 1 gives 1.14. Planted teams (8 of 4 among 128, strength 0.5) read 1.19-1.70.
DEFAULT_MIN_PAIR_EXCESS = 1.14
MIN_PAIRS_TESTED = 16  # eligible pairs below this: the pair test is untested (4 top pairs at least)
NULL_Z = 5.0  # the real gain must also clear the null mean by this many null standard deviations
MIN_PAIR_COUNT = 25  # top pair: only pairs seen this often (lift known to about +-20%)
_KEY_NULL, _KEY_CLUSTER = 0, 1
NULLS = ("shuffle", "swap")


# ----------------------------------------------------------------------------------------------
# kernels


@njit_parallel
def _pair_counts(experts, layer_idx, out):
    """Add co-selections to ``out [m, E, E]``: slot pairs a < b at ``[id_a, id_b]``, selections on the diagonal.

    experts : [tokens, layers, k] ids, distinct per token and layer; layer_idx : [m] layer axis indices.
    ``out + out.T`` off the diagonal is the symmetric count (no min/max per pair: an unpredictable branch
    there costs about 3x).
    """
    n_tok, k = experts.shape[0], experts.shape[2]
    for q in prange(layer_idx.shape[0]):
        layer = layer_idx[q]
        o = out[q]
        for t in range(n_tok):
            for a in range(k):
                i = experts[t, layer, a]
                o[i, i] += 1
                for b in range(a + 1, k):
                    o[i, experts[t, layer, b]] += 1


# ----------------------------------------------------------------------------------------------
# public array functions


def coact_counts(experts: np.ndarray, n_experts: int) -> np.ndarray:
    """Co-activation counts per layer, pair by pair (no one-hot), parallel across layers.

    Parameters
    ----------
    experts : [tokens, k] (one layer) or [tokens, layers, k] integer expert ids, distinct per token and layer
        (as in a `RoutingTrace`).
    n_experts : experts per layer; ids must be in ``0 .. n_experts-1``.

    Returns
    -------
    [E, E] (or [layers, E, E]) int64, symmetric: ``[i, j]`` tokens that selected both i and j, ``[i, i]``
    selections of i. Additive over token chunks: the sum over chunks equals the whole.
    """
    ex = np.asarray(experts)
    if ex.ndim not in (2, 3) or not np.issubdtype(ex.dtype, np.integer):
        raise UsageError(
            f"experts has shape {ex.shape} and dtype {ex.dtype}; expected integer ids [tokens, k] or "
            f"[tokens, layers, k]"
        )
    n_experts = _check_int("n_experts", n_experts, 1)
    one_layer = ex.ndim == 2
    ex3 = ex[:, None, :] if one_layer else ex
    lo, hi = (int(ex3.min()), int(ex3.max())) if ex3.size else (0, 0)
    if lo < 0 or hi >= n_experts:
        bad = lo if lo < 0 else hi
        raise UsageError(
            f"expert id {bad} is outside 0..{n_experts - 1} (n_experts={n_experts}); pass the model's n_experts "
            f"or validate the ids with RoutingTrace"
        )
    out = _layer_counts(ex3, np.arange(ex3.shape[1]), n_experts)
    return out[0] if one_layer else out


def _layer_counts(experts: np.ndarray, layer_idx: np.ndarray, n_experts: int) -> np.ndarray:
    """[m, E, E] int64 symmetric counts of the layers at ``layer_idx [m]`` of validated ``experts``."""
    out = np.zeros((layer_idx.size, n_experts, n_experts), dtype=np.int64)
    _pair_counts(experts, np.asarray(layer_idx, dtype=np.int64), out)
    return _symmetrize(out)


def group_sizes(n_experts: int, n_groups: int) -> np.ndarray:
    """[D] int64 group sizes: ``E // D``, the first ``E mod D`` groups one more."""
    sizes = np.full(n_groups, n_experts // n_groups, dtype=np.int64)
    sizes[: n_experts % n_groups] += 1
    return sizes


def _objective(counts: np.ndarray) -> np.ndarray:
    """``W [..., E, E]`` = C / sum C - X / sum X off the diagonal (0 on it), ``X = n_i n_j``."""
    n = np.einsum("...ii->...i", counts).astype(np.float64)
    idx = np.arange(counts.shape[-1])
    obs = counts.astype(np.float64)
    obs[..., idx, idx] = 0.0
    exp = n[..., :, None] * n[..., None, :]
    exp[..., idx, idx] = 0.0
    obs_tot = obs.sum(axis=(-1, -2), keepdims=True)
    exp_tot = exp.sum(axis=(-1, -2), keepdims=True)
    return obs / np.where(obs_tot > 0, obs_tot, 1.0) - exp / np.where(exp_tot > 0, exp_tot, 1.0)


def _cluster(counts: np.ndarray, n_groups: int, restarts: int, keys: np.ndarray) -> np.ndarray:
    """[M, E] int64 canonical labels for ``counts [M, E, E]``; ``keys [M, restarts - 1]`` uint64."""
    w = np.ascontiguousarray(_objective(counts))
    labels = np.empty(counts.shape[:2], dtype=np.int64)
    with np.errstate(over="ignore"):
        _cluster_many(w, group_sizes(counts.shape[-1], n_groups), keys, labels)
    return np.stack([_canonical(row) for row in labels])


def _canonical(labels: np.ndarray) -> np.ndarray:
    """Relabel groups in order of their smallest member, so equal partitions have equal labels."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    return np.argsort(np.argsort(first))[inverse].astype(np.int64)


def balanced_groups(
    counts: np.ndarray, n_groups: int, *, seed: int = 0, restarts: int = DEFAULT_RESTARTS
) -> np.ndarray:
    """Split experts into `n_groups` equal-size groups maximising intra-group co-activation beyond chance.

    Parameters
    ----------
    counts : [E, E] symmetric co-activation counts (`coact_counts` of one layer).
    n_groups : D, with ``2 <= D <= E // 2``; sizes per `group_sizes`.
    seed : seeds the random restarts (the result is deterministic given it).
    restarts : partitions refined (the greedy one, then ``restarts - 1`` random ones); the best is kept.

    Returns
    -------
    [E] int64 group of each expert, groups numbered by their smallest member.
    """
    c = _check_matrix(counts)
    _check_groups(n_groups, c.shape[0])
    keys = _stream_keys(_check_int("seed", seed, 0), 0, 0, _KEY_CLUSTER, _check_int("restarts", restarts, 1) - 1)
    return _cluster(c[None], n_groups, restarts, keys[None])[0]


@dataclasses.dataclass(frozen=True)
class GainParts:
    """How much of a layer's co-selection falls inside the groups, observed and under chance."""

    gain: float  # intra_share_observed / intra_share_expected
    intra_share_observed: float  # sum_{intra, i<j} C / sum_{i<j} C
    intra_share_expected: float  # the same with X = n_i n_j / N
    pair_ratio: float  # sum_{i<j} C / sum_{i<j} X (< 1 from a fixed top-k alone)


def clustering_gain(counts: np.ndarray, n_tokens: int, labels: np.ndarray) -> GainParts:
    """Gain of a grouping: intra-group share of co-selected pairs, observed over chance.

    Parameters
    ----------
    counts : [E, E] symmetric co-activation counts.
    n_tokens : tokens behind the counts (N in ``n_i n_j / N``).
    labels : [E] int group of each expert.
    """
    c = _check_matrix(counts).astype(np.float64)
    lab = np.asarray(labels)
    if lab.shape != (c.shape[0],):
        raise UsageError(f"labels has shape {lab.shape}; expected one group per expert ({c.shape[0]},)")
    n = np.diag(c).copy()
    x = np.outer(n, n) / _check_int("n_tokens", n_tokens, 1)
    off = ~np.eye(c.shape[0], dtype=bool)
    intra = (lab[:, None] == lab[None, :]) & off
    obs_tot, exp_tot = c[off].sum(), x[off].sum()
    share_obs = float(c[intra].sum() / obs_tot) if obs_tot > 0 else float("nan")
    share_exp = float(x[intra].sum() / exp_tot) if exp_tot > 0 else float("nan")
    gain = share_obs / share_exp if share_exp > 0 else float("nan")
    ratio = float(obs_tot / exp_tot) if exp_tot > 0 else float("nan")
    return GainParts(float(gain), share_obs, share_exp, ratio)


def _top_pair(counts: np.ndarray, n_tokens: int) -> tuple[int, int, int, float]:
    """(i, j, count, lift) of the pair with the highest lift among pairs seen >= MIN_PAIR_COUNT times
    (else the most co-selected pair)."""
    n = np.diag(counts).astype(np.float64)
    iu, ju = np.triu_indices(counts.shape[0], 1)
    obs = counts[iu, ju]
    exp = n[iu] * n[ju] / n_tokens
    lift = np.divide(obs, exp, out=np.zeros_like(exp), where=exp > 0)
    ok = obs >= MIN_PAIR_COUNT
    p = int(np.argmax(np.where(ok, lift, -1.0))) if ok.any() else int(np.argmax(obs))
    return int(iu[p]), int(ju[p]), int(obs[p]), float(lift[p])


def top_pair_lift(counts: np.ndarray, n_tokens: int) -> float | None:
    """The pair test's statistic (module docstring): ``sum C / sum X'`` over the top pairs by lift among
    pairs expected ``MIN_PAIR_COUNT`` times or more; None when fewer than `MIN_PAIRS_TESTED` are.

    counts : [E, E] symmetric co-activation counts; n_tokens : N.
    """
    n = np.diag(counts).astype(np.float64)
    iu, ju = np.triu_indices(counts.shape[0], 1)
    obs = counts[iu, ju].astype(np.float64)
    exp = n[iu] * n[ju] / n_tokens
    if obs.sum() <= 0 or exp.sum() <= 0:
        return None
    exp *= obs.sum() / exp.sum()  # a fixed top-k makes pairs rarer than independent draws: compare shares
    ok = exp >= MIN_PAIR_COUNT
    if ok.sum() < MIN_PAIRS_TESTED:
        return None
    obs, exp = obs[ok], exp[ok]
    top = np.argsort(-(obs / exp), kind="stable")[: min(counts.shape[0], int(ok.sum()) // 4)]
    return float(obs[top].sum() / exp[top].sum())


# ----------------------------------------------------------------------------------------------
# the analysis


@dataclasses.dataclass(frozen=True)
class LayerCoact:
    """One layer: its groups, the gain, the null layers' gains and the verdict (module docstring)."""

    layer: int
    groups: tuple[tuple[int, ...], ...]  # experts of each group, groups by smallest member
    gain: float
    intra_share_observed: float
    intra_share_expected: float
    pair_ratio: float
    null_gains: tuple[float, ...]  # gain of the same clustering on each null layer
    null_gain_mean: float
    null_gain_std: float | None  # sample std (ddof 1); None with one null layer
    excess: float  # gain / null_gain_mean
    grouped: bool  # the clustering at D groups clears the null (what D groups capture)
    pair_lift: float | None  # top-pair lift (module docstring); None when untested
    null_pair_lifts: tuple[float, ...]
    pair_excess: float | None  # pair_lift / mean null pair lift
    structured: bool  # the verdict: the pair test, or the clustering where the pair test is untested
    top_pair: tuple[int, int]
    top_pair_count: int
    top_pair_lift: float
    counts: np.ndarray | None = dataclasses.field(default=None, compare=False)  # [E, E] int64, when asked for

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "counts"}
        d["groups"] = [list(g) for g in self.groups]
        d["null_gains"] = list(self.null_gains)
        d["null_pair_lifts"] = list(self.null_pair_lifts)
        d["top_pair"] = list(self.top_pair)
        if self.counts is not None:
            d["counts"] = self.counts.tolist()
        return d


@dataclasses.dataclass(frozen=True)
class Coactivation:
    """Per-layer `LayerCoact` rows, their medians and the overall verdict."""

    layers: tuple[LayerCoact, ...]
    n_experts: int
    top_k: int
    n_tokens: int
    n_groups: int
    group_sizes: tuple[int, ...]
    null: str
    n_null: int
    seed: int
    restarts: int
    min_excess: float
    min_pair_excess: float
    null_z: float
    model: str | None
    median_gain: float
    median_null_gain: float
    median_excess: float
    median_pair_excess: float | None
    grouped_layers: int
    structured_layers: int
    structured: bool  # more than half of the layers have real pairwise structure

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["layers"] = [r.to_dict() for r in self.layers]
        d["group_sizes"] = list(self.group_sizes)
        return d


def coactivation(
    trace: RoutingTrace,
    *,
    groups: int | None = None,
    layers: Sequence[int] | None = None,
    n_null: int = DEFAULT_N_NULL,
    null: str = DEFAULT_NULL,
    seed: int = 0,
    restarts: int = DEFAULT_RESTARTS,
    min_excess: float = DEFAULT_MIN_EXCESS,
    min_pair_excess: float = DEFAULT_MIN_PAIR_EXCESS,
    keep_matrices: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Coactivation:
    """Co-activation, clustering gain and the null, per layer (see the module docstring).

    Parameters
    ----------
    trace : the routing (``experts [tokens, layers, k]``, k >= 2).
    groups : D, the number of equal-size expert groups, ``2 <= D <= E // 2``; default ``min(8, E // 2)``.
    layers : model layer ids to analyse (default all), in the given order.
    n_null : null layers drawn per layer (>= 1; the z test needs >= 2).
    null : ``"swap"`` (fixed set sizes, default) or ``"shuffle"`` (independent experts); see `NULLS`.
    seed : seeds the nulls and the clustering restarts; a layer's result depends only on the seed,
        its own routing and its model layer id (not on which other layers are analysed).
    restarts : partitions refined per matrix (greedy + ``restarts - 1`` random); best kept.
    min_excess : the clustering at D groups clears the null (``grouped``; the verdict where the pair test is
        untested) when ``excess >= min_excess`` and the gain clears the null by ``NULL_Z`` standard deviations.
    min_pair_excess : a layer is structured when its ``pair_excess >= min_pair_excess`` and the top-pair lift
        clears the null by ``NULL_Z`` standard deviations (the pair test: no group count involved).
    keep_matrices : keep each layer's ``counts [E, E]`` in the result (for `write_coact_npz`, JSON).
    progress : called as ``progress(layers_done, layers_total)``.

    Returns
    -------
    `Coactivation`, one `LayerCoact` per analysed layer.
    """
    pos = _layer_positions(trace, layers)
    opts = _options(
        trace.n_experts, trace.top_k, trace.n_tokens, groups, n_null, null, seed, restarts, min_excess, min_pair_excess
    )
    rows: list[LayerCoact] = []
    batch = max(1, numba.get_num_threads())
    for lo in range(0, pos.size, batch):
        idx = pos[lo : lo + batch]
        real = _layer_counts(trace.experts, idx, trace.n_experts)
        rows += _batch_rows(real, [int(trace.layer_ids[i]) for i in idx], trace.n_tokens, trace.top_k, opts,
                            keep_matrices)  # fmt: skip
        if progress is not None:
            progress(len(rows), pos.size)
    return _result(rows, trace.n_experts, trace.top_k, trace.n_tokens, opts, trace.meta.model)


def coactivation_from_counts(
    counts: np.ndarray,
    n_tokens: int,
    top_k: int,
    layer_ids: Sequence[int],
    *,
    groups: int | None = None,
    n_null: int = DEFAULT_N_NULL,
    null: str = DEFAULT_NULL,
    seed: int = 0,
    restarts: int = DEFAULT_RESTARTS,
    min_excess: float = DEFAULT_MIN_EXCESS,
    min_pair_excess: float = DEFAULT_MIN_PAIR_EXCESS,
    keep_matrices: bool = False,
    model: str | None = None,
) -> Coactivation:
    """`coactivation` from summed pair counts ``[layers, E, E]`` (e.g. a map-reduce over token chunks):
    the nulls depend only on each expert's selections, the token count and k, so the result equals
    `coactivation` of the whole trace with the same options and seed."""
    c = np.asarray(counts)
    if c.ndim != 3 or c.shape[0] != len(layer_ids):
        raise UsageError(f"counts has shape {c.shape}; expected [layers, E, E] with {len(layer_ids)} layers")
    opts = _options(c.shape[1], top_k, n_tokens, groups, n_null, null, seed, restarts, min_excess, min_pair_excess)
    lids = [int(x) for x in layer_ids]
    rows: list[LayerCoact] = []
    batch = max(1, numba.get_num_threads())  # the nulls hold N k ids per null layer: a few layers at a time
    for lo in range(0, len(lids), batch):
        rows += _batch_rows(c[lo : lo + batch].astype(np.int64), lids[lo : lo + batch], n_tokens, top_k, opts,
                            keep_matrices)  # fmt: skip
    return _result(rows, c.shape[1], top_k, n_tokens, opts, model)


def _options(n_exp, k, n_tok, groups, n_null, null, seed, restarts, min_excess, min_pair_excess) -> dict[str, Any]:
    if k < 2:
        raise UsageError(f"top_k is {k}; co-activation needs at least 2 experts per token")
    if n_tok == 0:
        raise UsageError("the trace has no tokens; give a trace with routing")
    groups = min(DEFAULT_GROUPS, n_exp // 2) if groups is None else groups
    _check_groups(groups, n_exp)
    _check_int("n_null", n_null, 1)
    _check_null(null)
    _check_int("seed", seed, 0)
    _check_int("restarts", restarts, 1)
    for name, value in (("min_excess", min_excess), ("min_pair_excess", min_pair_excess)):
        if not value >= 1.0:
            raise UsageError(f"{name} is {value}; expected a ratio >= 1 (e.g. 1.1)")
    return dict(groups=int(groups), n_null=int(n_null), null=null, seed=int(seed), restarts=int(restarts),
                min_excess=float(min_excess), min_pair_excess=float(min_pair_excess))  # fmt: skip


def _batch_rows(real, lids, n_tok, k, o, keep_matrices) -> list[LayerCoact]:
    """Rows of the layers `lids` from their real counts ``[m, E, E]``: nulls, clustering, verdicts."""
    n_exp, n_null, restarts = real.shape[-1], o["n_null"], o["restarts"]
    n_sel = np.repeat(np.einsum("lii->li", real), n_null, axis=0)  # [m * n_null, E], a fresh array
    keys = np.stack([_stream_keys(o["seed"], lid, r, _KEY_NULL, n_exp) for lid in lids for r in range(n_null)])
    null_mats = _null_counts(n_sel, n_tok, k, keys, o["null"]).reshape(len(lids), n_null, n_exp, n_exp)
    mats = np.concatenate([real[:, None], null_mats], axis=1).reshape(-1, n_exp, n_exp)  # per layer: real, nulls
    ckeys = np.stack(
        [_stream_keys(o["seed"], lid, r, _KEY_CLUSTER, restarts - 1) for lid in lids for r in range(n_null + 1)]
    )
    labels = _cluster(mats, o["groups"], restarts, ckeys).reshape(len(lids), n_null + 1, n_exp)
    return [
        _layer_result(
            lid, real[q], null_mats[q], labels[q], n_tok, o["min_excess"], o["min_pair_excess"], keep_matrices
        )
        for q, lid in enumerate(lids)
    ]


def _result(rows, n_exp, k, n_tok, o, model) -> Coactivation:
    gains = np.array([r.gain for r in rows])
    nulls = np.array([r.null_gain_mean for r in rows])
    n_struct = sum(r.structured for r in rows)
    pairs = [r.pair_excess for r in rows if r.pair_excess is not None]
    return Coactivation(
        layers=tuple(rows),
        n_experts=n_exp,
        top_k=k,
        n_tokens=n_tok,
        n_groups=o["groups"],
        group_sizes=tuple(int(s) for s in group_sizes(n_exp, o["groups"])),
        null=o["null"],
        n_null=o["n_null"],
        seed=o["seed"],
        restarts=o["restarts"],
        min_excess=o["min_excess"],
        min_pair_excess=o["min_pair_excess"],
        null_z=NULL_Z,
        model=model,
        median_gain=float(np.median(gains)),
        median_null_gain=float(np.median(nulls)),
        median_excess=float(np.median(gains / nulls)),
        median_pair_excess=float(np.median(pairs)) if pairs else None,
        grouped_layers=int(sum(r.grouped for r in rows)),
        structured_layers=int(n_struct),
        structured=2 * n_struct > len(rows),
    )


def _layer_result(
    lid: int,
    real: np.ndarray,
    null: np.ndarray,
    labels: np.ndarray,
    n_tok: int,
    min_excess: float,
    min_pair_excess: float,
    keep: bool,
) -> LayerCoact:
    """Package one layer: ``real [E, E]``, ``null [n_null, E, E]``, ``labels [1 + n_null, E]``."""
    parts = clustering_gain(real, n_tok, labels[0])
    null_gains = tuple(clustering_gain(null[r], n_tok, labels[r + 1]).gain for r in range(null.shape[0]))
    mean = float(np.mean(null_gains))
    std = float(np.std(null_gains, ddof=1)) if len(null_gains) > 1 else None
    excess = parts.gain / mean
    clears = std is None or parts.gain >= mean + NULL_Z * std
    grouped = bool(excess >= min_excess and clears)
    pair_lift = top_pair_lift(real, n_tok)
    null_lifts = tuple(x for x in (top_pair_lift(null[r], n_tok) for r in range(null.shape[0])) if x is not None)
    pair_excess, pair_ok = None, None
    if pair_lift is not None and len(null_lifts) == null.shape[0]:
        pmean = float(np.mean(null_lifts))
        pstd = float(np.std(null_lifts, ddof=1)) if len(null_lifts) > 1 else None
        pair_excess = pair_lift / pmean
        pair_ok = bool(pair_excess >= min_pair_excess and (pstd is None or pair_lift >= pmean + NULL_Z * pstd))
    i, j, count, lift = _top_pair(real, n_tok)
    members = tuple(tuple(int(e) for e in np.flatnonzero(labels[0] == g)) for g in range(int(labels[0].max()) + 1))
    return LayerCoact(
        layer=lid,
        groups=members,
        gain=parts.gain,
        intra_share_observed=parts.intra_share_observed,
        intra_share_expected=parts.intra_share_expected,
        pair_ratio=parts.pair_ratio,
        null_gains=null_gains,
        null_gain_mean=mean,
        null_gain_std=std,
        excess=float(excess),
        grouped=grouped,
        pair_lift=pair_lift,
        null_pair_lifts=null_lifts,
        pair_excess=None if pair_excess is None else float(pair_excess),
        structured=grouped if pair_ok is None else pair_ok,
        top_pair=(i, j),
        top_pair_count=count,
        top_pair_lift=lift,
        counts=real.copy() if keep else None,
    )


def write_coact_npz(result: Coactivation, path: str | Path, overwrite: bool = False) -> Path:
    """Write the matrices of `result` (made with ``keep_matrices=True``) to an ``.npz``, atomically.

    Arrays: ``layer_ids [L]``, ``counts [L, E, E]`` int64, ``expected [L, E, E]`` float64 (``n_i n_j / N``),
    ``lift [L, E, E]`` float64 (``counts / expected``, NaN where expected is 0), ``groups [L, E]`` int64
    (group of each expert), ``n_tokens`` (scalar).
    """
    if any(r.counts is None for r in result.layers):
        raise UsageError("this result holds no matrices; run coactivation(..., keep_matrices=True)")
    counts = np.stack([r.counts for r in result.layers])
    n = np.einsum("lii->li", counts).astype(np.float64)
    expected = n[:, :, None] * n[:, None, :] / result.n_tokens
    with np.errstate(divide="ignore", invalid="ignore"):
        lift = np.where(expected > 0, counts / expected, np.nan)
    labels = np.zeros((len(result.layers), result.n_experts), dtype=np.int64)
    for q, r in enumerate(result.layers):
        for g, members in enumerate(r.groups):
            labels[q, list(members)] = g
    with _atomic.atomic_path(path, overwrite, suffix=".npz") as tmp:
        np.savez(
            tmp,
            layer_ids=np.asarray([r.layer for r in result.layers], dtype=np.int64),
            counts=counts,
            expected=expected,
            lift=lift,
            groups=labels,
            n_tokens=np.int64(result.n_tokens),
        )
    return Path(path)


# ----------------------------------------------------------------------------------------------
# validation


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise UsageError(f"{name} is {value!r}; expected an integer {bound}")
    return int(value)


def _check_null(null: Any) -> str:
    if null not in NULLS:
        raise UsageError(f"null is {null!r}; expected one of {', '.join(NULLS)}")
    return null


def _check_groups(n_groups: Any, n_experts: int) -> int:
    if n_experts < 4:
        raise UsageError(f"the layer has {n_experts} experts; grouping needs at least 4 (2 groups of 2)")
    return _check_int("groups", n_groups, 2, n_experts // 2)


def _check_matrix(counts: Any) -> np.ndarray:
    c = np.asarray(counts)
    if c.ndim != 2 or c.shape[0] != c.shape[1] or not np.issubdtype(c.dtype, np.integer):
        raise UsageError(f"counts has shape {c.shape} and dtype {c.dtype}; expected [E, E] integer counts")
    if not np.array_equal(c, c.T):
        raise UsageError("counts is not symmetric; pass a co-activation matrix from coact_counts")
    return c


def _layer_positions(trace: RoutingTrace, layers: Sequence[int] | None) -> np.ndarray:
    """[m] int64 positions along the trace's layer axis of the model layer ids `layers` (default all)."""
    if layers is None:
        return np.arange(trace.n_layers, dtype=np.int64)
    return layer_positions(trace.layer_ids, layers)
