"""Cache replays of a stored trace a window of tokens at a time, so memory does not grow with the trace's length.

`moescope.cache.streamed` bounds memory by the number of layers read at once; a layer's whole stream is
still replayed in one kernel call, so memory grows with the number of tokens (about 16 x k bytes per token).
Here the policies that can carry their cache from one window of a stream to the next
(`CachePolicy.windowed`: every policy but learned-near and gate-lrfu) replay each layer's stream a window of
`WINDOW_TOKENS` store tokens at a time, with the same counts as one whole-stream call (tests check it):

- the store is decoded once into one raw file per layer (`streamed.LayerColumns`), and each window is read
  from its layer's file with plain reads (no memory map, so the pages read do not stay resident);
- a window's stream is the tokens of that window which belong to the replayed part (the second halves of
  the sequences, the scored labels' sequences, or every token with ``--split all``), in order; the cache
  restarts empty at the part's first token and, with ``--reset-per-sequence``, at each of its sequences;
- the policies that learn are fitted from the train part read window by window (`CachePolicy.fitter`):
  LFU-static from its per-expert counts, LRFU from its first `policies.LRFU_FIT_GROUPS` groups (all its fit
  ever reads), the learned eviction from its rows sampled as the windows pass, the co-activation prefetcher
  from its pair counts;
- Belady needs each access's next use: one pass over the windows from last to first writes them to a
  temporary file (8 x k bytes per replayed token), which the forward pass reads back window by window;
- miss curves (`miss_curves_windows`, for ``--curve`` and the ``--slots`` / ``--vram`` budget) take LRU's
  and Belady's stack depths window by window (every capacity in one pass) and replay the other policies at
  each capacity.

Memory is then one window per worker (ids, mask, stream, next uses: about 15 x k bytes per window token, 120
MB at top-8 for 2^20 tokens) plus each cache's state (items x a few words) and the sequence table, at any
trace length; the decode into layer files before it holds two spans of `streamed.SPAN_CHUNKS` store chunks
(every layer). Layers are replayed in parallel, one per worker. Disk: the layer files (tokens x layers x k x 2
bytes) and, for Belady, each worker's next-use file. A pooled cache, a Dask scheduler, a policy that is not
windowed (learned-near, gate-lrfu: a store's layer files hold no router candidates or gate weights), or a disk
without that room use `streamed` instead. Measured (`bench/cache_e2e.py`, peak RSS of ``moescope cache`` with
the defaults on 2 layers): 393 / 443 / 531 MB at 2.5M / 10M / 40M tokens; what still grows is the sequence
table (a few hundred bytes per sequence) and allocator slack, not the ids.

`WINDOW_TOKENS` bounds memory, not results (counts are exact for any window).

    >>> result = simulate_windows(TraceStore("run.zarr"), [16, 32], ["lru", "belady"])
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from moescope._jit import usable_cpus
from moescope.cache import kernels as K
from moescope.cache.policies import POLICIES, CachePolicy, PolicyParams, make_policy
from moescope.cache.simulate import (
    CacheResult,
    MissCurves,
    check_capacities,
    check_parts,
    check_protocol,
    curve_capacities,
    policy_names,
)
from moescope.cache.streamed import LayerColumns
from moescope.slicing import label_protocol
from moescope.trace import EXPERT_DTYPE, layer_positions

WINDOW_TOKENS = 1 << 20  # store tokens per window (memory per worker: module docstring)


@dataclasses.dataclass(frozen=True)
class Part:
    """The tokens of a trace one stream replays: the sorted, disjoint token ranges ``[starts[i], ends[i])``, in
    order; the cache restarts empty at the part's first token and, with `per_sequence`, at every range's."""

    starts: np.ndarray
    ends: np.ndarray
    per_sequence: bool

    @functools.cached_property
    def offsets(self) -> np.ndarray:
        """[ranges + 1] each range's first position in the stream, then the stream's length."""
        return np.concatenate([[0], np.cumsum(self.ends - self.starts)]).astype(np.int64)

    @property
    def n(self) -> int:
        return int((self.ends - self.starts).sum())

    def before(self, t: int) -> int:
        """Stream positions taken by tokens before token `t`."""
        full = int(np.searchsorted(self.ends, t, side="right"))  # ranges that end at or before t
        out = int(self.offsets[full])
        if full < self.starts.size and self.starts[full] < t:
            out += t - int(self.starts[full])
        return out

    def mask(self, a: int, b: int) -> np.ndarray:
        """[b - a] bool: which tokens of ``a:b`` the part holds."""
        lo = int(np.searchsorted(self.ends, a, side="right"))
        hi = int(np.searchsorted(self.starts, b, side="left"))
        d = np.zeros(b - a + 1, dtype=np.int32)
        np.add.at(d, np.clip(self.starts[lo:hi] - a, 0, b - a), 1)
        np.add.at(d, np.clip(self.ends[lo:hi] - a, 0, b - a), -1)
        return np.cumsum(d[:-1]) > 0

    def resets(self, g0: int, count: int) -> np.ndarray:
        """[count] bool: the reset flags of stream positions ``g0 : g0 + count``."""
        out = np.zeros(count, dtype=np.bool_)
        if count and g0 == 0:
            out[0] = True
        if self.per_sequence:
            at = self.offsets[:-1]
            at = at[(at >= g0) & (at < g0 + count)] - g0
            out[at] = True
        return out


def parts(
    store: Any, split: str, fit_labels: Sequence[str] | None, score_labels: Sequence[str] | None, per_sequence: bool
) -> tuple[Part, Part, tuple[str, ...], tuple[str, ...]]:
    """(train part, replayed part, fitted labels, scored labels) of `store` for a split mode or the labels
    protocol, with the errors `simulate` gives for the same arguments."""
    labelled = bool(fit_labels or score_labels)
    check_protocol(split, labelled)
    starts = np.asarray(store.seq_starts, dtype=np.int64)
    ends = np.append(starts[1:], store.n_tokens).astype(np.int64) if starts.size else starts
    fit_l: tuple[str, ...] = ()
    score_l: tuple[str, ...] = ()
    if labelled:
        skeleton = _Labelled(store.seq_labels)
        fit_l, score_l = label_protocol(skeleton, fit_labels, score_labels)  # type: ignore[arg-type]
        f, s = (np.isin(store.seq_labels, list(x)) for x in (fit_l, score_l))
        train, test = Part(starts[f], ends[f], per_sequence), Part(starts[s], ends[s], per_sequence)
    elif split == "all":
        whole = Part(starts, ends, per_sequence)
        return whole, whole, fit_l, score_l
    else:
        mid = starts + (ends - starts) // 2
        keep_tr, keep_te = mid > starts, ends > mid  # the sub-traces drop empty ranges
        train, test = (
            Part(starts[keep_tr], mid[keep_tr], per_sequence),
            Part(mid[keep_te], ends[keep_te], per_sequence),
        )
    check_parts(train.n, test.n, labelled, store.n_tokens, starts.size)
    return train, test, fit_l, score_l


@dataclasses.dataclass(frozen=True)
class _Labelled:
    """What `label_protocol` reads of a trace: its labels."""

    seq_labels: Any

    def labels(self) -> list[str]:
        """As `RoutingTrace.labels`: distinct labels in first-seen order."""
        return [] if self.seq_labels is None else list(dict.fromkeys(np.asarray(self.seq_labels).tolist()))


def eligible(names: Sequence[str], pooled: bool, scheduler: str | None) -> bool:
    """Whether `simulate_windows` serves this request (every named policy known and windowed, per-layer caches,
    no Dask)."""
    return not pooled and scheduler is None and all(n in POLICIES and POLICIES[n].windowed for n in names)


def serves(store: Any, names: Sequence[str], layers: Sequence[int] | None, pooled: bool = False,
           scheduler: str | None = None) -> bool:  # fmt: skip
    """Whether `moescope.cache.streamed` should hand this request to the windows: `eligible`, and the disk
    has the `room` for the store's `layers` (None: all)."""
    n_layers = len(store.layer_ids if layers is None else layers)
    return eligible(names, pooled, scheduler) and room(store, n_layers, usable_cpus())


