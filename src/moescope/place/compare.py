"""Fit placement methods on the train split, score them on the held-out split, side by side.

`compare_placements` is what ``moescope place`` runs: for each device count D and each method, fit on the
train tokens (first half of every sequence; ``split="all"``: every token, in-sample) and score on the held-out
tokens (second halves; ``"all"``: every token) with `moescope.place.metrics`. ``frequency`` (standard load
balancing) is always fitted: every row's devices per token is also given relative to it. With ``replicas
R > 0`` each method is scored twice, without and with R copies of the hottest experts, so the trade of
memory for balance and locality reads off adjacent rows. The refined methods' train caps (unless set by
hand) are chosen once per D, before any fit, by validation inside the train split (`moescope.place.calibrate`,
mirroring the protocol: halves, labels or in-sample) and passed to every fit. With ``balance_loads`` (expert
loads of the workload to be served, `moescope.place.data.balance_table`) every method, frequency included,
balances those loads instead of the train tokens', and the refined methods' train caps are the stated margins
against them (nothing to validate: the drift left is between the given loads and the served ones, which the
fitting data cannot show). Every method treats layers
independently, so ``scheduler="local:N"`` (or a Dask address) fits groups of layers as Dask tasks
(`fit_layers` each) with the same result. Pure: no I/O, no printing.

    >>> report = compare_placements(trace, devices=[4, 8], methods=["frequency", "coact-refined"])
    >>> report.rows[1].vs_frequency
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from moescope._jit import njit_parallel, prange
from moescope.errors import UsageError
from moescope.place.calibrate import Calibration, calibrate, given_loads_calibration
from moescope.place.data import TrainData
from moescope.place.layout import Placement, check_devices
from moescope.place.methods import METHODS, PlaceParams, RefinedPlacement, default_methods
from moescope.place.metrics import PlacementScore, route
from moescope.place.replicas import add_replicas
from moescope.slicing import EVAL_SPLITS, label_protocol, select_labels, select_layers, split_halves
from moescope.trace import RoutingTrace

BASELINE = "frequency"


@dataclasses.dataclass(frozen=True)
class LoadAgreement:
    """How far the expert loads of workload(s) ``a`` agree with those of ``b``: the correlation of their
    per-expert selections, mean over the layers where neither is constant (`load_correlation`); None when no
    layer qualifies."""

    a: str
    b: str
    correlation: float | None
    layers: int

    def to_dict(self) -> dict[str, Any]:
        r = None if self.correlation is None else round(self.correlation, 4)
        return {"a": self.a, "b": self.b, "correlation": r, "layers": self.layers}


def load_correlation(a: np.ndarray, b: np.ndarray) -> tuple[float | None, int]:
    """Mean over layers of the Pearson correlation of two ``[layers, E]`` expert-load tables, and the number of
    layers it is taken over (layers where either table is constant have no correlation and are left out)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    da, db = a - a.mean(axis=1, keepdims=True), b - b.mean(axis=1, keepdims=True)
    na, nb = np.sqrt((da * da).sum(axis=1)), np.sqrt((db * db).sum(axis=1))
    ok = (na > 0) & (nb > 0)
    if not ok.any():
        return None, 0
    r = (da[ok] * db[ok]).sum(axis=1) / (na[ok] * nb[ok])
    return float(np.clip(r, -1.0, 1.0).mean()), int(ok.sum())


