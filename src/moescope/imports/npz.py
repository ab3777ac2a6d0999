"""moescope's `.npz` trace format (also the format of ``shared/realdata/esft-dsv2lite/trace.npz``), and the
bounded `.npy` / `.npz` reading that the vLLM reader shares.

Arrays: ``experts [tokens, layers, k] int``, optional ``weights [tokens, layers, k] float16|float32``,
``seq_starts [sequences] int64``, optional ``seq_labels [sequences] str``, the optional per-token arrays
of `moescope.trace.EXTRAS` (``token_ids``, ``lookahead``, ``candidates``, ``candidate_probs``) under
their names, and ``meta``: a JSON string with ``n_experts`` (required unless given as an option),
``layer_ids``, ``phase``, ``model``/``source``/... .
A ``task_starts`` mapping in meta (label -> first token of that task's sequences) labels the sequences
when ``seq_labels`` is absent. Nothing in the file is ever unpickled: object arrays are refused.

Reading is bounded. Every member's `.npy` header is read (a few hundred bytes) before any of its data,
and these checks run before decompressing, each one from what the file itself declares:

- a member must be stored or deflated (what `numpy.savez` writes), and its declared uncompressed size at
  most what deflate can produce from its compressed bytes (1032:1, zlib's documented maximum), so the
  sizes below are tied to bytes that are really in the file;
- its header must describe a plain numeric (or, for meta and labels, string) array whose shape x itemsize
  plus the header is exactly that declared size;
- the shapes must agree with each other (weights and extras as experts' tokens / layers / k, one label
  per sequence, at most one sequence per token), so experts bounds the size of every other array;
- data is decompressed in chunks of `CHUNK_BYTES`, at most the declared size (zipfile stops there and
  checks the CRC), and experts' ids (integers in C order) are validated chunk by chunk and kept as int16,
  the first chunk before the whole array is allocated: a bomb of repeated bytes fails on its first chunk
  instead of filling memory. What is left is an array that validates, which may be as large as the file
  legitimately declares (GBs); one larger than the machine can allocate is a `FormatError`.

    >>> trace = read_npz(Path("trace.npz"), ImportOptions())
"""

from __future__ import annotations

import dataclasses
import json
import math
import tokenize
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from moescope import _atomic
from moescope.errors import FormatError, MoescopeError, UsageError
from moescope.imports.registry import (
    ImportOptions,
    brief,
    check_meta_strings,
    json_int,
    parse_json,
    register_reader,
    register_writer,
    short,
)
from moescope.trace import EXTRAS, MAX_EXPERTS, PHASES, RoutingTrace, TraceMeta, validate_experts

STRUCTURAL_KEYS = ("n_experts", "top_k", "n_layers", "layer_ids", "phase")
CHUNK_BYTES = 1 << 22
"""Bytes decompressed per step: bounds the temporary memory (and how much of a bomb is read before its
first chunk is checked) while keeping the per-chunk overhead (a numba validation call) negligible."""
DEFLATE_MAX_RATIO = 1032
"""zlib's maximum expansion (one 258-byte match per 2 bits): a member declaring more than this many
uncompressed bytes per compressed byte cannot be what it claims."""
META_MAX_BYTES = 1 << 24
"""The meta JSON records per-file facts, never per-token data (a real trace's is 4 KB); 16 MiB is ~4000x
that and keeps a hostile meta from being decompressed and parsed into Python objects without bound."""
MAX_LABEL_CHARS = 4096
"""Sequence labels are task or domain names; longer ones would make numpy's fixed-width string array
(sequences x longest label x 4 bytes) a memory multiplier."""
MAX_IDS_PER_TOKEN = 1 << 22
"""Per-token row of experts (layers x k): DeepSeek-V3 has 58 x 8 = 464; rows are validated whole, so a
row over 4M ids (8 MiB in int16) would defeat the chunked validation and is refused as implausible."""
ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, OverflowError, NotImplementedError)
"""What zipfile raises on damaged archives (bad directory, bad CRC, truncated deflate stream...)."""
_HEADER_ERRORS = (
    ValueError,
    TypeError,
    OverflowError,
    SyntaxError,
    RecursionError,
    MemoryError,
    tokenize.TokenError,
    *ZIP_ERRORS,
)
"""What numpy's header readers raise on a damaged header (they `ast.literal_eval` it, retry through
`tokenize` for Python 2 headers, and build a dtype from what they find)."""
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
NUMERIC_KINDS = "biuf"
INT_KINDS = "iu"