def room(store: Any, n_layers: int, workers: int, folder: str | os.PathLike | None = None) -> bool:
    """Whether the temporary folder's disk holds the layer files and every worker's next-use file (10% spare)."""
    k = store.top_k
    need = store.n_tokens * k * (n_layers * EXPERT_DTYPE.itemsize + workers * 8)
    return shutil.disk_usage(folder or tempfile.gettempdir()).free > 1.1 * need


def _windows(part: Part, n_tokens: int, window: int) -> list[tuple[int, int, int, int]]:
    """[(a, b, g0, count)]: store tokens ``a:b``, the stream position of their first part token and how many
    they hold, for every window that holds some."""
    out = []
    for a in range(0, n_tokens, window):
        b = min(a + window, n_tokens)
        g0, g1 = part.before(a), part.before(b)
        if g1 > g0:
            out.append((a, b, g0, g1 - g0))
    return out


class _LayerFile:
    """One layer's ids ([tokens, k] int16, row-major), read a token range at a time with plain reads."""

    def __init__(self, path: Path, k: int) -> None:
        self._f, self.k = open(path, "rb"), k  # noqa: SIM115  (closed by `close`)

    def rows(self, a: int, b: int) -> np.ndarray:
        self._f.seek(a * self.k * EXPERT_DTYPE.itemsize)
        out = np.fromfile(self._f, dtype=EXPERT_DTYPE, count=(b - a) * self.k)
        if out.size != (b - a) * self.k:  # the file is ours: a short read is a bug or a full disk
            raise OSError(f"layer file {self._f.name} ended early at token {a + out.size // self.k}")
        return out.reshape(b - a, self.k)

    def close(self) -> None:
        self._f.close()


