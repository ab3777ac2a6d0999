"""The cache policies, one small class each behind one interface, registered by name.

A policy is built with its parameters, optionally fitted on a train stream (`learns`), then replays test
streams at a capacity. The CLI's ``--policy`` choices are the keys of `POLICIES`; the shared contract
tests run over the same registry. Kernels live in `moescope.cache.kernels`.

    >>> policy = POLICIES["lru"](PolicyParams())
    >>> policy.run(stream, capacity=16)     # [hits, demand_misses, prefetch_loads, wasted_prefetches]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import ClassVar

import numpy as np

from moescope.cache import kernels as K
from moescope.errors import UsageError


@dataclasses.dataclass(frozen=True)
class Stream:
    """One replayable request stream.

    req: [groups, k] int32 item ids; a group is one token at one MoE layer, its k experts needed together.
    reset: [groups] bool, True where the cache starts empty (group 0 always).
    n_items: distinct items (E per layer, or layers x E for one pooled cache; item = layer * E + expert).
    n_experts: E, experts per layer.
    near: [groups, m] int32 the router's near misses of each group (its top-m candidates that were not
        chosen, as item ids, -1 padded), when the trace has candidates and a policy reads them
        (`CachePolicy.near_misses`); else None.
    weights: [groups, k] float32 the gate weight of each requested item, when the trace has weights and a
        policy reads them (`CachePolicy.gate_weights`); else None.
    """

    req: np.ndarray
    reset: np.ndarray
    n_items: int
    n_experts: int
    near: np.ndarray | None = None
    weights: np.ndarray | None = None

    @property
    def k(self) -> int:
        return int(self.req.shape[1])

    @property
    def n_layers(self) -> int:
        return self.n_items // self.n_experts


@dataclasses.dataclass(frozen=True)
class PolicyParams:
    """aging: LFU halves its counts every `aging` groups (0 = never).
    prefetch: experts the co-activation prefetcher loads after each token (default 1; capped at capacity - k).
    More is worse on real traces: each extra guess evicts a used expert's neighbour for a rarer hit."""

    aging: int = 0
    prefetch: int = 1


