"""moescope's `.npz` trace format (also the format of ``shared/realdata/esft-dsv2lite/trace.npz``).

Arrays: ``experts [tokens, layers, k] int``, optional ``weights [tokens, layers, k] float16|float32``,
``seq_starts [sequences] int64``, optional ``seq_labels [sequences] str``, the optional per-token arrays
of `moescope.trace.EXTRAS` (``token_ids``, ``lookahead``, ``candidates``, ``candidate_probs``) under
their names, and ``meta``: a JSON string with ``n_experts`` (required unless given as an option),
``layer_ids``, ``phase``, ``model``/``source``/... .
A ``task_starts`` mapping in meta (label -> first token of that task's sequences) labels the sequences
when ``seq_labels`` is absent. Read with ``allow_pickle=False``: nothing in the file is ever unpickled.

    >>> trace = read_npz(Path("trace.npz"), ImportOptions())
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from moescope import _atomic
from moescope.errors import FormatError
from moescope.imports.registry import ImportOptions, register_reader, register_writer
from moescope.trace import EXTRAS, RoutingTrace, TraceMeta

STRUCTURAL_KEYS = ("n_experts", "top_k", "n_layers", "layer_ids", "phase")


def _has_experts_key(path: Path) -> bool:
    if path.suffix.lower() != ".npz" or not path.is_file():
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            return "experts.npy" in zf.namelist()
    except zipfile.BadZipFile:
        return False


def _labels_from_task_starts(task_starts: Any, seq_starts: np.ndarray, path: Path) -> np.ndarray:
    if not isinstance(task_starts, dict) or not task_starts:
        raise FormatError(f"{path}: meta task_starts must be a mapping label -> first token, got {task_starts!r}")
    items = sorted(task_starts.items(), key=lambda kv: kv[1])
    firsts = np.asarray([int(v) for _, v in items], dtype=np.int64)
    if firsts[0] != 0 or not np.all(np.isin(firsts, seq_starts)):
        raise FormatError(
            f"{path}: meta task_starts {dict(items)} must start at token 0 and at sequence starts; "
            f"fix the meta or drop task_starts"
        )
    names = np.asarray([k for k, _ in items], dtype=str)
    return names[np.searchsorted(firsts, seq_starts, side="right") - 1]


@register_reader(
    "npz",
    description="moescope .npz trace (experts, weights, seq_starts, seq_labels, meta JSON)",
    detect=_has_experts_key,
    options=("n_experts", "model", "phase"),
)
def read_npz(path: Path, options: ImportOptions) -> RoutingTrace:
    """Read a moescope `.npz` trace (see the module docstring for the arrays). The phase is the meta's, or
    ``options.phase`` when the meta records none (a differing one is refused), else prefill."""
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise FormatError(f"{path}: not a readable .npz file ({exc}); check the file") from None
    with z:
        if "experts" not in z.files:
            raise FormatError(f"{path}: no 'experts' array (found {z.files}); this is not a moescope .npz trace")
        meta: dict[str, Any] = {}
        if "meta" in z.files:
            try:
                meta = json.loads(str(z["meta"]))
            except ValueError as exc:
                raise FormatError(f"{path}: 'meta' is not valid JSON ({exc}); fix or remove it") from None
            if not isinstance(meta, dict):
                raise FormatError(f"{path}: 'meta' must be a JSON object, got {type(meta).__name__}")
        n_experts = options.n_experts or meta.get("n_experts")
        if n_experts is None:
            raise FormatError(f"{path}: meta has no 'n_experts'; pass --n-experts (routed experts per layer)")
        try:
            wanted = ("experts", "weights", "seq_starts", "seq_labels", *EXTRAS)
            arrays = {k: z[k] for k in wanted if k in z.files}
        except ValueError as exc:  # object arrays need pickle
            raise FormatError(f"{path}: holds an array that needs unpickling ({exc}); refusing to load it") from None
    seq_starts = arrays.get("seq_starts")
    labels = arrays.get("seq_labels")
    if labels is None and "task_starts" in meta and seq_starts is not None:
        labels = _labels_from_task_starts(meta["task_starts"], np.asarray(seq_starts), path)
    if "top_k" in meta and int(meta["top_k"]) != arrays["experts"].shape[-1]:
        raise FormatError(
            f"{path}: meta says top_k={meta['top_k']} but experts has shape {arrays['experts'].shape}; fix the meta"
        )
    # task_starts is now carried by the labels (and would go stale after slicing)
    info = {k: v for k, v in meta.items() if k not in STRUCTURAL_KEYS and k != "task_starts"}
    tmeta = TraceMeta.from_dict(info)
    if options.model:
        tmeta = tmeta.replace(model=options.model)
    if tmeta.source is None:
        tmeta = tmeta.replace(source=str(path))
    return RoutingTrace(
        arrays["experts"],
        int(n_experts),
        weights=arrays.get("weights"),
        seq_starts=seq_starts,
        seq_labels=labels,
        layer_ids=meta.get("layer_ids"),
        phase=_phase(meta.get("phase"), options.phase, path),
        meta=tmeta,
        extras={name: arrays[name] for name in EXTRAS if name in arrays},
    )


def _phase(recorded: Any, asked: str | None, path: Path) -> str:
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