def _stream(layer: _LayerFile, part: Part, wins: list[tuple[int, int, int, int]]) -> Iterator[tuple[int, Any, Any]]:
    """(g0, req [count, k] int32, reset [count]) of each window of `part` (in the order of `wins`)."""
    for a, b, g0, count in wins:
        req = np.ascontiguousarray(layer.rows(a, b)[part.mask(a, b)], dtype=np.int32)
        assert req.shape[0] == count
        yield g0, req, part.resets(g0, count)


class Depths:
    """LRU stack depths of a stream fed window by window (`kernels.depths_run`): every LRU capacity at once."""

    def __init__(self, n_items: int) -> None:
        self.state = K.depths_state(n_items)

    def feed(self, req: np.ndarray, reset: np.ndarray, g0: int, nu: np.ndarray | None) -> None:
        K.depths_run(req, reset, *self.state)

    def misses(self, capacities: np.ndarray) -> np.ndarray:
        """Demand misses of an LRU cache at each of `capacities` (as `miss_curves`)."""
        beyond = np.cumsum(self.state[0][::-1])[::-1]  # beyond[d] = accesses at depth >= d (cold included)
        return beyond[capacities]


class BeladyDepths(Depths):
    """Belady's stack depths fed window by window (`kernels.belady_depths_run`, reading each window's next
    uses): every Belady capacity at once."""

    def __init__(self, n_items: int) -> None:
        self.state = K.belady_depths_state(n_items)

    def feed(self, req: np.ndarray, reset: np.ndarray, g0: int, nu: np.ndarray | None) -> None:
        assert nu is not None  # replay_layer reads the next uses when a policy (here belady) does
        K.belady_depths_run(req, reset, g0, nu, *self.state)


# the window-by-window stack depths of each policy of `simulate.STACK_DEPTHS` (same keys)
DEPTHS: dict[str, type[Depths]] = {"lru": Depths, "belady": BeladyDepths}


