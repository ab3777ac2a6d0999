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

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moescope.errors import MissingDependencyError, UsageError
from moescope.store import TraceStore
from moescope.trace import RoutingTrace

Partial = dict[str, np.ndarray]
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


@dataclasses.dataclass(frozen=True)
class Analysis:
    """A chunked analysis: `map` turns a chunk (whole sequences) into a partial; `finish` turns the sum of
    all partials into the result. `needs` names analyses whose partials `finish` also reads."""

    name: str
    summary: str
    map: Callable[[RoutingTrace, Mapping[str, Any]], Partial]
    finish: Callable[[Partial, Mapping[str, Any]], Any]


ANALYSES: dict[str, Analysis] = {}


def register(a: Analysis) -> Analysis:
    ANALYSES[a.name] = a
    return a


def _map_chunk(
    path: str, lo: int, hi: int, names: Sequence[str], layers: Sequence[int] | None, params: Mapping[str, Any]
) -> Partial:
    """One task: read tokens lo:hi of the store and return every analysis' partial, keys prefixed."""
    chunk = TraceStore(path).read(lo, hi, layers=layers).trace
    out: Partial = {}
    for name in names:
        for k, v in ANALYSES[name].map(chunk, params).items():
            out[f"{name}/{k}"] = v
    return out


def _context(store: TraceStore, layers: Sequence[int] | None, params: Mapping[str, Any]) -> dict[str, Any]:
    ids = store.layer_ids if layers is None else np.asarray(list(layers), dtype=np.int64)
    return {
        **params,
        "n_experts": store.n_experts,
        "top_k": store.top_k,
        "layer_ids": ids,
        "n_tokens": store.n_tokens,
        "model": store.meta.model,
        "has_weights": store.has_weights,
    }


def run_chunked(
    path: str | os.PathLike,
    analyses: Sequence[str],
    *,
    scheduler: str | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    layers: Sequence[int] | None = None,
    params: Mapping[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Run `analyses` (names from `ANALYSES`) over the store at `path`; returns name -> result.

    Parameters
    ----------
    scheduler : None (this process), ``"local:N"`` (a LocalCluster of N workers) or a Dask scheduler address.
    chunk_tokens : target tokens per chunk (whole sequences).
    layers : model layer ids to keep (default all).
    params : analysis options (e.g. ``coverage`` for the concentration gate).
    """
    names = list(dict.fromkeys(analyses))
    unknown = [n for n in names if n not in ANALYSES]
    if unknown:
        raise UsageError(f"analysis {', '.join(unknown)}: unknown; choose from {', '.join(ANALYSES)}")
    store = TraceStore(path)
    store._layer_index(layers)  # validates the layer ids
    ranges = sequence_chunks(store.seq_starts, store.n_tokens, chunk_tokens)
    ctx = _context(store, layers, params or {})
    path_s = str(Path(path).resolve())
    if scheduler is None:
        total: Partial = {}
        for i, (lo, hi) in enumerate(ranges):
            total = add_partials(total, _map_chunk(path_s, lo, hi, names, layers, ctx))
            if progress:
                progress(i + 1, len(ranges))
    else:
        total = _run_dask(scheduler, path_s, ranges, names, layers, ctx, progress)
    out = {}
    for name in names:
        prefix = name + "/"
        part = {k[len(prefix) :]: v for k, v in total.items() if k.startswith(prefix)}
        out[name] = ANALYSES[name].finish(part, ctx)
    return out


def _client(scheduler: str) -> tuple[Any, Any]:
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise MissingDependencyError(
            "--scheduler needs Dask: pip install 'moescope[dask]' (dask[distributed])"
        ) from None
    if scheduler.startswith("local:"):
        try:
            n = int(scheduler.split(":", 1)[1])
        except ValueError:
            raise UsageError(f"--scheduler {scheduler!r}: expected local:N with N workers, e.g. local:2") from None
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None)
        return Client(cluster), cluster
    return Client(scheduler), None


def _run_dask(scheduler, path, ranges, names, layers, ctx, progress) -> Partial:
    client, cluster = _client(scheduler)
    try:
        futures = [client.submit(_map_chunk, path, lo, hi, names, layers, ctx, pure=False) for lo, hi in ranges]
        done = 0
        level = futures
        while len(level) > 1:  # a tree of pairwise sums on the workers
            nxt = [client.submit(add_partials, level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
            if len(level) % 2:
                nxt.append(level[-1])
            level = nxt
        if progress:
            from distributed import as_completed

            for _ in as_completed(futures):
                done += 1
                progress(done, len(futures))
        return level[0].result() if level else {}
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


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


register(Analysis("counts", "selections per layer and expert", _counts_map, _counts))
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