class CachePolicy:
    """Base class: `run` replays a stream at one capacity; `fit` learns from the train split if `learns`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    learns: ClassVar[bool] = False
    prefetches: ClassVar[bool] = False
    offline: ClassVar[bool] = False
    bypass: ClassVar[bool] = False  # misses are served from slow memory without entering the cache
    near_misses: ClassVar[bool] = False  # reads `Stream.near` (the trace's router candidates): named only
    gate_weights: ClassVar[bool] = False  # reads `Stream.weights` (the trace's gate weights): named only
    # replays a stream a window at a time (`replayer`; `moescope.cache.windowed`), so memory does not grow with
    # the trace's length; a learner among them is fitted from the train stream's windows too (`fitter`)
    windowed: ClassVar[bool] = False
    reads_next_use: ClassVar[bool] = False  # its replayer reads each access's next use (offline)

    def __init__(self, params: PolicyParams) -> None:
        self.params = params

    def fit(self, train: Stream) -> None:
        """Learn from a train stream (no-op for policies that do not learn)."""

    def run(self, stream: Stream, capacity: int) -> np.ndarray:
        """[4] int64: hits, demand misses, prefetch loads, wasted prefetches."""
        raise NotImplementedError

    def misses_per_group(self, stream: Stream, capacity: int) -> np.ndarray | None:
        """[groups] int64 demand misses of each group (a token at a layer), for the decode timeline
        (`moescope.cache.timeline`); None for a policy whose transfers are not all demand loads."""
        return None

    def replayer(self, n_items: int, k: int, capacity: int) -> Replayer:
        """An empty cache of `capacity` that replays a stream window by window (`windowed` policies only)."""
        raise NotImplementedError(f"{self.name} replays whole streams only")

    def fitter(self, n_items: int, k: int, n_groups: int) -> Fitter:
        """A fit fed the train stream (`n_groups` groups) window by window; its ``finish()`` leaves this policy
        fitted as `fit` on the whole stream would (`windowed` learners only)."""
        raise NotImplementedError(f"{self.name} fits on a whole train stream only")


_NO_GROUPS = np.empty(0, dtype=np.int64)  # a kernel's per-group output, not asked for


@dataclasses.dataclass
class Fitter:
    """A learner's fit fed a train stream's windows in order: ``feed(req, reset, g0)`` (as `Replayer.feed`,
    without next uses), then ``finish()`` once."""

    feed: Callable[[np.ndarray, np.ndarray, int], None]
    finish: Callable[[], None]


@dataclasses.dataclass
class Replayer:
    """One policy's cache at one capacity, fed a stream's windows in order: ``feed(req, reset, g0, nu)`` with
    the window's ``[groups, k]`` int32 ids, ``[groups]`` reset flags, its first group's index in the stream
    and (`CachePolicy.reads_next_use`) its ``[groups, k]`` next uses in stream-wide group indices (else
    None); ``sc[:4]`` accumulates the stats `CachePolicy.run` returns for the whole stream."""

    feed: Callable[[np.ndarray, np.ndarray, int, np.ndarray | None], None]
    sc: np.ndarray
    final: Callable[[], np.ndarray] | None = None  # the stats at the stream's end, when not ``sc[:4]``

    def stats(self) -> np.ndarray:
        return self.sc[:4].copy() if self.final is None else self.final()


POLICIES: dict[str, type[CachePolicy]] = {}


def register(cls: type[CachePolicy]) -> type[CachePolicy]:
    POLICIES[cls.name] = cls
    return cls


# The policies `cache` and `simulate` run when none is named, chosen by cost alone, never by their results: the
# LRU baseline and the Belady floor (every gap is measured between them), then, among the policies that replay
# in windows (`windowed`, so the default run's memory does not grow with the trace's length:
# `moescope.cache.windowed`), the cheapest first while ``moescope cache`` with the defaults at three capacities
# on 1M tokens x 48 layers x top-8 stays under 60 s on 2 cores with 10% to spare (`bench/cache_e2e.py`). Its CPU
# seconds per policy (one layer's fit and three replays, one thread, x 48): LFU-static 5, SIEVE 11, LRU 13,
# FIFO 14, ARC 19, 2Q 20, SLRU 21, LIRS 27, S3-FIFO 31, LFU 42, Belady 47, W-TinyLFU 48, LeCaR 53, Cacheus 97,
# LRFU 118 (its fit included), coact-prefetch 198, learned 440, adaptive LRFU 523. End to end (wall, with
# reading the store) LRU + FIFO + LFU-static + Belady take 38-46 s (four runs) and 0.4 GB in windows; with
# SIEVE too, the cheapest windowed policy left, 53.9-54.4 s (two runs): not under the 54 s, so it is not added.
# Before the windows (layer groups) the same set took 53 s, and with SIEVE 62-64 s. Every other policy runs
# when named, or with ``--policy all``.
DEFAULT_POLICIES = ("lru", "fifo", "lfu-static", "belady")


def default_policies() -> list[str]:
    """The policies run when none is named (`DEFAULT_POLICIES`), in registry order."""
    return [name for name in POLICIES if name in DEFAULT_POLICIES]


def check_policies(names: Sequence[str] | None, flag: str = "--policy") -> list[str]:
    """`names` (None: `default_policies`; ``all``: every registered policy but those that need the router's
    near misses or the gate weights, which many traces lack), checked: `UsageError` naming the unknown ones
    and the choices."""
    chosen = default_policies() if names is None else list(names)
    if "all" in chosen:
        every = [n for n, cls in POLICIES.items() if not cls.near_misses and not cls.gate_weights]
        chosen = list(dict.fromkeys(n for x in chosen for n in (every if x == "all" else [x])))
    unknown = [p for p in chosen if p not in POLICIES]
    if unknown:
        raise UsageError(f"{flag} {', '.join(unknown)}: unknown; choose from {', '.join(POLICIES)}")
    return chosen


def make_policy(name: str, params: PolicyParams | None = None) -> CachePolicy:
    try:
        cls = POLICIES[name]
    except KeyError:
        raise UsageError(f"cache policy {name!r} is unknown; choose from {', '.join(POLICIES)}") from None
    return cls(params or PolicyParams())


@register
class LRU(CachePolicy):
    name = "lru"
    summary = "least recently used (the baseline every cache must beat)"
    windowed = True

    def run(self, stream: Stream, capacity: int) -> np.ndarray:
        return K.lru(stream.req, stream.reset, stream.n_items, capacity)

    def misses_per_group(self, stream: Stream, capacity: int) -> np.ndarray:
        out = np.zeros(stream.req.shape[0], dtype=np.int64)
        K._lru(stream.req, stream.reset, stream.n_items, capacity, out)
        return out

    def replayer(self, n_items: int, k: int, capacity: int) -> Replayer:
        st = K.lru_state(n_items)
        return Replayer(lambda req, reset, g0, nu: K.lru_run(req, reset, capacity, *st, _NO_GROUPS), st[-1])


@register
class FIFO(CachePolicy):
    name = "fifo"
    summary = "first in, first out (hits do not refresh)"
    windowed = True

    def run(self, stream: Stream, capacity: int) -> np.ndarray:
        return K.scan_policy(stream.req, stream.reset, stream.n_items, capacity, K.SCAN_FIFO, 0)

    def misses_per_group(self, stream: Stream, capacity: int) -> np.ndarray:
        return _scan_groups(stream, capacity, K.SCAN_FIFO, 0)

    def replayer(self, n_items: int, k: int, capacity: int) -> Replayer:
        st = K.fifo_state(n_items, k)
        return Replayer(lambda req, reset, g0, nu: K.fifo_run(req, reset, g0, capacity, *st, _NO_GROUPS), st[-1])


@register
class LFU(CachePolicy):
    name = "lfu"
    summary = "least frequently used, counts since the cache started (halved every --aging tokens if set)"
    windowed = True

    def run(self, stream: Stream, capacity: int) -> np.ndarray:
        return K.scan_policy(stream.req, stream.reset, stream.n_items, capacity, K.SCAN_LFU, self.params.aging)

    def misses_per_group(self, stream: Stream, capacity: int) -> np.ndarray:
        return _scan_groups(stream, capacity, K.SCAN_LFU, self.params.aging)

    def replayer(self, n_items: int, k: int, capacity: int) -> Replayer:
        return _heap_replayer(n_items, k, capacity, False, self.params.aging)


@register
class LFUStatic(CachePolicy):
    name = "lfu-static"
    summary = "the capacity's most frequent experts of the train split, pinned (loaded at first use); the rest bypass"
    learns = True
    bypass = True
    windowed = True

    def fit(self, train: Stream) -> None:
        self._order = np.argsort(-np.bincount(train.req.ravel(), minlength=train.n_items), kind="stable")

    def fitter(self, n_items: int, k: int, n_groups: int) -> Fitter:
        counts = np.zeros(n_items, dtype=np.int64)

        def feed(req: np.ndarray, reset: np.ndarray, g0: int) -> None:
            counts[:] += np.bincount(req.ravel(), minlength=n_items)

        def finish() -> None:
            self._order = np.argsort(-counts, kind="stable")

        return Fitter(feed, finish)

    def _pinned(self, n_items: int, capacity: int) -> np.ndarray:
        pinned = np.zeros(n_items, dtype=np.bool_)
        pinned[self._order[:capacity]] = True
        return pinned

    def run(self, stream: Stream, capacity: int) -> np.ndarray:
        return K.static_set(stream.req, stream.reset, self._pinned(stream.n_items, capacity))

    def misses_per_group(self, stream: Stream, capacity: int) -> np.ndarray:
        out = np.zeros(stream.req.shape[0], dtype=np.int64)
        K._static_set(stream.req, stream.reset, self._pinned(stream.n_items, capacity), out)
        return out

    def replayer(self, n_items: int, k: int, capacity: int) -> Replayer:
        pinned, (loaded, sc) = self._pinned(n_items, capacity), K.static_state(n_items)
        return Replayer(lambda req, reset, g0, nu: K.static_run(req, reset, pinned, loaded, sc, _NO_GROUPS), sc)


@register
class ARC(CachePolicy):
    name = "arc"
    summary = "adaptive replacement cache (recency and frequency lists steered by ghost hits)"
    windowed = True

    def run(self, stream: Stream, capacity: int) -> np.ndarray:
        return K.arc(stream.req, stream.reset, stream.n_items, capacity)

    def replayer(self, n_items: int, k: int, capacity: int) -> Replayer:
        st = K.arc_state(n_items)
        return Replayer(lambda req, reset, g0, nu: K.arc_run(req, reset, g0, capacity, *st, _NO_GROUPS), st[-2])

    def misses_per_group(self, stream: Stream, capacity: int) -> np.ndarray:
        out = np.zeros(stream.req.shape[0], dtype=np.int64)
        K._arc(stream.req, stream.reset, stream.n_items, capacity, out)
        return out


# LRFU's decay rates, log-evenly over the paper's range [0 (LFU), 1 (about LRU)], fixed before any data was
# seen; which one a capacity uses is chosen on the train split only (`LRFU.fit`).
LRFU_GRID = (0.0, 2.0**-12, 2.0**-10, 2.0**-8, 2.0**-6, 2.0**-4, 2.0**-2, 1.0)
LRFU_FIT_GROUPS = 1 << 16  # train groups replayed per candidate rate, at most (bounds the fit's cost, not tuned)


@register
class LRFU(CachePolicy):
    name = "lrfu"
    summary = "recency-weighted use counts (LRFU), the decay rate per capacity chosen on the train split"
    learns = True
    windowed = True

    def fitter(self, n_items: int, k: int, n_groups: int) -> Fitter:
        head: list[tuple[np.ndarray, np.ndarray]] = []  # the train stream's first LRFU_FIT_GROUPS groups

        def feed(req: np.ndarray, reset: np.ndarray, g0: int) -> None:
            if g0 < LRFU_FIT_GROUPS:
                head.append((req[: LRFU_FIT_GROUPS - g0].copy(), reset[: LRFU_FIT_GROUPS - g0].copy()))

        def finish() -> None:
            req = np.concatenate([r for r, _ in head]) if head else np.empty((0, k), dtype=np.int32)
            reset = np.concatenate([f for _, f in head]) if head else np.empty(0, dtype=np.bool_)
            self.fit(Stream(req, reset, n_items, n_items))

        return Fitter(feed, finish)

    def fit(self, train: Stream) -> None:
        n = min(train.req.shape[0], LRFU_FIT_GROUPS)
        # copies, so the fitted policy does not keep the whole train stream alive
        w = None if train.weights is None else train.weights[:n].copy()
        self._train = Stream(train.req[:n].copy(), train.reset[:n].copy(), train.n_items, train.n_experts, None, w)
        self._rates: dict[int, float] = {}

    def _lw(self, stream: Stream) -> np.ndarray:
        """The log2 use weights the kernel adds (`kernels.lrfu_run`): none, every use counts 1."""
        return K.NO_WEIGHTS

    def rate(self, capacity: int) -> float:
        """The decay rate for `capacity`: the `LRFU_GRID` value with the fewest demand misses replaying the
        train stream at that capacity (ties: the smaller rate)."""
        if capacity not in self._rates:
            t = self._train
            lw = self._lw(t)
            misses = [K._lrfu(t.req, t.reset, t.n_items, capacity, lam, lw, _NO_GROUPS)[1] for lam in LRFU_GRID]
            self._rates[capacity] = LRFU_GRID[int(np.argmin(misses))]
        return self._rates[capacity]

    def run(self, stream: Stream, capacity: int) -> np.ndarray:
        return self._replay(stream, capacity, _NO_GROUPS)

    def misses_per_group(self, stream: Stream, capacity: int) -> np.ndarray:
        out = np.zeros(stream.req.shape[0], dtype=np.int64)
        self._replay(stream, capacity, out)
        return out

    def _replay(self, stream: Stream, capacity: int, per_group: np.ndarray) -> np.ndarray:
        lam = self.rate(capacity)
        return K._lrfu(stream.req, stream.reset, stream.n_items, capacity, lam, self._lw(stream), per_group)

    def replayer(self, n_items: int, k: int, capacity: int) -> Replayer:
        lam, st = self.rate(capacity), K.lrfu_state(n_items, capacity)
        return Replayer(
            lambda req, reset, g0, nu: K.lrfu_run(req, reset, g0, capacity, lam, K.NO_WEIGHTS, *st, _NO_GROUPS), st[-1]
        )


@register
class GateLRFU(LRFU):
    """LRFU whose CRF sums each use's gate weight instead of 1 (`kernels.gate_lrfu`): an expert the router
    weighs heavily counts more. A runtime has the weights at that moment (the router computes them). On the
    shared ESFT / DeepSeek-V2-Lite trace it closes less of LRU's gap to Belady than LRFU everywhere (C 8 / 16 /
    32: held-out halves 18.1 / 19.4 / 23.7% against 29.2 / 25.3 / 29.7%; replaying intent, law, summary with
    the other two fitted 14.7 / 11.0 / 22.1, 8.7 / 0.5 / 3.1, 16.1 / 20.9 / 21.5% against 26.1 / 18.2 / 32.0,
    14.5 / 4.1 / 8.9, 22.7 / 25.9 / 26.3%; `bench/cache_generalisation.py`), so gate mass does not predict reuse
    there; it is here to measure that on other workloads."""

    name = "gate-lrfu"
    summary = "LRFU with each use counted by its gate weight (traces with weights; when named)"
    gate_weights = True
    windowed = False  # a store's layer files hold expert ids only

    def _lw(self, stream: Stream) -> np.ndarray:
        """log2 of each use's gate weight (-inf for 0: it counts nothing)."""
        if stream.weights is None:
            raise UsageError(
                "gate-lrfu counts each use by its gate weight, and this trace has no weights; capture or import "
                "one with gate weights, or use the policy lrfu"
            )
        with np.errstate(divide="ignore"):
            return np.log2(stream.weights.astype(np.float64))