def replay_layer(
    path: Path,
    k: int,
    n_items: int,
    n_tokens: int,
    train: Part,
    test: Part,
    policies: Sequence[CachePolicy],
    consumers: Callable[[], list[Any]],
    scratch: Path,
    window: int = WINDOW_TOKENS,
) -> list[Any]:
    """Replay one layer's file (`_LayerFile`) window by window: fit the `policies` that learn (fresh instances
    per layer) from the train part's windows (`CachePolicy.fitter`), then feed every window of the test part to
    each of ``consumers()`` (built after the fit: the policies' `Replayer` s, `Depths`), which it returns;
    `scratch` holds the next-use file when a policy reads next uses."""
    layer = _LayerFile(path, k)
    try:
        learners = [p for p in policies if p.learns]
        if learners:
            fits = [p.fitter(n_items, k, train.n) for p in learners]
            for g0, req, reset in _stream(layer, train, _windows(train, n_tokens, window)):
                for f in fits:
                    f.feed(req, reset, g0)
            for f in fits:
                f.finish()
        wins = _windows(test, n_tokens, window)
        nu_path = None
        if any(p.reads_next_use for p in policies):
            nu_path = scratch / f"next-use-{path.stem}.bin"
            _write_next_use(layer, test, wins, n_items, nu_path)
        fed = consumers()
        with contextlib.ExitStack() as stack:
            nu_f = None if nu_path is None else stack.enter_context(open(nu_path, "rb"))
            for g0, req, reset in _stream(layer, test, wins):
                nu = None
                if nu_f is not None:
                    nu_f.seek(g0 * k * 8)
                    nu = np.fromfile(nu_f, dtype=np.int64, count=req.size).reshape(req.shape)
                for c in fed:
                    c.feed(req, reset, g0, nu)
        if nu_path is not None:
            nu_path.unlink(missing_ok=True)
        return fed
    finally:
        layer.close()


def _write_next_use(layer: _LayerFile, part: Part, wins: list[tuple[int, int, int, int]], n_items: int,
                    path: Path) -> None:  # fmt: skip
    """Every access's next use (`kernels.next_use`, stream-wide) into `path` ([stream, k] int64), computed from
    the last window to the first."""
    last = np.full(n_items, K.NEVER, dtype=np.int64)
    with open(path, "wb") as f:
        f.truncate(part.n * layer.k * 8)
        for g0, req, reset in _stream(layer, part, wins[::-1]):
            out = np.empty(req.shape, dtype=np.int64)
            K.next_use_into(req, reset, g0, last, out)
            f.seek(g0 * layer.k * 8)
            out.tofile(f)


@dataclasses.dataclass(frozen=True)
class _Request:
    """What `simulate_windows` and `miss_curves_windows` share: the checked policies, layers and parts."""

    names: list[str]
    ids: list[int]
    train: Part
    test: Part
    fit_labels: tuple[str, ...]
    score_labels: tuple[str, ...]


def _request(
    store: Any,
    names: Sequence[str] | None,
    params: PolicyParams,
    layers: Sequence[int] | None,
    split: str,
    fit_labels: Sequence[str] | None,
    score_labels: Sequence[str] | None,
    per_sequence: bool,
) -> _Request:
    """Check a request as `simulate` does, before any work."""
    names = policy_names(names, params)
    if not all(POLICIES[n].windowed for n in names):
        raise ValueError(f"not every policy of {names} replays in windows; use moescope.cache.streamed")
    ids = [int(x) for x in (store.layer_ids if layers is None else layers)]
    layer_positions(store.layer_ids, ids)  # unknown or repeated ids: a UsageError before any work
    train, test, fit_l, score_l = parts(store, split, fit_labels, score_labels, per_sequence)
    return _Request(names, ids, train, test, fit_l, score_l)


def _each_layer(
    store: Any,
    req: _Request,
    params: PolicyParams,
    consumers: Callable[[list[CachePolicy]], list[Any]],
    done: Callable[[int, list[Any]], None],
    progress: Callable[[int, int], None] | None,
    window: int,
    workers: int | None,
    folder: str | os.PathLike | None,
    columns: LayerColumns | None = None,
) -> None:
    """Decode the store's layers once (`LayerColumns`; `columns` instead when it covers them), then replay
    each layer (`replay_layer`, fresh policy instances, ``consumers(policies)``) in parallel; ``done(layer
    position, consumers)`` as each finishes."""
    n_workers = max(1, min(workers or usable_cpus(), len(req.ids)))
    with contextlib.ExitStack() as stack:
        if columns is not None and columns.covers(store, req.ids):
            cols = columns
        else:
            cols = stack.enter_context(LayerColumns(store, req.ids, folder))
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="moescope-next-use-", dir=folder)))

        def work(i: int) -> None:
            pols = [make_policy(n, params) for n in req.names]
            fed = replay_layer(cols.path(req.ids[i]), store.top_k, store.n_experts, store.n_tokens, req.train,
                               req.test, pols, lambda: consumers(pols), scratch, window)  # fmt: skip
            done(i, fed)

        if progress:
            progress(0, len(req.ids))
        with ThreadPoolExecutor(max_workers=n_workers) as pool:
            for n_done, _ in enumerate(pool.map(work, range(len(req.ids))), 1):
                if progress:
                    progress(n_done, len(req.ids))