# ----------------------------------------------------------------------------------------------------------
# bounded .npy reading


@dataclasses.dataclass(frozen=True)
class NpyHeader:
    """What a `.npy` header declares: ``shape``, ``dtype`` (plain: no objects, no fields), ``fortran`` order,
    ``offset`` (bytes of magic and header before the data) and ``where`` (file and member, for messages)."""

    where: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    offset: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)  # a Python int: a hostile shape cannot overflow it

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def describe(self) -> str:
        return f"shape {self.shape} and dtype {self.dtype}"


MAX_HEADER_BYTES = 1 << 16
"""numpy refuses a header over 10,000 characters, but only after reading it, and a version-2 header may declare
up to 4 GiB: reads past 64 KiB (what a version-1 header can hold) are refused before they happen."""


class _HeaderStream:
    """The stream numpy's header reader reads through: counts the bytes (the header's length), refuses to read
    past `MAX_HEADER_BYTES`."""

    def __init__(self, fp: IO[bytes]) -> None:
        self.fp, self.count = fp, 0

    def read(self, n: int) -> bytes:
        if self.count + n > MAX_HEADER_BYTES:
            raise FormatError(f"the header declares {self.count + n} bytes, over {MAX_HEADER_BYTES}")
        data = self.fp.read(n)
        self.count += len(data)
        return data


def read_npy_header(fp: IO[bytes], where: str) -> NpyHeader:
    """Read the magic and header of the `.npy` stream `fp` (nothing after them).

    Raises
    ------
    FormatError : a damaged header, or a dtype that is not plain numbers or text (objects need pickle).
    """
    counting = _HeaderStream(fp)
    try:
        version = np.lib.format.read_magic(counting)
        read = _HEADER_READERS.get(version)
        header = None if read is None else read(counting)
    except _HEADER_ERRORS as exc:  # including _HeaderStream's FormatError (a ValueError)
        raise FormatError(f"{where}: not a valid .npy array header ({brief(exc)}); the file is damaged") from None
    if header is None:
        raise FormatError(f"{where}: .npy format version {version} is not 1.0 or 2.0; save it with numpy")
    shape, fortran, dtype = header
    if dtype.hasobject:
        raise FormatError(
            f"{where} cannot be loaded as plain numpy arrays: dtype {dtype} holds Python objects and needs "
            f"unpickling, which moescope never does (object arrays need pickle); save integer or float arrays"
        )
    if dtype.kind not in NUMERIC_KINDS + "U" or dtype.names is not None or dtype.shape or not dtype.itemsize:
        raise FormatError(f"{where}: dtype {dtype} is not a plain number or text type; save plain arrays")
    if any(d < 0 for d in shape):
        raise FormatError(f"{where}: header declares a negative shape {shape}; the file is damaged")
    return NpyHeader(where, tuple(shape), dtype, bool(fortran), counting.count)


def _read_exactly(fp: IO[bytes], n: int, where: str) -> bytes:
    data = fp.read(n)
    if len(data) != n:
        raise FormatError(f"{where}: data ends {n - len(data)} bytes early; the file is truncated or damaged")
    return data