@njit_parallel
def _slot_loads(experts, slot, out):
    """``out [slots, layers, E]`` += selections of each expert by the tokens of each slot (``slot [tokens]``;
    -1: counted nowhere). Parallel over blocks of layers, each block reading the tokens in memory order."""
    n_tok, n_lay, k = experts.shape
    step = 4  # layers per block: a token's row of a block is one contiguous read
    for blk in prange((n_lay + step - 1) // step):
        lo, hi = blk * step, min(n_lay, blk * step + step)
        for t in range(n_tok):
            s = slot[t]
            if s >= 0:
                for layer in range(lo, hi):
                    for j in range(k):
                        out[s, layer, experts[t, layer, j]] += 1


MAX_EACH = 64  # labels compared each against the rest, at most (more: only fitted against scored)


def load_agreement(trace: RoutingTrace, fit_labels: Sequence[str] = (), score_labels: Sequence[str] = ()) -> tuple:
    """`LoadAgreement` of the trace's workloads (sequence labels): with `score_labels` (the labels protocol), the
    fitted labels' loads (default: every other label's) against the scored ones', then each fitted label against
    the other fitted ones (one pair with two; none with more than `MAX_EACH`); without, each of the trace's
    labels against the rest. A placement balanced on some workloads' loads stays balanced on another only as far
    as their loads agree (`moescope.place.data`). Empty with fewer than two labels. One pass over the tokens;
    counts are kept only for the labels compared one by one, the other fitted ones together, the scored ones."""
    labels = trace.labels()
    if len(labels) < 2:
        return ()
    fitted = list(fit_labels) or [x for x in labels if x not in score_labels]
    each = fitted[:1] if len(fitted) == 2 else fitted if 2 < len(fitted) <= MAX_EACH else []
    if not each and not score_labels:
        return ()
    slot_of = {lab: i for i, lab in enumerate(each)}  # then: the other fitted labels, then the scored ones
    slot_of.update({lab: len(each) for lab in fitted if lab not in slot_of})
    slot_of.update({lab: len(each) + 1 for lab in score_labels})
    per_seq = np.array([slot_of.get(x, -1) for x in trace.seq_labels.tolist()], dtype=np.int64)
    sums = np.zeros((len(each) + 2, trace.n_layers, trace.n_experts), dtype=np.int64)
    _slot_loads(trace.experts, np.repeat(per_seq, trace.seq_lengths), sums)
    total = sums[:-1].sum(axis=0)  # every fitted label

    def name(labs: Sequence[str]) -> str:
        return "+".join(labs) if len(labs) <= 4 else f"{len(labs)} labels"

    out = [LoadAgreement(name(fitted), name(score_labels), *load_correlation(total, sums[-1]))] if score_labels else []
    for i, lab in enumerate(each):
        rest = name([x for x in fitted if x != lab])
        out.append(LoadAgreement(lab, rest, *load_correlation(sums[i], total - sums[i])))
    return tuple(out)


@dataclasses.dataclass(frozen=True, eq=False)
class PlacementRow:
    """One method at one device count (and replica count), scored on the held-out split. ``fit_seconds``: this
    row's own fitting; the placements a refined method starts from are fitted once per D and shared, so their
    time is counted where they were first fitted."""

    n_devices: int
    method: str
    replicas: int
    score: PlacementScore
    baseline: PlacementScore
    fit_seconds: float

    @property
    def vs_frequency(self) -> float:
        """Relative change of mean devices per token against frequency (replica-free) at the same D."""
        return self.score.mean_devices / self.baseline.mean_devices - 1.0

    @property
    def cv_excess(self) -> float:
        """Mean load CV minus frequency's (replica-free, same D)."""
        return self.score.mean_cv - self.baseline.mean_cv

    def within(self, params: PlaceParams) -> bool:
        """Within the stated constraint: mean load CV and mean max/mean load at most frequency's plus
        ``params.cv_margin`` / ``params.max_mean_margin``."""
        mm_excess = self.score.mean_max_mean - self.baseline.mean_max_mean
        return self.cv_excess <= params.cv_margin and mm_excess <= params.max_mean_margin

    def to_dict(self, layers: bool = False) -> dict[str, Any]:
        score = self.score.to_dict()
        if not layers:
            score.pop("layers")
        return {
            "devices": self.n_devices,
            "method": self.method,
            "replicas": self.replicas,
            "vs_frequency": self.vs_frequency,
            "load_cv_minus_frequency": self.cv_excess,
            "fit_seconds": round(self.fit_seconds, 3),
            **score,
        }


@dataclasses.dataclass(frozen=True, eq=False)
class PlacementReport:
    """Rows in (D, method, replicas) order, the split used, and the fitted placements by (D, method, R)."""

    rows: tuple[PlacementRow, ...]
    split: str
    train_tokens: int
    test_tokens: int
    n_experts: int
    top_k: int
    layer_ids: np.ndarray
    placements: dict[tuple[int, str, int], Placement]
    params: PlaceParams
    model: str | None = None
    fit_labels: tuple[str, ...] = ()  # the labels protocol (split "labels"): whole sequences fitted / scored
    score_labels: tuple[str, ...] = ()
    calibrations: dict[int, Calibration] = dataclasses.field(default_factory=dict)  # the refined methods' margin per D
    given_loads: bool = False  # balanced on given expert loads (``balance_loads``), not the train tokens'
    load_agreement: tuple[LoadAgreement, ...] = ()  # how far the workloads' expert loads agree (`load_agreement`)

    def row(self, n_devices: int, method: str, replicas: int = 0) -> PlacementRow:
        for r in self.rows:
            if (r.n_devices, r.method, r.replicas) == (n_devices, method, replicas):
                return r
        raise UsageError(f"no result for D={n_devices}, method {method!r}, replicas {replicas}")

    def to_dict(self, layers: bool = False) -> dict[str, Any]:
        return {
            "model": self.model,
            "split": self.split,
            "fit_labels": list(self.fit_labels),
            "score_labels": list(self.score_labels),
            "train_tokens": self.train_tokens,
            "scored_tokens": self.test_tokens,
            "n_experts": self.n_experts,
            "top_k": self.top_k,
            "layer_ids": self.layer_ids.tolist(),
            "params": dataclasses.asdict(self.params),
            "balanced_on": "given loads" if self.given_loads else "train tokens",
            "calibration": [c.to_dict() for c in self.calibrations.values()],
            "load_agreement": [x.to_dict() for x in self.load_agreement],
            "rows": [r.to_dict(layers) for r in self.rows],
        }


def parse_methods(names: Sequence[str] | None) -> list[str]:
    """Validate method names against `METHODS` (None: `default_methods`),
    frequency always first."""
    chosen = default_methods() if names is None else list(dict.fromkeys(names))
    unknown = [n for n in chosen if n not in METHODS]
    if unknown:
        raise UsageError(f"--method {', '.join(unknown)}: unknown; choose from {', '.join(METHODS)}")
    return [BASELINE] + [n for n in chosen if n != BASELINE]


@dataclasses.dataclass(frozen=True, eq=False)
class LayerFit:
    """One (D, method, R) fitted and replayed on some layers: the parts a `PlacementRow` is built from."""

    key: tuple[int, str, int]
    table: np.ndarray  # [layers, D, slots]
    hist: np.ndarray  # [layers, min(k, D) + 1]
    load: np.ndarray  # [layers, D]
    fit_seconds: float


def fit_layers(
    train: RoutingTrace,
    test: RoutingTrace,
    devices: Sequence[int],
    names: Sequence[str],
    replicas: int,
    seed: int,
    params: PlaceParams,
    progress: Callable[[int, int], None] | None = None,
    margins: dict[int, tuple[float, float | None]] | None = None,
    balance: np.ndarray | None = None,
) -> list[LayerFit]:
    """Fit every method at every D on the layers of `train` and replay `test` through each placement.

    Every method treats layers independently (random streams are keyed by model layer id), so fitting a
    subset of layers gives exactly those layers' rows of fitting all of them: this is the unit of work of a
    Dask task. The refined methods' train balance margin per D comes from `margins` (chosen once on all
    layers, `compare_placements`) where ``params.balance_margin`` is None; `balance`: given loads, one row per
    layer of `train` (`TrainData`). Results in (D, method, R) order.
    """
    data = TrainData(train, balance=balance)
    out: list[LayerFit] = []
    total, done = len(devices) * len(names), 0
    for d in devices:
        fitted: dict[str, np.ndarray] = {}  # shared by the methods at this D: the refined ones reuse their starts
        p = params
        if p.balance_margin is None and margins and d in margins:
            p = dataclasses.replace(params, balance_margin=margins[d][0], drift_margin=margins[d][1])
        for name in names:
            method = METHODS[name](p)
            t0 = time.perf_counter()
            assign = fitted[name] if name in fitted else method.fit(data, d, seed, fitted)
            fitted[name] = assign
            fit_s = time.perf_counter() - t0
            tables = [(0, Placement.from_assign(assign, d, train.layer_ids, name, train.n_experts).table)]
            if replicas:
                tables.append((replicas, add_replicas(assign, data, d, replicas)))
            for r, table in tables:
                hist, load = route(table, test.experts, train.n_experts)
                out.append(LayerFit((d, name, r), table, hist, load, fit_s))
            done += 1
            if progress is not None:
                progress(done, total)
    return out


def compare_placements(
    trace: RoutingTrace,
    devices: Sequence[int],
    methods: Sequence[str] | None = None,
    *,
    replicas: int = 0,
    split: str = "test",
    seed: int = 0,
    params: PlaceParams | None = None,
    scheduler: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    fit_labels: Sequence[str] | None = None,
    score_labels: Sequence[str] | None = None,
    balance_loads: np.ndarray | None = None,
) -> PlacementReport:
    """Fit every method for every device count on train tokens and score it on held-out tokens.

    Parameters
    ----------
    trace : the routing; its sequences are split in halves (train = first halves).
    devices : device counts D, each in 1..E.
    methods : names in `METHODS` (default: `default_methods`, the fast ones; ``frequency`` is always
        added first).
    replicas : R extra copies per layer; rows with and without them when R > 0.
    split : ``"test"`` (fit on first halves, score on second halves) or ``"all"`` (in-sample).
    fit_labels, score_labels : the labels protocol instead of `split`: fit on the whole sequences labelled
        `fit_labels`, score on those labelled `score_labels` (a workload the fit has not seen); either may be
        omitted for "every other label". The report's split is then ``"labels"``.
    seed : seed of the random parts (random placement, local-search kicks, Mt-KaHyPar).
    params : method knobs.
    balance_loads : ``[layers, E]`` expert loads to balance, one row per layer of `trace`
        (`moescope.place.data.balance_table`), instead of the train tokens' loads; co-activation still comes
        from the train tokens.
    scheduler : fit groups of layers as Dask tasks (``"local:N"`` or a scheduler address) instead of all
        layers in this process; the report is identical (fit seconds are then summed over tasks).
    progress : called with (steps done, steps total).
    """
    if split not in EVAL_SPLITS:
        raise UsageError(f"--split {split!r}: expected one of {', '.join(EVAL_SPLITS)}")
    names = parse_methods(methods)
    devs = list(dict.fromkeys(int(d) for d in devices))
    if not devs:
        raise UsageError("no device counts given; pass e.g. --devices 2,4,8")
    for d in devs:
        check_devices(d, trace.n_experts, replicas)
    params = params or PlaceParams()
    fit_l: tuple[str, ...] = ()
    score_l: tuple[str, ...] = ()
    if fit_labels or score_labels:
        if split != "test":
            raise UsageError(f"--split {split} and --fit-labels / --score-labels are two protocols; give one of them")
        fit_l, score_l = label_protocol(trace, fit_labels, score_labels)
        train, test = select_labels(trace, fit_l), select_labels(trace, score_l)
        split = "labels"
    else:
        train, test = split_halves(trace) if split == "test" else (trace, trace)
    if test.n_tokens == 0:
        raise UsageError("no held-out tokens: the trace has no sequence with 2+ tokens; use --split all")
    TrainData(train, balance=balance_loads)  # an empty train split or misshapen loads fail here, before any work
    calibrations: dict[int, Calibration] = {}
    if params.balance_margin is None and any(issubclass(METHODS[n], RefinedPlacement) for n in names):
        if balance_loads is not None:
            calibrations = {d: given_loads_calibration(d, params) for d in devs}
        else:
            protocol = {"test": "halves", "labels": "labels", "all": "all"}[split]
            calibrations = {d: calibrate(train, d, params, protocol, seed) for d in devs}
    margins = {d: (c.balance_margin, c.drift_margin) for d, c in calibrations.items()}
    fit_args = (devs, names, replicas, seed, params, progress, margins, balance_loads)
    fitted = fit_layers(train, test, *fit_args) if scheduler is None else _fit_dask(scheduler, train, test, *fit_args)
    rows: list[PlacementRow] = []
    placements: dict[tuple[int, str, int], Placement] = {}
    baselines: dict[int, PlacementScore] = {}
    for f in fitted:
        d, name, r = f.key
        placement = Placement(f.table, trace.n_experts, trace.layer_ids, name, r)
        score = PlacementScore(trace.layer_ids, test.n_tokens, f.hist, f.load, placement.experts_per_device())
        baseline = baselines.setdefault(d, score)  # frequency, replica-free, comes first at each D
        rows.append(PlacementRow(d, name, r, score, baseline, f.fit_seconds))
        placements[f.key] = placement
    return PlacementReport(
        rows=tuple(rows),
        split=split,
        train_tokens=train.n_tokens,
        test_tokens=test.n_tokens,
        n_experts=trace.n_experts,
        top_k=trace.top_k,
        layer_ids=trace.layer_ids,
        placements=placements,
        params=params,
        model=trace.meta.model,
        fit_labels=fit_l,
        score_labels=score_l,
        calibrations=calibrations,
        given_loads=balance_loads is not None,
        load_agreement=load_agreement(trace, fit_l, score_l),
    )


def _fit_part(part: tuple[RoutingTrace, RoutingTrace], *args: Any) -> list[LayerFit]:
    return fit_layers(*part, *args)


def _fit_dask(
    scheduler, train, test, devs, names, replicas, seed, params, progress, margins, balance
) -> list[LayerFit]:
    """`fit_layers` on groups of layers as Dask tasks (about two per worker), stitched back in layer order."""
    from distributed import as_completed

    from moescope._dask import dask_client

    with dask_client(scheduler) as client:
        n_workers = max(1, len(client.scheduler_info().get("workers", {})))
        groups = [g for g in np.array_split(np.arange(train.n_layers), min(train.n_layers, 2 * n_workers)) if g.size]
        futures = []
        for g in groups:
            ids = train.layer_ids[g].tolist()
            # scattered, not embedded in the task graph: a group's tokens can be hundreds of MB
            [part] = client.scatter([(select_layers(train, ids), select_layers(test, ids))])
            rows = None if balance is None else balance[g]
            futures.append(
                client.submit(_fit_part, part, devs, names, replicas, seed, params, None, margins, rows, pure=False)
            )
        if progress:
            for done, _ in enumerate(as_completed(futures), 1):
                progress(done, len(futures))
        parts = client.gather(futures)
    out = []
    for i, first in enumerate(parts[0]):
        pieces = [p[i] for p in parts]
        out.append(
            LayerFit(
                first.key,
                np.concatenate([p.table for p in pieces]),
                np.concatenate([p.hist for p in pieces]),
                np.concatenate([p.load for p in pieces]),
                sum(p.fit_seconds for p in pieces),
            )
        )
    return out
