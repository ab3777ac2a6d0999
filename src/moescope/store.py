"""The trace store: a Zarr v3 folder, chunked along tokens, written atomically and appendable.

Layout of ``PATH/`` (a Zarr v3 group)::

    zarr.json                  group attributes under "moescope": format, version, n_experts, top_k,
                               layer_ids, phase, meta, label_names, chunk_tokens, weights_dtype, and the
                               commit record: committed_tokens, committed_sequences, complete
    experts/                   [tokens, layers, k] int16, chunks of (chunk_tokens, layers, k)
    weights/                   [tokens, layers, k] float16|float32 (only when the trace has gate weights)
    seq_starts/                [sequences] int64
    seq_label_codes/           [sequences] int32 index into label_names (only when labelled)
    <extra>/                   [tokens, ...] each optional per-token array of `moescope.trace.EXTRAS`
                               the trace carries (token_ids, lookahead, candidates, candidate_probs),
                               chunks of (chunk_tokens, ...); attribute "extras": {name: trailing shape}.
                               Stores without them read as before; readers that predate them ignore them

Commit protocol: data chunks are written first, then the group attributes (one atomic file replace)
advance ``committed_tokens``. Readers never look past the commit record, so a writer that dies leaves
every committed chunk readable and nothing corrupt; ``complete`` is false until the writer closed cleanly.

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

import dataclasses
import json
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from moescope import _atomic
from moescope.errors import FormatError, MissingDependencyError, TraceError, UsageError
from moescope.trace import (
    EXPERT_DTYPE,
    EXTRAS,
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

FORMAT_NAME = "moescope.trace"
FORMAT_VERSION = 1
ATTR_KEY = "moescope"
TARGET_CHUNK_BYTES = 8 << 20  # uncompressed experts bytes per chunk
MIN_CHUNK_TOKENS = 1024
MAX_CHUNK_TOKENS = 1 << 20
SEQ_CHUNK = 1 << 16
CAPTURE_COMMIT_SECONDS = 30.0  # captures commit at least this often (see TraceWriter's commit_seconds)


def default_chunk_tokens(n_layers: int, top_k: int) -> int:
    """A power-of-two token count giving ~8 MiB of int16 expert ids per chunk."""
    per_token = max(1, n_layers * top_k * EXPERT_DTYPE.itemsize)
    n = 1 << int(math.log2(max(1, TARGET_CHUNK_BYTES // per_token)))
    return int(min(MAX_CHUNK_TOKENS, max(MIN_CHUNK_TOKENS, n)))


def is_url(path: str | os.PathLike) -> bool:
    """True for an fsspec URL (``s3://bucket/run.zarr``, ``file:///data/run.zarr``), read through fsspec."""
    return isinstance(path, str) and "://" in path


def _open_url(url: str) -> zarr.Group:
    """The trace store at an fsspec URL, read-only (the protocol's package, e.g. s3fs, must be installed)."""
    try:
        store = zarr.storage.FsspecStore.from_url(url, read_only=True)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{url!r}: reading this protocol needs its fsspec package ({exc}); e.g. pip install s3fs for s3://"
        ) from None
    except ValueError as exc:
        raise UsageError(f"{url!r}: not a URL fsspec can open ({exc}); use e.g. s3://bucket/run.zarr") from None
    try:
        group = zarr.open_group(store, mode="r")
        attrs = group.attrs.get(ATTR_KEY)
    except (FileNotFoundError, KeyError, ValueError, zarr.errors.NodeNotFoundError):
        attrs = None
    if not isinstance(attrs, dict) or attrs.get("format") != FORMAT_NAME:
        raise FormatError(
            f"{url!r} is not a moescope trace store (no zarr.json with moescope attributes); write one with "
            f"moescope trace convert and copy the folder there"
        )
    return group


def is_store(path: str | os.PathLike) -> bool:
    """True when `path` is a folder holding a moescope trace store."""
    meta = Path(path) / "zarr.json"
    if not meta.is_file():
        return False
    try:
        doc = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return doc.get("attributes", {}).get(ATTR_KEY, {}).get("format") == FORMAT_NAME