def read_npy_data(
    fp: IO[bytes],
    hdr: NpyHeader,
    dtype: np.dtype | None = None,
    check: Callable[[np.ndarray, int], None] | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """The array whose header `hdr` was just read from `fp`, decompressed `CHUNK_BYTES` at a time.

    Parameters
    ----------
    fp : the stream, positioned after the header.
    hdr : its header (already checked against the declared size).
    dtype : the array's dtype in memory (default: the file's, in native byte order); each chunk is assigned
        into it, so a narrowing cast must be made safe by `check`.
    check : called as ``check(rows, first_row)`` on each chunk of whole rows, in native byte order, before it
        is kept; the first call comes before the output is allocated. A Fortran-order array's rows are not
        contiguous: it is read whole in its own dtype and checked once before being cast.
    out : a contiguous array of ``hdr.size`` elements to fill instead (e.g. a slice of a larger array).

    Returns
    -------
    The array, of shape ``hdr.shape`` (a view of `out` when given). A `FormatError` when the data is short,
    or when the declared size cannot be allocated (`MemoryError`).
    """
    native = hdr.dtype.newbyteorder("=")
    out_dtype = native if dtype is None else np.dtype(dtype)
    if out is not None:
        out = out.reshape(-1)  # a view: the caller's array is filled
        assert out.size == hdr.size, "out must have the array's size"
    if check is not None and hdr.fortran and len(hdr.shape) > 1:
        whole = read_npy_data(fp, hdr)
        check(whole, 0)
        if out is None:
            return whole.astype(out_dtype)
        out.reshape(hdr.shape)[...] = whole
        return out.reshape(hdr.shape)
    row_items = math.prod(hdr.shape[1:])
    step = max(1, CHUNK_BYTES // max(1, row_items * hdr.dtype.itemsize)) * max(1, row_items)
    done = 0
    while out is None or done < hdr.size:
        n = min(step, hdr.size - done)
        part = np.frombuffer(_read_exactly(fp, n * hdr.dtype.itemsize, hdr.where), dtype=hdr.dtype)
        part = part.astype(native, copy=False)
        if check is not None and n:
            check(part.reshape(-1, *hdr.shape[1:]), done // max(1, row_items))
        if out is None:
            try:
                out = np.empty(hdr.size, dtype=out_dtype)
            except MemoryError:
                gib = hdr.size * out_dtype.itemsize / 2**30
                raise FormatError(
                    f"{hdr.where}: declares {hdr.describe()} ({gib:.1f} GiB in memory), more than this machine "
                    f"can allocate; read it on a larger machine or split the trace"
                ) from None
        out[done : done + n] = part
        done += n
    if fp.read(1):
        raise FormatError(f"{hdr.where}: holds more data than its header declares; the file is damaged")
    return out.reshape(hdr.shape, order="F" if hdr.fortran else "C")


def _check_member(info: zipfile.ZipInfo, file_size: int, where: str) -> None:
    """Refuse a member whose declared sizes cannot come from the bytes in the file (before reading it)."""
    if info.flag_bits & 0x1:
        raise FormatError(f"{where}: the member is encrypted; save the arrays with numpy.savez")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise FormatError(
            f"{where}: compression method {info.compress_type} is not stored or deflate (what numpy.savez "
            f"writes); save the arrays with numpy.savez or savez_compressed"
        )
    if info.header_offset + info.compress_size > file_size:
        raise FormatError(
            f"{where}: declares {info.compress_size} compressed bytes at offset {info.header_offset} but the file "
            f"has {file_size} bytes; the file is truncated or damaged"
        )
    ratio = 1 if info.compress_type == zipfile.ZIP_STORED else DEFLATE_MAX_RATIO
    if info.file_size > info.compress_size * ratio + (1 << 16 if ratio > 1 else 0):
        raise FormatError(
            f"{where}: declares {info.file_size} bytes uncompressed from {info.compress_size} compressed bytes, "
            f"more than {'a stored member holds' if ratio == 1 else 'deflate can expand (1032:1)'}; "
            f"the file is damaged or a decompression bomb"
        )


class NpzArchive:
    """An open `.npz` whose members are read header first and data in bounded chunks (a context manager).

    ``keys`` : the `.npy` members' names without the suffix, in file order. `header(key)` reads and checks
    one header; `load(key, ...)` its data (see `read_npy_data`).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self._size = self.path.stat().st_size
            self._zf = zipfile.ZipFile(self.path)
        except ZIP_ERRORS as exc:
            raise FormatError(f"{self.path}: not a readable .npz file ({brief(exc)}); check the file") from None
        self._infos: dict[str, zipfile.ZipInfo] = {}
        for info in self._zf.infolist():
            if info.filename.endswith(".npy"):
                if info.filename[:-4] in self._infos:
                    self._zf.close()
                    raise FormatError(f"{self.path}: holds two members named {info.filename!r}; the file is damaged")
                self._infos[info.filename[:-4]] = info
        self._headers: dict[str, NpyHeader] = {}

    @property
    def keys(self) -> list[str]:
        return list(self._infos)

    def __enter__(self) -> NpzArchive:
        return self

    def __exit__(self, *exc: object) -> None:
        self._zf.close()

    def _where(self, key: str) -> str:
        return f"{self.path} ({key})"

    def header(self, key: str) -> NpyHeader:
        """The checked header of member `key` (its declared size must match shape x itemsize exactly)."""
        if key not in self._headers:
            info, where = self._infos[key], self._where(key)
            _check_member(info, self._size, where)
            try:
                with self._zf.open(info) as fp:
                    hdr = read_npy_header(fp, where)
            except MoescopeError:
                raise
            except ZIP_ERRORS as exc:
                raise FormatError(f"{where}: cannot be read ({brief(exc)}); the file is damaged") from None
            if info.file_size != hdr.offset + hdr.nbytes:
                raise FormatError(
                    f"{where}: header declares {hdr.describe()} ({hdr.nbytes} bytes) but the member holds "
                    f"{info.file_size - hdr.offset} bytes of data; the file is truncated or damaged"
                )
            self._headers[key] = hdr
        return self._headers[key]

    def load(
        self,
        key: str,
        dtype: np.dtype | None = None,
        check: Callable[[np.ndarray, int], None] | None = None,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Member `key`'s array, read in bounded chunks (see `read_npy_data`)."""
        hdr = self.header(key)
        try:
            with self._zf.open(self._infos[key]) as fp:
                _read_exactly(fp, hdr.offset, hdr.where)
                return read_npy_data(fp, hdr, dtype, check, out)
        except MoescopeError:  # a FormatError or TraceError is a ValueError too: keep its message
            raise
        except ZIP_ERRORS as exc:
            raise FormatError(f"{hdr.where}: cannot be decompressed ({brief(exc)}); the file is damaged") from None


def open_npy(fp: IO[bytes], path: Path) -> NpyHeader:
    """Read and check the header of the plain `.npy` file open as `fp` against the file's real size."""
    hdr = read_npy_header(fp, str(path))
    size = path.stat().st_size
    if size != hdr.offset + hdr.nbytes:
        raise FormatError(
            f"{path}: header declares {hdr.describe()} ({hdr.nbytes} bytes) but the file holds "
            f"{size - hdr.offset} bytes of data; the file is truncated or damaged"
        )
    return hdr


def load_npy(path: Path, what: str) -> np.ndarray:
    """A whole plain-number `.npy` file (e.g. an expert map), read with the checks of `open_npy`."""
    try:
        with path.open("rb") as fp:
            hdr = open_npy(fp, path)
            if hdr.dtype.kind not in NUMERIC_KINDS:
                raise FormatError(f"{what} {path} holds dtype {hdr.dtype}, expected numbers")
            return read_npy_data(fp, hdr)
    except OSError as exc:  # not ZIP_ERRORS: a plain file
        raise FormatError(f"{what} {path} cannot be read ({brief(exc)}); check the file") from None


# ----------------------------------------------------------------------------------------------------------
# the trace format


def _has_experts_key(path: Path) -> bool:
    if path.suffix.lower() != ".npz" or not path.is_file():
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            return "experts.npy" in zf.namelist()
    except ZIP_ERRORS:
        return False


def _labels_from_task_starts(task_starts: Any, seq_starts: np.ndarray, path: Path) -> np.ndarray:
    if not isinstance(task_starts, dict) or not task_starts:
        raise FormatError(f"{path}: meta task_starts must be a mapping label -> first token, got {short(task_starts)}")
    firsts_of = {k: json_int(v, f"{path}: meta task_starts[{k!r}]") for k, v in task_starts.items()}
    items = sorted(firsts_of.items(), key=lambda kv: kv[1])
    firsts = np.asarray([v for _, v in items], dtype=np.int64)
    if firsts[0] != 0 or not np.all(np.isin(firsts, seq_starts)):
        raise FormatError(
            f"{path}: meta task_starts {short(dict(items))} must start at token 0 and at sequence starts; "
            f"fix the meta or drop task_starts"
        )
    names = np.asarray([k for k, _ in items], dtype=str)
    return names[np.searchsorted(firsts, seq_starts, side="right") - 1]


def _read_meta(npz: NpzArchive) -> dict[str, Any]:
    """The meta JSON object ({} when absent), its size bounded by `META_MAX_BYTES` before decompressing."""
    if "meta" not in npz.keys:
        return {}
    hdr = npz.header("meta")
    if hdr.dtype.kind != "U" or hdr.size != 1 or hdr.nbytes > META_MAX_BYTES:
        raise FormatError(
            f"{hdr.where}: 'meta' has {hdr.describe()}, expected one JSON string of at most {META_MAX_BYTES} "
            f"bytes; fix or remove it"
        )
    meta = parse_json(str(npz.load("meta").reshape(-1)[0]), f"{npz.path}: 'meta'")
    if not isinstance(meta, dict):
        raise FormatError(f"{npz.path}: 'meta' must be a JSON object, got {type(meta).__name__}")
    check_meta_strings(meta, f"{npz.path}: meta")
    return meta


def _check_headers(npz: NpzArchive, n_experts: int) -> dict[str, NpyHeader]:
    """The headers of the arrays a trace uses, checked against experts' ``[tokens, layers, k]`` before any
    data is read: every other array's size is then bounded by experts'."""
    ex = npz.header("experts")
    if len(ex.shape) != 3 or ex.dtype.kind not in INT_KINDS:
        raise FormatError(
            f"{ex.where}: experts has {ex.describe()}, expected [tokens, layers, k] integers; fix the writer"
        )
    if ex.fortran:  # its rows are not contiguous, so it could not be validated chunk by chunk
        raise FormatError(
            f"{ex.where}: experts is stored in Fortran order; save np.ascontiguousarray(experts) (C order)"
        )
    n_tok, n_lay, k = ex.shape
    if n_lay * k > MAX_IDS_PER_TOKEN:
        raise FormatError(
            f"{ex.where}: experts declares {n_lay} layers x k {k} = {n_lay * k} ids per token, over the "
            f"{MAX_IDS_PER_TOKEN} a model could have; the header is damaged"
        )
    out = {"experts": ex}

    def want(name: str, kinds: str, ok: bool, expected: str) -> None:
        hdr = npz.header(name)
        if hdr.dtype.kind not in kinds or not ok(hdr):
            raise FormatError(f"{hdr.where}: {name} has {hdr.describe()}, expected {expected}; fix the writer")
        out[name] = hdr

    if "weights" in npz.keys:
        want("weights", "iuf", lambda h: h.shape == ex.shape, f"numbers of the experts' shape {ex.shape}")
    if "seq_starts" in npz.keys:
        want("seq_starts", "iuf", lambda h: len(h.shape) == 1 and h.size <= n_tok, f"[<= {n_tok}] integers")
    if "seq_labels" in npz.keys:
        n_seq = out["seq_starts"].size if "seq_starts" in out else min(n_tok, 1)
        want(
            "seq_labels",
            "U",
            lambda h: h.shape == (n_seq,) and h.dtype.itemsize <= 4 * MAX_LABEL_CHARS,
            f"[{n_seq}] strings of at most {MAX_LABEL_CHARS} characters (one label per sequence)",
        )
    per_token = n_lay * max(n_experts, n_lay * k)  # one id per (layer, expert) or per (layer, later layer, slot)
    for name, extra in EXTRAS.items():
        if name in npz.keys:
            want(
                name,
                "iuf",
                lambda h, e=extra: (
                    len(h.shape) == e.ndim
                    and h.shape[0] == n_tok
                    and (not e.layered or h.shape[1] == n_lay)
                    and (not e.per_k or h.shape[-1] == k)
                    and math.prod(h.shape[1:]) <= per_token
                ),
                f"{extra.shape} numbers with {n_tok} tokens"
                + (f" and {n_lay} layers" if extra.layered else "")
                + (f" and k = {k}" if extra.per_k else ""),
            )
    return out


def _n_experts(options: ImportOptions, meta: dict[str, Any], path: Path) -> int:
    if options.n_experts is not None:
        n = options.n_experts
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_EXPERTS:
            raise UsageError(f"--n-experts is {short(n)}, expected an integer in 1..{MAX_EXPERTS}")
        return int(n)
    if meta.get("n_experts") is None:
        raise FormatError(f"{path}: meta has no 'n_experts'; pass --n-experts (routed experts per layer)")
    return json_int(meta["n_experts"], f"{path}: meta n_experts", 1, MAX_EXPERTS)


@register_reader(
    "npz",
    description="moescope .npz trace (experts, weights, seq_starts, seq_labels, meta JSON)",
    detect=_has_experts_key,
    options=("n_experts", "model", "phase"),
)
def read_npz(path: Path, options: ImportOptions) -> RoutingTrace:
    """Read a moescope `.npz` trace (see the module docstring for the arrays and the reading bounds). The
    phase is the meta's, or ``options.phase`` when the meta records none (a differing one is refused), else
    prefill."""
    with NpzArchive(path) as npz:
        if "experts" not in npz.keys:
            raise FormatError(
                f"{path}: no 'experts' array (found {short(npz.keys)}); this is not a moescope .npz trace"
            )
        meta = _read_meta(npz)
        n_experts = _n_experts(options, meta, path)
        headers = _check_headers(npz, n_experts)
        k = headers["experts"].shape[2]
        if "top_k" in meta and json_int(meta["top_k"], f"{path}: meta top_k") != k:
            raise FormatError(
                f"{path}: meta says top_k={meta['top_k']} but experts has shape {headers['experts'].shape}; "
                f"fix the meta"
            )

        def check(rows: np.ndarray, first: int) -> None:  # ids in 0..n_experts-1 fit the int16 kept
            validate_experts(rows, n_experts, token_offset=first)

        arrays = {"experts": npz.load("experts", np.dtype(np.int16), check)}
        arrays.update((name, npz.load(name)) for name in headers if name != "experts")
    seq_starts = arrays.get("seq_starts")
    labels = arrays.get("seq_labels")
    if labels is None and "task_starts" in meta and seq_starts is not None:
        labels = _labels_from_task_starts(meta["task_starts"], np.asarray(seq_starts), path)
    layer_ids = meta.get("layer_ids")
    if layer_ids is not None:
        if not isinstance(layer_ids, list):
            raise FormatError(f"{path}: meta layer_ids is {short(layer_ids)}, expected a list of layer indices")
        layer_ids = [json_int(x, f"{path}: meta layer_ids entry") for x in layer_ids]
    # task_starts is now carried by the labels (and would go stale after slicing)
    info = {k: v for k, v in meta.items() if k not in STRUCTURAL_KEYS and k != "task_starts"}
    tmeta = TraceMeta.from_dict(info)
    if options.model:
        tmeta = tmeta.replace(model=options.model)
    if tmeta.source is None:
        tmeta = tmeta.replace(source=str(path))
    return RoutingTrace(
        arrays["experts"],
        n_experts,
        weights=arrays.get("weights"),
        seq_starts=seq_starts,
        seq_labels=labels,
        layer_ids=layer_ids,
        phase=_phase(meta.get("phase"), options.phase, path),
        meta=tmeta,
        extras={name: arrays[name] for name in EXTRAS if name in arrays},
    )


def _phase(recorded: Any, asked: str | None, path: Path) -> str:
    if recorded is not None and recorded not in PHASES:
        raise FormatError(f"{path}: meta phase is {short(recorded)}, expected one of {', '.join(PHASES)} or null")
    if recorded is not None and asked is not None and recorded != asked:
        raise FormatError(f"{path}: meta says phase {recorded!r} but --phase {asked} was given; drop --phase")
    return str(recorded or asked or "prefill")


@register_writer("npz", description="moescope .npz trace", suffixes=(".npz",), accepts=("trace",))
def write_npz(trace: RoutingTrace, path: Path, overwrite: bool = False) -> Path:
    """Write `trace` as a compressed `.npz` (atomically)."""
    meta = {
        "n_experts": trace.n_experts,
        "top_k": trace.top_k,
        "n_layers": trace.n_layers,
        "layer_ids": trace.layer_ids.tolist(),
        "phase": trace.phase,
        **trace.meta.to_dict(),
    }
    arrays: dict[str, np.ndarray] = {"experts": trace.experts, "seq_starts": trace.seq_starts}
    if trace.weights is not None:
        arrays["weights"] = trace.weights
    if trace.seq_labels is not None:
        arrays["seq_labels"] = trace.seq_labels
    arrays.update(trace.extras)
    arrays["meta"] = np.asarray(json.dumps(meta))
    with _atomic.atomic_path(path, overwrite, suffix=".npz") as tmp:
        np.savez_compressed(tmp, **arrays)
    return path
