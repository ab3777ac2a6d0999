"""The trace store (`moescope.store`) as a registered reader and writer named ``zarr``.

A store's checks (checksums, missing chunks, attributes) and its incomplete mark come from `moescope.store`:
reading an incomplete store marks the trace's ``meta.extra["incomplete"]`` and writing such a trace (here,
or through any writer that keeps the meta) gives an output marked incomplete too.
"""

from __future__ import annotations

from pathlib import Path

from moescope.imports.registry import ImportOptions, register_reader, register_writer
from moescope.store import TraceStore, is_store, save_trace
from moescope.trace import RoutingTrace


@register_reader("zarr", description="moescope trace store (Zarr v3 folder)", detect=is_store, options=("model",))
def read_zarr(path: Path, options: ImportOptions) -> RoutingTrace:
    """Load a whole trace store into memory (an incomplete one logs one warning and stays marked)."""
    trace = TraceStore(path).to_trace()
    return trace.replace(meta=trace.meta.replace(model=options.model), validate=False) if options.model else trace


@register_writer("zarr", description="moescope trace store (Zarr v3 folder)", suffixes=(".zarr",), accepts=("trace",))
def write_zarr(trace: RoutingTrace, path: Path, overwrite: bool = False) -> Path:
    """Write a trace store atomically (marked incomplete when the trace was read from an incomplete one)."""
    return save_trace(trace, path, overwrite=overwrite)
