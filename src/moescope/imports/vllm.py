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
``npz`` reader handles it). Arrays are read with the bounded reader of `moescope.imports.npz`: headers
are checked (3-D integers, declared sizes matching the bytes in the file) before any data, object arrays are
refused, and ids are range-checked chunk by chunk (-1..32767) before they are kept as int16.

    >>> trace = read_input("prompts.npz", "vllm", ImportOptions(n_experts=128))
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moescope.errors import FormatError, MoescopeError, UsageError
from moescope.imports.npz import INT_KINDS, NpyHeader, NpzArchive, open_npy, read_npy_data
from moescope.imports.registry import ImportOptions, brief, moe_layer_index, register_reader
from moescope.trace import EXPERT_DTYPE, MAX_EXPERTS, RoutingTrace

SUFFIXES = (".npy", ".npz")
CACHED = -1  # vLLM's id for a token whose routing was not computed (prefix cache hit)
EXPERT_ID_MAX = MAX_EXPERTS - 1  # the largest id the trace's int16 holds (and the data model allows)


def _looks_like_routing(hdr: NpyHeader) -> bool:
    return len(hdr.shape) == 3 and hdr.dtype.kind in INT_KINDS


def detect_vllm(path: Path) -> bool:
    """A ``.npy``/``.npz`` of only 3-D integer arrays, and no ``experts`` array (moescope's own npz)."""
    if not path.is_file() or path.suffix.lower() not in SUFFIXES:
        return False
    try:
        if path.suffix.lower() == ".npy":
            with path.open("rb") as fp:
                return _looks_like_routing(open_npy(fp, path))
        with NpzArchive(path) as npz:
            keys = npz.keys
            return bool(keys) and "experts" not in keys and all(_looks_like_routing(npz.header(k)) for k in keys)
    except (MoescopeError, OSError):
        return False


def _check(hdr: NpyHeader, key: str, first: NpyHeader | None, first_key: str | None, path: Path) -> None:
    """Refuse, from its header alone, an array that is not ``[tokens, layers, top_k]`` integers like the first."""
    if not _looks_like_routing(hdr):
        raise FormatError(
            f"{path}: array {key!r} has shape {hdr.shape} and dtype {hdr.dtype}, expected "
            f"[tokens, layers, top_k] integers as vLLM returns in routed_experts"
        )
    if first is not None and hdr.shape[1:] != first.shape[1:]:
        raise FormatError(
            f"{path}: array {key!r} has [layers, top_k] {hdr.shape[1:]} but {first_key!r} has "
            f"{first.shape[1:]}; every sequence must come from the same model"
        )


def _range_check(key: str, path: Path):
    """A chunk check: ids in -1..32767, so that keeping them as int16 (the trace's dtype) loses nothing."""

    def check(rows: np.ndarray, first: int) -> None:
        bad = (rows < CACHED) | (rows > EXPERT_ID_MAX)
        if bad.any():
            t, layer, s = (int(v) for v in np.argwhere(bad)[0])
            raise FormatError(
                f"{path}: array {key!r} token {first + t}, layer {layer}, slot {s} holds {int(rows[t, layer, s])}; "
                f"expected expert ids 0..{EXPERT_ID_MAX} or {CACHED} (prefix-cached): the file is damaged"
            )

    return check


def _arrays(path: Path) -> tuple[list[str], list[int], np.ndarray]:
    """Every array's name and token count, and their ids concatenated ``[tokens, layers, k] int16``.

    Headers are read and checked (3-D integers, one [layers, top_k], declared sizes matching the file) before
    any data; the ids are range-checked chunk by chunk as they are read into one preallocated array.
    """
    if path.suffix.lower() not in SUFFIXES:
        raise FormatError(f"{path} is not a .npy or .npz file; save vLLM's routed_experts arrays with numpy")
    try:
        if path.suffix.lower() == ".npy":
            with path.open("rb") as fp:
                hdr = open_npy(fp, path)
                _check(hdr, path.name, None, None, path)
                return [path.name], [hdr.shape[0]], read_npy_data(fp, hdr, EXPERT_DTYPE, _range_check(path.name, path))
        with NpzArchive(path) as npz:
            keys = npz.keys
            if not keys:
                raise FormatError(f"{path} holds no arrays; save one routed_experts array per sequence")
            headers = [npz.header(k) for k in keys]
            for key, hdr in zip(keys, headers, strict=True):
                _check(hdr, key, headers[0], keys[0], path)
            lens = [h.shape[0] for h in headers]
            try:
                out = np.empty((sum(lens), *headers[0].shape[1:]), dtype=EXPERT_DTYPE)
            except MemoryError:
                raise FormatError(
                    f"{path}: its arrays declare {sum(lens)} tokens x {headers[0].shape[1:]}, more than this "
                    f"machine can allocate; read it on a larger machine or split the file"
                ) from None
            for key, lo, n in zip(keys, np.cumsum([0, *lens[:-1]]).tolist(), lens, strict=True):
                npz.load(key, EXPERT_DTYPE, _range_check(key, path), out=out[lo : lo + n])
            return keys, lens, out
    except OSError as exc:
        raise FormatError(f"{path} cannot be read ({brief(exc)}); check the file") from None


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
    names, lens, ids = _arrays(Path(path))  # ids: [tokens, layers, k] int16
    n_layers, k = ids.shape[1:]
    if k >= 2:
        dense = ((ids == 0) | (ids == CACHED)).all(axis=(0, 2)) & (ids == 0).any(axis=(0, 2))
    else:  # with one slot, a layer always choosing expert 0 cannot be told from a dense one
        dense = np.zeros(n_layers, dtype=bool)
    kept = moe_layer_index(dense, options.moe_layers, str(path))
    ids = ids[:, kept]
    cached = (ids == CACHED).any(axis=(1, 2))
    seq_of_token = np.repeat(np.arange(len(names)), lens)
    kept_lens = np.bincount(seq_of_token[~cached], minlength=len(names))
    if not kept_lens.any():
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
        seq_starts=np.concatenate([[0], np.cumsum(kept_lens[kept_lens > 0])[:-1]]),
        layer_ids=kept,
        phase=options.phase or "prefill",
        meta=meta,
    )
