"""Read SGLang's expert-distribution recorder outputs: CSV counts, per-token dumps and stat dumps.

Three readers, each detected from the file name alone (nothing is loaded to detect):

- ``sglang-csv``: ``expert_distribution_rank<r>_timestamp<t>.csv`` (older recorder; header
  ``layer_id,expert_id,count``, non-zero rows only) -> `ExpertCounts` summed over files (ranks).
- ``sglang-pt``: ``expert_distribution_recorder_<time>_<rank>.pt`` (``per_token`` mode) -> `RoutingTrace`.
  A record's ``topk_ids_of_layer [layers, tokens, 8]`` holds *physical* ids (-1: unused slot, dense
  layer), mapped through ``last_physical_to_logical_map [layers, physical]`` (EPLB replicas: row
  ``[0 1 2 3 4 5 6 7 0 3]`` says slots 8 and 9 serve experts 0 and 3). Prefill: EXTEND records
  (ForwardMode 1), a sequence per ``extend_seq_lens`` entry. Decode: DECODE records (2) of batch size 1,
  chained while the position grows by 1. Other records are skipped and counted in the metadata.
- ``sglang-stat``: ``expert_distribution_recorder_<time>.pt`` (``stat`` mode, rank 0) -> `ExpertCounts`
  of ``logical_count [steps, layers, experts]`` summed over steps.

Dense layers are dropped unless ``moe_layers`` lists the layers to keep (``layer_ids`` index the dump's
layer axis). Dumps are loaded with ``torch.load(weights_only=True)`` only: pickled objects are refused,
never run; and only when every member of the archive is stored uncompressed (as ``torch.save`` writes
it), so loading takes no more memory than the file's size. Every value is checked before it is used:
ids and counts against their ranges before any narrowing cast or int64 arithmetic, record fields for
their type. Not read: gate weights (not recorded), per_pass dumps.

    >>> trace = read_input("dumps/", "sglang-pt", ImportOptions(phase="prefill"))
"""

from __future__ import annotations

import collections
import pickle
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from moescope.errors import FormatError, TraceError, UsageError, require
from moescope.imports.npz import load_npy
from moescope.imports.registry import (
    INT64_MAX,
    ImportOptions,
    brief,
    moe_layer_index,
    parse_json,
    register_reader,
    short,
)
from moescope.trace import EXPERT_DTYPE, MAX_EXPERTS, ExpertCounts, RoutingTrace

CSV_HEADER = "layer_id,expert_id,count"
PER_TOKEN_NAME = re.compile(r"expert_distribution_recorder_\d+(?:\.\d+)?_\d+\.pt")
STAT_NAME = re.compile(r"expert_distribution_recorder_\d+(?:\.\d+)?\.pt")
FORWARD_MODES = {1: "EXTEND", 2: "DECODE", 3: "MIXED", 4: "IDLE"}
_PHASE_MODE = {"prefill": 1, "decode": 2}
_INT = re.compile(r"[0-9]{1,18}")  # ASCII digits, at most 18: always inside int64
MAX_POSITION = 1 << 62  # token positions: any real one is far below; +1 and differences cannot overflow int64
_TORCH_ERRORS = (
    RuntimeError,  # torch's zip reader and storage checks
    AssertionError,  # torch's persistent_load asserts on a damaged storage reference
    EOFError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    OverflowError,
    UnicodeDecodeError,
    zipfile.BadZipFile,
    OSError,
)
"""What `torch.load` raises on a damaged archive or pickle stream (its weights-only unpickler reports bad
opcodes and arguments as these, besides `pickle.UnpicklingError`)."""


