"""The registry of input readers and output writers, keyed by format name.

A reader turns one file or folder into a `RoutingTrace` (per-token routing) or `ExpertCounts` (aggregates
only). Each is registered with the `ImportOptions` fields it understands; passing any other option is an
error, so a flag is never silently ignored. Formats are detected from the path when not named.

    >>> data = read_input("trace.npz")                       # detected as "npz"
    >>> data = read_input("dumps/", "esft", ImportOptions(n_experts=64, top_k=6))

It also holds the checks every reader applies to what a file declares (`parse_json`, `json_int`,
`check_meta_strings`, `brief`): a reader turns any malformed input into a one-line `FormatError`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import reprlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from moescope import _atomic
from moescope.errors import FormatError, UsageError
from moescope.trace import ExpertCounts, RoutingTrace

INT64_MAX = int(np.iinfo(np.int64).max)
MAX_JSON_DEPTH = 64
"""JSON nested deeper than this is refused. The formats nest at most 3 levels (a counts table in an object);
64 leaves room for free-form metadata, and stays far below Python's recursion limit (1000), which a
document parsed near that limit could hit again whenever it is printed or written back."""
META_STRINGS = ("model", "source", "corpus", "created")
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60

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
    if "://" not in str(path):
        # a writer of this path killed mid-replace: put its old version back, drop dead writers' temporaries
        _atomic.recover(p)
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


def brief(exc: BaseException) -> str:
    """The first line of an exception's message, at most 200 characters (for one-line error messages)."""
    lines = str(exc).splitlines()
    return (lines[0] if lines else type(exc).__name__)[:200]


def short(value: Any) -> str:
    """A bounded repr of any value (nesting cut at 6 levels, strings at 60 characters): never recurses deeply."""
    return _REPR.repr(value)


def parse_json(text: str | bytes, what: str) -> Any:
    """Parse JSON `text` (bytes must be UTF-8), or raise a one-line `FormatError` naming `what`.

    Refused: text that is not UTF-8 or not JSON, integers of more than 4300 digits (Python's limit), and
    nesting deeper than `MAX_JSON_DEPTH` (Python's parser would raise RecursionError past about 1000).
    """
    try:
        doc = json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)
    except UnicodeDecodeError as exc:
        raise FormatError(f"{what} is not UTF-8 text ({brief(exc)}); give a UTF-8 JSON file") from None
    except RecursionError:
        raise FormatError(
            f"{what} nests JSON deeper than Python can parse; expected at most {MAX_JSON_DEPTH} levels"
        ) from None
    except ValueError as exc:  # JSONDecodeError, or an integer of too many digits
        raise FormatError(f"{what} is not valid JSON ({brief(exc)}); check the file") from None
    stack = [(doc, 1)]
    while stack:  # iterative: a recursive walk would fail on exactly the documents refused here
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        if children and depth >= MAX_JSON_DEPTH:
            raise FormatError(f"{what} nests JSON deeper than {MAX_JSON_DEPTH} levels; the format needs 3 at most")
        stack.extend((child, depth + 1) for child in children)
    return doc


def json_int(value: Any, what: str, lo: int = 0, hi: int = INT64_MAX) -> int:
    """`value` as an int when it is an exact integer in ``lo..hi``: 16 or 16.0, never 16.7, "16", [16] or true.

    Raises
    ------
    FormatError : naming `what`, the value seen and the range expected.
    """
    exact = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        exact = True
    if not exact or not lo <= int(value) <= hi:
        raise FormatError(f"{what} is {short(value)}, expected an integer in {lo}..{hi}; fix the file")
    return int(value)


def check_meta_strings(meta: Mapping[str, Any], what: str) -> None:
    """Refuse a `TraceMeta` string field (model, source, corpus, created) that is not a string or null."""
    for key in META_STRINGS:
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise FormatError(f"{what} '{key}' is {short(meta[key])}, expected a string or null; fix the file")


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
    n = dense.size
    if not len(moe_layers):
        raise UsageError(f"--moe-layers is empty; name the MoE layers of {what} to keep (0..{n - 1})")
    for x in moe_layers:  # before any conversion: a huge Python int would overflow int64
        if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)) or not 0 <= x < n:
            raise UsageError(f"--moe-layers {short(x)} is out of range: {what} has {n} layers (0..{n - 1})")
    kept = np.asarray(moe_layers, dtype=np.int64)
    if np.unique(kept).size != kept.size:
        raise UsageError(f"--moe-layers {list(moe_layers)} repeats a layer; name each MoE layer once")
    return kept
