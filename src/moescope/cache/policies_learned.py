"""The learned eviction policy (kernels and features in `moescope.cache.kernels_learned`), registered by name.

``learned``: evict the cached expert with the furthest predicted next use, the prediction a linear model of
log2 next-use distance fitted by least squares on the train split only (first halves, or the fitted labels) of
the same layer, from recency, recency-weighted use counts at four decay rates and the gap between the item's
last two uses (`kernels_learned`). One model per layer (8 floats), shared by every capacity. Fit rows: at most
`FIT_GROUPS` evenly spaced train groups, every item seen so far in the segment at each (a bound on the fit's
time, not tuned); an item not used again in its segment is labelled with the train stream's length. Rows from
every item seen, not only those an LRU cache of the capacity would hold (LRB samples its cache): checked by
validation inside the train split only (ESFT train halves split again, first halves fitted, second halves
replayed; gap to Belady closed at C 8 / 16 / 32: every item 21.1 / 22.0 / 31.9%, an LRU cache's items 20.1 /
18.7 / 25.7%, twice its capacity 20.3 / 18.6 / 31.9%), so one model per layer serves every capacity. With no
rows (no item seen before a sampled group) the model is recency alone: LRU, up to ties between items last used
by the same token.

While replaying, the model is refitted every 64 groups from the train rows (each weighing `TRAIN_WEIGHT`)
and the replayed stream's own rows, labelled as their next uses happen (`kernels_learned`): it follows a
workload that differs from the train split. Chosen by validation inside the fitting data only (gap to
Belady closed at C 8 / 16 / 32, static model / train weight 0.1 / 0.01): ESFT train halves split again
21.1 / 22.0 / 31.9%, 21.3 / 22.2 / 32.2%, 22.7 / 22.9 / 32.6%; and across tasks (fit on one ESFT task, replay
another, as the leave-one-task-out protocol's inner folds), e.g. intent to law 12.5 / 4.5 / 9.5%, 16.0 / 8.6 /
13.8%, 17.7 / 10.5 / 14.7%, law to intent 32.3 / 29.9 / 37.7%, 32.8 / 31.1 / 41.4%, 33.3 / 31.7 / 42.4%; the
weight 0.01 was best or within 0.4 points on every pair (the same choice from each leave-one-task-out split's
own two fitted tasks alone).

``learned-near`` adds one feature where the trace has the router's candidates (captured with
``--candidates``): each expert's near misses (the router ranked it in its top-M for a token but did not
choose it), as a CRF at `kernels_learned.NEAR_RATE`. A runtime has them at that moment: the router scores
every expert.

What the models are not given, and why: gate weights (a `Stream` carries ids only) and the same token's
routing at earlier layers (it predicts the current token's experts, which demand loading needs now and never
evicts; a victim's next use is a later token's). Gate weights were tried as features, two variants fixed
before validating inside the fitting data only (gap to Belady closed at C 8 / 16 / 32, online refits on):
one more feature, each expert's gate-weighted CRF at `kernels_learned.NEAR_RATE`, gave 22.8 / 23.1 / 32.8%
on the ESFT train halves split again against 22.7 / 22.9 / 32.6%, and across tasks intent to law 17.5 /
10.5 / 15.3% against 17.7 / 10.5 / 14.7%, law to intent 33.5 / 31.7 / 42.4% against 33.3 / 31.7 / 42.4%,
summary to law 18.0 / 11.6 / 16.7% against 18.4 / 11.7 / 16.2%: within 0.6 points either way, not worth a
wider stream; the four CRFs weighted by gate weight instead of counts lost 2-7 points everywhere. (A
gate-weight-weighted LRFU built earlier also closed less of the gap than LRFU on the ESFT held-out halves.)

    >>> import moescope.cache.policies_learned
    >>> POLICIES["learned"](PolicyParams()).fit(train_stream)
"""

from __future__ import annotations

import dataclasses

import numpy as np

from moescope.cache import kernels_learned as KL
from moescope.cache.policies import _NO_GROUPS, CachePolicy, Fitter, Replayer, Stream, register
from moescope.errors import UsageError

FIT_GROUPS = 4096  # train groups sampled for the fit rows, at most (bounds the fit's time and memory)


def _near(stream: Stream, use: bool) -> np.ndarray:
    """The near-miss array a kernel takes: the stream's when `use`, else no columns."""
    if not use:
        return np.empty((stream.req.shape[0], 0), dtype=np.int32)
    if stream.near is None:
        raise UsageError(
            "learned-near needs the router's near misses, and this trace has no candidates; capture with "
            "--candidates M (transformers or llama.cpp capture), or use the policy learned"
        )
    return np.ascontiguousarray(stream.near, dtype=np.int32)


