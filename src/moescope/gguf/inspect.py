"""What a GGUF model file says about its experts, read through a memory map (the file is never loaded).

`inspect_gguf` returns the architecture, expert count and top-k, the MoE blocks (those with a router
``blk.N.ffn_gate_inp.weight``), every tensor with its type and bytes, the bytes of one routed expert per
layer, and the bytes of everything else. Per-expert tensors are the ``blk.N.*_exps.*`` ones
(``ffn_gate_exps``, ``ffn_up_exps``, ``ffn_down_exps``, merged ``ffn_gate_up_exps``, and their biases /
scales), whose outermost dimension (the last in GGUF's order) is the expert. It does not modify the file.

Multi-token-prediction (MTP / NextN) blocks: a GGUF with ``{arch}.nextn_predict_layers = N`` (GLM-4.5,
Qwen3-Next, DeepSeek-V3 conversions that keep them) stores N extra blocks after the model's own, the last N
of ``block_count``. llama.cpp neither loads nor runs them in normal decoding (``load_mtp`` is off unless a
speculative MTP context asks for them: ``src/llama-model.cpp``, ``TENSOR_SKIP``), so they are not routed
layers here: they are listed in ``mtp_blocks`` with their bytes (``mtp_bytes``) and left out of
``layer_ids``, the expert bytes and the bytes a decode step reads.

    >>> model = inspect_gguf("Qwen3-30B-A3B-Q4_K_M.gguf")
    >>> model.expert_bytes[model.layer_ids[0]]     # bytes of one routed expert in the first MoE layer
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

from moescope.errors import FormatError, UsageError
from moescope.imports.gguf_header import RawString, gguf_errors, read_header

GGUF_MAGIC = b"GGUF"
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")
_EXPERT_TENSOR = re.compile(r"^blk\.(\d+)\.[a-z_]+_exps\.[a-z_]+$")
_ROUTER = re.compile(r"^blk\.(\d+)\.ffn_gate_inp\.weight$")
GATING_FUNCS = {1: "softmax", 2: "sigmoid", 4: "sqrtsoftplus"}  # gguf-py ExpertGatingFuncType


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor: name, ggml type name, shape in GGUF order (innermost first), bytes, block (-1 if none)."""

    name: str
    type: str
    shape: tuple[int, ...]
    n_bytes: int
    block: int
    per_expert: bool
    mtp: bool = False  # in an MTP / NextN block (not loaded by llama.cpp in normal decoding)


