"""Count-based analyses as a map-reduce over sequence-aligned token chunks of a trace store.

One code path, two executors: in this process (chunks one after another, memory bounded by one chunk plus
the running sums) or on a Dask cluster (``scheduler="tcp://host:8786"``, or ``"local:N"`` for a
LocalCluster of N single-threaded workers), where each task opens the store itself and reads only its
chunk, and partial sums are added up in a tree. Results are identical between executors: every partial is
a dict of integer (or exactly summed) arrays, added key by key.

Chunks are cut at sequence boundaries (a sequence longer than the target stays whole), so statistics
within a sequence (next-token reuse, reuse distances, working sets) need no state from other chunks.

    >>> run_chunked("big.zarr", ["counts", "coact"], scheduler="local:2")["counts"].values
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moescope._dask import dask_client
from moescope.errors import UsageError
from moescope.store import TraceStore, is_url
from moescope.trace import RoutingTrace

Partial = dict[str, Any]  # values are numpy arrays or additive result objects (with __add__)
DEFAULT_CHUNK_TOKENS = 1 << 17


def sequence_chunks(seq_starts: np.ndarray, n_tokens: int, target: int) -> list[tuple[int, int]]:
    """Token ranges of about `target` tokens, each made of whole sequences (a longer sequence alone)."""
    if target < 1:
        raise UsageError(f"chunk size {target}: expected >= 1 token")
    bounds = np.append(np.asarray(seq_starts, dtype=np.int64), n_tokens)
    out, lo = [], 0
    while lo < n_tokens:
        want = lo + target
        i = int(np.searchsorted(bounds, want, side="right")) - 1  # last sequence boundary <= want
        hi = int(bounds[i]) if bounds[i] > lo else int(bounds[np.searchsorted(bounds, lo, side="right")])
        out.append((lo, hi))
        lo = hi
    return out


def add_partials(a: Partial, b: Partial) -> Partial:
    """Key-wise sum of two partials (keys of either)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = out[k] + v if k in out else v
    return out


class TreeSum:
    """Sum of partials pushed one by one, added in the same pairwise tree as `tree_sum` builds on Dask, with
    O(log n) partials held. Floating-point sums (gate mass) then come out bit-identical in this process
    and on a cluster: the same additions in the same order."""

    def __init__(self, add: Callable[[Partial, Partial], Partial] = add_partials) -> None:
        self._add = add
        self._stack: list[tuple[int, Partial]] = []  # (subtree size, partial); sizes are powers of two

    def push(self, part: Partial) -> None:
        size = 1
        while self._stack and self._stack[-1][0] == size:
            _, left = self._stack.pop()
            part, size = self._add(left, part), 2 * size
        self._stack.append((size, part))

    def total(self) -> Partial:
        """The sum (``{}`` for none): leftover subtrees joined right to left, as the levels of `tree_sum` do."""
        if not self._stack:
            return {}
        parts = [p for _, p in self._stack]
        acc = parts[-1]
        for left in reversed(parts[:-1]):
            acc = self._add(left, acc)
        return acc


