"""The trace store: a Zarr v3 folder, chunked along tokens, written atomically and appendable.

Layout of ``PATH/`` (a Zarr v3 group)::

    zarr.json                  group attributes under "moescope": format, version, n_experts, top_k,
                               layer_ids, phase, meta, label_names, chunk_tokens, weights_dtype, and the
                               commit record: committed_tokens, committed_sequences, complete, written
    experts/                   [tokens, layers, k] int16, chunks of (chunk_tokens, layers, k)
    weights/                   [tokens, layers, k] float16|float32 (only when the trace has gate weights)
    seq_starts/                [sequences] int64
    seq_label_codes/           [sequences] int32 index into label_names (only when labelled)
    <extra>/                   [tokens, ...] each optional per-token array of `moescope.trace.EXTRAS`
                               the trace carries (token_ids, lookahead, candidates, candidate_probs),
                               chunks of (chunk_tokens, ...); attribute "extras": {name: trailing shape}.
                               Stores without them read as before; readers that predate them ignore them

Integrity: every chunk is zstd-compressed, then carries a CRC32C checksum (`CHUNK_CODECS`), so a changed
byte fails the read with a `FormatError` naming the chunk. Every chunk is stored, even one of zeros, and
``written`` records each array's committed length, so a missing chunk file is an error, never zeros (the
fill value). Stores written before this (no ``written``) still read, without these two checks. Every
attribute is checked on reading (`_ATTRS`: types, ranges, agreement with the arrays); the zarr.json files
themselves carry no checksum, so a changed label name or meta string is not detected.

Commit protocol: data chunks are written first, then the group attributes (one atomic file replace)
advance ``committed_tokens``. Readers never look past the commit record, so a writer that dies leaves
every committed chunk readable and nothing corrupt; ``complete`` is false until the writer closed cleanly.

Incomplete stores: reading one logs one warning (the store, what is committed, whether its writer still
runs; once per store and reason in a process) and marks the trace's ``meta.extra["incomplete"]``; writing a
trace so marked (``trace convert``, ``trace slice``, `save_trace`) leaves the output's ``complete`` false
too, so the mark is never lost.

One writer per path: a writer holds the lock file ``.NAME.lock`` beside the store (`WriterLock`) from
start to close, so a second writer fails with `UsageError` and never deletes a store being written; the
lock of a dead process on this host is taken over; `WriterLock.check_free` lets a command fail before slow
work. Readers ignore the lock.

Two ways to write:
- ``save_trace(trace, path)`` / ``TraceWriter(path, ..., atomic=True)``: built in a hidden temp folder
  beside ``path`` and renamed into place at the end (nothing is left behind on error);
- ``TraceWriter(path, ..., atomic=False)``: for captures, the store is visible at ``path`` from the
  start and grows commit by commit (every full chunk, and with ``commit_seconds`` at least that often).
  Chunk files are replaced atomically (zarr's LocalStore writes a temp file and renames it), so a reader
  never sees a half-written chunk, even one rewritten after a partial commit.

Reading: ``TraceStore(path)`` (metadata only), ``.read(start, stop, layers=...)`` for a token range,
``.iter_chunks()`` to stream with bounded memory, ``load_trace(path)`` for everything.

    >>> save_trace(trace, "run.zarr")
    >>> for chunk in TraceStore("run.zarr").iter_chunks(): ...
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from moescope import _atomic
from moescope._store_lock import WriterLock, _clock, _is_int, _short  # WriterLock: also moescope.store's
from moescope.errors import FormatError, MissingDependencyError, MoescopeError, TraceError, UsageError
from moescope.trace import (
    EXPERT_DTYPE,
    EXTRAS,
    MAX_EXPERTS,
    PHASES,
    WEIGHT_DTYPES,
    RoutingTrace,
    TraceMeta,
    _check_layer_ids,
    _check_n_experts,
    _check_weights,
    check_extras,
    extras_at_layers,
    layer_positions,
    validate_experts,
)

log = logging.getLogger(__name__)

FORMAT_NAME = "moescope.trace"
FORMAT_VERSION = 1
ATTR_KEY = "moescope"
TARGET_CHUNK_BYTES = 8 << 20  # uncompressed experts bytes per chunk
MIN_CHUNK_TOKENS = 1024
MAX_CHUNK_TOKENS = 1 << 20
SEQ_CHUNK = 1 << 16
CAPTURE_COMMIT_SECONDS = 30.0  # captures commit at least this often (see TraceWriter's commit_seconds)
CHUNK_CODECS = (ZstdCodec(level=0, checksum=False), Crc32cCodec())  # the checksum covers the stored bytes
INCOMPLETE_KEY = "incomplete"  # meta.extra key of a trace read from an incomplete store
_FIX = "the store was changed or damaged; restore it or re-capture"


def default_chunk_tokens(n_layers: int, top_k: int) -> int:
    """A power-of-two token count giving ~8 MiB of int16 expert ids per chunk."""
    per_token = max(1, n_layers * top_k * EXPERT_DTYPE.itemsize)
    n = 1 << int(math.log2(max(1, TARGET_CHUNK_BYTES // per_token)))
    return int(min(MAX_CHUNK_TOKENS, max(MIN_CHUNK_TOKENS, n)))


def is_url(path: str | os.PathLike) -> bool:
    """True for an fsspec URL (``s3://bucket/run.zarr``, ``file:///data/run.zarr``), read through fsspec."""
    return isinstance(path, str) and "://" in path


# ----------------------------------------------------------------------------------------------
# the group attributes, as data: each one's check, what a message says is expected, its default


def _is_count(v: Any) -> bool:
    return _is_int(v) and v >= 0


def _is_dims(v: Any) -> bool:
    return isinstance(v, list) and all(_is_count(x) for x in v)


_REQUIRED = object()


@dataclasses.dataclass(frozen=True)
class _Attr:
    ok: Callable[[Any], bool]
    expected: str
    default: Any = _REQUIRED


_ATTRS: dict[str, _Attr] = {
    "format": _Attr(lambda v: v == FORMAT_NAME, repr(FORMAT_NAME)),
    "version": _Attr(lambda v: _is_int(v) and v >= 1, "an integer >= 1", 1),
    "n_experts": _Attr(lambda v: _is_int(v) and 1 <= v <= MAX_EXPERTS, f"an integer in 1..{MAX_EXPERTS}"),
    "n_layers": _Attr(lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "top_k": _Attr(lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "layer_ids": _Attr(_is_dims, "a list of model layer indices >= 0"),
    "phase": _Attr(lambda v: isinstance(v, str) and v in PHASES, f"one of {', '.join(PHASES)}"),
    "meta": _Attr(lambda v: isinstance(v, dict), "a JSON object"),
    "weights_dtype": _Attr(
        lambda v: v is None or (isinstance(v, str) and v in [d.name for d in WEIGHT_DTYPES]),
        "null, float16 or float32",
    ),
    "extras": _Attr(
        lambda v: isinstance(v, dict) and all(_is_dims(t) for t in v.values()),
        "a JSON object {name: [trailing dimensions]}",
        {},
    ),
    "token_ids": _Attr(lambda v: isinstance(v, bool), "true or false", False),  # the first token-id stores
    "chunk_tokens": _Attr(lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "label_names": _Attr(lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings", []),
    "labelled": _Attr(lambda v: v is None or isinstance(v, bool), "null, true or false", None),
    "committed_tokens": _Attr(_is_count, "an integer >= 0"),
    "committed_sequences": _Attr(_is_count, "an integer >= 0"),
    "complete": _Attr(lambda v: isinstance(v, bool), "true or false"),
    "written": _Attr(
        lambda v: v is None or (isinstance(v, dict) and all(_is_count(x) for x in v.values())),
        "a JSON object {array: committed length}",
        None,  # stores written before checksums: missing chunks cannot be told from chunks of zeros
    ),
}


def _check_attrs(raw: Any, where: str) -> dict[str, Any]:
    """The moescope attributes `raw`, each checked against `_ATTRS` and against the others."""
    if not isinstance(raw, dict):
        raise FormatError(
            f"{where}: the moescope attributes in zarr.json are {_short(raw)}, expected a JSON object; {_FIX}"
        )
    version = raw.get("version")
    if _is_int(version) and version > FORMAT_VERSION:
        raise FormatError(
            f"{where} uses trace store version {version}, newer than this moescope reads ({FORMAT_VERSION}); "
            f"upgrade moescope"
        )
    a: dict[str, Any] = {}
    for key, spec in _ATTRS.items():
        if key not in raw:
            if spec.default is _REQUIRED:
                raise FormatError(f"{where}: the store attribute {key!r} is missing (expected {spec.expected}); {_FIX}")
            a[key] = spec.default
        elif not spec.ok(raw[key]):
            raise FormatError(
                f"{where}: the store attribute {key!r} is {_short(raw[key])}, expected {spec.expected}; {_FIX}"
            )
        else:
            a[key] = raw[key]

    def bad(what: str) -> FormatError:
        return FormatError(f"{where}: the store attributes disagree: {what}; {_FIX}")

    if a["top_k"] > a["n_experts"]:
        raise bad(f"top_k {a['top_k']} > n_experts {a['n_experts']}")
    if len(a["layer_ids"]) != a["n_layers"] or len(set(a["layer_ids"])) != a["n_layers"]:
        raise bad(f"layer_ids {_short(a['layer_ids'])} are not {a['n_layers']} distinct layers (n_layers)")
    if a["committed_sequences"] > a["committed_tokens"] or (a["committed_tokens"] > 0) != (
        a["committed_sequences"] > 0
    ):
        raise bad(f"{a['committed_sequences']} sequences committed for {a['committed_tokens']} tokens")
    for name, tail in a["extras"].items():
        if name in EXTRAS and len(tail) != EXTRAS[name].ndim - 1:
            raise bad(f"extra {name} has trailing shape {tail}, expected {EXTRAS[name].ndim - 1} dimensions")
    if a["labelled"] and len(set(a["label_names"])) != len(a["label_names"]):
        raise bad(f"label_names {_short(a['label_names'])} repeat a name")
    return a


# ----------------------------------------------------------------------------------------------
# opening: the group document, zarr's errors, chunks that must exist


def _group_attrs(path: Path) -> tuple[Any, str]:
    """The raw moescope attributes of the folder `path`, or ``(None, why it is not a store)``; the reason
    starts with "no " when the folder is simply not a moescope store, else the zarr.json is damaged."""
    meta = path / "zarr.json"
    if not meta.is_file():
        return None, "no zarr.json"
    try:
        doc = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        return None, f"its zarr.json is not readable JSON ({type(exc).__name__}: {_short(exc)})"
    if not isinstance(doc, dict):
        return None, f"its zarr.json is {_short(doc, 40)}, not a JSON object"
    attrs = doc.get("attributes", {})
    if not isinstance(attrs, dict):
        return None, f"the attributes in its zarr.json are {_short(attrs, 40)}, not a JSON object"
    if ATTR_KEY not in attrs:
        return None, "no moescope attributes"
    if not isinstance(attrs[ATTR_KEY], dict):
        return None, f"the moescope attributes in its zarr.json are {_short(attrs[ATTR_KEY], 40)}, not a JSON object"
    if attrs[ATTR_KEY].get("format") != FORMAT_NAME:
        return None, "no moescope attributes"
    return attrs[ATTR_KEY], ""


def is_store(path: str | os.PathLike) -> bool:
    """True when `path` is a folder holding a moescope trace store."""
    return _group_attrs(Path(path))[0] is not None


# zarr's and its codecs' failures (RecursionError: a deeply nested array zarr.json)
_ZARR_ERRORS = (ValueError, TypeError, KeyError, RuntimeError, OSError, RecursionError)


@contextlib.contextmanager
def _damaged(where: str, what: str) -> Iterator[None]:
    """Turn zarr's errors on unreadable metadata or chunks into one `FormatError` line."""
    try:
        yield
    except MoescopeError:
        raise
    except _ZARR_ERRORS as exc:
        raise FormatError(f"{where}: {what} cannot be read ({type(exc).__name__}: {_short(exc)}); {_FIX}") from None


_CHUNK_KEY = re.compile(r"^(?P<array>[^/]+)/c/(?P<index>\d+)(?:/\d+)*$")


class _StrictStore(zarr.storage.WrapperStore):
    """A read-only zarr store that fails on a missing chunk of the arrays in `required` (shared, filled in
    once the attributes are read) instead of letting zarr read it as the fill value."""

    def __init__(self, store: Any, where: str = "", required: set[str] | None = None) -> None:
        super().__init__(store)
        self.where = where
        self.required = set() if required is None else required

    def _with_store(self, store: Any) -> _StrictStore:
        return type(self)(store, self.where, self.required)

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        buf = await super().get(key, prototype, byte_range)
        m = _CHUNK_KEY.match(key)
        if buf is None and m and m["array"] in self.required:
            raise FormatError(
                f"{self.where}: chunk {m['index']} of {m['array']} is missing (its file {key} was deleted or not "
                f"copied); restore it or re-capture"
            )
        return buf


def _open_url(url: str) -> tuple[zarr.Group, _StrictStore]:
    """The trace store at an fsspec URL, read-only (the protocol's package, e.g. s3fs, must be installed),
    and the store wrapper that is told which arrays must have every chunk."""
    try:
        store = zarr.storage.FsspecStore.from_url(url, read_only=True)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{url!r}: reading this protocol needs its fsspec package ({exc}); e.g. pip install s3fs for s3://"
        ) from None
    except ValueError as exc:
        raise UsageError(f"{url!r}: not a URL fsspec can open ({exc}); use e.g. s3://bucket/run.zarr") from None
    strict = _StrictStore(store, url)
    try:
        group = zarr.open_group(strict, mode="r")
        attrs = group.attrs.get(ATTR_KEY)
    except (FileNotFoundError, KeyError, ValueError, TypeError, zarr.errors.NodeNotFoundError):
        attrs = None
    if not isinstance(attrs, dict) or attrs.get("format") != FORMAT_NAME:
        raise FormatError(
            f"{url!r} is not a moescope trace store (no zarr.json with moescope attributes); write one with "
            f"moescope trace convert and copy the folder there"
        )
    return group, strict


class TraceWriter:
    """Write a trace to a store block by block, committing every full chunk.

    Parameters
    ----------
    path : the store folder to create.
    n_experts, n_layers, top_k : the trace's shape (fixed for the whole store).
    layer_ids : [layers] model layer index of each MoE layer.
    phase : "prefill" or "decode".
    meta : provenance, stored as given (captures set `created`); a meta marked ``incomplete`` (a trace read
        from an incomplete store) leaves the store's ``complete`` false, even after `close`.
    weights_dtype : "float16", "float32" or None (no gate weights).
    extras : the optional per-token arrays the store keeps, ``{name: trailing shape}`` (`EXTRAS` names, e.g.
        ``{"token_ids": (), "lookahead": (layers, 2, k)}``); then every `append` gives each of them.
    token_ids : shorthand for ``extras={"token_ids": ()}``.
    chunk_tokens : tokens per chunk (default: ~8 MiB of ids per chunk).
    overwrite : replace an existing `path` (never one another live writer holds: that is a `UsageError`).
    atomic : True builds in a temp folder and renames at `close()`; False (captures) writes in place.
    commit_seconds : also commit what is buffered (a partial chunk, rewritten whole when more comes) once
        this long has passed since the last commit; captures use `CAPTURE_COMMIT_SECONDS`, so readers of a
        slow capture see its tokens within that time and a crash loses at most that much. None: full chunks.

    Use as a context manager: an exception inside the block removes an atomic store, and leaves a
    non-atomic one with what was committed (marked incomplete). The writer holds the path's `WriterLock`
    until `close` or `abort` (or until it is garbage-collected).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        n_experts: int,
        n_layers: int,
        top_k: int,
        layer_ids: Sequence[int] | np.ndarray | None = None,
        phase: str = "prefill",
        meta: TraceMeta | dict[str, Any] | None = None,
        weights_dtype: str | np.dtype | None = None,
        extras: Mapping[str, Sequence[int]] | None = None,
        token_ids: bool = False,
        chunk_tokens: int | None = None,
        overwrite: bool = False,
        atomic: bool = True,
        commit_seconds: float | None = None,
    ) -> None:
        if commit_seconds is not None and not commit_seconds >= 0:
            raise UsageError(f"commit_seconds {commit_seconds!r}: expected seconds >= 0, or None")
        self.commit_seconds = commit_seconds
        self._last_commit = time.monotonic()
        self.path = Path(path)
        self.overwrite = overwrite
        self.atomic = atomic
        self.n_experts = _check_n_experts(n_experts, top_k)
        if n_layers < 1 or top_k < 1:
            raise TraceError(f"a store needs n_layers >= 1 and top_k >= 1, got {n_layers} and {top_k}")
        self.n_layers, self.top_k = int(n_layers), int(top_k)
        self.layer_ids = _check_layer_ids(layer_ids, self.n_layers)
        if phase not in PHASES:
            raise TraceError(f"phase is {phase!r}, expected one of {', '.join(PHASES)}")
        self.weights_dtype = None if weights_dtype is None else np.dtype(weights_dtype)
        if self.weights_dtype is not None and self.weights_dtype not in WEIGHT_DTYPES:
            raise TraceError(f"weights_dtype {self.weights_dtype} is not float16 or float32")
        self.chunk_tokens = int(chunk_tokens or default_chunk_tokens(self.n_layers, self.top_k))
        if self.chunk_tokens < 1:
            raise UsageError(f"chunk_tokens is {self.chunk_tokens}; expected >= 1")
        meta = meta if isinstance(meta, TraceMeta) else TraceMeta.from_dict(meta)
        self._incomplete_source = bool(meta.extra.get(INCOMPLETE_KEY))
        shapes = {**({"token_ids": ()} if token_ids else {}), **(extras or {})}
        unknown = sorted(set(shapes) - set(EXTRAS))
        if unknown:
            raise TraceError(f"unknown extra array(s) {unknown}; a store can keep {', '.join(EXTRAS)}")
        tails = {name: tuple(int(x) for x in tail) for name, tail in shapes.items()}
        for name, tail in tails.items():
            if len(tail) != EXTRAS[name].ndim - 1:
                raise TraceError(f"extra {name} needs {EXTRAS[name].ndim - 1} trailing dimensions, got {tail}")

        # the folder exists (and what is at the path could be replaced); whether it may be: under the lock
        _atomic.check_output(self.path, overwrite=True, kind=_atomic.TRACE_STORE)
        self._lock = WriterLock.acquire(self.path)
        self._release = weakref.finalize(self, self._lock.release)
        self._dir = _atomic.temp_sibling(self.path) if atomic else self.path
        self._old: Path | None = None  # in place over an old store: the old one, kept aside until close
        try:
            _atomic.check_output(self.path, overwrite, kind=_atomic.TRACE_STORE)
            if not atomic and self.path.exists():
                # overwrite was checked and no live writer holds the path; the old store waits aside under this
                # process's name until the new one is complete: an abort, or a kill (`_atomic.recover` on the
                # next run), puts it back, so a replace leaves the old store or the complete new one
                self._old = _atomic.temp_sibling(self.path, "old")
                os.rename(self.path, self._old)
            self._create(phase, meta, tails)
        except BaseException:
            if atomic:
                _atomic.remove(self._dir)
            self._put_back_old()
            self._release()
            raise
        self._buf_e: list[np.ndarray] = []
        self._buf_w: list[np.ndarray] = []
        self._buf_x: dict[str, list[np.ndarray]] = {name: [] for name in self._extras}
        self._buf_tokens = 0
        self._pending_starts: list[int] = []  # absolute token index of sequences not yet committed
        self._pending_labels: list[str | None] = []
        self._written = 0  # tokens on disk (committed)
        self._closed = False

    def _create(self, phase: str, meta: TraceMeta, tails: Mapping[str, tuple[int, ...]]) -> None:
        """Make the group and its empty arrays, and write the first (empty) commit record."""
        self._attrs: dict[str, Any] = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "n_experts": self.n_experts,
            "n_layers": self.n_layers,
            "top_k": self.top_k,
            "layer_ids": self.layer_ids.tolist(),
            "phase": phase,
            "meta": meta.to_dict(),
            "weights_dtype": None if self.weights_dtype is None else self.weights_dtype.name,
            "extras": {},
            "chunk_tokens": self.chunk_tokens,
            "label_names": [],
            "labelled": None,
            "committed_tokens": 0,
            "committed_sequences": 0,
            "complete": False,
            "written": {},
        }
        self._group = zarr.open_group(zarr.storage.LocalStore(self._dir), mode="w-", zarr_format=3)
        shape3 = (0, self.n_layers, self.top_k)
        chunks3 = (self.chunk_tokens, self.n_layers, self.top_k)
        self._experts = self._array("experts", shape3, chunks3, EXPERT_DTYPE)
        self._weights = (
            None if self.weights_dtype is None else self._array("weights", shape3, chunks3, self.weights_dtype)
        )
        self._seq = self._array("seq_starts", (0,), (SEQ_CHUNK,), np.int64)
        self._extras: dict[str, zarr.Array] = {}
        for name, tail in tails.items():
            self._extras[name] = self._array(name, (0, *tail), (self.chunk_tokens, *tail), EXTRAS[name].dtype)
            self._attrs["extras"][name] = list(tail)
        self._codes: zarr.Array | None = None
        self._group.attrs[ATTR_KEY] = self._attrs

    def _array(self, name: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: Any) -> zarr.Array:
        """A new empty array with checksummed chunks, every one stored (zeros too: a missing chunk is an
        error for readers, never the fill value); its committed length in ``written`` starts at 0."""
        self._attrs["written"][name] = 0
        return self._group.create_array(
            name, shape=shape, chunks=chunks, dtype=dtype, compressors=CHUNK_CODECS, config={"write_empty_chunks": True}
        )

    # -- appending --------------------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        """Tokens appended so far (committed or buffered)."""
        return self._written + self._buf_tokens

    def append(
        self,
        experts: np.ndarray,
        weights: np.ndarray | None = None,
        *,
        seq_starts: Sequence[int] | np.ndarray = (0,),
        labels: Sequence[str] | None = None,
        extras: Mapping[str, Any] | None = None,
        token_ids: Sequence[int] | np.ndarray | None = None,
    ) -> None:
        """Append a block of tokens.

        Parameters
        ----------
        experts : [n, layers, k] expert ids.
        weights : [n, layers, k] gate weights (required iff the store has weights).
        seq_starts : [m] sequence starts inside this block, relative to it. Default ``(0,)``: the block is
            one new sequence. A block whose starts do not include 0 continues the previous sequence.
        labels : [m] label per new sequence (required iff the store is labelled).
        extras : ``{name: [n, ...] array}``, each extra the store keeps (required iff it keeps them).
        token_ids : shorthand for ``extras["token_ids"]``.
        """
        if self._closed:
            raise UsageError("this TraceWriter is closed; open a new one to write more")
        ex = np.asarray(experts)
        if ex.ndim != 3 or ex.shape[1:] != (self.n_layers, self.top_k):
            raise TraceError(
                f"appended experts have shape {ex.shape}, expected [n, {self.n_layers}, {self.top_k}] "
                f"(tokens, layers, k) to match the store"
            )
        n = ex.shape[0]
        starts = np.asarray(seq_starts, dtype=np.int64).ravel()
        if n == 0:
            if starts.size:
                raise TraceError("an empty block cannot start sequences; pass seq_starts=[]")
            return
        if starts.size and (starts[0] < 0 or np.any(np.diff(starts) <= 0) or starts[-1] >= n):
            raise TraceError(f"block seq_starts {starts.tolist()[:8]} must be strictly increasing in 0..{n - 1}")
        if self.n_tokens == 0 and (starts.size == 0 or starts[0] != 0):
            raise TraceError("the first block must start a sequence at its token 0 (seq_starts[0] == 0)")
        validate_experts(ex, self.n_experts, token_offset=self.n_tokens)
        if (weights is None) != (self.weights_dtype is None):
            raise TraceError(
                "this store "
                + ("has" if self.weights_dtype is not None else "has no")
                + " gate weights; give weights for every block or for none"
            )
        if weights is not None:
            w = np.asarray(weights)
            if w.shape != ex.shape:
                raise TraceError(f"block weights shape {w.shape} differs from experts shape {ex.shape}")
            _check_weights(w)
        given = {**(extras or {}), **({} if token_ids is None else {"token_ids": token_ids})}
        if set(given) != set(self._extras):
            raise TraceError(
                f"this store keeps the extra arrays {sorted(self._extras) or 'none'} but the block gives "
                f"{sorted(given) or 'none'}; give the same ones for every block"
            )
        checked = check_extras(given, n, self.n_layers, self.n_experts, self.top_k)
        for name, arr in checked.items():
            if arr.shape[1:] != self._extras[name].shape[1:]:
                raise TraceError(f"block {name} has shape {arr.shape}, the store keeps {self._extras[name].shape[1:]}")
        if weights is not None:
            self._buf_w.append(w.astype(self.weights_dtype, copy=False))
        for name, arr in checked.items():
            self._buf_x[name].append(arr)
        self._check_labels(labels, starts.size)
        self._buf_e.append(ex.astype(EXPERT_DTYPE, copy=False))
        self._pending_starts.extend((starts + self.n_tokens).tolist())
        self._pending_labels.extend(labels if labels is not None else [None] * starts.size)
        self._buf_tokens += n
        if self._buf_tokens >= self.chunk_tokens:
            self._write_buffer(full_chunks_only=True)
        if (
            self.commit_seconds is not None
            and self._buf_tokens
            and time.monotonic() - self._last_commit >= self.commit_seconds
        ):
            self.flush()  # readers (analyze --follow) see a slow capture's tokens without waiting for a chunk

    def append_trace(self, trace: RoutingTrace) -> None:
        """Append every token and sequence of `trace` (its metadata is not merged)."""
        self.append(
            trace.experts,
            trace.weights,
            seq_starts=trace.seq_starts,
            labels=None if trace.seq_labels is None else trace.seq_labels.tolist(),
            extras=trace.extras,
        )

    def _check_labels(self, labels: Sequence[str] | None, n_new: int) -> None:
        if n_new == 0:
            return
        labelled = labels is not None
        if self._attrs["labelled"] is None:
            self._attrs["labelled"] = labelled
        elif self._attrs["labelled"] != labelled:
            raise TraceError("some sequences have labels and some do not; label every sequence or none")
        if labelled and len(labels) != n_new:
            raise TraceError(f"{len(labels)} labels given for {n_new} new sequences; give one per sequence")

    # -- committing -------------------------------------------------------------------------------
    def flush(self) -> None:
        """Write and commit everything appended so far (a partial last chunk included)."""
        self._write_buffer(full_chunks_only=False)

    def _write_buffer(self, full_chunks_only: bool) -> None:
        if self._buf_tokens == 0 and not self._pending_starts:
            return
        ex = np.concatenate(self._buf_e) if len(self._buf_e) != 1 else self._buf_e[0]
        w = None
        if self._weights is not None:
            w = np.concatenate(self._buf_w) if len(self._buf_w) != 1 else self._buf_w[0]
        xs = {name: np.concatenate(b) if len(b) != 1 else b[0] for name, b in self._buf_x.items()}
        n = ex.shape[0]
        if full_chunks_only:
            # stop at a chunk boundary of the on-disk array so every chunk is written once
            end = ((self._written + n) // self.chunk_tokens) * self.chunk_tokens
            n = max(0, end - self._written)
        if n == 0:
            return
        lo, hi = self._written, self._written + n
        self._experts.resize((hi, self.n_layers, self.top_k))
        self._experts[lo:hi] = ex[:n]
        if self._weights is not None:
            self._weights.resize((hi, self.n_layers, self.top_k))
            self._weights[lo:hi] = w[:n]
        for name, arr in self._extras.items():
            arr.resize((hi, *arr.shape[1:]))
            arr[lo:hi] = xs[name][:n]
        for name in ("experts", "weights", *self._extras):
            if name in self._attrs["written"]:
                self._attrs["written"][name] = hi
        n_starts = sum(1 for s in self._pending_starts if s < hi)
        self._commit_sequences(n_starts)
        self._written = hi
        self._buf_e = [ex[n:]] if n < ex.shape[0] else []
        self._buf_w = [w[n:]] if w is not None and n < w.shape[0] else []
        self._buf_x = {name: [x[n:]] if n < x.shape[0] else [] for name, x in xs.items()}
        self._buf_tokens = ex.shape[0] - n
        self._attrs["committed_tokens"] = hi
        self._group.attrs[ATTR_KEY] = self._attrs  # the commit point (one atomic file replace)
        self._last_commit = time.monotonic()

    def _commit_sequences(self, n_starts: int) -> None:
        starts, self._pending_starts = self._pending_starts[:n_starts], self._pending_starts[n_starts:]
        labels, self._pending_labels = self._pending_labels[:n_starts], self._pending_labels[n_starts:]
        if not starts:
            return
        lo = self._attrs["committed_sequences"]
        hi = lo + len(starts)
        self._seq.resize((hi,))
        self._seq[lo:hi] = np.asarray(starts, dtype=np.int64)
        if self._attrs["labelled"]:
            names: list[str] = self._attrs["label_names"]
            index = {name: i for i, name in enumerate(names)}
            codes = np.empty(len(labels), dtype=np.int32)
            for i, label in enumerate(labels):
                if label not in index:
                    index[label] = len(names)
                    names.append(str(label))
                codes[i] = index[label]
            if self._codes is None:
                self._codes = self._array("seq_label_codes", (0,), (SEQ_CHUNK,), np.int32)
            self._codes.resize((hi,))
            self._codes[lo:hi] = codes
            self._attrs["written"]["seq_label_codes"] = hi
        self._attrs["written"]["seq_starts"] = hi
        self._attrs["committed_sequences"] = hi

    def close(self) -> Path:
        """Commit the rest, mark the store complete (unless its trace came from an incomplete store), rename
        it into place (atomic mode) and release the path's lock."""
        if self._closed:
            return self.path
        try:
            self.flush()
            self._attrs["complete"] = not self._incomplete_source
            self._group.attrs[ATTR_KEY] = self._attrs
            self._closed = True
            if self.atomic:
                _atomic.replace_into(self._dir, self.path, self.overwrite)
            elif self._old is not None:
                _atomic.remove(self._old)
                self._old = None
        except BaseException:
            self._closed = True
            if self.atomic:
                _atomic.remove(self._dir)  # never half a store
            raise
        finally:
            self._release()
        return self.path

    def abort(self) -> None:
        """Stop writing: an atomic store is deleted; an in-place one commits what was validated so far
        and stays marked incomplete, unless it was replacing an old store, which is put back. Releases the
        path's lock."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.atomic:
                _atomic.remove(self._dir)
            elif self._old is not None:
                self._put_back_old()
            else:
                self.flush()
        finally:
            self._release()

    def _put_back_old(self) -> None:
        """The old store this in-place writer moved aside, back under its name (the new one deleted)."""
        if self._old is None:
            return
        _atomic.remove(self.path)
        os.rename(self._old, self.path)
        self._old = None

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def save_trace(
    trace: RoutingTrace, path: str | os.PathLike, *, overwrite: bool = False, chunk_tokens: int | None = None
) -> Path:
    """Write `trace` as a store at `path`, atomically (temp folder, then rename). A trace read from an
    incomplete store (``meta.extra["incomplete"]``) gives a store marked incomplete too."""
    with TraceWriter(
        path,
        n_experts=trace.n_experts,
        n_layers=trace.n_layers,
        top_k=trace.top_k,
        layer_ids=trace.layer_ids,
        phase=trace.phase,
        meta=trace.meta,
        weights_dtype=None if trace.weights is None else trace.weights.dtype,
        extras={name: a.shape[1:] for name, a in trace.extras.items()},
        chunk_tokens=chunk_tokens,
        overwrite=overwrite,
        atomic=True,
    ) as writer:
        for lo in range(0, max(trace.n_tokens, 1), writer.chunk_tokens):
            hi = min(trace.n_tokens, lo + writer.chunk_tokens)
            if hi <= lo:
                break
            starts = trace.seq_starts[(trace.seq_starts >= lo) & (trace.seq_starts < hi)]
            labels = None
            if trace.seq_labels is not None:
                labels = trace.seq_labels[(trace.seq_starts >= lo) & (trace.seq_starts < hi)].tolist()
            writer.append(
                trace.experts[lo:hi],
                None if trace.weights is None else trace.weights[lo:hi],
                seq_starts=starts - lo,
                labels=labels,
                extras={name: a[lo:hi] for name, a in trace.extras.items()},
            )
    return Path(path)


@dataclasses.dataclass(frozen=True)
class Chunk:
    """A token range of a stored trace.

    start : index of the chunk's first token in the whole trace.
    trace : the tokens ``start .. start + trace.n_tokens`` as a `RoutingTrace`; its first sequence may be
        the tail of a sequence begun in an earlier chunk (then `continues` is True).
    first_sequence : index (in the whole trace) of the chunk's first sequence.
    """

    start: int
    trace: RoutingTrace
    first_sequence: int
    continues: bool


_WARNED: set[tuple[str, str]] = set()  # (store, why) of the incomplete stores this process has warned about


class TraceStore:
    """A trace store opened for reading; only committed tokens are visible.

    Attributes: n_tokens, n_layers, top_k, n_experts, layer_ids, phase, meta, complete, chunk_tokens,
    has_weights, has_token_ids, extras (names of the optional per-token arrays kept), seq_starts [sequences]
    int64, seq_labels [sequences] str or None; for an incomplete store, incomplete_notice (one line: why,
    and what is committed) and writer (the live `WriterLock` of a local store being written, else None).

    Opening checks every attribute and array shape (`FormatError` on damage); reads check chunk checksums
    and that no committed chunk is missing. Opening an incomplete store logs `incomplete_notice` as a warning
    (once per store and reason in a process, so a command that reopens it says it once) unless
    `warn_incomplete` is False, and marks ``meta.extra["incomplete"]`` so the traces read carry it.
    """

    def __init__(self, path: str | os.PathLike, *, warn_incomplete: bool = True) -> None:
        if is_url(path):  # shared or object storage through fsspec, e.g. s3://bucket/run.zarr
            self.path: Path | str = str(path)
            self._group, strict = _open_url(self.path)
            raw = self._group.attrs.get(ATTR_KEY)
            held = None  # no write lock through a URL
        else:
            self.path = Path(path)
            if not self.path.exists():
                raise UsageError(
                    f"trace store {str(self.path)!r} does not exist; give a store written by moescope capture or "
                    f"moescope trace convert"
                )
            # the writer before the commit record: a writer releases its lock only after its last commit, so a
            # store seen without a live writer has its final record on disk when the attributes are read next
            held = WriterLock.holder(self.path)
            raw, why = _group_attrs(self.path)
            if raw is None and why.startswith("no "):
                name = self.path.name if self.path.suffix == ".zarr" else f"{self.path.stem or 'OUT'}.zarr"
                raise FormatError(
                    f"{str(self.path)!r} is not a moescope trace store (no zarr.json with moescope attributes); "
                    f"convert the source first: moescope trace convert SOURCE {name}"
                )
            if raw is None:
                raise FormatError(f"{self.path}: {why}; {_FIX}")
            strict = _StrictStore(zarr.storage.LocalStore(self.path, read_only=True), str(self.path))
            with _damaged(str(self.path), "the group metadata (zarr.json)"):
                self._group = zarr.open_group(strict, mode="r")
        self._where = str(self.path)
        a = self._attrs = _check_attrs(raw, self._where)
        strict.required.update(a["written"] or ())  # stores of the checksum version store every chunk
        self.n_tokens = a["committed_tokens"]
        self.n_layers = a["n_layers"]
        self.top_k = a["top_k"]
        self.n_experts = a["n_experts"]
        self.layer_ids = np.asarray(a["layer_ids"], dtype=np.int64)
        self.phase = a["phase"]
        self.meta = TraceMeta.from_dict(a["meta"])
        self.complete = a["complete"]
        self.chunk_tokens = a["chunk_tokens"]
        self.has_weights = a["weights_dtype"] is not None
        tail3 = (self.n_layers, self.top_k)
        self._experts = self._array("experts", EXPERT_DTYPE, tail3, self.n_tokens)
        if self._experts.chunks[0] != self.chunk_tokens:
            raise FormatError(
                f"{self._where}: experts is chunked by {self._experts.chunks[0]} tokens but the store attributes "
                f"say chunk_tokens {self.chunk_tokens}; {_FIX}"
            )
        self._weights = (
            None if not self.has_weights else self._array("weights", a["weights_dtype"], tail3, self.n_tokens)
        )
        tails = {name: tuple(tail) for name, tail in a["extras"].items() if name in EXTRAS}  # newer names: skipped
        if a["token_ids"]:  # stores of the first token-id version
            tails.setdefault("token_ids", ())
        self._extras = {
            name: self._array(name, EXTRAS[name].dtype, tail, self.n_tokens) for name, tail in tails.items()
        }
        self.extras = tuple(self._extras)
        self.has_token_ids = "token_ids" in self._extras
        n_seq = a["committed_sequences"]
        starts = self._load("seq_starts", self._array("seq_starts", np.int64, (), n_seq), 0, n_seq)
        if n_seq and not (starts[0] == 0 and np.all(np.diff(starts) > 0) and starts[-1] < self.n_tokens):
            raise FormatError(
                f"{self._where}: seq_starts {_short(starts.tolist(), 60)} do not increase from 0 below the "
                f"{self.n_tokens} committed tokens; {_FIX}"
            )
        self.seq_starts = np.asarray(starts, dtype=np.int64)
        self.seq_labels: np.ndarray | None = None
        if a["labelled"]:
            codes = np.zeros(0, dtype=np.int32)
            if n_seq:
                codes = self._load("seq_label_codes", self._array("seq_label_codes", np.int32, (), n_seq), 0, n_seq)
            names = a["label_names"]
            if codes.size and (codes.min() < 0 or codes.max() >= len(names)):
                bad = int(codes.min()) if codes.min() < 0 else int(codes.max())
                raise FormatError(
                    f"{self._where}: seq_label_codes holds {bad} but there are {len(names)} label_names; {_FIX}"
                )
            self.seq_labels = np.asarray(names, dtype=str)[codes]
        if not is_url(path):  # a store (checked above, so not a stub a dead writer's lock still marks)
            WriterLock.clear_dead(self.path)  # a killed writer's lock goes with the next read
        self.writer = None if self.complete or is_url(path) else held
        self.incomplete_notice: str | None = None
        if not self.complete:
            why, self.incomplete_notice = self._notice(a["meta"].get(INCOMPLETE_KEY))
            mark = self.meta.extra.get(INCOMPLETE_KEY) or {
                "store": self._where,
                "tokens": self.n_tokens,
                "sequences": self.n_sequences,
            }
            self.meta = self.meta.replace(extra={**self.meta.extra, INCOMPLETE_KEY: mark})
            key = (self._where if is_url(path) else str(self.path.resolve()), why)
            if warn_incomplete and key not in _WARNED:
                _WARNED.add(key)
                log.warning("%s", self.incomplete_notice)

    def _notice(self, source: Any) -> tuple[str, str]:
        """Why this store is incomplete (a short key) and the one-line notice saying so."""
        n = self.n_sequences
        held = f"{n:,} sequence{'' if n == 1 else 's'} ({self.n_tokens:,} tokens)"
        if source:  # written whole from a trace read from an incomplete store
            src = source.get("store") if isinstance(source, dict) else None
            origin = f"the incomplete store {src}" if isinstance(src, str) else "an incomplete store"
            return "copy", f"{self._where} is incomplete: it was written from {origin}; reading its {held}"
        if self.writer is not None:
            return "writing", (
                f"{self._where} is incomplete: process {self.writer.pid} is still writing it (since "
                f"{_clock(self.writer.since)}); reading the {held} committed so far"
            )
        if is_url(self.path):
            return "open", f"{self._where} is incomplete: its writer has not closed it; reading the {held} committed"
        return "stopped", (
            f"{self._where} is incomplete: its writer stopped without closing it (killed or crashed); reading the "
            f"{held} committed"
        )

    def _array(self, name: str, dtype: Any, tail: tuple[int, ...], extent: int) -> zarr.Array:
        """The array `name`, checked: dtype, trailing shape, at least `extent` rows (the committed ones), and
        for stores with a ``written`` record, that record and the checksum codec."""
        with _damaged(self._where, f"the metadata of array {name}"):
            arr = self._group.get(name)
        if not isinstance(arr, zarr.Array):
            raise FormatError(f"{self._where}: array {name} is missing ({extent} rows are committed to it); {_FIX}")
        shape, want = tuple(arr.shape), np.dtype(dtype)
        if np.dtype(arr.dtype) != want or shape[1:] != tuple(tail) or shape[0] < extent:
            raise FormatError(
                f"{self._where}: array {name} is {np.dtype(arr.dtype)} {list(shape)}, expected {want} "
                f"[{extent} or more{''.join(f', {d}' for d in tail)}]; {_FIX}"
            )
        written = self._attrs["written"]
        if written is not None and written.get(name) != extent:
            raise FormatError(
                f"{self._where}: the commit record says {written.get(name)} rows of {name} were written, but "
                f"{extent} are committed; {_FIX}"
            )
        if written is not None and not any(isinstance(c, Crc32cCodec) for c in arr.compressors):
            raise FormatError(f"{self._where}: array {name} lost its crc32c checksum codec; {_FIX}")
        return arr

    def _load(self, name: str, arr: zarr.Array, lo: int, hi: int) -> np.ndarray:
        """Rows ``lo:hi`` of array `name`; a chunk that fails its checksum or cannot be decoded is a
        `FormatError` naming the chunk (found by reading the range's chunks one by one)."""
        try:
            return arr[lo:hi]
        except MoescopeError:
            raise
        except _ZARR_ERRORS as exc:
            error: BaseException = exc
        step, bad = arr.chunks[0], None
        for c in range(lo // step, (max(hi, lo + 1) - 1) // step + 1):
            try:
                arr[c * step : min((c + 1) * step, arr.shape[0])]
            except MoescopeError:
                raise
            except _ZARR_ERRORS as exc:
                error, bad = exc, c
                break
        what = f"{name} rows {lo}:{hi}" if bad is None else f"chunk {bad} of {name}"
        if "checksum" in str(error):
            why = "fails its checksum (the file was changed or damaged)"
        else:
            why = f"cannot be decoded ({type(error).__name__}: {_short(error)}; the file was changed or damaged)"
        raise FormatError(f"{self._where}: {what} {why}; re-capture or restore it") from None

    @property
    def n_sequences(self) -> int:
        return int(self.seq_starts.size)

    def _layer_index(self, layers: Sequence[int] | None) -> np.ndarray | None:
        """Positions along the layer axis for the given model layer ids (None = all)."""
        if layers is None:
            return None
        return layer_positions(self.layer_ids, layers)

    def read(self, start: int = 0, stop: int | None = None, *, layers: Sequence[int] | None = None) -> Chunk:
        """Tokens ``start:stop`` (model layers `layers`, default all) as a `Chunk`."""
        stop = self.n_tokens if stop is None else min(int(stop), self.n_tokens)
        start = int(start)
        if not 0 <= start <= stop:
            raise UsageError(f"token range {start}:{stop} is outside 0:{self.n_tokens}")
        li = self._layer_index(layers)
        ex = self._load("experts", self._experts, start, stop)
        w = None if self._weights is None else self._load("weights", self._weights, start, stop)
        extras = {name: self._load(name, arr, start, stop) for name, arr in self._extras.items()}
        if li is not None:
            ex = ex[:, li]
            w = None if w is None else w[:, li]
            extras = extras_at_layers(extras, li)
        first = int(np.searchsorted(self.seq_starts, start, side="right")) - 1
        last = int(np.searchsorted(self.seq_starts, stop, side="left"))
        rel = self.seq_starts[max(first, 0) : last] - start
        continues = stop > start and first >= 0 and rel.size > 0 and rel[0] < 0
        if stop > start:
            rel = np.maximum(rel, 0)
        labels = None if self.seq_labels is None else self.seq_labels[max(first, 0) : last]
        trace = RoutingTrace(
            ex,
            self.n_experts,
            weights=w,
            seq_starts=rel if stop > start else [],
            seq_labels=labels if stop > start else (None if labels is None else []),
            layer_ids=self.layer_ids if li is None else self.layer_ids[li],
            phase=self.phase,
            meta=self.meta,
            extras=extras,
        )
        return Chunk(start, trace, max(first, 0), bool(continues))

    def iter_chunks(self, *, layers: Sequence[int] | None = None, chunk_tokens: int | None = None) -> Iterator[Chunk]:
        """Stream the trace in token chunks (default: the store's chunking), bounded memory."""
        step = int(chunk_tokens or self.chunk_tokens)
        if step < 1:
            raise UsageError(f"chunk_tokens is {step}; expected >= 1")
        for lo in range(0, self.n_tokens, step):
            yield self.read(lo, lo + step, layers=layers)

    def expert_rows(self, start: int, stop: int) -> np.ndarray:
        """The ``[stop - start, layers, k]`` expert ids of tokens ``start:stop`` (every layer), read as one
        request (zarr decodes its chunks in parallel); a damaged chunk is a `FormatError` naming it. Ids are
        not checked here (`moescope.trace.validate_experts`)."""
        return self._load("experts", self._experts, int(start), int(stop))

    def routing_at(self, layers: Sequence[int]) -> RoutingTrace:
        """Every token's expert ids at model layers `layers` only, with the sequences and labels: no gate
        weights, token ids or extras. Read 8 chunks at a time (decoded in parallel), so memory is the result
        (tokens x len(layers) x k int16) plus those chunks; a command that works layer by layer reads a long
        trace in layer groups this way (`moescope.cache.simulate_store`) instead of loading it whole."""
        li = self._layer_index(layers)
        assert li is not None
        out = np.empty((self.n_tokens, li.size, self.top_k), dtype=EXPERT_DTYPE)
        step = self.chunk_tokens * 8
        for lo in range(0, self.n_tokens, step):
            hi = min(lo + step, self.n_tokens)
            out[lo:hi] = self.expert_rows(lo, hi)[:, li]
        return self.routing_of(out, self.layer_ids[li])

    def routing_of(self, experts: np.ndarray, layer_ids: Sequence[int], *, checked: bool = False) -> RoutingTrace:
        """A trace of every token's ``experts [tokens, len(layer_ids), k]`` (this store's ids at the model layers
        `layer_ids`, read in some other way) with the store's sequences, labels, phase and meta; ids checked
        unless `checked` says they already were."""
        return RoutingTrace(
            experts,
            self.n_experts,
            seq_starts=self.seq_starts,
            seq_labels=self.seq_labels,
            layer_ids=np.asarray(layer_ids, dtype=np.int64),
            phase=self.phase,
            meta=self.meta,
            validate=not checked,
        )

    def to_trace(self, *, layers: Sequence[int] | None = None) -> RoutingTrace:
        """The whole committed trace in memory."""
        return self.read(0, self.n_tokens, layers=layers).trace

    def summary(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "tokens": self.n_tokens,
            "layers": self.n_layers,
            "top_k": self.top_k,
            "n_experts": self.n_experts,
            "sequences": self.n_sequences,
            "layer_ids": self.layer_ids.tolist(),
            "phase": self.phase,
            "has_weights": self.has_weights,
            "weights_dtype": self._attrs["weights_dtype"],
            "has_token_ids": self.has_token_ids,
            "extras": {name: list(arr.shape[1:]) for name, arr in self._extras.items()},
            "labels": [] if self.seq_labels is None else list(dict.fromkeys(self.seq_labels.tolist())),
            "complete": self.complete,
            "incomplete": self.incomplete_notice,
            "chunk_tokens": self.chunk_tokens,
            "meta": self.meta.to_dict(),
        }


def load_trace(path: str | os.PathLike, *, layers: Sequence[int] | None = None) -> RoutingTrace:
    """Read a whole store into memory (see `moescope.imports.read_input` for other formats)."""
    return TraceStore(path).to_trace(layers=layers)