# Adaptive LRFU's memory of its shadows' misses: a miss weighs half after this many groups. Fixed a priori
# (about a thousand tokens per layer); on ESFT/DeepSeek-V2-Lite half-lives from 256 to 4,096 moved the gap
# closed by under 1.5 points on every split, so it is not a tuned knob.
ADAPTIVE_HALF_LIFE = 1024


@register
class AdaptiveLRFU(CachePolicy):
    name = "adaptive-lrfu"
    summary = "LRFU following, online, the decay rate whose shadow cache missed least lately (no fit; when named)"
    windowed = True

    def _args(self) -> tuple[np.ndarray, float]:
        return np.asarray(LRFU_GRID), 2.0 ** (-1.0 / ADAPTIVE_HALF_LIFE)

    def run(self, stream: Stream, capacity: int) -> np.ndarray:
        return K.adaptive_lrfu(stream.req, stream.reset, stream.n_items, capacity, *self._args())

    def misses_per_group(self, stream: Stream, capacity: int) -> np.ndarray:
        out = np.zeros(stream.req.shape[0], dtype=np.int64)
        K._adaptive_lrfu(stream.req, stream.reset, stream.n_items, capacity, *self._args(), out)
        return out

    def replayer(self, n_items: int, k: int, capacity: int) -> Replayer:
        rates, decay = self._args()
        st = K.adaptive_lrfu_state(n_items, capacity, rates.shape[0])

        def feed(req: np.ndarray, reset: np.ndarray, g0: int, nu: np.ndarray | None) -> None:
            K.adaptive_lrfu_run(req, reset, g0, capacity, rates, decay, *st, _NO_GROUPS)

        return Replayer(feed, st[-1])