def _no_near(req: np.ndarray) -> np.ndarray:
    """The near-miss array of a window without near misses: no columns."""
    return np.empty((req.shape[0], 0), dtype=np.int32)


TRAIN_WEIGHT = 0.01  # a train row's weight in the online refits, against 1 for a replayed row (module docstring)


@dataclasses.dataclass(frozen=True)
class Model:
    """A fitted next-use model: ``coef`` (least squares on the train rows), the train rows' normal equations
    ``a [F, F]``, ``b [F]`` weighted by `TRAIN_WEIGHT` (the online refits start from them), and the label
    horizon (groups) of an item not used again."""

    coef: np.ndarray
    a: np.ndarray
    b: np.ndarray
    horizon: int


def fit_model(train: Stream, near: bool = False) -> Model:
    """The next-use model fitted on `train` (`N_COEF` features, one more with `near`; recency alone without
    rows)."""
    every, rows, horizon = _fit_shape(train.req.shape[0], train.n_items)
    n_coef = KL.N_COEF + int(near)
    x = np.empty((rows, n_coef))
    y = np.empty(rows)
    n = KL.samples(train.req, train.reset, train.n_items, KL.RATES, _near(train, near), every, horizon, x, y)
    return _model(x[:n], y[:n], horizon)


def _fit_shape(g_n: int, n_items: int) -> tuple[int, int, int]:
    """(sampling period, fit rows at most, label horizon) of a train stream of `g_n` groups."""
    every = max(1, -(-g_n // FIT_GROUPS))
    return every, (-(-g_n // every)) * n_items, max(g_n, 2)


def _model(x: np.ndarray, y: np.ndarray, horizon: int) -> Model:
    """The least-squares model of the fit rows ``x [n, F]``, ``y [n]`` (recency alone with fewer rows than F)."""
    n, n_coef = x.shape
    a, b = TRAIN_WEIGHT * (x.T @ x), TRAIN_WEIGHT * (x.T @ y)
    if n < n_coef:
        coef = np.zeros(n_coef)
        coef[1] = 1.0  # the least recently used item is predicted furthest
    else:
        coef = np.linalg.lstsq(x, y, rcond=None)[0]
    return Model(*(np.ascontiguousarray(v, dtype=np.float64) for v in (coef, a, b)), horizon)


@register
class Learned(CachePolicy):
    name = "learned"
    summary = "evict the furthest predicted next use (linear model of recency, decayed counts, reuse gap; fit on train)"
    learns = True
    windowed = True  # learned-near is not: a store's layer files hold no router candidates

    def fit(self, train: Stream) -> None:
        self.model = fit_model(train, self.near_misses)

    def _args(self, stream: Stream, capacity: int) -> tuple:
        m = self.model
        near = _near(stream, self.near_misses)
        return (stream.req, stream.reset, stream.n_items, capacity, KL.RATES, m.coef, near, m.a, m.b, m.horizon,
                KL.ONLINE_REFIT)  # fmt: skip

    def run(self, stream: Stream, capacity: int) -> np.ndarray:
        return KL.learned(*self._args(stream, capacity))

    def fitter(self, n_items: int, k: int, n_groups: int) -> Fitter:
        every, rows, horizon = _fit_shape(n_groups, n_items)
        x, y = np.empty((rows, KL.N_COEF)), np.empty(rows)
        st = KL.samples_state(n_items, KL.RATES, rows)

        def feed(req: np.ndarray, reset: np.ndarray, g0: int) -> None:
            KL.samples_run(req, reset, g0, KL.RATES, _no_near(req), every, horizon, *st, x, y)

        def finish() -> None:
            KL.samples_finish(st[4], st[5], y, horizon)
            n = int(st[-1][0])
            self.model = _model(x[:n], y[:n], horizon)

        return Fitter(feed, finish)

    def replayer(self, n_items: int, k: int, capacity: int) -> Replayer:
        m = self.model
        st = KL.learned_state(n_items, capacity, KL.RATES, m.coef, m.a, m.b)

        def feed(req: np.ndarray, reset: np.ndarray, g0: int, nu: np.ndarray | None) -> None:
            KL.learned_run(req, reset, g0, capacity, KL.RATES, _no_near(req), m.horizon, KL.ONLINE_REFIT, *st,
                           _NO_GROUPS)  # fmt: skip

        return Replayer(feed, st[-1])

    def misses_per_group(self, stream: Stream, capacity: int) -> np.ndarray:
        out = np.zeros(stream.req.shape[0], dtype=np.int64)
        KL._learned(*self._args(stream, capacity), out)
        return out


@register
class LearnedNear(Learned):
    name = "learned-near"
    summary = "learned, plus a decayed count of each expert's router near misses (traces with candidates)"
    near_misses = True
    windowed = False
