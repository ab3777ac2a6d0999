"""llama.cpp importance matrices (``llama-imatrix`` GGUF output) read as per-expert selection counts.

``llama-imatrix`` (``tools/imatrix/imatrix.cpp``) runs a model over a text and, for every weight it
multiplies, stores two F32 tensors in a GGUF whose ``general.type`` is ``"imatrix"``:

- ``<weight>.in_sum2``: ``[n_mat, n_cols]`` summed squared activations (not read here);
- ``<weight>.counts``: ``[n_mat, 1]`` (GGUF ``ne = [1, n_mat]``) how many activation rows were summed.

For the stacked expert weights of a MoE layer (``blk.N.ffn_{gate,up,down,gate_up}_exps.weight``,
multiplied with ``MUL_MAT_ID``) ``n_mat`` is the number of experts, and ``collect_imatrix`` adds one to
``counts[e]`` for every (token, top-k slot) routed to expert ``e``, in every chunk. So a counts row is
exactly what `ExpertCounts` holds: selections per expert over all tokens of all chunks (each row sums to
``tokens * top_k``). The gate, up and down weights of a layer see the same routed tokens, so their
counts agree; this reader takes the first of `EXPERT_WEIGHTS` present and checks the others against it.
The header keys ``imatrix.chunk_count``, ``imatrix.chunk_size`` and ``imatrix.datasets`` go to the metadata.

Not done here: the activation statistics (``in_sum2``), the legacy ``.dat`` format (it keeps no per-expert
counts), a token count (the file does not record top-k; pass ``top_k`` to have it recorded). Counts are
stored as float32, exact up to 2**24 selections per expert.

    >>> counts = read_input("model.imatrix.gguf", "imatrix", ImportOptions(top_k=8))
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from moescope.errors import FormatError
from moescope.imports.gguf_header import gguf_errors, read_header
from moescope.imports.registry import ImportOptions, register_reader
from moescope.trace import ExpertCounts

GGUF_MAGIC = b"GGUF"
TYPE_KEY = "general.type"
IMATRIX_TYPE = "imatrix"  # gguf.GGUFType.IMATRIX
CHUNK_COUNT, CHUNK_SIZE, DATASETS = "imatrix.chunk_count", "imatrix.chunk_size", "imatrix.datasets"
# Stacked expert weights, in order of preference; all of a layer's must agree.
EXPERT_WEIGHTS = ("ffn_gate_exps", "ffn_up_exps", "ffn_gate_up_exps", "ffn_down_exps")
COUNTS_TENSOR = re.compile(r"^blk\.(\d+)\.(" + "|".join(EXPERT_WEIGHTS) + r")\.weight\.counts$")
FIX = "re-create it with llama-imatrix"


def gguf_type(path: Path) -> str | None:
    """The ``general.type`` of the GGUF at `path` (None when absent or not a string), from the header alone.

    The whole header is walked with reads bounded by the file size (`moescope.imports.gguf_header`), so a file
    that passes can then be parsed by gguf-py without unbounded loops or allocations.

    Raises
    ------
    FormatError : `path` does not start with the GGUF magic, or its header is truncated or corrupt.
    """
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise FormatError(
            f"{str(path)!r} starts with {magic!r}, not the GGUF magic {GGUF_MAGIC!r}; give the .gguf file "
            f"that llama-imatrix wrote (--output-format gguf)"
        )
    kind = read_header(path).values.get(TYPE_KEY)
    return kind if isinstance(kind, str) else None


def _is_imatrix(path: Path) -> bool:
    if path.suffix.lower() != ".gguf" or not path.is_file():
        return False
    try:
        return gguf_type(path) == IMATRIX_TYPE
    except (FormatError, OSError):
        return False


# -- the reader ---------------------------------------------------------------------------------------
def expert_counts(tensors: Mapping[str, np.ndarray], source: str) -> tuple[list[int], np.ndarray]:
    """Per-layer expert counts from an imatrix's ``<weight>.counts`` tensors (a pure function).

    Parameters
    ----------
    tensors : name -> counts array (any shape holding ``n_experts`` values); names not matching
        ``blk.N.ffn_*_exps.weight.counts`` are ignored.
    source : the file, for error messages.

    Returns
    -------
    layer_ids : [layers] the block indices N, ascending.
    values : [layers, experts] int64 selections per expert.

    Raises
    ------
    FormatError : no expert tensors, a single count for all experts, counts that are not whole numbers,
        weights of one layer that disagree, or layers with different expert numbers or totals.
    """
    by_layer: dict[int, dict[str, np.ndarray]] = {}
    for name, data in tensors.items():
        m = COUNTS_TENSOR.match(name)
        if m:
            by_layer.setdefault(int(m.group(1)), {})[m.group(2)] = np.asarray(data, dtype=np.float64).reshape(-1)
    if not by_layer:
        raise FormatError(
            f"{source}: an imatrix without blk.N.ffn_*_exps.weight.counts tensors (a dense model, or one "
            f"whose experts were not reached); there are no per-expert counts to read"
        )
    layer_ids = sorted(by_layer)
    rows = []
    for layer in layer_ids:
        weights = by_layer[layer]
        first = next(w for w in EXPERT_WEIGHTS if w in weights)
        row = weights[first]
        if row.size == 1:
            raise FormatError(
                f"{source}: blk.{layer}.{first} has one count for all experts (an imatrix converted from the "
                f"legacy .dat format, which keeps no per-expert counts); recompute it with llama-imatrix "
                f"--output-format gguf"
            )
        if not np.all(row == np.rint(row)):
            raise FormatError(f"{source}: blk.{layer}.{first} counts {row[:4].tolist()}... are not whole numbers")
        for other, values in weights.items():
            if not np.array_equal(values, row):
                raise FormatError(
                    f"{source}: blk.{layer}.{other} counts {values.astype(np.int64).tolist()} differ from "
                    f"blk.{layer}.{first} counts {row.astype(np.int64).tolist()}; all expert weights of a layer "
                    f"see the same tokens, so the file was merged from mismatched runs: recompute it"
                )
        rows.append(row)
    sizes = {len(r) for r in rows}
    totals = {float(r.sum()) for r in rows}
    if len(sizes) > 1 or len(totals) > 1:
        what = (
            f"experts per layer {[len(r) for r in rows]}"
            if len(sizes) > 1
            else f"selections per layer {[int(r.sum()) for r in rows]}"
        )
        raise FormatError(
            f"{source}: layers {layer_ids} have {what}; expected one value for every MoE layer (each layer "
            f"routes every token), so the file mixes models or runs: recompute it with llama-imatrix"
        )
    return layer_ids, np.stack(rows).astype(np.int64)


def _field(reader: Any, key: str) -> Any:
    f = reader.get_field(key)
    return None if f is None else f.contents()


@register_reader(
    "imatrix",
    description="llama.cpp llama-imatrix GGUF: per-expert selection counts (no token order)",
    detect=_is_imatrix,
    options=("top_k", "model"),
    produces="counts",
)
def read_imatrix(path: Path, options: ImportOptions) -> ExpertCounts:
    """Read the per-expert counts of a ``llama-imatrix`` GGUF into `ExpertCounts`.

    Parameters
    ----------
    path : the imatrix ``.gguf`` file.
    options : ``top_k`` (experts per token, recorded; the file does not say) and ``model`` (a name for
        the metadata).

    Returns
    -------
    `ExpertCounts` with values [layers, experts] int64 selections, ``layer_ids`` the block indices,
    ``tokens`` None, and metadata ``imatrix.chunk_count``, ``imatrix.chunk_size``, ``imatrix.datasets``.

    Raises
    ------
    FormatError : not a GGUF, a GGUF that is not an imatrix (e.g. the model itself), or counts that
        `expert_counts` refuses.
    """
    from gguf import GGUFReader

    kind = gguf_type(path)
    if kind != IMATRIX_TYPE:
        hint = (
            "this is a model GGUF, not an imatrix; run llama-imatrix -m MODEL.gguf -f TEXT -o OUT.imatrix.gguf first"
            if kind in (None, "model")
            else "give the .gguf file that llama-imatrix wrote"
        )
        raise FormatError(f"{str(path)!r} has general.type {kind!r}, not {IMATRIX_TYPE!r}; {hint}")
    with gguf_errors(path, FIX):  # gguf-py's parse, after read_header (in gguf_type) proved it bounded
        reader = GGUFReader(path, "r")  # tensors stay np.memmap views
        tensors = {t.name: t.data for t in reader.tensors if t.name.endswith(".counts")}
        chunk_count, chunk_size, datasets = (_field(reader, k) for k in (CHUNK_COUNT, CHUNK_SIZE, DATASETS))
    layer_ids, values = expert_counts(tensors, str(path))
    if datasets is not None and not isinstance(datasets, list):  # one dataset written as a scalar
        datasets = [datasets]
    meta: dict[str, Any] = {
        "source": str(path),
        CHUNK_COUNT: chunk_count,
        CHUNK_SIZE: chunk_size,
        DATASETS: None if datasets is None else [str(d) for d in datasets],
    }
    if datasets:
        meta["corpus"] = ", ".join(str(d) for d in datasets)
    if options.model:
        meta["model"] = options.model
    return ExpertCounts(values, top_k=options.top_k, layer_ids=layer_ids, mass="counts", meta=meta)
