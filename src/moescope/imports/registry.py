"""The registry of input readers and output writers, keyed by format name.

A reader turns one file or folder into a `RoutingTrace` (per-token routing) or `ExpertCounts` (aggregates
only). Each is registered with the `ImportOptions` fields it understands; passing any other option is an
error, so a flag is never silently ignored. Formats are detected from the path when not named.

    >>> data = read_input("trace.npz")                       # detected as "npz"
    >>> data = read_input("dumps/", "esft", ImportOptions(n_experts=64, top_k=6))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from moescope.errors import FormatError, UsageError
from moescope.trace import ExpertCounts, RoutingTrace

Data = RoutingTrace | ExpertCounts


@dataclasses.dataclass(frozen=True)
class ImportOptions:
    """Facts a source file may not record, and selections applied while reading.

    n_experts : routed experts per layer (required by formats that do not store it).
    top_k : experts per token (required by formats that flatten ids, e.g. ESFT logs).
    moe_layers : indices along the source's layer axis to keep (dense layers dropped); they become
        the trace's ``layer_ids``.
    phys_to_log : file with a ``[layers, physical_experts]`` physical-to-logical expert map (.npy/.json).
    model : model name to record in the metadata (overrides what the file says).
    mass : for counts sources with both, read selection counts (``"counts"``) or gate mass (``"gate"``).
    phase : which passes to import from a mixed source (``"prefill"`` or ``"decode"``).
    """

    n_experts: int | None = None
    top_k: int | None = None
    moe_layers: tuple[int, ...] | None = None
    phys_to_log: Path | None = None
    model: str | None = None
    mass: Literal["counts", "gate"] | None = None
    phase: Literal["prefill", "decode"] | None = None

    def given(self) -> set[str]:
        """Names of the options that were set."""
        return {f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


@dataclasses.dataclass(frozen=True)
class Reader:
    name: str
    description: str
    read: Callable[[Path, ImportOptions], Data]
    detect: Callable[[Path], bool]
    options: frozenset[str]
    produces: Literal["trace", "counts"]


@dataclasses.dataclass(frozen=True)
class Writer:
    name: str
    description: str
    write: Callable[[Data, Path, bool], Path]
    suffixes: tuple[str, ...]
    accepts: frozenset[str]  # "trace", "counts"


READERS: dict[str, Reader] = {}
WRITERS: dict[str, Writer] = {}


def register_reader(
    name: str,
    *,
    description: str,
    detect: Callable[[Path], bool],
    options: Sequence[str] = (),
    produces: Literal["trace", "counts"] = "trace",
) -> Callable[[Callable[[Path, ImportOptions], Data]], Callable[[Path, ImportOptions], Data]]:
    """Register ``read(path, options) -> RoutingTrace | ExpertCounts`` under `name`."""
    fields = {f.name for f in dataclasses.fields(ImportOptions)}
    unknown = set(options) - fields
    if unknown:
        raise ValueError(f"reader {name!r} declares unknown options {sorted(unknown)}")

    def deco(fn: Callable[[Path, ImportOptions], Data]) -> Callable[[Path, ImportOptions], Data]:
        if name in READERS:
            raise ValueError(f"reader {name!r} registered twice")
        READERS[name] = Reader(name, description, fn, detect, frozenset(options), produces)
        return fn

    return deco


def register_writer(
    name: str, *, description: str, suffixes: Sequence[str], accepts: Sequence[str] = ("trace",)
) -> Callable[[Callable[[Data, Path, bool], Path]], Callable[[Data, Path, bool], Path]]:
    """Register ``write(data, path, overwrite) -> path`` under `name`."""

    def deco(fn: Callable[[Data, Path, bool], Path]) -> Callable[[Data, Path, bool], Path]:
        if name in WRITERS:
            raise ValueError(f"writer {name!r} registered twice")
        WRITERS[name] = Writer(name, description, fn, tuple(suffixes), frozenset(accepts))
        return fn

    return deco


def detect_format(path: str | Path) -> str:
    """The name of the first registered reader that recognises `path`, or a `FormatError`."""
    p = Path(path)
    if not p.exists():
        raise FormatError(f"input {str(p)!r} does not exist; check the path")
    for reader in READERS.values():
        if reader.detect(p):
            return reader.name
    raise FormatError(f"cannot tell the format of {str(p)!r}; pass --from with one of: {', '.join(sorted(READERS))}")


def read_input(path: str | Path, fmt: str | None = None, options: ImportOptions | None = None) -> Data:
    """Read `path` with the reader named `fmt` (detected when None), applying `options`."""
    p = Path(path)
    options = options or ImportOptions()
    if not p.exists():
        raise FormatError(f"input {str(p)!r} does not exist; check the path")
    name = fmt or detect_format(p)
    if name not in READERS:
        raise UsageError(f"unknown input format {name!r}; expected one of: {', '.join(sorted(READERS))}")
    reader = READERS[name]
    extra = options.given() - reader.options
    if extra:
        flags = ", ".join("--" + o.replace("_", "-") for o in sorted(extra))
        raise UsageError(
            f"{flags} does not apply to {name!r} input (it accepts: "
            f"{', '.join('--' + o.replace('_', '-') for o in sorted(reader.options)) or 'no options'}); drop it"
        )
    return reader.read(p, options)


def writer_for(path: str | Path, fmt: str | None = None) -> Writer:
    """The writer named `fmt`, or the one whose suffix matches `path` (a folder without suffix: zarr)."""
    if fmt is not None:
        if fmt not in WRITERS:
            raise UsageError(f"unknown output format {fmt!r}; expected one of: {', '.join(sorted(WRITERS))}")
        return WRITERS[fmt]
    name = Path(path).name.lower()
    for writer in WRITERS.values():
        if any(name.endswith(s) for s in writer.suffixes):
            return writer
    raise UsageError(
        f"cannot tell the output format from {str(path)!r}; name it *.zarr, *.npz or *.json, or pass --to "
        f"with one of: {', '.join(sorted(WRITERS))}"
    )


def write_output(data: Data, path: str | Path, fmt: str | None = None, overwrite: bool = False) -> Path:
    """Write `data` with the writer for `path` / `fmt` (atomically)."""
    writer = writer_for(path, fmt)
    kind = "trace" if isinstance(data, RoutingTrace) else "counts"
    if kind not in writer.accepts:
        raise UsageError(
            f"{writer.name!r} output needs a per-token trace, but the input holds aggregate counts only "
            f"(no token order); write counts JSON instead (*.json)"
        )
    return writer.write(data, Path(path), overwrite)


def as_trace(data: Data, what: str = "this command") -> RoutingTrace:
    """`data` if it is a trace, else a `FormatError` saying counts cannot stand in for a trace."""
    if isinstance(data, RoutingTrace):
        return data
    raise FormatError(
        f"{what} needs a per-token trace, but the input holds aggregate per-expert counts only "
        f"(no token order); give a trace (zarr store, .npz, ESFT logs, vLLM/SGLang per-token dumps)"
    )


def as_counts(data: Data, mass: Literal["counts", "gate"] = "counts") -> ExpertCounts:
    """Counts from either kind of input (a trace is counted)."""
    if isinstance(data, RoutingTrace):
        return data.counts(mass)
    return data


def moe_layer_index(dense: np.ndarray, moe_layers: tuple[int, ...] | None, what: str) -> np.ndarray:
    """Indices along a source's layer axis to keep (shared by the engine-dump readers).

    Parameters
    ----------
    dense : [layers] bool, True where the source recorded no routing (a dense layer).
    moe_layers : the user's ``--moe-layers`` (checked and returned as given), or None for the non-dense.
    what : the source, for messages.

    Returns
    -------
    [kept layers] int64 indices along the layer axis.
    """
    if moe_layers is None:
        if dense.all():
            raise FormatError(f"every layer of {what} looks dense (no routing recorded); pass --moe-layers")
        return np.flatnonzero(~dense)
    kept, n = np.asarray(moe_layers, dtype=np.int64), dense.size
    bad = kept[(kept < 0) | (kept >= n)]
    if bad.size:
        raise UsageError(f"--moe-layers {int(bad[0])} is out of range: {what} has {n} layers (0..{n - 1})")
    if np.unique(kept).size != kept.size:
        raise UsageError(f"--moe-layers {list(moe_layers)} repeats a layer; name each MoE layer once")
    return kept