def tree_sum(items: Sequence[Any], add: Callable[[Any, Any], Any]) -> Any:
    """Level by level pairwise sums of `items` (an odd one out moves up a level): the tree `TreeSum` mirrors.
    `add` may return a future (Dask) or a value."""
    level = list(items)
    while len(level) > 1:
        nxt = [add(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0] if level else None


@dataclasses.dataclass(frozen=True)
class Analysis:
    """A chunked analysis: `map` turns a chunk (whole sequences) into a partial; `finish` turns the sum of
    all partials into the result. Two-pass analyses also give `learn` (first-pass sum -> what the second
    pass needs) and `map2`; their second-pass sums reach `finish` under keys prefixed ``pass2/``."""

    name: str
    summary: str
    map: Callable[[RoutingTrace, Mapping[str, Any]], Partial]
    finish: Callable[[Partial, Mapping[str, Any]], Any]
    # a second pass over the chunks, given what the first one learned (e.g. tables fitted on the train halves)
    learn: Callable[[Partial, Mapping[str, Any]], Any] | None = None
    map2: Callable[[RoutingTrace, Mapping[str, Any], Any], Partial] | None = None


ANALYSES: dict[str, Analysis] = {}


def register(a: Analysis) -> Analysis:
    ANALYSES[a.name] = a
    return a


def _map_chunk(
    path: str,
    lo: int,
    hi: int,
    names: Sequence[str],
    layers: Sequence[int] | None,
    params: Mapping[str, Any],
    learned: Mapping[str, Any] | None = None,
) -> Partial:
    """One task: read tokens lo:hi of the store and return every analysis' partial, keys prefixed (the
    first pass with `learned` None, else the second pass of the analyses named in `learned`)."""
    # the run's own opening warned about an incomplete store once; a Dask worker would warn again
    chunk = TraceStore(path, warn_incomplete=False).read(lo, hi, layers=layers).trace
    params = {**params, "token_offset": lo}  # where the chunk sits in the store (a seeded shuffle keys on it)
    out: Partial = {}
    first_pass: dict[Any, Partial] = {}  # analyses sharing a map function (counts, ranking, ...) map once
    for name in names:
        a = ANALYSES[name]
        if learned is None:
            part = first_pass[a.map] if a.map in first_pass else first_pass.setdefault(a.map, a.map(chunk, params))
        else:
            part = a.map2(chunk, params, learned[name])
        for k, v in part.items():
            out[f"{name}/{k}"] = v
    return out


def _context(store: TraceStore, layers: Sequence[int] | None, params: Mapping[str, Any]) -> dict[str, Any]:
    from moescope.analyze.locality import default_budgets
    from moescope.analyze.prefetch import PREDICTORS

    ids = store.layer_ids if layers is None else np.asarray(list(layers), dtype=np.int64)
    return {
        "budgets": default_budgets(store.top_k, store.n_experts),
        "predictors": tuple(PREDICTORS),
        **params,
        "n_experts": store.n_experts,
        "top_k": store.top_k,
        "layer_ids": ids,
        "model": store.meta.model,
        "has_weights": store.has_weights,
    }


def finished_tokens(store: TraceStore) -> int:
    """Tokens of the store's finished sequences: every committed token once the writer has closed the
    store; while it is still open (a capture in progress), the tokens before the last committed sequence
    start, since that sequence may go on in the next commit."""
    if store.complete:
        return store.n_tokens
    return int(store.seq_starts[-1]) if store.n_sequences else 0


class ChunkedRun:
    """Running sums of chunked analyses over a trace store that may still be growing.

    `update` maps the sequences finished since the last update (all committed ones if `include_open`) and
    adds their partials to the running sums; `results` finishes the analyses on the sums. Because chunks
    are whole sequences and partials add up exactly, any sequence of updates gives the same results as one
    run over the same tokens. The Dask client (``scheduler``) is opened on first use and closed by `close`
    (or the ``with`` block).

        >>> with ChunkedRun("capture.zarr", ["counts", "coact"]) as run:
        ...     while not run.complete:
        ...         run.update(); print(run.tokens, run.results(one_pass_only=True)["counts"].tokens)
        ...         time.sleep(10)
    """

    def __init__(
        self,
        path: str | os.PathLike,
        analyses: Sequence[str] | None = None,
        *,
        scheduler: str | None = None,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        layers: Sequence[int] | None = None,
        params: Mapping[str, Any] | None = None,
        include_open: bool = False,
    ) -> None:
        store = TraceStore(path)
        if analyses is None:
            analyses = [n for n in ANALYSES if n != "gate" or store.has_weights]
        self.names = list(dict.fromkeys(analyses))
        unknown = [n for n in self.names if n not in ANALYSES]
        if unknown:
            raise UsageError(f"analysis {', '.join(unknown)}: unknown; choose from {', '.join(ANALYSES)}")
        if "gate" in self.names and not store.has_weights:
            raise UsageError(
                f"analysis 'gate' needs gate weights, which {str(path)!r} lacks (captured without them); "
                f"leave 'gate' out, or recapture with weights"
            )
        if chunk_tokens < 1:
            raise UsageError(f"chunk size {chunk_tokens}: expected >= 1 token")
        store._layer_index(layers)  # validates the layer ids
        self.path = str(path) if is_url(path) else str(Path(path).resolve())
        self.scheduler = scheduler
        self.chunk_tokens = int(chunk_tokens)
        self.layers = None if layers is None else [int(x) for x in layers]
        self.ctx = _context(store, layers, params or {})
        self.include_open = include_open
        self.tokens = 0  # tokens mapped so far (always a sequence boundary unless include_open)
        self.committed = store.n_tokens  # committed tokens at the last update
        self.complete = False  # the writer had closed the store at the last update
        self.writing = False  # a live process held the store's writer lock at the last update
        self._total: Partial = {}
        self._open_tail = False  # the last update mapped a sequence that may still go on
        self._stack = contextlib.ExitStack()
        self._client: Any = None

    # -- executing ------------------------------------------------------------------------------------
    def _map(self, ranges: Sequence[tuple[int, int]], names: Sequence[str], learned, progress) -> Partial:
        args = (names, self.layers, self.ctx, learned)
        if self.scheduler is None:
            acc = TreeSum()
            for i, (lo, hi) in enumerate(ranges):
                acc.push(_map_chunk(self.path, lo, hi, *args))
                if progress:
                    progress(i + 1, len(ranges))
            return acc.total()
        if self._client is None:
            self._client = self._stack.enter_context(dask_client(self.scheduler))
        return _run_dask(self._client, self.path, ranges, args, progress)

    def update(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Map the sequences finished since the last update; returns the number of new tokens."""
        if self._open_tail:
            raise UsageError("this run already mapped an unfinished sequence (include_open); start a new run")
        store = TraceStore(self.path)
        self.complete, self.committed = store.complete, store.n_tokens
        self.writing = store.writer is not None
        stop = store.n_tokens if self.include_open else finished_tokens(store)
        if stop <= self.tokens:
            return 0
        lo = self.tokens
        starts = store.seq_starts[(store.seq_starts >= lo) & (store.seq_starts < stop)] - lo
        ranges = [(a + lo, b + lo) for a, b in sequence_chunks(starts, stop - lo, self.chunk_tokens)]
        self._total = add_partials(self._total, self._map(ranges, self.names, None, progress))
        self._open_tail = self.include_open and not store.complete
        new, self.tokens = stop - self.tokens, stop
        return new

    def results(
        self, progress: Callable[[int, int], None] | None = None, *, one_pass_only: bool = False
    ) -> dict[str, Any]:
        """Name -> result over the tokens mapped so far. Two-pass analyses (their second pass needs what
        the first learned from all tokens) map every token again, unless `one_pass_only` leaves them out."""
        if self.tokens == 0 and self.complete:
            raise UsageError(f"{self.path}: the store holds no tokens; capture or convert a workload into it first")
        if self.tokens == 0:
            raise UsageError(
                f"{self.path}: no finished sequence to analyse yet ({self.committed} tokens committed while the "
                f"store is still being written); wait for more commits, or pass include_open / --include-open "
                f"to analyse the sequence that may still go on"
            )
        names = [n for n in self.names if not (one_pass_only and ANALYSES[n].map2 is not None)]
        total = dict(self._total)
        two = [n for n in names if ANALYSES[n].map2 is not None]
        if two:
            learned = {n: ANALYSES[n].learn(_strip(total, n), self.ctx) for n in two}
            store = TraceStore(self.path)
            starts = store.seq_starts[store.seq_starts < self.tokens]
            ranges = sequence_chunks(starts, self.tokens, self.chunk_tokens)
            for k, v in self._map(ranges, two, learned, progress).items():
                name, _, rest = k.partition("/")
                total[f"{name}/pass2/{rest}"] = v
        return {name: ANALYSES[name].finish(_strip(total, name), self.ctx) for name in names}

    def close(self) -> None:
        self._stack.close()
        self._client = None

    def __enter__(self) -> ChunkedRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_chunked(
    path: str | os.PathLike,
    analyses: Sequence[str] | None = None,
    *,
    scheduler: str | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    layers: Sequence[int] | None = None,
    params: Mapping[str, Any] | None = None,
    include_open: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Run `analyses` (names from `ANALYSES`; None: every one that applies to the store) over the store at
    `path`; returns name -> result.

    Parameters
    ----------
    scheduler : None (this process), ``"local:N"`` (a LocalCluster of N workers) or a Dask scheduler address.
    chunk_tokens : target tokens per chunk (whole sequences).
    layers : model layer ids to keep (default all).
    params : analysis options (e.g. ``coverage`` for the concentration gate).
    include_open : a store still being written is analysed on its finished sequences (`finished_tokens`);
        True takes every committed token, the last sequence cut where the commit stands.
    """
    with ChunkedRun(
        path,
        analyses,
        scheduler=scheduler,
        chunk_tokens=chunk_tokens,
        layers=layers,
        params=params,
        include_open=include_open,
    ) as run:
        run.update(progress)
        return run.results(progress)


def _strip(total: Partial, name: str) -> Partial:
    prefix = name + "/"
    return {k[len(prefix) :]: v for k, v in total.items() if k.startswith(prefix)}


def _run_dask(client, path, ranges, args, progress) -> Partial:
    """Map `ranges` as tasks on `client`'s cluster and sum the partials in a tree of pairwise sums there."""
    futures = [client.submit(_map_chunk, path, lo, hi, *args, pure=False) for lo, hi in ranges]
    total = tree_sum(futures, lambda a, b: client.submit(add_partials, a, b))
    if progress:
        from distributed import as_completed

        for done, _ in enumerate(as_completed(futures), 1):
            progress(done, len(futures))
    return total.result() if total is not None else {}


# -- the analyses ----------------------------------------------------------------------------------------
def _counts_map(tr: RoutingTrace, ctx: Mapping[str, Any]) -> Partial:
    from moescope.trace import expert_mass

    out = {"counts": expert_mass(tr.experts, tr.n_experts), "tokens": np.array([tr.n_tokens], dtype=np.int64)}
    if tr.weights is not None:
        out["gate"] = expert_mass(tr.experts, tr.n_experts, tr.weights)
    return out


def _counts(part: Partial, ctx: Mapping[str, Any]):
    from moescope.trace import ExpertCounts

    return ExpertCounts(
        part["counts"],
        layer_ids=ctx["layer_ids"],
        tokens=int(part["tokens"][0]),
        top_k=ctx["top_k"],
        meta={"model": ctx["model"], "source": "moescope.scale"},
    )


def _gate(part: Partial, ctx: Mapping[str, Any]):
    from moescope.trace import ExpertCounts

    return ExpertCounts(
        part["gate"],
        layer_ids=ctx["layer_ids"],
        tokens=int(part["tokens"][0]),
        top_k=ctx["top_k"],
        mass="gate",
        meta={"model": ctx["model"], "source": "moescope.scale"},
    )


register(Analysis("counts", "selections per layer and expert", _counts_map, _counts))
register(Analysis("gate", "summed gate weight per layer and expert (stores with weights)", _counts_map, _gate))
register(
    Analysis(
        "concentration",
        "the concentration gate (hot fraction for coverage, entropy, Gini)",
        _counts_map,
        lambda part, ctx: __import__("moescope.analyze", fromlist=["concentration"]).concentration(
            _counts(part, ctx),
            coverage=ctx.get("coverage", 0.9),
            threshold=ctx.get("threshold", 0.25),
            model=ctx["model"],
        ),
    )
)


def _ranking(part: Partial, ctx: Mapping[str, Any]):
    from moescope.analyze.ranking import Ranking

    by = ctx.get("by", "counts")
    counts = part["counts"]
    gate = part.get("gate")
    if by == "gate" and gate is None:
        raise UsageError("--by gate needs gate weights, which this store lacks; use --by counts")
    key = counts if by == "counts" else gate
    return Ranking(np.asarray(ctx["layer_ids"]), np.argsort(-key, axis=1, kind="stable"), counts, gate, by)


register(Analysis("ranking", "per-layer expert ranking", _counts_map, _ranking))


# co-activation: pair counts add up; the nulls need only each expert's selections, so the result is exact
def _coact_map(tr: RoutingTrace, ctx: Mapping[str, Any]) -> Partial:
    from moescope.analyze.coact import coact_counts

    return {"counts": coact_counts(tr.experts, tr.n_experts), "tokens": np.array([tr.n_tokens], dtype=np.int64)}


def _coact_finish(part: Partial, ctx: Mapping[str, Any]):
    from moescope.analyze.coact import coactivation_from_counts

    keys = ("groups", "n_null", "null", "seed", "restarts", "min_excess", "min_pair_excess")
    opts = {k: ctx[k] for k in keys if k in ctx}
    return coactivation_from_counts(
        part["counts"],
        int(part["tokens"][0]),
        ctx["top_k"],
        [int(x) for x in ctx["layer_ids"]],
        model=ctx["model"],
        **opts,
    )


register(Analysis("coact", "co-activation matrices, clustering gain vs the null", _coact_map, _coact_finish))


# temporal locality: additive sums over whole sequences, of the trace and of one seeded within-sequence shuffle
# (its keys hash the absolute token index, so each chunk shuffles exactly as the whole trace would)
def _temporal_map(tr: RoutingTrace, ctx: Mapping[str, Any]) -> Partial:
    from moescope.analyze.locality import shuffle_within_sequences, temporal_counts

    order = shuffle_within_sequences(tr.seq_starts, tr.n_tokens, ctx.get("seed", 0), offset=ctx["token_offset"])
    return {"real": temporal_counts(tr), "shuffled": temporal_counts(tr, order=order)}


@dataclasses.dataclass(frozen=True)
class Temporal:
    """The temporal part of `moescope.analyze.locality` from chunked sums: per-layer rows (reuse against the
    exact shuffle expectation and one seeded shuffle, gaps, cold share, working sets, windowed working
    sets), working sets by sequence length, and spreads over layers. Equal to ``locality(trace)``'s
    ``layers``, ``working_set_by_length`` and temporal ``summary`` on the same tokens and seed."""

    layers: tuple[Any, ...]  # LayerLocality
    working_set_by_length: tuple[Any, ...]  # LengthRow
    gap_bins: tuple[str, ...]
    widths: tuple[int, ...]
    summary: dict[str, Any]  # name -> Spread
    tokens: int
    sequences: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "sequences": self.sequences,
            "seed": self.seed,
            "widths": list(self.widths),
            "gap_bins": list(self.gap_bins),
            "summary": {k: dataclasses.asdict(v) for k, v in self.summary.items()},
            "layers": [r.to_dict() for r in self.layers],
            "working_set_by_length": [dataclasses.asdict(r) for r in self.working_set_by_length],
        }


def _temporal_finish(part: Partial, ctx: Mapping[str, Any]) -> Temporal:
    from moescope.analyze.locality import TEMPORAL_SUMMARY, layer_rows, length_rows, spread

    real, shuf = part["real"], part["shuffled"]
    rows, gap_bins = layer_rows(ctx["layer_ids"], ctx["top_k"], ctx["n_experts"], real, shuf)
    return Temporal(
        layers=rows,
        working_set_by_length=length_rows(real, ctx["n_experts"]),
        gap_bins=gap_bins,
        widths=tuple(real.widths),
        summary={name: spread([getattr(r, name) for r in rows]) for name in TEMPORAL_SUMMARY},
        tokens=int(real.tokens),
        sequences=int(real.seqs_by_length.sum()),
        seed=int(ctx.get("seed", 0)),
    )


register(
    Analysis(
        "temporal",
        "next-token reuse vs shuffles, reuse gaps, cold share, working sets (as `moescope locality`)",
        _temporal_map,
        _temporal_finish,
    )
)


# prefetch and cross-layer prediction: tables learned on the train halves (pass 1), scored on the test halves
def _tables_map(tr: RoutingTrace, ctx: Mapping[str, Any]) -> Partial:
    from moescope.analyze.prefetch import learn_tables

    return {"tables": learn_tables(tr)}


def _hits_map(tr: RoutingTrace, ctx: Mapping[str, Any], tables: Any) -> Partial:
    from moescope.analyze.prefetch import hit_counts
    from moescope.slicing import split_ranges

    return {"hits": hit_counts(tr, tables, ctx["budgets"], ctx["predictors"], ranges=split_ranges(tr, "test"))}


def _prefetch_finish(part: Partial, ctx: Mapping[str, Any]):
    from moescope.analyze.prefetch import results_from_hits

    return results_from_hits(part["pass2/hits"], [int(x) for x in ctx["layer_ids"]], ctx["top_k"], ctx["n_experts"])


register(
    Analysis(
        "prefetch",
        "next-token prefetch hit rates and cross-layer precision (train halves -> test halves)",
        _tables_map,
        _prefetch_finish,
        learn=lambda part, ctx: part["tables"],
        map2=_hits_map,
    )
)
