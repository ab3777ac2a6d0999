"""Read and write DeepSeek ESFT routing logs: folders of ``expert_weights_<layer>.txt`` files.

ESFT (github.com/deepseek-ai/ESFT) logs each MoE layer to its own file, ``<layer>`` being the absolute
decoder layer index (1..26 for DeepSeek-V2-Lite; layer 0 is dense). Each line is one sequence: its
tokens' expert ids flattened token-major (``t0s0 .. t0s(k-1) t1s0 ..``), tab-separated, a double tab,
then the gate weights in the same order as ``str(round(w, 4))``. Line i of every layer file is the
same sequence. Layouts (detected): ``<dir>/expert_weights_<L>.txt``; ``<dir>/rank_<r>/...`` (ranks
concatenated in rank order); ``<dir>/<task>/...`` of either (ESFT's ``results/expert_scores/``: each
sequence labelled with its task, tasks sorted). Rank folders never sit beside task folders, so a folder
whose subfolders of logs are not all ``rank_<r>`` is a task layout: a task named ``rank_0`` is read as a
task, never mistaken for a rank while its siblings are dropped. A folder mixing layer files with
subfolders of logs is refused rather than half read.

The files record neither top-k nor the expert count, so both must be given. Weights stay float32, so
text -> trace -> text is byte-identical; the writer makes one task folder per label. Not handled:
ESFT's derived per-task expert scores, and token ids (ESFT does not log them).

    >>> trace = read_input("results/expert_scores/", "esft", ImportOptions(n_experts=64, top_k=6))
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from moescope import _atomic
from moescope.errors import FormatError, UsageError
from moescope.imports.registry import INT64_MAX, Data, ImportOptions, brief, register_reader, register_writer, short
from moescope.trace import MAX_EXPERTS, RoutingTrace

LAYER_FILE = "expert_weights_{layer}.txt"
_LAYER_RE = re.compile(r"expert_weights_([0-9]+)\.txt")  # ASCII digits: \d would take other scripts' digits
_RANK_RE = re.compile(r"rank_([0-9]+)")
_MAX_INDEX_DIGITS = 9  # layer and rank indices: far above any model, far below int64 and int()'s digit limit
_EXAMPLE = "e.g. --n-experts 64 --top-k 6 for DeepSeek-V2-Lite"


def _entries(folder: Path) -> list[Path]:
    """The entries of `folder`, sorted; a `FormatError` when it cannot be listed."""
    try:
        return sorted(folder.iterdir())
    except OSError as exc:
        raise FormatError(f"{folder} cannot be listed ({brief(exc)}); check the folder") from None


def _has_layer_files(folder: Path) -> bool:
    """Whether `folder` holds entries named ``expert_weights_<L>.txt`` (for detection: never raises)."""
    try:
        return any(_LAYER_RE.fullmatch(p.name) for p in folder.iterdir())
    except OSError:
        return False


def _index(match: re.Match[str], path: Path) -> int:
    if len(match[1]) > _MAX_INDEX_DIGITS:
        raise FormatError(f"{path}: index {short(match[1])} has over {_MAX_INDEX_DIGITS} digits; rename it")
    return int(match[1])


def _layer_files(folder: Path) -> dict[int, Path]:
    """``{layer index: path}`` of the ``expert_weights_<L>.txt`` entries directly in `folder`, by layer.

    Two names of one layer (``_3`` and ``_03``) are refused; an entry that is not a readable file is
    reported when it is read.
    """
    found: dict[int, Path] = {}
    for p in _entries(folder):
        if m := _LAYER_RE.fullmatch(p.name):
            layer = _index(m, p)
            if layer in found:
                raise FormatError(f"{p} and {found[layer].name} both name layer {layer}; keep one file per layer")
            found[layer] = p
    return dict(sorted(found.items()))


def _is_rank(path: Path) -> bool:
    return bool(_RANK_RE.fullmatch(path.name)) and path.is_dir() and _has_layer_files(path)


def _is_unit(folder: Path) -> bool:
    """Whether `folder` holds layer files directly or in ``rank_<r>`` subfolders (never raises)."""
    if _has_layer_files(folder):
        return True
    try:
        return any(_is_rank(p) for p in folder.iterdir())
    except OSError:
        return False


def _log_dirs(folder: Path) -> list[Path]:
    """Subfolders of `folder` holding logs (directly or in rank folders), hidden ones skipped, sorted."""
    return [p for p in _entries(folder) if p.is_dir() and not p.name.startswith(".") and _is_unit(p)]


def _rank_order(folder: Path) -> list[Path]:
    """The ``rank_<r>`` folders of `folder`, in numeric rank order (``rank_2`` before ``rank_10``)."""
    ranks = [p for p in _log_dirs(folder) if _is_rank(p)]
    return sorted(ranks, key=lambda p: (_index(_RANK_RE.fullmatch(p.name), p), p.name))


def _layout(root: Path) -> tuple[str, list[Path]]:
    """``("files", [root])``, ``("ranks", rank folders)`` or ``("tasks", task folders)``, or a `FormatError`.

    Subfolders of logs all named ``rank_<r>`` are ranks; any other name among them makes every one a task.
    """
    subs = _log_dirs(root)
    if _has_layer_files(root):
        if subs:
            names = short([p.name for p in subs])
            raise FormatError(
                f"{root} holds both expert_weights_<L>.txt files and subfolders of logs ({names}); keep one "
                f"layout: move the files into their own task or rank folder"
            )
        return "files", [root]
    if subs and all(_is_rank(p) for p in subs):
        return "ranks", _rank_order(root)
    return "tasks", subs


def detect_esft(path: Path) -> bool:
    """True for a folder in one of the accepted layouts (reads no file contents)."""
    try:
        subs = (p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        return path.is_dir() and (_is_unit(path) or any(_is_unit(p) for p in subs))
    except OSError:
        return False


def _numbers(parts: list[str], dtype: type, path: Path, what: str) -> np.ndarray:
    """Parse tab-separated `parts` (one per line) as one flat array; name file:line of a bad field.

    Each field is converted on its own (``np.array(fields, dtype)``): no fixed-width string array, whose
    size (fields x longest field) one long field would multiply.
    """
    try:
        return np.array("\t".join(parts).split("\t"), dtype=dtype)
    except (ValueError, OverflowError):
        pass
    convert = int if dtype is np.int64 else float
    for i, part in enumerate(parts, 1):
        for field in part.split("\t"):
            try:
                value = convert(field)
            except ValueError:
                raise FormatError(
                    f"{path}:{i}: {what} {short(field)} is not a number; "
                    f"each line must be tab-separated integer expert ids, a double tab, then tab-separated gate "
                    f"weights"
                ) from None
            if convert is int and not -INT64_MAX - 1 <= value <= INT64_MAX:
                raise FormatError(f"{path}:{i}: {what} {short(field)} is out of the 64-bit range; the file is damaged")
    raise FormatError(f"{path}: cannot parse the {what}s; check the file is an ESFT expert_weights log")


def _parse_file(path: Path, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One layer file -> ``(ids [n*k] int64, weights [n*k] float32, ids per line [lines] int64)``."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(f"{path} is not UTF-8 text; expected an ESFT expert_weights log") from None
    except OSError as exc:  # a folder named like a layer file, a permission error...
        raise FormatError(f"{path} cannot be read ({brief(exc)}); expected an ESFT expert_weights log file") from None
    lines = text.removesuffix("\n").split("\n") if text else []
    if not lines:
        raise FormatError(f"{path} is empty; every layer file needs one line per sequence")
    split = [line.split("\t\t") for line in lines]
    for i, halves in enumerate(split, 1):
        if len(halves) != 2:
            raise FormatError(
                f"{path}:{i}: found {len(halves) - 1} double tabs, expected exactly one between the expert "
                f"ids and the gate weights; check the file is an unedited ESFT log"
            )
    id_parts, w_parts = (list(col) for col in zip(*split, strict=True))
    n_ids = np.array([p.count("\t") + 1 for p in id_parts], dtype=np.int64)
    n_w = np.array([p.count("\t") + 1 for p in w_parts], dtype=np.int64)
    if (bad := np.flatnonzero(n_ids % k)).size:
        i = int(bad[0])
        raise FormatError(
            f"{path}:{i + 1}: {n_ids[i]} expert ids is not a multiple of top-k {k}; pass the model's real "
            f"--top-k ({_EXAMPLE})"
        )
    if (bad := np.flatnonzero(n_w != n_ids)).size:
        i = int(bad[0])
        raise FormatError(
            f"{path}:{i + 1}: {n_ids[i]} expert ids but {n_w[i]} gate weights; each selected expert needs one weight"
        )
    ids = _numbers(id_parts, np.int64, path, "expert id")
    weights = _numbers(w_parts, np.float64, path, "gate weight")
    if (bad := np.flatnonzero(~np.isfinite(weights) | (weights < 0))).size:
        line = int(np.searchsorted(np.cumsum(n_ids), bad[0], side="right")) + 1
        raise FormatError(
            f"{path}:{line}: gate weight {float(weights[bad[0]])!r} is negative or not finite; ESFT logs "
            f"post-softmax weights, so the file is damaged"
        )
    return ids, weights.astype(np.float32), n_ids


class _Part(NamedTuple):
    """The routing read from one folder (or several, concatenated)."""

    experts: np.ndarray  # [tokens, layers, k] int64
    weights: np.ndarray  # [tokens, layers, k] float32
    seq_lens: np.ndarray  # [sequences] int64
    layers: list[int]  # the <L> of the file names, ascending


def _concat(folders: list[Path], parts: list[_Part]) -> _Part:
    for folder, part in zip(folders, parts, strict=True):
        if part.layers != parts[0].layers:
            raise FormatError(
                f"{folder} has layers {part.layers} but {folders[0]} has {parts[0].layers}; every rank and "
                f"task folder must log the same layers"
            )
    return _Part(*(np.concatenate([p[i] for p in parts]) for i in range(3)), parts[0].layers)


def _read_layers(folder: Path, k: int) -> _Part:
    """A folder of layer files (line i of each is sequence i) -> its routing."""
    files = _layer_files(folder)
    experts, weights, first, first_lens = [], [], None, None
    for path in files.values():
        ids, w, n_ids = _parse_file(path, k)
        if first_lens is None:
            first, first_lens = path, n_ids
        elif n_ids.size != first_lens.size:
            raise FormatError(
                f"{path} has {n_ids.size} lines but {first.name} has {first_lens.size}; line i of every "
                f"layer file is the same sequence, so the files must come from one complete run"
            )
        elif (mismatch := np.flatnonzero(n_ids != first_lens)).size:
            i = int(mismatch[0])
            raise FormatError(
                f"{path}:{i + 1} has {n_ids[i]} expert ids but {first.name}:{i + 1} has {first_lens[i]}; "
                f"line i of every layer file must be the same sequence"
            )
        experts.append(ids.reshape(-1, k))
        weights.append(w.reshape(-1, k))
    return _Part(np.stack(experts, axis=1), np.stack(weights, axis=1), first_lens // k, list(files))


def _read_unit(folder: Path, k: int) -> _Part:
    """Layer files directly in `folder`, or its ``rank_<r>`` folders concatenated in rank order."""
    kind, folders = _layout(folder)
    if kind == "files":
        return _read_layers(folder, k)
    if kind == "tasks":
        raise FormatError(
            f"{folder} holds subfolders of logs that are not all rank_<r> ({short([p.name for p in folders])}); "
            f"a task folder holds layer files or rank_<r> folders only"
        )
    return _concat(folders, [_read_layers(r, k) for r in folders])


def _check_options(options: ImportOptions) -> tuple[int, int]:
    missing = [f"--{n.replace('_', '-')}" for n in ("n_experts", "top_k") if getattr(options, n) is None]
    if missing:
        raise UsageError(
            f"ESFT logs record neither the expert count nor top-k; pass {' and '.join(missing)} ({_EXAMPLE})"
        )
    k = options.top_k
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_EXPERTS:
        raise UsageError(f"--top-k is {short(k)}, expected an integer in 1..{MAX_EXPERTS} ({_EXAMPLE})")
    return int(k), options.n_experts


@register_reader(
    "esft",
    description="DeepSeek ESFT routing logs: folder of expert_weights_<layer>.txt (rank_<r>/, task folders)",
    detect=detect_esft,
    options=("n_experts", "top_k", "model"),
)
def read_esft(path: Path, options: ImportOptions) -> RoutingTrace:
    """Read an ESFT log folder into a trace (one sequence per line, task folders become labels).

    Parameters
    ----------
    path : folder in one of the layouts of the module docstring.
    options : ``n_experts`` and ``top_k`` (required), ``model`` (recorded in the metadata).

    Returns
    -------
    RoutingTrace with ``experts [tokens, layers, k] int16``, ``weights [tokens, layers, k] float32``,
    ``layer_ids`` = the ``<L>`` of the file names, ``seq_labels`` = task names (task layout only).
    """
    k, n_experts = _check_options(options)
    root = Path(path)
    kind, units = _layout(root) if root.is_dir() else ("tasks", [])
    if not units:
        raise FormatError(
            f"{root} is not a folder holding expert_weights_<L>.txt files (directly, in rank_<r>/ or in task "
            f"folders); give the ESFT log folder"
        )
    if kind != "tasks":
        units = [root]
    parts = [_read_unit(u, k) for u in units]
    whole = _concat(units, parts)
    labels = None
    if kind == "tasks":
        labels = np.repeat([u.name for u in units], [p.seq_lens.size for p in parts])
    return RoutingTrace(
        whole.experts,
        n_experts,
        weights=whole.weights,
        seq_starts=np.concatenate([[0], np.cumsum(whole.seq_lens)[:-1]]),
        seq_labels=labels,
        layer_ids=whole.layers,
        phase="prefill",
        meta={"source": f"esft:{root}", "model": options.model},
    )


def _write_layers(folder: Path, trace: RoutingTrace, seqs: Sequence[int]) -> None:
    starts, ends = trace.seq_starts, trace.seq_ends
    for j, layer in enumerate(trace.layer_ids.tolist()):
        lines = []
        for s in seqs:
            tokens = slice(int(starts[s]), int(ends[s]))
            ids = "\t".join(map(str, trace.experts[tokens, j].ravel().tolist()))
            weights = "\t".join(str(round(w, 4)) for w in trace.weights[tokens, j].ravel().tolist())
            lines.append(f"{ids}\t\t{weights}\n")
        (folder / LAYER_FILE.format(layer=layer)).write_text("".join(lines), encoding="utf-8", newline="\n")


@register_writer("esft", description="DeepSeek ESFT routing logs (a folder)", suffixes=(), accepts=("trace",))
def write_esft(data: Data, path: Path, overwrite: bool = False) -> Path:
    """Write a trace as an ESFT log folder (one task folder per label), atomically.

    Parameters
    ----------
    data : RoutingTrace with gate weights ``[tokens, layers, k]``.
    path : the folder to create.
    overwrite : replace an existing `path`.

    Returns
    -------
    The written folder. Sequences sharing a label are written together in trace order, so a trace whose
    labels are not sorted and contiguous reads back in a different sequence order.
    """
    if not isinstance(data, RoutingTrace):
        raise UsageError("ESFT output needs a per-token trace, not counts; write counts JSON instead")
    if data.weights is None:
        raise UsageError("ESFT logs need gate weights but this trace has none; write zarr or npz instead")
    if data.n_tokens == 0:
        raise UsageError("the trace has no tokens; ESFT logs need at least one sequence")
    groups: dict[str | None, list[int]] = {}
    labels = [None] * data.n_sequences if data.seq_labels is None else data.seq_labels.tolist()
    for s, label in enumerate(labels):
        groups.setdefault(label, []).append(s)
    for label in groups.keys() - {None}:
        if not label or label[0] == "." or any(c in label for c in "/\\\0") or _RANK_RE.fullmatch(label):
            raise UsageError(
                f"sequence label {label!r} cannot be an ESFT task folder name (empty, hidden, a path, or "
                f"rank_<r>); relabel the sequences first"
            )
    with _atomic.atomic_path(path, overwrite) as tmp:
        tmp.mkdir()
        for label, seqs in groups.items():
            folder = tmp if label is None else tmp / label
            folder.mkdir(exist_ok=True)
            _write_layers(folder, data, seqs)
    return Path(path)