class TraceWriter:
    """Write a trace to a store block by block, committing every full chunk.

    Parameters
    ----------
    path : the store folder to create.
    n_experts, n_layers, top_k : the trace's shape (fixed for the whole store).
    layer_ids : [layers] model layer index of each MoE layer.
    phase : "prefill" or "decode".
    meta : provenance, stored as given (captures set `created`).
    weights_dtype : "float16", "float32" or None (no gate weights).
    extras : the optional per-token arrays the store keeps, ``{name: trailing shape}`` (`EXTRAS` names, e.g.
        ``{"token_ids": (), "lookahead": (layers, 2, k)}``); then every `append` gives each of them.
    token_ids : shorthand for ``extras={"token_ids": ()}``.
    chunk_tokens : tokens per chunk (default: ~8 MiB of ids per chunk).
    overwrite : replace an existing `path`.
    atomic : True builds in a temp folder and renames at `close()`; False (captures) writes in place.
    commit_seconds : also commit what is buffered (a partial chunk, rewritten whole when more comes) once
        this long has passed since the last commit; captures use `CAPTURE_COMMIT_SECONDS`, so readers of a
        slow capture see its tokens within that time and a crash loses at most that much. None: full chunks.

    Use as a context manager: an exception inside the block removes an atomic store, and leaves a
    non-atomic one with what was committed (marked incomplete).
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
        self.path = _atomic.check_output(path, overwrite)
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

        self._dir = _atomic.temp_sibling(self.path) if atomic else self.path
        if not atomic and self.path.exists():
            _atomic.remove(self.path)  # overwrite was checked above
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
        }
        self._group = zarr.open_group(zarr.storage.LocalStore(self._dir), mode="w-", zarr_format=3)
        shape3 = (0, self.n_layers, self.top_k)
        chunks3 = (self.chunk_tokens, self.n_layers, self.top_k)
        self._experts = self._group.create_array("experts", shape=shape3, chunks=chunks3, dtype=EXPERT_DTYPE)
        self._weights = (
            None
            if self.weights_dtype is None
            else self._group.create_array("weights", shape=shape3, chunks=chunks3, dtype=self.weights_dtype)
        )
        self._seq = self._group.create_array("seq_starts", shape=(0,), chunks=(SEQ_CHUNK,), dtype=np.int64)
        shapes = {**({"token_ids": ()} if token_ids else {}), **(extras or {})}
        unknown = sorted(set(shapes) - set(EXTRAS))
        if unknown:
            raise TraceError(f"unknown extra array(s) {unknown}; a store can keep {', '.join(EXTRAS)}")
        self._extras: dict[str, zarr.Array] = {}
        for name, tail in shapes.items():
            tail = tuple(int(x) for x in tail)
            if len(tail) != EXTRAS[name].ndim - 1:
                raise TraceError(f"extra {name} needs {EXTRAS[name].ndim - 1} trailing dimensions, got {tail}")
            self._extras[name] = self._group.create_array(
                name, shape=(0, *tail), chunks=(self.chunk_tokens, *tail), dtype=EXTRAS[name].dtype
            )
            self._attrs["extras"][name] = list(tail)
        self._codes: zarr.Array | None = None
        self._group.attrs[ATTR_KEY] = self._attrs
        self._buf_e: list[np.ndarray] = []
        self._buf_w: list[np.ndarray] = []
        self._buf_x: dict[str, list[np.ndarray]] = {name: [] for name in self._extras}
        self._buf_tokens = 0
        self._pending_starts: list[int] = []  # absolute token index of sequences not yet committed
        self._pending_labels: list[str | None] = []
        self._written = 0  # tokens on disk (committed)
        self._closed = False

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
                self._codes = self._group.create_array(
                    "seq_label_codes", shape=(0,), chunks=(SEQ_CHUNK,), dtype=np.int32
                )
            self._codes.resize((hi,))
            self._codes[lo:hi] = codes
        self._attrs["committed_sequences"] = hi

    def close(self) -> Path:
        """Commit the rest, mark the store complete and (atomic mode) rename it into place."""
        if self._closed:
            return self.path
        self.flush()
        self._attrs["complete"] = True
        self._group.attrs[ATTR_KEY] = self._attrs
        self._closed = True
        if self.atomic:
            _atomic.replace_into(self._dir, self.path, self.overwrite)
        return self.path

    def abort(self) -> None:
        """Stop writing: an atomic store is deleted; an in-place one commits what was validated so far
        and stays marked incomplete."""
        if self._closed:
            return
        self._closed = True
        if self.atomic:
            _atomic.remove(self._dir)
        else:
            self.flush()

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
    """Write `trace` as a store at `path`, atomically (temp folder, then rename)."""
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


class TraceStore:
    """A trace store opened for reading; only committed tokens are visible.

    Attributes: n_tokens, n_layers, top_k, n_experts, layer_ids, phase, meta, complete, chunk_tokens,
    has_weights, has_token_ids, extras (names of the optional per-token arrays kept), seq_starts [sequences]
    int64, seq_labels [sequences] str or None.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        if is_url(path):  # shared or object storage through fsspec, e.g. s3://bucket/run.zarr
            self.path: Path | str = str(path)
            self._group = _open_url(self.path)
        else:
            self.path = Path(path)
            if not self.path.exists():
                raise UsageError(
                    f"trace store {str(self.path)!r} does not exist; give a store written by moescope capture or "
                    f"moescope trace convert"
                )
            if not is_store(self.path):
                name = self.path.name if self.path.suffix == ".zarr" else f"{self.path.stem or 'OUT'}.zarr"
                raise FormatError(
                    f"{str(self.path)!r} is not a moescope trace store (no zarr.json with moescope attributes); "
                    f"convert the source first: moescope trace convert SOURCE {name}"
                )
            self._group = zarr.open_group(zarr.storage.LocalStore(self.path, read_only=True), mode="r")
        a = dict(self._group.attrs[ATTR_KEY])
        if a.get("version", 0) > FORMAT_VERSION:
            raise FormatError(
                f"{str(self.path)!r} uses trace store version {a['version']}, newer than this moescope "
                f"reads ({FORMAT_VERSION}); upgrade moescope"
            )
        self._attrs = a
        self.n_tokens = int(a["committed_tokens"])
        self.n_layers = int(a["n_layers"])
        self.top_k = int(a["top_k"])
        self.n_experts = int(a["n_experts"])
        self.layer_ids = np.asarray(a["layer_ids"], dtype=np.int64)
        self.phase = a["phase"]
        self.meta = TraceMeta.from_dict(a["meta"])
        self.complete = bool(a["complete"])
        self.chunk_tokens = int(a["chunk_tokens"])
        self.has_weights = a["weights_dtype"] is not None
        self._experts = self._group["experts"]
        self._weights = self._group["weights"] if self.has_weights else None
        names = list(a.get("extras") or {}) if isinstance(a.get("extras"), dict) else []
        if a.get("token_ids") is True and "token_ids" not in names:  # stores of the first token-id version
            names.append("token_ids")
        self._extras = {name: self._group[name] for name in names if name in EXTRAS}
        self.extras = tuple(self._extras)
        self.has_token_ids = "token_ids" in self._extras
        n_seq = int(a["committed_sequences"])
        self.seq_starts = np.asarray(self._group["seq_starts"][:n_seq], dtype=np.int64)
        self.seq_labels: np.ndarray | None = None
        if a.get("labelled"):
            names = np.asarray(a["label_names"], dtype=str)
            self.seq_labels = names[np.asarray(self._group["seq_label_codes"][:n_seq])]
        for name, arr in (("experts", self._experts), *self._extras.items()):
            if arr.shape[0] < self.n_tokens:
                raise FormatError(
                    f"{str(self.path)!r} is corrupt: {self.n_tokens} tokens committed but only {arr.shape[0]} "
                    f"stored in {name}; recapture or restore it"
                )

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
        ex = self._experts[start:stop]
        w = self._weights[start:stop] if self._weights is not None else None
        extras = {name: arr[start:stop] for name, arr in self._extras.items()}
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
            "chunk_tokens": self.chunk_tokens,
            "meta": self.meta.to_dict(),
        }


def load_trace(path: str | os.PathLike, *, layers: Sequence[int] | None = None) -> RoutingTrace:
    """Read a whole store into memory (see `moescope.imports.read_input` for other formats)."""
    return TraceStore(path).to_trace(layers=layers)
