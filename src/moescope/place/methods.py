"""Placement methods, one small class each behind one interface, registered by name in `METHODS`.

A method is built with `PlaceParams` and fitted on train routing only: ``fit(data, n_devices, seed)``
returns ``assign [layers, E] int64``, the device of each expert, at most ``slots = ceil(E / D)`` experts
per device. Replicas are added afterwards, whatever the method (`moescope.place.replicas`). The CLI's
``--method`` choices are the keys of `METHODS`; the contract tests run over the same registry.

- ``random``: a seeded random balanced assignment (``ceil`` / ``floor(E / D)`` experts per device).
- ``frequency``: standard load balancing, LPT: experts by descending train load, each to the least-loaded
  device with a free slot.
- ``coact-greedy``: agglomerative clustering on co-activation counts ``C[i, j]`` (train tokens choosing
  both): repeatedly merge the two groups with the largest summed ``C`` whose sizes fit one device, down to
  D groups; unconstrained in load. Groups are then packed whole, largest first, onto the least-loaded
  device with room; a group that fits nowhere is split expert by expert onto the device with room that
  shares the most co-activation with it.
- ``coact-capped``: the same, a merge's score lowered by ``coact_lambda`` times the train load by which the
  merged group would exceed its share of the mean device load (``size / slots`` of it: a full group may
  carry the mean, a half-full one half of it; penalising only loads above the whole mean lets early
  groups swallow the hot experts, which leaves the last forced merges unbalanced).
- ``hypergraph``: Mt-KaHyPar connectivity partitioning of the train token sets (optional extra; at most
  ``max_tokens`` evenly strided train tokens per layer), repaired to the slot capacity
  (`moescope.place.hypergraph`).
- ``coact-refined``: local search on the exact train objective (`moescope.place.refine`) from the
  coact-greedy, coact-capped and frequency placements, per layer the best: swaps that cut train devices
  per token while the layer's train load CV stays within frequency's plus the train margin ``b`` and its
  max/mean load within frequency's plus ``b + max_mean_margin - cv_margin`` (the same safety taken off both
  stated margins); train tokens in the second half of their sequence weigh ``late_weight`` times more.
  ``hypergraph-refined``: the same with the hypergraph placement as a fourth start.

The stated constraint is on the *scored* tokens: load CV within frequency's + ``cv_margin`` and max/mean
load within frequency's + ``max_mean_margin``. Scored loads drift from train loads, and experts chosen
together drift together, so a placement held to exactly these margins on its train tokens overshoots them on
held-out ones (on ESFT/DeepSeek-V2-Lite a train CV margin of 0 already gave +0.03..+0.05 held-out). Unless
``balance_margin`` fixes ``b``, it is chosen per D, with the drift cap, by validation inside the fitting
data (`moescope.place.calibrate`): the candidate whose placement, fitted on one part of the train data, cuts
devices per token most while keeping both stated margins on another part, split the way the real fit is
scored.

The drift cap (``drift_margin``) bounds the **drift CV** (`moescope.place.data`) at frequency's times
``1 + drift_margin``. It was the earlier, hand-set guard against the same overshoot; with ``balance_margin``
given it is off unless asked for, and with the validation it is one of the candidates (off, or 0.25).

No I/O.

    >>> assign = METHODS["coact-capped"](PlaceParams()).fit(TrainData(train), n_devices=8, seed=0)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from moescope._jit import njit, njit_parallel, parallel_chunksize, prange
from moescope.errors import UsageError
from moescope.place.data import TrainData, device_loads, drift_cv
from moescope.place.layout import slot_capacity
from moescope.place.metrics import load_cv, max_mean
from moescope.place.refine import refine_all, refine_layer, token_sets

REFINE_TOKENS = 1 << 14  # train tokens per layer the local search evaluates, at most (evenly strided)


# The stated constraint's defaults. cv_margin = 0.05 is the balance rule of issue 18 (held-out load CV within
# frequency's + 0.05). max_mean_margin = 0.10: for roughly normal device loads max/mean - 1 is about the
# expected maximum of D standard normals times the CV (1.03 at D = 4, 1.42 at D = 8, 1.77 at D = 16), so a
# CV margin of 0.05 corresponds to 0.05-0.09 of max/mean; 0.10 lets the max/mean guard bind only on a single
# straggler device, not before the CV guard. Neither was tuned on a result.
CV_MARGIN = 0.05
MAX_MEAN_MARGIN = 0.10
# The search's own knobs. late_weight = 3 and coact_lambda = 20 were chosen on a development set that is not
# the shared ESFT trace the placement results are reported on: the fixture's five domains, 123 cases (halves of
# the whole trace and of each domain, and every split fitting 2 or 4 domains scored on another, D = 2, 4, 8;
# bench place_defaults, rules fixed before the run: the value under which coact-refined holds the stated
# constraint in the most cases, then the lowest mean devices per token). late_weight 1 / 2 / 3 / 5 held 76 /
# 81 / 82 / 78 cases; coact_lambda 1 to 20 all held 82, 20 at the lowest mean (-2.31% against -2.28%: the set
# hardly tells them apart; the earlier hand-set 5 is not kept for it: on ESFT's held-out halves 5 kept
# coact-refined within the rule at -21.0% / -22.2% (D = 4 / 8) and 20 puts it at -22.7% / -23.6% with load CV
# +0.054 / +0.056 over frequency's, and choosing between them on that would choose on the test split). Timed
# in one process on the place_speed input, 5 and 20 give the same placement at the same cost (65-79 s per run
# as the machine drifted, in alternation). kicks = 32 bounds time (the place_speed budget: 60 s at 1M tokens
# x 48 layers x 128 experts), not results: the search is near-converged (4x the kicks moved ESFT's results by
# at most 1.6 points). epsilon = 0.03 is the partitioner's usual imbalance (only the optional hypergraph
# methods use it).
LATE_WEIGHT = 3
COACT_LAMBDA = 20.0
KICKS = 32


@dataclasses.dataclass(frozen=True)
class PlaceParams:
    """Knobs of the methods (each used only by the methods named).

    cv_margin : refined methods, the stated constraint: scored load CV at most frequency's + this.
    max_mean_margin : refined methods, the stated constraint: scored max/mean load at most frequency's + this.
    balance_margin : refined methods: the train load-CV margin ``b`` (per layer, over frequency's train CV; the
        train max/mean margin is ``b + max_mean_margin - cv_margin``). None (default): chosen per D by
        validation inside the fitting data (`moescope.place.calibrate`). Negative asks for a tighter balance
        than frequency's (a cap never goes below 0: then no step may raise the figure).
    drift_margin : refined methods: drift CV allowed above frequency's, as a ratio (None: no drift cap).
    coact_lambda : coact-capped: merge penalty per selection of load above the mean device load.
    epsilon : hypergraph: Mt-KaHyPar's block-weight imbalance.
    kicks : refined methods: iterated-local-search rounds per layer (random swaps, then descend again).
    late_weight : refined methods: objective weight of train tokens in the second half of their sequence.
    max_tokens : refined methods and hypergraph: train tokens per layer the search / partitioner sees, at most.
    threads : hypergraph: Mt-KaHyPar threads (default: usable CPUs).
    """

    cv_margin: float = CV_MARGIN
    max_mean_margin: float = MAX_MEAN_MARGIN
    balance_margin: float | None = None
    drift_margin: float | None = None
    coact_lambda: float = COACT_LAMBDA
    epsilon: float = 0.03
    kicks: int = KICKS
    late_weight: int = LATE_WEIGHT
    max_tokens: int = REFINE_TOKENS
    threads: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.cv_margin < 10:
            raise UsageError(f"--cv-margin {self.cv_margin!r}: expected a load-CV margin in [0, 10), e.g. 0.05")
        if not 0 <= self.max_mean_margin < 100:
            raise UsageError(
                f"--max-mean-margin {self.max_mean_margin!r}: expected a max/mean-load margin in [0, 100), e.g. 0.1"
            )
        if self.balance_margin is not None and not -1 < self.balance_margin < 10:
            raise UsageError(
                f"--balance-margin {self.balance_margin!r}: expected a CV margin in (-1, 10), e.g. 0.02, or 'auto'"
            )
        if self.drift_margin is not None and not 0 <= self.drift_margin < 1e6:
            raise UsageError(f"--drift-margin {self.drift_margin!r}: expected a ratio >= 0, e.g. 0.25 (or off)")
        if not 1 <= self.late_weight <= 1000:
            raise UsageError(f"late_weight {self.late_weight!r}: expected an integer in 1..1000")
        if not 0 <= self.coact_lambda < 1e6:
            raise UsageError(f"coact_lambda {self.coact_lambda!r}: expected a penalty >= 0")
        if not 0 < self.epsilon < 10:
            raise UsageError(f"epsilon {self.epsilon!r}: expected an imbalance in (0, 10), e.g. 0.03")
        if self.kicks < 0 or self.max_tokens < 1:
            raise UsageError(f"kicks {self.kicks!r} / max_tokens {self.max_tokens!r}: expected >= 0 / >= 1")


# ----------------------------------------------------------------------------------------------
# kernels


@njit
def _lpt(load, n_dev, slots):
    """LPT with slots: ``load [E]`` -> ``[E]`` device (descending load, stable; least-loaded device with room)."""
    n_exp = load.shape[0]
    order = np.argsort(-load, kind="mergesort")
    dload = np.zeros(n_dev)
    dcount = np.zeros(n_dev, dtype=np.int64)
    out = np.empty(n_exp, dtype=np.int64)
    for i in range(n_exp):
        e = order[i]
        best = -1
        for d in range(n_dev):
            if dcount[d] < slots and (best < 0 or dload[d] < dload[best]):
                best = d
        out[e] = best
        dload[best] += load[e]
        dcount[best] += 1
    return out


@njit
def _agglomerate(coact, load, n_dev, slots, lam):
    """Merge experts into <= D groups by co-activation, then pack (see the module); returns ``[E]`` device.

    coact : [E, E] int64 co-activation counts; load : [E] float64 train selections; lam : load penalty.
    """
    n_exp = load.shape[0]
    gain = coact.astype(np.float64)
    for i in range(n_exp):
        gain[i, i] = 0.0
    mean_load = load.sum() / n_dev
    group = np.arange(n_exp)
    size = np.ones(n_exp, dtype=np.int64)
    gload = load.copy()
    alive = np.ones(n_exp, dtype=np.bool_)
    n_groups = n_exp
    while n_groups > n_dev:
        best, ba, bb = -np.inf, -1, -1
        for a in range(n_exp):
            if not alive[a]:
                continue
            for b in range(a + 1, n_exp):
                if not alive[b] or size[a] + size[b] > slots:
                    continue
                fair = mean_load * (size[a] + size[b]) / slots
                score = gain[a, b] - lam * max(0.0, gload[a] + gload[b] - fair)
                if score > best:
                    best, ba, bb = score, a, b
        if ba < 0:
            break
        for c in range(n_exp):
            gain[ba, c] += gain[bb, c]
            gain[c, ba] += gain[c, bb]
        gain[ba, ba] = 0.0
        alive[bb] = False
        size[ba] += size[bb]
        gload[ba] += gload[bb]
        for e in range(n_exp):
            if group[e] == bb:
                group[e] = ba
        n_groups -= 1
    # whole groups, largest first (then heaviest), onto the least-loaded device with room
    order = np.argsort(-(size * (n_exp + 1.0) + gload / (load.sum() + 1.0)), kind="mergesort")
    out = np.full(n_exp, -1, dtype=np.int64)
    dload = np.zeros(n_dev)
    dcount = np.zeros(n_dev, dtype=np.int64)
    for i in range(n_exp):
        g = order[i]
        if not alive[g]:
            continue
        best = -1
        for d in range(n_dev):
            if dcount[d] + size[g] <= slots and (best < 0 or dload[d] < dload[best]):
                best = d
        if best < 0:
            continue
        for e in range(n_exp):
            if group[e] == g:
                out[e] = best
        dload[best] += gload[g]
        dcount[best] += size[g]
    # split what did not fit: each expert (hottest first) to the device with room sharing most co-activation
    order = np.argsort(-load, kind="mergesort")
    for i in range(n_exp):
        e = order[i]
        if out[e] >= 0:
            continue
        best, best_aff = -1, -1.0
        for d in range(n_dev):
            if dcount[d] >= slots:
                continue
            aff = 0.0
            for f in range(n_exp):
                if out[f] == d:
                    aff += coact[e, f]
            if aff > best_aff or (aff == best_aff and dload[d] < dload[best]):
                best, best_aff = d, aff
        out[e] = best
        dload[best] += load[e]
        dcount[best] += 1
    return out


@njit_parallel
def _agglomerate_all(coact, load, n_dev, slots, lam, out):
    for layer in prange(coact.shape[0]):
        out[layer] = _agglomerate(coact[layer], load[layer], n_dev, slots, lam)


# ----------------------------------------------------------------------------------------------
# the registry


Fitted = dict[str, np.ndarray]
"""Placements already fitted on the same train data and D, by method name (`PlacementMethod.fit`'s ``fitted``)."""


class PlacementMethod:
    """Base class: `fit` maps train routing to ``assign [layers, E]`` (device per expert, <= ceil(E/D) each).

    ``fitted``: other methods' placements on the same data and D; a method built on others (the refined
    ones start from them) takes those from it instead of fitting them again, and adds what it had to fit.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    requires: ClassVar[str | None] = None  # optional Python package the method imports lazily
    default: ClassVar[bool] = True  # run when no --method is given (`default_methods`)

    def __init__(self, params: PlaceParams | None = None) -> None:
        self.params = params or PlaceParams()

    def fit(self, data: TrainData, n_devices: int, seed: int = 0, fitted: Fitted | None = None) -> np.ndarray:
        raise NotImplementedError


METHODS: dict[str, type[PlacementMethod]] = {}


def register(cls: type[PlacementMethod]) -> type[PlacementMethod]:
    METHODS[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    """Registered methods whose optional dependency (if any) is installed, in registry order."""
    import importlib.util

    return [n for n, cls in METHODS.items() if cls.requires is None or importlib.util.find_spec(cls.requires)]


def default_methods() -> list[str]:
    """The methods run when none are named: the available ones marked `default`, in registry order."""
    return [n for n in available_methods() if METHODS[n].default]


@register
class RandomPlacement(PlacementMethod):
    name = "random"
    summary = "seeded random balanced assignment (the floor to beat)"

    def fit(self, data: TrainData, n_devices: int, seed: int = 0, fitted: Fitted | None = None) -> np.ndarray:
        out = np.empty((data.n_layers, data.n_experts), dtype=np.int64)
        for layer, lid in enumerate(data.layer_ids.tolist()):
            perm = np.random.default_rng([seed, lid]).permutation(data.n_experts)
            out[layer, perm] = np.arange(data.n_experts) % n_devices
        return out


@register
class FrequencyPlacement(PlacementMethod):
    name = "frequency"
    summary = "standard load balancing: LPT on train load, E/D experts per device (the baseline)"

    def fit(self, data: TrainData, n_devices: int, seed: int = 0, fitted: Fitted | None = None) -> np.ndarray:
        slots = slot_capacity(data.n_experts, n_devices)
        return np.stack([_lpt(data.load[i].astype(np.float64), n_devices, slots) for i in range(data.n_layers)])


@register
class CoactGreedy(PlacementMethod):
    name = "coact-greedy"
    summary = "agglomerate experts by co-activation count; load unconstrained"
    capped: ClassVar[bool] = False

    def fit(self, data: TrainData, n_devices: int, seed: int = 0, fitted: Fitted | None = None) -> np.ndarray:
        out = np.empty((data.n_layers, data.n_experts), dtype=np.int64)
        lam = self.params.coact_lambda if self.capped else 0.0
        slots = slot_capacity(data.n_experts, n_devices)
        _agglomerate_all(data.coact, data.load.astype(np.float64), n_devices, slots, lam, out)
        return out


@register
class CoactCapped(CoactGreedy):
    name = "coact-capped"
    summary = "co-activation agglomeration penalised by load above the mean device load"
    capped = True


@register
class HypergraphPlacement(PlacementMethod):
    name = "hypergraph"
    summary = "Mt-KaHyPar connectivity partition of train token sets, repaired to E/D slots (run when named)"
    requires = "mtkahypar"
    # Not a default, for speed: Mt-KaHyPar's deterministic preset takes 5-7 s per layer on 2 cores at the
    # default 16,384 sampled tokens (a 48-layer model: 4-5 minutes, against the 60 s goal of `moescope place`
    # at 1M x 48 x 128, D = 8); the faster presets are not deterministic on more than one thread.
    default = False

    def fit(self, data: TrainData, n_devices: int, seed: int = 0, fitted: Fitted | None = None) -> np.ndarray:
        from moescope.place.hypergraph import partition_layer

        slots = slot_capacity(data.n_experts, n_devices)
        out = np.empty((data.n_layers, data.n_experts), dtype=np.int64)
        none = np.zeros((0, 0))
        experts, _ = data.sample(self.params.max_tokens)  # Mt-KaHyPar needs minutes for 500k hyperedges
        for layer in range(data.n_layers):
            sets, w = token_sets(experts, layer, np.zeros(0, dtype=np.int64))
            vw = data.load[layer] + 1
            assign = partition_layer(sets, w, vw, n_devices, self.params.epsilon, seed, self.params.threads)
            load = data.load[layer].astype(np.float64)
            # phase 0 only: the cheapest moves out of over-full devices
            refine_layer(sets, w, assign, load, n_devices, slots, -1.0, 0, 0, seed, none, -1.0, -1.0)
            out[layer] = assign
        return out


def refine(data: TrainData, starts: list[np.ndarray], n_devices: int, params: PlaceParams, seed: int) -> np.ndarray:
    """Local search (`moescope.place.refine`) from each of ``starts`` (``[layers, E]`` each); per layer the
    result with the lowest train objective. Returns a new ``[layers, E]`` assignment.

    Each layer's train load CV is capped at frequency's train CV + ``b`` (``params.balance_margin``, which must
    be set: `RefinedPlacement.fit` chooses it when it is None), its max/mean load at frequency's + ``b +
    max_mean_margin - cv_margin`` and, unless ``params.drift_margin`` is None, its drift CV
    (`moescope.place.data`) at frequency's times ``1 + drift_margin``. The objective weighs train tokens in
    the second half of their sequence ``params.late_weight`` times (held-out tokens come later in the same
    sequences).
    """
    return refine_batch(data, starts, n_devices, [params], seed)[0]


def refine_batch(
    data: TrainData, starts: list[np.ndarray], n_devices: int, params: Sequence[PlaceParams], seed: int
) -> list[np.ndarray]:
    """`refine` under each of `params` (which may differ only in their margins and drift cap), in one parallel
    kernel call over every (params, layer) pair: what `refine` gives for each, with the threads kept busy
    (the calibration's candidates, `moescope.place.calibrate`)."""
    first = params[0]
    for p in params:
        if p.balance_margin is None:
            raise ValueError("refine needs a balance margin: calibrate first (RefinedPlacement.fit does)")
        if (p.max_tokens, p.late_weight, p.kicks) != (first.max_tokens, first.late_weight, first.kicks):
            raise ValueError("refine_batch: params may differ only in their margins and drift cap")
    freq = FrequencyPlacement().fit(data, n_devices)
    fload = device_loads(freq, data.load, n_devices)
    n_lay, n_par = data.n_layers, len(params)
    drift = any(p.drift_margin is not None for p in params)
    caps, mm_caps, dcaps = [], [], []
    for p in params:
        b = p.balance_margin
        assert b is not None
        # a cap < 0 would switch the cap off in the kernels: 0 is the tightest (no step may raise the CV)
        caps.append(np.maximum(load_cv(fload) + b, 0.0))
        mm_caps.append(np.maximum(max_mean(fload) + b + p.max_mean_margin - p.cv_margin, 1.0))
        if p.drift_margin is not None:
            dcaps.append(drift_cv(freq, data.drift_cov, data.load, n_devices) * (1.0 + p.drift_margin))
        else:  # with the covariance passed for another candidate, a cap < 0 leaves this one unconstrained
            dcaps.append(np.full(n_lay, -1.0))
    cov = np.tile(data.drift_cov, (n_par, 1, 1)) if drift else np.zeros((n_lay * n_par, 0, 0))
    stack = np.ascontiguousarray(np.tile(np.stack(starts), (1, n_par, 1)), dtype=np.int64)
    out = np.empty_like(stack[0])
    stats = np.zeros((n_lay * n_par, stack.shape[0] + 1, 3), dtype=np.int64)
    experts, tw = data.sample(first.max_tokens, first.late_weight)
    keys = np.tile(np.ascontiguousarray(data.layer_ids, dtype=np.int64), n_par)
    # layers' searches differ in length: threads take one layer at a time, not equal shares up front
    with parallel_chunksize(1):
        refine_all(
            np.ascontiguousarray(np.tile(experts, (1, n_par, 1))),
            tw,
            stack,
            np.tile(data.load.astype(np.float64), (n_par, 1)),
            n_devices,
            slot_capacity(data.n_experts, n_devices),
            np.concatenate(caps),
            1 << 30,
            first.kicks,
            seed,
            keys,
            cov,
            np.concatenate(dcaps),
            np.concatenate(mm_caps),
            out,
            stats,
        )
    return [out[i * n_lay : (i + 1) * n_lay].copy() for i in range(n_par)]


class RefinedPlacement(PlacementMethod):
    """Local search from the placements of the `starts` methods; per layer the best train objective.

    With ``params.balance_margin`` None the train margin is chosen first (`moescope.place.calibrate`, on
    ``data``'s protocol); `moescope.place.compare` does that once per D and passes the margin in instead.
    """

    starts: ClassVar[tuple[type[PlacementMethod], ...]]

    def fit(self, data: TrainData, n_devices: int, seed: int = 0, fitted: Fitted | None = None) -> np.ndarray:
        params = self.params
        if params.balance_margin is None:
            from moescope.place.calibrate import calibrate

            cal = calibrate(data.trace, n_devices, params, data.protocol, seed)
            params = dataclasses.replace(params, balance_margin=cal.balance_margin, drift_margin=cal.drift_margin)
        fitted = {} if fitted is None else fitted
        for m in self.starts:
            if m.name not in fitted:
                fitted[m.name] = m(params).fit(data, n_devices, seed, fitted)
        return refine(data, [fitted[m.name] for m in self.starts], n_devices, params, seed)


@register
class CoactRefined(RefinedPlacement):
    name = "coact-refined"
    summary = "swaps cutting train devices/token within frequency's balance, from coact and frequency starts"
    starts = (CoactGreedy, CoactCapped, FrequencyPlacement)


@register
class HypergraphRefined(RefinedPlacement):
    name = "hypergraph-refined"
    summary = "coact-refined with the hypergraph partition as a fourth start (run when named)"
    requires = "mtkahypar"
    default = False  # as `hypergraph`, whose partition it starts from
    starts = (CoactGreedy, CoactCapped, FrequencyPlacement, HypergraphPlacement)
