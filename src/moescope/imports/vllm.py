"""Read vLLM routed-experts arrays (``enable_return_routed_experts``) saved as ``.npy`` or ``.npz``.

vLLM returns per request ``prompt_routed_experts`` (prompt tokens: the prefill phase) and
``routed_experts`` (generated tokens: decode), each ``[tokens, layers, top_k]`` int16/int32 expert ids,
without gate weights. A ``.npy`` holds one sequence; an ``.npz`` one sequence per array, in the file's
order (array names are not kept). Older vLLM indexes the layer axis by absolute layer, so dense layers
read all 0: with top_k >= 2 such layers are dropped (a MoE layer never picks expert 0 twice) unless
``moe_layers`` lists the layers to keep; ``layer_ids`` index the array's layer axis. Prefix-cached
tokens read -1 (no routing was computed): they are dropped, and a sequence left empty disappears.
Both drops are recorded in the metadata. The arrays record neither the expert count (pass
``n_experts``) nor the phase (``phase``, default prefill).

Not read: vLLM's JSON API responses, and moescope's own ``.npz`` (it has an ``experts`` array; the
``npz`` reader handles it). Arrays are loaded with ``allow_pickle=False``: object arrays are refused.

    >>> trace = read_input("prompts.npz", "vllm", ImportOptions(n_experts=128))
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import IO

import numpy as np

from moescope.errors import FormatError, UsageError
from moescope.imports.registry import ImportOptions, moe_layer_index, register_reader
from moescope.trace import RoutingTrace

SUFFIXES = (".npy", ".npz")
CACHED = -1  # vLLM's id for a token whose routing was not computed (prefix cache hit)
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
_BAD_FILE = (ValueError, OSError, EOFError, zipfile.BadZipFile)


def _looks_like_routing(fp: IO[bytes]) -> bool:
    """Whether the .npy stream `fp` holds a 3-D integer array (reads the header only)."""
    read = _HEADER_READERS.get(np.lib.format.read_magic(fp))
    if read is None:
        return False
    shape, _, dtype = read(fp)
    return len(shape) == 3 and np.issubdtype(dtype, np.integer)


def detect_vllm(path: Path) -> bool:
    """A ``.npy``/``.npz`` of only 3-D integer arrays, and no ``experts`` array (moescope's own npz)."""
    if not path.is_file() or path.suffix.lower() not in SUFFIXES:
        return False
    try:
        if path.suffix.lower() == ".npy":
            with path.open("rb") as fp:
                return _looks_like_routing(fp)
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if not names or "experts.npy" in names:
                return False
            for name in names:
                with zf.open(name) as fp:
                    if not _looks_like_routing(fp):
                        return False
            return True
    except _BAD_FILE:
        return False


def _arrays(path: Path) -> list[tuple[str, np.ndarray]]:
    """``[(name, array)]`` in file order, loaded without pickle; each checked to be 3-D integers."""
    if path.suffix.lower() not in SUFFIXES:
        raise FormatError(f"{path} is not a .npy or .npz file; save vLLM's routed_experts arrays with numpy")
    name = path.name
    try:
        if path.suffix.lower() == ".npy":
            out = [(path.name, np.load(path, allow_pickle=False))]
        else:
            out = []
            with np.load(path, allow_pickle=False) as z:
                for name in z.files:
                    out.append((name, z[name]))
    except _BAD_FILE as exc:
        raise FormatError(
            f"{path} ({name}) cannot be loaded as plain numpy arrays ({exc}); save integer arrays, not "
            f"Python objects (object arrays need pickle, which moescope never uses)"
        ) from None
    for key, arr in out:
        if arr.ndim != 3 or not np.issubdtype(arr.dtype, np.integer):
            raise FormatError(
                f"{path}: array {key!r} has shape {arr.shape} and dtype {arr.dtype}, expected "
                f"[tokens, layers, top_k] integers as vLLM returns in routed_experts"
            )
        if arr.shape[1:] != out[0][1].shape[1:]:
            raise FormatError(
                f"{path}: array {key!r} has [layers, top_k] {arr.shape[1:]} but {out[0][0]!r} has "
                f"{out[0][1].shape[1:]}; every sequence must come from the same model"
            )
    if not out:
        raise FormatError(f"{path} holds no arrays; save one routed_experts array per sequence")
    return out


@register_reader(
    "vllm",
    description="vLLM routed_experts / prompt_routed_experts arrays [tokens, layers, k] (.npy, .npz)",
    detect=detect_vllm,
    options=("n_experts", "moe_layers", "model", "phase"),
)
def read_vllm(path: Path, options: ImportOptions) -> RoutingTrace:
    """Read vLLM routed-experts arrays into a trace, one sequence per array.

    Parameters
    ----------
    path : ``.npy`` (one ``[tokens, layers, top_k]`` array) or ``.npz`` (one array per sequence).
    options : ``n_experts`` (required), ``moe_layers`` (default: drop all-zero dense layers),
        ``phase`` (default prefill), ``model``.

    Returns
    -------
    RoutingTrace with ``experts [tokens, layers, k] int16``, no weights; metadata
    ``dropped_dense_layers`` (layer-axis indices) and ``dropped_cached_tokens``.
    """
    if options.n_experts is None:
        raise UsageError(
            "vLLM routed-experts arrays do not record the expert count; pass --n-experts (the model "
            "config's num_experts, e.g. 128 for Qwen3-30B-A3B)"
        )
    arrays = _arrays(Path(path))
    ids = np.concatenate([a for _, a in arrays])  # [tokens, layers, k]
    n_layers, k = ids.shape[1:]
    if k >= 2:
        dense = ((ids == 0) | (ids == CACHED)).all(axis=(0, 2)) & (ids == 0).any(axis=(0, 2))
    else:  # with one slot, a layer always choosing expert 0 cannot be told from a dense one
        dense = np.zeros(n_layers, dtype=bool)
    kept = moe_layer_index(dense, options.moe_layers, str(path))
    ids = ids[:, kept]
    cached = (ids == CACHED).any(axis=(1, 2))
    seq_of_token = np.repeat(np.arange(len(arrays)), [a.shape[0] for _, a in arrays])
    lens = np.bincount(seq_of_token[~cached], minlength=len(arrays))
    if not lens.any():
        raise FormatError(f"{path} has no token with routing in every kept layer (all prefix-cached?)")
    meta = {
        "source": f"vllm:{path}",
        "model": options.model,
        "dropped_dense_layers": sorted(set(range(n_layers)) - set(kept.tolist())),
        "dropped_cached_tokens": int(cached.sum()),
    }
    return RoutingTrace(
        ids[~cached],
        options.n_experts,
        seq_starts=np.concatenate([[0], np.cumsum(lens[lens > 0])[:-1]]),
        layer_ids=kept,
        phase=options.phase or "prefill",
        meta=meta,
    )