def _has_header(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8") as fh:
            return fh.readline().rstrip("\r\n") == CSV_HEADER
    except (OSError, UnicodeDecodeError):
        return False


def detect_csv(path: Path) -> bool:
    """A ``.csv`` starting with SGLang's header, or a folder of only such files."""
    files = list(path.glob("*.csv")) if path.is_dir() else [path] if path.suffix.lower() == ".csv" else []
    return bool(files) and all(_has_header(f) for f in files)


def _by_name(pattern: re.Pattern[str]) -> Callable[[Path], bool]:
    """A detector: a file named like `pattern`, or a folder holding one (nothing is loaded)."""

    def detect(path: Path) -> bool:
        try:
            return any(pattern.fullmatch(p.name) for p in (path.iterdir() if path.is_dir() else [path]))
        except OSError:
            return False

    return detect


def _files(path: Path, pattern: re.Pattern[str], what: str) -> list[Path]:
    """`path` itself, or the files of folder `path` whose names match, in name order."""
    try:
        files = sorted(p for p in path.iterdir() if pattern.fullmatch(p.name)) if path.is_dir() else [path]
    except OSError as exc:
        raise FormatError(f"folder {path} cannot be listed ({brief(exc)}); check the path") from None
    if not files:
        raise FormatError(f"folder {path} holds no {what} files; check the path or the --from format")
    return files


def _load(path: Path) -> dict[str, Any]:
    """A torch dump as a dict, loaded with ``weights_only=True`` (never an arbitrary unpickle)."""
    torch = require("torch", "hf", "reading SGLang .pt dumps")
    _check_archive(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        raise FormatError(
            f"{path} holds a pickled Python object ({found[1] if found else 'not plain data'}) "
            f"that a weights-only load refuses; moescope never unpickles code: save plain data"
        ) from None
    except _TORCH_ERRORS as exc:
        raise FormatError(f"{path} is a damaged torch file ({brief(exc)}); re-dump") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{path} holds a {type(obj).__name__}, expected SGLang's dict dump")
    return obj


def _check_archive(path: Path) -> None:
    """Refuse a .pt archive that `torch.save` would not write: a compressed or encrypted member, or one whose
    declared size exceeds the file. Loading then takes at most the file's size in memory."""
    try:  # not zipfile.is_zipfile: it raises BadZipFile itself on some damaged archives
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
        raise FormatError(
            f"{path} is not a torch.save file (not a readable zip archive: {brief(exc)}); give an SGLang .pt dump"
        ) from None
    size = path.stat().st_size
    for info in infos:
        if (
            info.compress_type != zipfile.ZIP_STORED
            or info.flag_bits & 0x1
            or info.file_size != info.compress_size
            or info.header_offset + info.compress_size > size
        ):
            raise FormatError(
                f"{path} member {short(info.filename)} is compressed, encrypted or larger than the file "
                f"({info.file_size} bytes declared, {info.compress_size} stored); torch.save writes neither: re-dump"
            )


def _int_array(x: Any, ndim: int, what: str) -> np.ndarray:
    """`x` (a tensor, array or nested list) as an ``ndim``-D integer array in native byte order."""
    try:
        arr = x.numpy() if hasattr(x, "numpy") else np.asarray(x)
    except (TypeError, ValueError, RuntimeError) as exc:  # ragged lists, bfloat16 or sparse tensors...
        raise FormatError(f"{what} is not an integer array ({brief(exc)}); the dump is damaged") from None
    if isinstance(arr, np.ndarray) and arr.ndim == ndim and not arr.size:
        return arr.astype(np.int64)  # np.asarray([]) is float64
    if not isinstance(arr, np.ndarray) or arr.ndim != ndim or arr.dtype.kind not in "iu":
        shape, dtype = getattr(arr, "shape", "?"), getattr(arr, "dtype", type(arr).__name__)
        raise FormatError(f"{what} has shape {shape} and dtype {dtype}, expected {ndim}-D integers")
    return arr if arr.dtype.isnative else arr.astype(arr.dtype.newbyteorder("="))


def _check_range(arr: np.ndarray, lo: int, hi: int, what: str, fix: str) -> np.ndarray:
    """`arr` as int64 once every value is in ``lo..hi`` (checked before converting: uint64 would wrap)."""
    if arr.size and (arr.min() < lo or arr.max() > hi):
        bad = arr.min() if arr.min() < lo else arr.max()
        raise FormatError(f"{what} holds {int(bad)}, expected {lo}..{hi}; {fix}")
    return arr.astype(np.int64)


def _check_map(m: Any, what: str) -> np.ndarray:
    """A physical-to-logical map as ``[layers, physical] int64`` of logical ids that fit the trace's int16."""
    m = _int_array(m, 2, what)
    if not m.size:
        raise FormatError(f"{what} has shape {m.shape}: no layers or physical slots; give the model's real map")
    return _check_range(m, 0, MAX_EXPERTS - 1, what, "logical expert ids are 0..n_experts-1 (at most 32768)")


def _check_sum(total: np.ndarray, what: str) -> None:
    """Refuse counts whose sum (computed by the caller in float64: approximate, but it cannot wrap) could
    overflow int64."""
    if total.size and float(total.max()) >= 2.0**62:
        raise FormatError(
            f"{what} sums to about {float(total.max()):.3g} selections, beyond int64; the dump is damaged"
        )


def _meta(kind: str, path: Path, options: ImportOptions, **extra: Any) -> dict[str, Any]:
    return {"source": f"{kind}:{path}", "model": options.model, **extra}


def _parse_csv(path: Path, n_experts: int) -> np.ndarray:
    """One CSV -> ``[rows, 3] int64`` (layer_id, expert_id, count); bad rows named by file:line."""
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise FormatError(f"{path} is not UTF-8 text; expected an SGLang expert distribution CSV") from None
    except OSError as exc:  # a folder named *.csv, a permission error...
        raise FormatError(f"{path} cannot be read ({brief(exc)}); expected an SGLang CSV file") from None
    if not lines or lines[0] != CSV_HEADER:
        head = lines[0] if lines else ""
        raise FormatError(f"{path}:1: header is {head!r}, expected {CSV_HEADER!r}; give SGLang's CSV")
    rows = np.zeros((len(lines) - 1, 3), dtype=np.int64)
    for i, line in enumerate(lines[1:], 2):
        fields = line.split(",")
        if len(fields) != 3 or not all(_INT.fullmatch(x.strip()) for x in fields):
            raise FormatError(
                f"{path}:{i}: {short(line)} is not layer_id,expert_id,count as integers >= 0 (of at most 18 "
                f"digits); delete "
                f"or fix the row (SGLang writes layer 'UNKNOWN' for experts chosen outside a MoE layer)"
            )
        rows[i - 2] = [int(x) for x in fields]
        if rows[i - 2, 1] >= n_experts:
            raise TraceError(
                f"{path}:{i}: expert id {rows[i - 2, 1]} but --n-experts is {n_experts}; pass the model's "
                f"real expert count"
            )
    _, first, n = np.unique(rows[:, :2], axis=0, return_index=True, return_counts=True)
    if (n > 1).any():
        pair = rows[first[n > 1][0], :2]
        at = np.flatnonzero((rows[:, :2] == pair).all(axis=1))[:2] + 2
        raise FormatError(
            f"{path}:{at[1]}: layer {pair[0]}, expert {pair[1]} repeats line {at[0]}; SGLang writes "
            f"each pair once, so the file was edited or concatenated: keep one row per pair"
        )
    return rows


@register_reader(
    "sglang-csv",
    description="SGLang expert_distribution_rank<r>_timestamp<t>.csv counts (a file or a folder of ranks)",
    detect=detect_csv,
    options=("n_experts", "model"),
    produces="counts",
)
def read_sglang_csv(path: Path, options: ImportOptions) -> ExpertCounts:
    """Sum SGLang CSV counts over files into ``values [layers, experts] int64``.

    Parameters
    ----------
    path : one CSV, or a folder whose ``*.csv`` files (one per rank) are summed.
    options : ``n_experts`` (required: unused experts have no rows), ``model``.

    Returns
    -------
    ExpertCounts with ``layer_ids`` = the distinct ``layer_id`` values present, ascending.
    """
    if options.n_experts is None:
        raise UsageError("SGLang CSVs list only the experts that were used; pass --n-experts (e.g. 64)")
    n = options.n_experts
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_EXPERTS:
        raise UsageError(f"--n-experts is {short(n)}, expected an integer in 1..{MAX_EXPERTS}")
    n = int(n)
    files = sorted(path.glob("*.csv")) if path.is_dir() else [path]
    rows = np.concatenate([_parse_csv(f, n) for f in files] or [np.zeros((0, 3), np.int64)])
    if not rows.size:
        raise FormatError(f"{path} holds no count rows (or no .csv files); record traffic before dumping")
    if sum(rows[:, 2].tolist()) > INT64_MAX:  # exact: each count < 10**18, but their sum may not be
        raise FormatError(f"{path}: the counts sum beyond the 64-bit range; the files are damaged")
    layer_ids, row_of = np.unique(rows[:, 0], return_inverse=True)
    values = np.zeros((layer_ids.size, n), dtype=np.int64)
    np.add.at(values, (row_of, rows[:, 1]), rows[:, 2])
    return ExpertCounts(values, n, layer_ids=layer_ids, meta=_meta("sglang-csv", path, options))


def _load_map(path: Path) -> np.ndarray:
    """``--phys-to-log`` file (.npy or .json) -> ``[layers, physical] int64``."""
    if not path.is_file():
        raise UsageError(f"--phys-to-log {str(path)!r} does not exist; give a [layers, physical] .npy/.json")
    what = f"--phys-to-log {path}"
    if path.suffix.lower() == ".json":
        try:
            data = parse_json(path.read_bytes(), what)
        except OSError as exc:
            raise FormatError(f"{what} cannot be read ({brief(exc)}); give an int array file") from None
        if not isinstance(data, list) or not all(
            isinstance(row, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in row) for row in data
        ):
            raise FormatError(f"{what} must be a JSON list of per-layer lists of integers")
    else:
        data = load_npy(path, "--phys-to-log")
    return _check_map(data, what)


def _routing(rec: Any, m: np.ndarray, where: str, phase: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A record -> (logical ids ``[layers, tokens, 8]`` via map ``m``, sequence starts, positions)."""
    if not isinstance(rec, dict) or "topk_ids_of_layer" not in rec:
        raise FormatError(f"{where} has no topk_ids_of_layer; record with recorder mode per_token")
    topk = _int_array(rec["topk_ids_of_layer"], 3, f"{where} topk_ids_of_layer")
    if topk.shape[0] != m.shape[0]:
        raise FormatError(f"{where} has {topk.shape[0]} layers but the expert map has {m.shape[0]}")
    if (bad := (topk < -1) | (topk >= m.shape[1])).any():
        raise FormatError(
            f"{where} holds physical expert id {int(topk[bad][0])}, expected -1..{m.shape[1] - 1} "
            f"(the map's physical slots); pass the matching --phys-to-log"
        )
    n_tok, starts = topk.shape[1], np.zeros(topk.shape[1], dtype=bool)
    if phase == "prefill":
        lens = rec.get("extend_seq_lens")  # None outside extend passes
        lens = np.zeros(0, np.int64) if lens is None else _int_array(lens, 1, f"{where} extend_seq_lens")
        # each length in 0..n_tok before summing: a hostile one near 2**63 would wrap the int64 sum
        lens = _check_range(lens, 0, n_tok, f"{where} extend_seq_lens", "each is a sequence's token count")
        if lens.sum() != n_tok:
            raise FormatError(f"{where}: extend_seq_lens {short(lens.tolist())} do not sum to its {n_tok} tokens")
        starts[np.cumsum(lens[lens > 0])[:-1]] = True
        starts[:1] = True
    elif n_tok > 1:
        raise FormatError(
            f"{where} is a decode batch of {n_tok} requests; per-request order cannot be "
            f"recovered from batched decode dumps: record with batch size 1 or use --phase prefill"
        )
    logical = np.where(topk >= 0, m[np.arange(m.shape[0])[:, None, None], np.maximum(topk, 0)], -1)
    positions = rec.get("positions")
    if positions is None:
        positions = np.zeros(n_tok, dtype=np.int64)
    positions = _check_range(
        _int_array(positions, 1, f"{where} positions"), 0, MAX_POSITION, f"{where} positions", "the dump is damaged"
    )
    if positions.size != n_tok:
        raise FormatError(f"{where} has {positions.size} positions for {n_tok} tokens; the dump is damaged")
    return logical.astype(EXPERT_DTYPE), starts, positions  # the map's ids were checked to be 0..32767


def _mode(rec: Any) -> int | None:
    """A record's forward_mode when it is a plain integer (anything else is skipped as unknown)."""
    mode = rec.get("forward_mode") if isinstance(rec, dict) else None
    return int(mode) if isinstance(mode, (int, np.integer)) and not isinstance(mode, bool) else None


def _fingerprint(rec: dict[str, Any], where: str) -> tuple[int | None, bytes]:
    """``(forward_pass_id, input ids as bytes)``: equal on tensor-parallel ranks that recorded the same pass."""
    fpid, ids = rec.get("forward_pass_id"), rec.get("input_ids")
    if fpid is not None and (isinstance(fpid, bool) or not isinstance(fpid, (int, np.integer))):
        raise FormatError(f"{where} forward_pass_id is {short(fpid)}, expected an integer; the dump is damaged")
    ids = b"" if ids is None else _int_array(ids, 1, f"{where} input_ids").astype(np.int64).tobytes()
    return None if fpid is None else int(fpid), ids


@register_reader(
    "sglang-pt",
    description="SGLang per_token expert distribution dumps expert_distribution_recorder_<time>_<rank>.pt",
    detect=_by_name(PER_TOKEN_NAME),
    options=("n_experts", "moe_layers", "phys_to_log", "model", "phase"),
)
def read_sglang_pt(path: Path, options: ImportOptions) -> RoutingTrace:
    """Read per_token dumps (a file, or a folder of one per rank, in name order) into a trace.

    Parameters
    ----------
    path : ``expert_distribution_recorder_<time>_<rank>.pt`` or a folder of them.
    options : ``phase`` (default prefill), ``phys_to_log`` (default: each file's map), ``n_experts``
        (default: largest logical id + 1), ``moe_layers`` (default: non-dense layers), ``model``.

    Returns
    -------
    RoutingTrace with ``experts [tokens, layers, k] int16`` in logical ids, no weights.
    """
    phase = options.phase or "prefill"
    if phase not in _PHASE_MODE:
        raise UsageError(f"--phase {phase!r} is not one of {', '.join(_PHASE_MODE)}; pick one")
    user_map = None if options.phys_to_log is None else _load_map(Path(options.phys_to_log))
    parts, starts, positions, skipped, seen, n_max = [], [], [], collections.Counter(), {}, 0
    for f in _files(path, PER_TOKEN_NAME, "expert_distribution_recorder_<time>_<rank>.pt"):
        dump = _load(f)
        if "logical_count" in dump or not isinstance(dump.get("records"), list):
            raise FormatError(f"{f} is not a per_token dump (stat-mode? read it with --from sglang-stat)")
        m = (
            user_map
            if user_map is not None
            else _check_map(dump.get("last_physical_to_logical_map"), f"{f} last_physical_to_logical_map")
        )
        n_max = max(n_max, int(m.max()) + 1)
        fingerprint, brk = [], True  # a new file (rank) or a prefill in between starts a new sequence
        for i, rec in enumerate(dump["records"]):
            if (mode := _mode(rec)) != _PHASE_MODE[phase]:
                raw = rec.get("forward_mode") if isinstance(rec, dict) else None
                skipped[FORWARD_MODES.get(mode) or f"mode {short(raw)}"] += 1
                brk |= mode in (1, 3)
                continue
            topk, first, pos = _routing(rec, m, f"{f} record {i}", phase)
            if parts and topk.shape[::2] != parts[0].shape[::2]:
                raise FormatError(
                    f"{f} record {i} has [layers, slots] {topk.shape[::2]} but earlier records have "
                    f"{parts[0].shape[::2]}; every dump must come from the same model and map"
                )
            if topk.shape[1]:
                first[0] |= brk
                brk = False
                parts.append(topk)
                starts.append(first)
                positions.append(pos)
                fingerprint.append(_fingerprint(rec, f"{f} record {i}"))
        if (key := tuple(fingerprint)) and key in seen:  # tensor-parallel ranks record identical routing
            raise FormatError(f"{f} and {seen[key]} hold the same tokens (tensor-parallel ranks): read one")
        seen[key] = f.name
    if not parts:
        raise FormatError(f"{path} has no {phase} tokens (skipped: {dict(skipped)}); try the other --phase")
    topk = np.concatenate(parts, axis=1)
    kept = moe_layer_index(~(topk != -1).any(axis=(1, 2)), options.moe_layers, str(path))
    n_valid = (topk[kept] != -1).sum(axis=2)  # [layers, tokens]; routed slots must be left-aligned
    k = int(n_valid.max())
    if (bad := np.argwhere((n_valid != k) | (topk[kept, :, : max(k, 1)] == -1).any(axis=2))).size:
        layer, tok = (int(v) for v in bad[0])
        raise FormatError(
            f"token {tok} at layer {int(kept[layer])} has {int(n_valid[layer, tok])} routed "
            f"experts but others have {k}; top-k must be constant: pass --moe-layers to keep only MoE layers"
        )
    first = np.concatenate(starts)
    if phase == "decode":
        first[1:] |= np.diff(np.concatenate(positions)) != 1
    dropped = sorted(set(range(topk.shape[0])) - set(kept.tolist()))
    return RoutingTrace(
        topk[kept, :, :k].transpose(1, 0, 2),
        options.n_experts if options.n_experts is not None else n_max,
        seq_starts=np.flatnonzero(first),
        layer_ids=kept,
        phase=phase,
        meta=_meta("sglang-pt", path, options, skipped_records=dict(skipped), dropped_dense_layers=dropped),
    )


@register_reader(
    "sglang-stat",
    description="SGLang stat-mode expert distribution dumps expert_distribution_recorder_<time>.pt",
    detect=_by_name(STAT_NAME),
    options=("moe_layers", "model"),
    produces="counts",
)
def read_sglang_stat(path: Path, options: ImportOptions) -> ExpertCounts:
    """Sum stat-mode ``logical_count [steps, layers, experts]`` over steps and files.

    Parameters
    ----------
    path : ``expert_distribution_recorder_<time>.pt`` or a folder of them.
    options : ``moe_layers`` (default: layers with any count), ``model``.

    Returns
    -------
    ExpertCounts ``values [layers, experts] int64``; ``n_experts`` from the tensor shape.
    """
    total = None
    for f in _files(path, STAT_NAME, "expert_distribution_recorder_<time>.pt"):
        dump = _load(f)
        if "logical_count" not in dump:
            raise FormatError(f"{f} has no logical_count (a per_token dump? read it with --from sglang-pt)")
        what = f"{f} logical_count"
        counts = _check_range(_int_array(dump["logical_count"], 3, what), 0, INT64_MAX, what, "counts are >= 0")
        if total is not None and counts.shape[1:] != total.shape:
            raise FormatError(f"{f} has [layers, experts] {counts.shape[1:]}, others {total.shape}; one model")
        exact = counts.sum(axis=0, dtype=np.float64) + (0 if total is None else total)  # float: cannot wrap
        _check_sum(exact, f"{path} logical_count")
        counts = counts.sum(axis=0, dtype=np.int64)
        total = counts if total is None else total + counts
    kept = moe_layer_index(~total.any(axis=1), options.moe_layers, str(path))
    return ExpertCounts(total[kept], layer_ids=kept, meta=_meta("sglang-stat", path, options))