@register
class CoactPrefetch(CachePolicy):
    name = "coact-prefetch"
    summary = "LRU + after each token prefetch the experts most co-activated with its set (train split)"
    learns = True
    prefetches = True

    windowed = True

    def fit(self, train: Stream) -> None:
        self._coact = _coact_counts(train.req, train.n_experts, train.n_layers).reshape(
            train.n_layers, train.n_experts, train.n_experts
        )

    def fitter(self, n_items: int, k: int, n_groups: int) -> Fitter:
        counts = np.zeros(n_items * n_items)  # one layer's stream: items are its experts

        def feed(req: np.ndarray, reset: np.ndarray, g0: int) -> None:
            counts[:] += _coact_counts(req, n_items, 1)

        def finish() -> None:
            self._coact = counts.reshape(1, n_items, n_items)

        return Fitter(feed, finish)

    def run(self, stream: Stream, capacity: int) -> np.ndarray:
        return K.coact_prefetch(
            stream.req, stream.reset, stream.n_items, capacity, self._coact, stream.n_experts, self.params.prefetch
        )

    def replayer(self, n_items: int, k: int, capacity: int) -> Replayer:
        coact, budget = self._coact, self.params.prefetch
        st = K.coact_prefetch_state(n_items, capacity, n_items)

        def feed(req: np.ndarray, reset: np.ndarray, g0: int, nu: np.ndarray | None) -> None:
            K.coact_prefetch_run(req, reset, g0, capacity, coact, n_items, budget, *st)

        return Replayer(feed, st[-1], lambda: K.coact_prefetch_stats(st[0], st[5], st[-1]))