@dataclasses.dataclass(frozen=True)
class GGUFModel:
    """A GGUF Mixture-of-Experts model's layout.

    architecture : ``general.architecture``; n_experts, top_k : ``{arch}.expert_count`` / ``expert_used_count``
    (top_k may be a per-layer array in some files: then its maximum); layer_ids : MoE blocks (with a router),
    ascending, MTP blocks excluded; n_blocks : ``{arch}.block_count`` (MTP blocks included); expert_bytes :
    MoE block -> bytes of one routed expert (all its per-expert tensors); shared_experts :
    ``{arch}.expert_shared_count`` (0 if absent); tensors : all; mtp_blocks : the MTP / NextN blocks (the last
    ``{arch}.nextn_predict_layers`` of ``block_count``; see the module docstring); expert_groups,
    expert_groups_used : grouped routing (``{arch}.expert_group_count`` / ``expert_group_used_count``, 0 when
    absent); gating : ``{arch}.expert_gating_func`` as a name (softmax, sigmoid, sqrtsoftplus), None when absent.
    """

    path: str
    architecture: str
    name: str | None
    n_experts: int
    top_k: int
    layer_ids: tuple[int, ...]
    n_blocks: int
    shared_experts: int
    expert_bytes: dict[int, int]
    tensors: tuple[TensorInfo, ...]
    mtp_blocks: tuple[int, ...] = ()
    expert_groups: int = 0
    expert_groups_used: int = 0
    gating: str | None = None

    @property
    def trunk_blocks(self) -> int:
        """Blocks llama.cpp runs in normal decoding: ``n_blocks`` less the MTP blocks."""
        return self.n_blocks - len(self.mtp_blocks)

    def expert_bytes_at(self, layer_ids: Any, n_experts: int, what: str = "the trace") -> list[int]:
        """Bytes of one routed expert at each MoE layer of a trace (its model ``layer_ids``, its ``n_experts``).

        Raises
        ------
        UsageError : `what` cannot come from this model (another expert count, or a layer without a MoE block).
        """
        ids = [int(x) for x in layer_ids]
        missing = [x for x in ids if x not in self.expert_bytes]
        if n_experts != self.n_experts or missing:
            raise UsageError(
                f"{what} has {n_experts} experts per layer and MoE layers {ids}; {self.path} has {self.n_experts} "
                f"experts and MoE blocks {list(self.layer_ids)}: give the model {what} was captured from"
            )
        return [self.expert_bytes[x] for x in ids]

    @property
    def routed_expert_bytes(self) -> int:
        """Bytes of all routed experts of the MoE blocks (every per-expert tensor outside MTP blocks)."""
        return sum(t.n_bytes for t in self.tensors if t.per_expert and not t.mtp)

    @property
    def other_bytes(self) -> int:
        """Bytes of everything else llama.cpp loads (attention, shared experts, routers, norms, embeddings,
        output head); MTP blocks are counted apart, in `mtp_bytes`."""
        return sum(t.n_bytes for t in self.tensors if not t.per_expert and not t.mtp)

    @property
    def mtp_bytes(self) -> int:
        """Bytes of the MTP / NextN blocks (stored in the file, not loaded in normal decoding)."""
        return sum(t.n_bytes for t in self.tensors if t.mtp)

    @property
    def dense_bytes_per_token(self) -> int:
        """Bytes a decode step reads besides the routed experts: all loaded non-expert tensors except the
        token embedding table (a token reads one row of it)."""
        return sum(
            t.n_bytes for t in self.tensors if not t.per_expert and not t.mtp and not t.name.startswith("token_embd.")
        )

    @property
    def leading_dense_blocks(self) -> int:
        """Blocks before the first MoE block (dense FFN layers, e.g. DeepSeek's first_k_dense_replace)."""
        return self.layer_ids[0] if self.layer_ids else self.n_blocks

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(
            routed_expert_bytes=self.routed_expert_bytes,
            other_bytes=self.other_bytes,
            mtp_bytes=self.mtp_bytes,
            trunk_blocks=self.trunk_blocks,
            dense_bytes_per_token=self.dense_bytes_per_token,
            leading_dense_blocks=self.leading_dense_blocks,
        )
        d["expert_bytes"] = {str(k): v for k, v in self.expert_bytes.items()}
        return d


def open_gguf(path: str | os.PathLike) -> Any:
    """A `gguf.GGUFReader` over `path` (memory-mapped), after checking it exists, is a GGUF, and that its
    header is sound (`moescope.imports.gguf_header.read_header`: no count, offset or type that would make gguf-py
    loop, allocate without bound or raise). gguf-py decodes every header array (a real vocabulary takes it
    10-20 s); `open_header` is the fast reader of metadata and tensor infos.

    Raises
    ------
    UsageError : `path` is not a file.
    FormatError : not a GGUF, or a truncated or corrupt one.
    """
    from gguf import GGUFReader

    p = _checked(path)
    read_header(p)
    with gguf_errors(p):
        return GGUFReader(p, "r")


