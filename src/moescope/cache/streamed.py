"""Cache replays of a stored trace read layer by layer, so memory does not grow with the number of layers.

Per-layer caches are independent (one cache per MoE layer, policies fitted per layer), so `simulate` and
`miss_curves` over a trace give, layer for layer, what they give over any group of its layers. Here a store
(`moescope.store.TraceStore`) is replayed one group of layers at a time, each group with the in-memory
functions, and the per-layer results are joined in layer order: the same numbers as loading the trace whole
(tests check it), with at most one group's ids in memory. Only expert ids are read: no gate weights, token
ids or extras.

Reading. A store is chunked along tokens with every layer in a chunk, so reading one group of layers
decodes every chunk. With more than one group, the store is decoded once (`LayerColumns`: spans of
`SPAN_CHUNKS` chunks decoded in parallel, each chunk's ids checked) into one raw file per layer in a
temporary folder, and each group then reads its layers' files; the folder is removed at the end. When the
temporary folder's disk lacks the room (tokens x layers x k x 2 bytes), each group decodes the store itself
(`TraceStore.routing_at`), slower but in the same memory.

Group size: as many layers as fit `GROUP_BYTES` of ids counted four times over (the group's int16 ids, its
train and test halves, and the int32 streams each worker builds), at least one layer. The constant bounds
memory, not results: fewer, larger groups wait less on their slowest replay (1M tokens x 48 layers x
top-8: 16 layers a group). Memory therefore grows with one layer's ids, about 16 x k bytes per token
(1M tokens at top-8: 128 MB); the kernels replay a layer's whole stream, so a trace whose single layer does
not fit cannot be replayed.

A pooled cache (one cache over every layer) needs every layer at once and is not streamed: `simulate_store`
reads the whole routing for it. When every policy named can carry its cache from one window of tokens to
the next (the default set among them), `simulate_store` hands the store to `moescope.cache.windowed`
instead, whose memory does not grow with the trace's length; the layer groups here serve the other
policies, the miss curves and a disk without room for the layer files.

    >>> result = simulate_store(TraceStore("run.zarr"), [16, 32], ["lru", "belady"])
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from moescope.cache.simulate import CacheResult, MissCurves, miss_curves, simulate
from moescope.trace import EXPERT_DTYPE, RoutingTrace, layer_positions, validate_experts

SPAN_CHUNKS = 8  # store chunks decoded per read (zarr decodes a read's chunks in parallel); bounds memory
GROUP_BYTES = 1 << 30  # 1 GiB: ids of one layer group, counted four times over (module docstring)
_COPIES = 4  # the group's ids, its halves, and the per-worker int32 streams (about twice the int16 ids)

R = TypeVar("R")


def layer_groups(layer_ids: Sequence[int], n_tokens: int, top_k: int, budget: int | None = None) -> list[list[int]]:
    """`layer_ids` cut into consecutive groups of as many layers as `budget` bytes (None: `GROUP_BYTES`)
    allows, at least one."""
    budget = GROUP_BYTES if budget is None else budget
    per_layer = max(1, n_tokens * top_k * EXPERT_DTYPE.itemsize * _COPIES)
    size = max(1, budget // per_layer)
    ids = [int(x) for x in layer_ids]
    return [ids[i : i + size] for i in range(0, len(ids), size)]


class LayerColumns:
    """A store's expert ids at some layers, decoded once into one raw int16 file per layer (``[tokens, k]``,
    row-major) in a temporary folder, so that a group of layers is read without decoding the store again.
    Use as a context manager (the folder is removed on exit)."""

    def __init__(self, store: Any, layer_ids: Sequence[int], folder: str | os.PathLike | None = None) -> None:
        self.store, self.layer_ids = store, [int(x) for x in layer_ids]
        self._pos = layer_positions(store.layer_ids, self.layer_ids)
        self._dir = Path(tempfile.mkdtemp(prefix="moescope-layers-", dir=folder))
        try:
            self._write()
        except BaseException:
            self.close()
            raise

    @staticmethod
    def room(store: Any, n_layers: int, folder: str | os.PathLike | None = None) -> bool:
        """Whether the temporary folder's disk holds `n_layers` layers of `store` (with 10% to spare)."""
        need = store.n_tokens * n_layers * store.top_k * EXPERT_DTYPE.itemsize
        return shutil.disk_usage(folder or tempfile.gettempdir()).free > 1.1 * need

    def _write(self) -> None:
        st, step = self.store, self.store.chunk_tokens * SPAN_CHUNKS
        spans = [(lo, min(lo + step, st.n_tokens)) for lo in range(0, st.n_tokens, step)]
        files = [open(self.path(x), "wb") for x in self.layer_ids]  # noqa: SIM115  (closed below)
        # the next span is decoded (zarr: in parallel across its chunks) while this one is checked and written
        with ThreadPoolExecutor(max_workers=1) as reader:
            try:
                ahead = reader.submit(st.expert_rows, *spans[0]) if spans else None
                for i, (lo, _) in enumerate(spans):
                    assert ahead is not None
                    block = ahead.result()
                    ahead = reader.submit(st.expert_rows, *spans[i + 1]) if i + 1 < len(spans) else None
                    validate_experts(block, st.n_experts, token_offset=lo)
                    for f, p in zip(files, self._pos, strict=True):
                        f.write(np.ascontiguousarray(block[:, p, :], dtype=EXPERT_DTYPE).tobytes())
            finally:
                if ahead is not None:
                    ahead.cancel()
                for f in files:
                    f.close()

    def covers(self, store: Any, layer_ids: Sequence[int]) -> bool:
        """Whether these files hold `store`'s layers `layer_ids` (so a caller may read them instead)."""
        return store is self.store and set(int(x) for x in layer_ids) <= set(self.layer_ids)

    def path(self, layer: int) -> Path:
        """The raw file of model layer `layer`."""
        return self._dir / f"layer-{layer}.bin"

    def routing_at(self, layers: Sequence[int]) -> RoutingTrace:
        """As `TraceStore.routing_at`, from the files (ids already checked)."""
        st, k = self.store, self.store.top_k
        out = np.empty((st.n_tokens, len(layers), k), dtype=EXPERT_DTYPE)
        for i, x in enumerate(layers):
            out[:, i, :] = np.fromfile(self.path(int(x)), dtype=EXPERT_DTYPE).reshape(st.n_tokens, k)
        return st.routing_of(out, [int(x) for x in layers], checked=True)  # checked while decoding (`_write`)

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> LayerColumns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _by_groups(
    store: Any,
    layers: Sequence[int] | None,
    budget: int | None,
    run: Callable[[Any, Callable[[int, int], None] | None], R],
    progress: Callable[[int, int], None] | None,
    columns: LayerColumns | None = None,
) -> list[R]:
    """`run(group trace, progress)` for each layer group of `store` (model `layers`, default all), in order;
    `progress` sees one count over all groups (every layer has the same number of jobs). Groups read
    `columns` when it covers the layers (a caller decoded them already)."""
    ids = [int(x) for x in (store.layer_ids if layers is None else layers)]
    layer_positions(store.layer_ids, ids)  # unknown or repeated ids: a UsageError before any work
    groups = layer_groups(ids, store.n_tokens, store.top_k, budget)
    with contextlib.ExitStack() as stack:
        source: Any = store
        if columns is not None and columns.covers(store, ids):
            source = columns
        elif len(groups) > 1 and LayerColumns.room(store, len(ids)):
            source = stack.enter_context(LayerColumns(store, ids))
        out: list[R] = []
        done_layers = 0
        for group in groups:
            sub = source.routing_at(group)
            inner = None
            if progress is not None:

                def inner(done: int, jobs: int, _off: int = done_layers, _n: int = len(group)) -> None:
                    per_layer = max(jobs // _n, 1)
                    progress(_off * per_layer + done, len(ids) * per_layer)

            out.append(run(sub, inner))
            done_layers += len(group)
            del sub
    return out


def simulate_store(
    store: Any,
    capacities: Sequence[int],
    policies: Sequence[str] | None = None,
    *,
    layers: Sequence[int] | None = None,
    pooled: bool = False,
    budget: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    columns: LayerColumns | None = None,
    **kwargs: Any,
) -> CacheResult:
    """`simulate` over a `TraceStore` (model `layers`, default all) read in layer groups (module docstring);
    other keyword arguments as `simulate`'s. When every policy replays in windows and the disk has the room,
    each layer is replayed a window of tokens at a time instead (`moescope.cache.windowed`: memory bounded
    at any trace length). `columns`: the store's layers already decoded (`LayerColumns`), read instead of
    decoding them again when they cover the layers (the CLI shares one between the table and the curves)."""
    from moescope.cache import windowed
    from moescope.cache.policies import default_policies

    names = list(default_policies() if policies is None else policies)
    if windowed.serves(store, names, layers, pooled, kwargs.get("scheduler")):
        rest = {k: v for k, v in kwargs.items() if k != "scheduler"}
        return windowed.simulate_windows(
            store, capacities, policies, layers=layers, progress=progress, columns=columns, **rest
        )
    if pooled:
        trace = store.routing_at(store.layer_ids if layers is None else layers)
        return simulate(trace, capacities, policies, pooled=True, progress=progress, **kwargs)
    parts = _by_groups(
        store,
        layers,
        budget,
        lambda sub, p: simulate(sub, capacities, policies, progress=p, **kwargs),
        progress,
        columns,
    )
    return dataclasses.replace(
        parts[0],
        layer_ids=tuple(x for r in parts for x in r.layer_ids),
        stats=np.concatenate([r.stats for r in parts], axis=2),
    )


def miss_curves_store(
    store: Any,
    policies: Sequence[str] = ("lru", "belady"),
    *,
    layers: Sequence[int] | None = None,
    budget: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    columns: LayerColumns | None = None,
    **kwargs: Any,
) -> MissCurves:
    """`miss_curves` over a `TraceStore` read in layer groups, or window by window when every policy can
    (`moescope.cache.windowed`); `columns` as `simulate_store`'s; other keyword arguments as `miss_curves`'s."""
    from moescope.cache import windowed

    if windowed.serves(store, policies, layers):
        return windowed.miss_curves_windows(
            store, policies, layers=layers, progress=progress, columns=columns, **kwargs
        )
    parts = _by_groups(
        store, layers, budget, lambda sub, p: miss_curves(sub, policies, progress=p, **kwargs), progress, columns
    )
    return dataclasses.replace(
        parts[0],
        layer_ids=tuple(x for r in parts for x in r.layer_ids),
        misses=np.concatenate([r.misses for r in parts], axis=1),
        accesses=np.concatenate([r.accesses for r in parts]),
    )