def _coact_counts(req: np.ndarray, n_experts: int, n_layers: int) -> np.ndarray:
    """``[layers x E x E]`` float64: how often each ordered pair of distinct experts of a layer is needed by
    the same group (items ``layer * E + expert``)."""
    e, k = n_experts, req.shape[1]
    req = req.astype(np.int64)
    layer = req[:, :1] // e
    local = req - layer * e
    pairs = (layer * e + local)[:, :, None] * e + local[:, None, :]  # [groups, k, k] flat (layer, a, b)
    flat = pairs[:, ~np.eye(k, dtype=bool)].ravel()
    return np.bincount(flat, minlength=n_layers * e * e).astype(np.float64)


@register
class Belady(CachePolicy):
    name = "belady"
    summary = "offline optimum (MIN): evict the expert needed furthest in the future; the floor"
    offline = True
    windowed = True
    reads_next_use = True

    def run(self, stream: Stream, capacity: int) -> np.ndarray:
        return K.scan_policy(stream.req, stream.reset, stream.n_items, capacity, K.SCAN_BELADY, 0)

    def misses_per_group(self, stream: Stream, capacity: int) -> np.ndarray:
        return _scan_groups(stream, capacity, K.SCAN_BELADY, 0)

    def replayer(self, n_items: int, k: int, capacity: int) -> Replayer:
        return _heap_replayer(n_items, k, capacity, True, 0)


def _heap_replayer(n_items: int, k: int, capacity: int, belady: bool, aging: int) -> Replayer:
    st = K.heap_state(n_items, capacity, k)
    unused = np.empty((1, 1), dtype=np.int64)

    def feed(req: np.ndarray, reset: np.ndarray, g0: int, nu: np.ndarray | None) -> None:
        nu = unused if nu is None else nu
        K.heap_run(req, reset, g0, n_items, capacity, belady, aging, nu, *st, _NO_GROUPS)

    return Replayer(feed, st[-1])


def _scan_groups(stream: Stream, capacity: int, kind: int, aging: int) -> np.ndarray:
    out = np.zeros(stream.req.shape[0], dtype=np.int64)
    K._scan_policy(stream.req, stream.reset, stream.n_items, capacity, kind, aging, out)
    return out