def _checked(path: str | os.PathLike) -> Path:
    """`path`, after checking it is a readable file that starts with the GGUF magic."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"model {str(p)!r} does not exist or is not a file; give a local .gguf file")
    try:
        with p.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise FormatError(f"{str(p)!r} cannot be read ({exc.strerror or exc}); check its permissions") from exc
    if magic != GGUF_MAGIC:
        raise FormatError(
            f"{str(p)!r} starts with {magic!r}, not the GGUF magic {GGUF_MAGIC!r}; give a .gguf model "
            f"(convert a transformers folder with llama.cpp's convert_hf_to_gguf.py)"
        )
    return p


@dataclasses.dataclass(frozen=True)
class _Field:
    value: Any

    def contents(self) -> Any:
        if isinstance(self.value, RawString):
            return bytes(self.value).decode("utf-8")  # raises UnicodeDecodeError, as gguf-py would
        return self.value


@dataclasses.dataclass(frozen=True)
class _HeaderTensor:
    """A tensor info as `inspect_gguf` reads it (the attributes of gguf-py's ``ReaderTensor`` it uses)."""

    name: str
    shape: tuple[int, ...]
    tensor_type: Any
    n_bytes: int


class HeaderReader:
    """Metadata and tensor infos from moescope's bounded header walk, with the part of `gguf.GGUFReader`'s
    interface `field` and `inspect_gguf` use (``get_field(key).contents()``, ``tensors``). Keeps scalars,
    strings and arrays of up to `moescope.imports.gguf_header.MAX_KEPT_ARRAY` numbers: a key holding a
    longer array (a vocabulary) reads as absent. Milliseconds where gguf-py takes seconds on a real model."""

    def __init__(self, path: str | os.PathLike) -> None:
        from gguf import GGMLQuantizationType

        self.path = str(path)
        self.header = read_header(_checked(path))
        self.tensors = tuple(
            _HeaderTensor(t.name, tuple(t.dims), GGMLQuantizationType(t.ggml_type), t.n_bytes)
            for t in self.header.tensors
        )

    def get_field(self, key: str) -> _Field | None:
        return _Field(self.header.values[key]) if key in self.header.values else None


def open_header(path: str | os.PathLike) -> HeaderReader:
    """A `HeaderReader` over `path`, after the checks of `open_gguf`.

    Raises
    ------
    UsageError : `path` is not a file.
    FormatError : not a GGUF, or a truncated or corrupt one.
    """
    return HeaderReader(path)


def field(reader: Any, key: str) -> Any:
    """A metadata value (scalar, string or list), or None when absent.

    Raises
    ------
    FormatError : the value cannot be decoded (a string that is not UTF-8).
    """
    f = reader.get_field(key)
    if f is None:
        return None
    name = getattr(reader, "path", None) or getattr(getattr(reader, "data", None), "filename", None)
    with gguf_errors(name or "the GGUF"):
        return f.contents()


def inspect_gguf(path: str | os.PathLike) -> GGUFModel:
    """Read a GGUF MoE model's expert layout.

    Raises
    ------
    UsageError : the file does not exist.
    FormatError : not a GGUF, unreadable, a model without experts / routers, or metadata that disagrees with
        the tensors (an expert tensor or router whose expert dimension is not ``{arch}.expert_count``, a MoE
        block without expert tensors).
    """
    from gguf import Keys

    reader = open_header(path)
    p = str(Path(path))
    arch = field(reader, "general.architecture")
    if not isinstance(arch, str) or not arch:
        raise FormatError(
            f"{p!r} has general.architecture {arch!r}; expected an architecture name such as 'qwen3moe': "
            f"the file's metadata is corrupt, re-convert it"
        )

    def key(template: str) -> str:  # gguf-py's key templates, "{arch}.expert_count"
        return template.format(arch=arch)

    n_experts = _int_field(reader, key(Keys.LLM.EXPERT_COUNT), p)
    top_k = field(reader, key(Keys.LLM.EXPERT_USED_COUNT))
    if isinstance(top_k, list):  # per-layer top-k: the largest
        top_k = max(top_k) if top_k and all(_is_int(x) for x in top_k) else top_k or None
    if top_k is not None and not _is_int(top_k):
        raise FormatError(
            f"{p!r}: metadata {key(Keys.LLM.EXPERT_USED_COUNT)} is {top_k!r}, expected an integer or a list of "
            f"them; re-convert the model"
        )
    if not n_experts or not top_k or n_experts < 0 or top_k < 0:
        raise FormatError(
            f"{p!r} ({arch}) has {arch}.expert_count={n_experts} and {arch}.expert_used_count={top_k}; "
            f"it is not a Mixture-of-Experts model, so there is no routing to study"
        )
    if top_k > n_experts:
        raise FormatError(
            f"{p!r} ({arch}) routes {arch}.expert_used_count={top_k} experts per token out of "
            f"{arch}.expert_count={n_experts}; expected at most that many: the metadata is corrupt, re-convert it"
        )
    routers_all = sorted(int(m.group(1)) for t in reader.tensors if (m := _ROUTER.match(t.name)))
    n_blocks = _int_field(reader, key(Keys.LLM.BLOCK_COUNT), p) or (max(routers_all) + 1 if routers_all else 0)
    n_mtp = _int_field(reader, key(Keys.LLM.NEXTN_PREDICT_LAYERS), p) or 0
    # The MTP blocks are stored after the model's own, so there are fewer of them than stored blocks (this
    # also keeps the tuple of them as small as the file).
    n_stored = len({int(m.group(1)) for t in reader.tensors if (m := _BLOCK.match(t.name))})
    if not 0 <= n_mtp < max(n_blocks, 1) or n_mtp > n_stored:
        raise FormatError(
            f"{p!r} ({arch}) declares {arch}.nextn_predict_layers={n_mtp} for {n_blocks} blocks ({n_stored} stored); "
            f"expected 0 <= N < block_count and N <= the stored blocks: the file's metadata is corrupt, re-convert it"
        )
    mtp_blocks = tuple(range(n_blocks - n_mtp, n_blocks))
    tensors = []
    for t in reader.tensors:
        m = _BLOCK.match(t.name)
        block = int(m.group(1)) if m else -1
        shape = tuple(int(x) for x in t.shape)
        experts = bool(_EXPERT_TENSOR.match(t.name) or _ROUTER.match(t.name))
        if experts and (not shape or shape[-1] != n_experts):
            raise FormatError(
                f"{p!r} ({arch}): tensor {t.name} has shape {list(shape)} (GGUF order, experts last) but "
                f"{arch}.expert_count is {n_experts}; the metadata and the expert tensors disagree (a bad conversion "
                f"or edit): re-convert the model"
            )
        tensors.append(
            TensorInfo(
                t.name,
                t.tensor_type.name,
                shape,
                int(t.n_bytes),
                block,
                bool(_EXPERT_TENSOR.match(t.name)),
                block in mtp_blocks,
            )
        )
    routers = [b for b in routers_all if b not in mtp_blocks]
    if not routers:
        raise FormatError(
            f"{p!r} ({arch}) declares {n_experts} experts but has no blk.N.ffn_gate_inp.weight router "
            f"tensor; this architecture routes in a way moescope cannot read"
        )
    expert_bytes = {lid: 0 for lid in routers}
    for t in tensors:
        if t.per_expert and t.block in expert_bytes:
            expert_bytes[t.block] += t.n_bytes // n_experts
    empty = [lid for lid, n in expert_bytes.items() if n == 0]
    if empty:
        raise FormatError(
            f"{p!r} ({arch}): MoE block(s) {empty} have a router but no blk.N.ffn_*_exps tensors; expected the "
            f"stacked expert weights in every routed block: the file is incomplete or of a layout moescope cannot "
            f"read, re-convert it"
        )
    name = field(reader, "general.name")
    return GGUFModel(
        path=p,
        architecture=arch,
        name=None if name is None else str(name),
        n_experts=n_experts,
        top_k=int(top_k),
        layer_ids=tuple(routers),
        n_blocks=n_blocks,
        shared_experts=_int_field(reader, key(Keys.LLM.EXPERT_SHARED_COUNT), p) or 0,
        expert_bytes=expert_bytes,
        tensors=tuple(tensors),
        mtp_blocks=mtp_blocks,
        expert_groups=_int_field(reader, key(Keys.LLM.EXPERT_GROUP_COUNT), p) or 0,
        expert_groups_used=_int_field(reader, key(Keys.LLM.EXPERT_GROUP_USED_COUNT), p) or 0,
        gating=GATING_FUNCS.get(_int_field(reader, key(Keys.LLM.EXPERT_GATING_FUNC), p) or 0),
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_field(reader: Any, key: str, path: str) -> int | None:
    """An integer metadata value (None when absent); FormatError when it is not one."""
    value = field(reader, key)
    if value is None:
        return None
    if not _is_int(value):
        raise FormatError(f"{path!r}: metadata {key} is {value!r}, expected an integer; re-convert the model")
    return int(value)
