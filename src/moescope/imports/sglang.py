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
never run. Not read: gate weights (not recorded), per_pass dumps.

    >>> trace = read_input("dumps/", "sglang-pt", ImportOptions(phase="prefill"))
"""

from __future__ import annotations

import collections
import json
import pickle
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from moescope.errors import FormatError, TraceError, UsageError, require
from moescope.imports.registry import ImportOptions, moe_layer_index, register_reader
from moescope.trace import ExpertCounts, RoutingTrace

CSV_HEADER = "layer_id,expert_id,count"
PER_TOKEN_NAME = re.compile(r"expert_distribution_recorder_\d+(?:\.\d+)?_\d+\.pt")
STAT_NAME = re.compile(r"expert_distribution_recorder_\d+(?:\.\d+)?\.pt")
FORWARD_MODES = {1: "EXTEND", 2: "DECODE", 3: "MIXED", 4: "IDLE"}
_PHASE_MODE = {"prefill": 1, "decode": 2}
_INT = re.compile(r"[0-9]+")


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
    return lambda path: any(pattern.fullmatch(p.name) for p in (path.iterdir() if path.is_dir() else [path]))


def _files(path: Path, pattern: re.Pattern[str], what: str) -> list[Path]:
    """`path` itself, or the files of folder `path` whose names match, in name order."""
    files = sorted(p for p in path.iterdir() if pattern.fullmatch(p.name)) if path.is_dir() else [path]
    if not files:
        raise FormatError(f"folder {path} holds no {what} files; check the path or the --from format")
    return files


def _load(path: Path) -> dict[str, Any]:
    """A torch dump as a dict, loaded with ``weights_only=True`` (never an arbitrary unpickle)."""
    torch = require("torch", "hf", "reading SGLang .pt dumps")
    if not zipfile.is_zipfile(path):
        raise FormatError(f"{path} is not a torch.save file (not a zip archive); give an SGLang .pt dump")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        raise FormatError(
            f"{path} holds a pickled Python object ({found[1] if found else 'not plain data'}) "
            f"that a weights-only load refuses; moescope never unpickles code: save plain data"
        ) from None
    except (RuntimeError, EOFError) as exc:
        raise FormatError(f"{path} is a damaged torch file ({str(exc).splitlines()[0]}); re-dump") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{path} holds a {type(obj).__name__}, expected SGLang's dict dump")
    return obj


def _int_array(x: Any, ndim: int, what: str) -> np.ndarray:
    arr = x.numpy() if hasattr(x, "numpy") else np.asarray(x)
    if arr.ndim != ndim or not np.issubdtype(arr.dtype, np.integer):
        raise FormatError(f"{what} has shape {arr.shape} and dtype {arr.dtype}, expected {ndim}-D integers")
    return arr


def _meta(kind: str, path: Path, options: ImportOptions, **extra: Any) -> dict[str, Any]:
    return {"source": f"{kind}:{path}", "model": options.model, **extra}


def _parse_csv(path: Path, n_experts: int) -> np.ndarray:
    """One CSV -> ``[rows, 3] int64`` (layer_id, expert_id, count); bad rows named by file:line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise FormatError(f"{path} is not UTF-8 text; expected an SGLang expert distribution CSV") from None
    if not lines or lines[0] != CSV_HEADER:
        head = lines[0] if lines else ""
        raise FormatError(f"{path}:1: header is {head!r}, expected {CSV_HEADER!r}; give SGLang's CSV")
    rows = np.zeros((len(lines) - 1, 3), dtype=np.int64)
    for i, line in enumerate(lines[1:], 2):
        fields = line.split(",")
        if len(fields) != 3 or not all(_INT.fullmatch(x.strip()) for x in fields):
            raise FormatError(
                f"{path}:{i}: {line!r} is not layer_id,expert_id,count as integers >= 0; delete "
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
    n = int(options.n_experts)
    files = sorted(path.glob("*.csv")) if path.is_dir() else [path]
    rows = np.concatenate([_parse_csv(f, n) for f in files] or [np.zeros((0, 3), np.int64)])
    if not rows.size:
        raise FormatError(f"{path} holds no count rows (or no .csv files); record traffic before dumping")
    layer_ids, row_of = np.unique(rows[:, 0], return_inverse=True)
    values = np.zeros((layer_ids.size, n), dtype=np.int64)
    np.add.at(values, (row_of, rows[:, 1]), rows[:, 2])
    return ExpertCounts(values, n, layer_ids=layer_ids, meta=_meta("sglang-csv", path, options))


def _load_map(path: Path) -> np.ndarray:
    """``--phys-to-log`` file (.npy or .json) -> ``[layers, physical] int64``."""
    if not path.is_file():
        raise UsageError(f"--phys-to-log {str(path)!r} does not exist; give a [layers, physical] .npy/.json")
    try:
        is_json = path.suffix.lower() == ".json"
        data = json.loads(path.read_bytes()) if is_json else np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:  # includes JSONDecodeError
        raise FormatError(f"--phys-to-log {path} cannot be read ({exc}); give an int array file") from None
    m = _int_array(data, 2, f"--phys-to-log {path}")
    if m.size and m.min() < 0:
        raise FormatError(f"--phys-to-log {path} holds {int(m.min())}; logical expert ids are >= 0")
    return m.astype(np.int64)


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
        lens = np.asarray(() if lens is None else lens, dtype=np.int64)
        if lens.sum() != n_tok:
            raise FormatError(f"{where}: extend_seq_lens {lens.tolist()} do not sum to its {n_tok} tokens")
        starts[np.cumsum(lens[lens > 0])[:-1]] = True
        starts[:1] = True
    elif n_tok > 1:
        raise FormatError(
            f"{where} is a decode batch of {n_tok} requests; per-request order cannot be "
            f"recovered from batched decode dumps: record with batch size 1 or use --phase prefill"
        )
    logical = np.where(topk >= 0, m[np.arange(m.shape[0])[:, None, None], np.maximum(topk, 0)], -1)
    positions = np.asarray(rec.get("positions", np.zeros(n_tok)), dtype=np.int64).reshape(-1)
    return logical.astype(np.int16), starts, positions  # logical ids < 32768 (the trace's int16)


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
        m = dump.get("last_physical_to_logical_map") if user_map is None else user_map
        m = _int_array(m, 2, f"{f} last_physical_to_logical_map")
        n_max = max(n_max, int(m.max()) + 1)
        fingerprint, brk = [], True  # a new file (rank) or a prefill in between starts a new sequence
        for i, rec in enumerate(dump["records"]):
            if (mode := rec.get("forward_mode") if isinstance(rec, dict) else None) != _PHASE_MODE[phase]:
                skipped[FORWARD_MODES.get(mode, f"mode {mode}")] += 1
                brk |= mode in (1, 3)
                continue
            topk, first, pos = _routing(rec, m, f"{f} record {i}", phase)
            if topk.shape[1]:
                first[0] |= brk
                brk = False
                parts.append(topk)
                starts.append(first)
                positions.append(pos)
                ids = np.asarray(rec.get("input_ids", ())).tobytes()
                fingerprint.append((rec.get("forward_pass_id"), ids))
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
        counts = _int_array(dump["logical_count"], 3, f"{f} logical_count").sum(axis=0, dtype=np.int64)
        if total is not None and counts.shape != total.shape:
            raise FormatError(f"{f} has [layers, experts] {counts.shape}, others {total.shape}; one model")
        total = counts if total is None else total + counts
    kept = moe_layer_index(~total.any(axis=1), options.moe_layers, str(path))
    return ExpertCounts(total[kept], layer_ids=kept, meta=_meta("sglang-stat", path, options))