def simulate_windows(
    store: Any,
    capacities: Sequence[int],
    policies: Sequence[str] | None = None,
    *,
    layers: Sequence[int] | None = None,
    reset_per_sequence: bool = False,
    split: str = "test",
    params: PolicyParams | None = None,
    progress: Callable[[int, int], None] | None = None,
    fit_labels: Sequence[str] | None = None,
    score_labels: Sequence[str] | None = None,
    window: int = WINDOW_TOKENS,
    workers: int | None = None,
    folder: str | os.PathLike | None = None,
    columns: LayerColumns | None = None,
) -> CacheResult:
    """`simulate` over a `TraceStore` (model `layers`, default all), per-layer caches replayed window by window
    (module docstring); every named policy must be `CachePolicy.windowed` (`eligible`). Same result as
    `simulate` on the whole trace. `columns`: the layers already decoded, read when they cover the request."""
    params = params or PolicyParams()
    req = _request(store, policies, params, layers, split, fit_labels, score_labels, reset_per_sequence)
    caps = check_capacities(list(capacities), store.top_k, store.n_experts)
    stats = np.zeros((len(req.names), len(caps), len(req.ids), 4), dtype=np.int64)

    def grid(pols: list[CachePolicy]) -> list[Any]:
        return [p.replayer(store.n_experts, store.top_k, c) for p in pols for c in caps]

    def done(i: int, fed: list[Any]) -> None:
        stats[:, :, i] = np.array([r.stats() for r in fed]).reshape(len(req.names), len(caps), 4)

    _each_layer(store, req, params, grid, done, progress, window, workers, folder, columns)
    return CacheResult(
        tuple(req.names), tuple(caps), tuple(req.ids), stats, req.test.n, store.top_k, store.n_experts, False,
        reset_per_sequence, "labels" if req.fit_labels else split, params, req.fit_labels, req.score_labels,
    )  # fmt: skip


def miss_curves_windows(
    store: Any,
    policies: Sequence[str] = ("lru", "belady"),
    *,
    capacities: Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    reset_per_sequence: bool = False,
    split: str = "test",
    params: PolicyParams | None = None,
    progress: Callable[[int, int], None] | None = None,
    fit_labels: Sequence[str] | None = None,
    score_labels: Sequence[str] | None = None,
    window: int = WINDOW_TOKENS,
    workers: int | None = None,
    folder: str | os.PathLike | None = None,
    columns: LayerColumns | None = None,
) -> MissCurves:
    """`miss_curves` over a `TraceStore`, window by window (LRU and Belady from their stack depths, every
    capacity in one pass; every other policy replayed at each capacity); every named policy must be windowed;
    `columns` as `simulate_windows`'."""
    params = params or PolicyParams()
    req = _request(store, policies, params, layers, split, fit_labels, score_labels, reset_per_sequence)
    k, e = store.top_k, store.n_experts
    caps = curve_capacities(capacities, k, e)
    misses = np.zeros((len(req.names), len(req.ids), caps.size), dtype=np.int64)

    def curves(pols: list[CachePolicy]) -> list[Any]:
        out: list[Any] = []
        for p in pols:
            out += [DEPTHS[p.name](e)] if p.name in DEPTHS else [p.replayer(e, k, int(c)) for c in caps]
        return out

    def done(i: int, fed: list[Any]) -> None:
        at = 0
        for pi, name in enumerate(req.names):
            if name in DEPTHS:
                misses[pi, i] = fed[at].misses(caps)
                at += 1
            else:
                misses[pi, i] = [r.stats()[1] for r in fed[at : at + caps.size]]
                at += caps.size

    _each_layer(store, req, params, curves, done, progress, window, workers, folder, columns)
    accesses = np.full(len(req.ids), req.test.n * k, dtype=np.int64)
    return MissCurves(tuple(req.names), caps, tuple(req.ids), misses, accesses, req.test.n,
                      "labels" if fit_labels or score_labels else split)  # fmt: skip
