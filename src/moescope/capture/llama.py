"""`capture_llama`: run a GGUF MoE model with llama.cpp and stream the routing it used to a trace store.

llama.cpp builds each MoE layer's router in ``build_moe_ffn`` (``src/llama-graph.cpp``) and names its
tensors ``<name>-<layer>``; this module asks the ggml scheduler, through the eval callback of the
low-level context API (``cb_eval``, which the high-level ``llama_cpp.Llama`` does not expose), for

- ``ffn_moe_topk-L``: the selected expert ids, ``[k, tokens]`` int32 (a view of the argsort: strided);
- the gate weights the layer applied: the last of ``ffn_moe_weights`` (``[1, k, tokens]``), then
  ``_softmax``, ``_norm``, ``_scaled`` that the graph computes (see `WEIGHT_STAGES`).

Every token of the batch is marked as an output, because llama.cpp otherwise drops the rows not needed
for logits before the last layer's FFN and that layer would route only the final token.

Two modes, as in `moescope.capture.hf`:

- ``prefill``: each document (tokenised with the GGUF's own tokenizer, or given as token ids) is cut into
  sequences of at most ``seq_len`` tokens; each sequence is one ``llama_decode`` in a cleared KV cache;
- ``decode``: per document, the first ``prompt_len`` tokens are the prompt, then ``generate`` greedy steps
  (argmax of the logits), one token per ``llama_decode``; only the generated tokens are recorded.

The GGUF is checked (exists, GGUF magic, an ``{arch}.expert_count`` key, ``ffn_gate_inp`` tensors) with
the ``gguf`` package before llama.cpp loads it and before the store is created. The store is written in
place (``TraceWriter(atomic=False)``), committed chunk by chunk. For bit-level agreement with the
transformers capture of an f32 model use ``flash_attn=False, kv_type="f32"``. Not done here: sampling
other than greedy, batches of several sequences per decode, multimodal models, downloads.

    >>> capture_llama("qwen3-30b-a3b-q4_k_m.gguf", read_corpus("corpus/"), "qwen.zarr", max_tokens=100_000)
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moescope.capture.corpus import Document, Seq, capture_writer, check_capture, cut_sequences
from moescope.capture.routers import CaptureError
from moescope.errors import TraceError, UsageError, require
from moescope.gguf import GGUFModel, inspect_gguf
from moescope.trace import TraceMeta, utc_now

log = logging.getLogger(__name__)

TOPK_TENSOR = "ffn_moe_topk"
# Gate weights in the order build_moe_ffn computes them; per layer, the last one present is what it applied.
WEIGHT_STAGES = ("ffn_moe_weights", "ffn_moe_weights_softmax", "ffn_moe_weights_norm", "ffn_moe_weights_scaled")
KV_TYPES = {"f32": 0, "f16": 1}  # ggml_type of the KV cache
OVERRIDE_TYPES = ("int", "float", "bool", "str")
_GGML_DTYPES = {0: np.dtype(np.float32), 1: np.dtype(np.float16), 26: np.dtype(np.int32)}  # ggml_type -> numpy
_NAME = re.compile(r"^(.+)-(\d+)$")


def _llama_cpp() -> Any:
    return require("llama_cpp", "llama", "capturing routing with llama.cpp")


# -- the GGUF, read before llama.cpp loads it ---------------------------------------------------------
def read_gguf_moe(path: str | os.PathLike) -> GGUFModel:
    """Check that `path` is a GGUF of a Mixture-of-Experts model and return its expert layout
    (`moescope.gguf.inspect_gguf`: architecture, n_experts, top_k, router layer_ids, name, bytes).

    Raises
    ------
    UsageError : the file does not exist.
    FormatError : not a GGUF, unreadable, or a model without experts / routers.
    """
    return inspect_gguf(path)


def parse_override(spec: str) -> tuple[str, str, Any]:
    """Parse a llama.cpp ``--override-kv`` value ``KEY=TYPE:VALUE`` (TYPE: int, float, bool, str).

    Returns ``(key, type, value)``; e.g. ``"qwen3moe.expert_used_count=int:4"`` -> ``(..., "int", 4)``.
    """
    key, sep, rest = spec.partition("=")
    kind, sep2, raw = rest.partition(":")
    if not sep or not sep2 or not key or kind not in OVERRIDE_TYPES:
        raise UsageError(
            f"override {spec!r} is not KEY=TYPE:VALUE with TYPE one of {', '.join(OVERRIDE_TYPES)}; "
            f"e.g. qwen3moe.expert_used_count=int:4"
        )
    if len(key.encode()) >= 128 or (kind == "str" and len(raw.encode()) >= 128):
        raise UsageError(f"override {spec!r}: llama.cpp keys and string values must be under 128 bytes")
    try:
        value: Any = {"int": int, "float": float, "str": str}[kind](raw) if kind != "bool" else None
    except ValueError:
        raise UsageError(f"override {spec!r}: {raw!r} is not a valid {kind}") from None
    if kind == "bool":
        if raw.lower() not in ("true", "false"):
            raise UsageError(f"override {spec!r}: a bool is true or false, got {raw!r}")
        value = raw.lower() == "true"
    return key, kind, value


@dataclasses.dataclass(frozen=True)
class RoutingCaveat:
    """A GGUF architecture whose routing in llama.cpp is known to differ from the reference model's.

    applies : tells from the GGUF's layout whether the caveat holds; text : what differs and where, for the
    user (and the trace's provenance); source : the llama.cpp code that shows it.
    """

    applies: Callable[[GGUFModel], bool]
    text: str
    source: str


ROUTING_CAVEATS = (
    RoutingCaveat(
        lambda m: m.architecture == "deepseek2" and m.expert_groups > 1 and m.gating in (None, "softmax"),
        "llama.cpp routes this deepseek2 GGUF (expert groups with softmax gating: DeepSeek-V2's "
        "group_limited_greedy) by scoring each group with the sum of its two best experts (DeepSeek-V3's rule); "
        "the reference model scores a group by its best expert, so llama.cpp picks other experts for some tokens",
        "src/llama-graph.cpp build_moe_ffn: ggml_argsort_top_k(selection_groups, 2) then ggml_sum_rows",
    ),
    RoutingCaveat(
        lambda m: m.architecture == "phimoe",
        "llama.cpp runs PhiMoE with RMSNorm (+ bias) where the reference uses LayerNorm, and weighs the top-2 "
        "experts by a softmax over them where the reference uses sparsemixer; hidden states, and so the routing "
        "of later layers, drift from the reference's",
        "src/models/phi3.cpp: build_norm(..., LLM_NORM_RMS) and build_moe_ffn(..., GATING_FUNC_TYPE_SOFTMAX)",
    ),
)


def routing_caveats(info: GGUFModel) -> list[str]:
    """Where llama.cpp's routing for this GGUF is known to differ from the reference model's (transformers),
    in words (`ROUTING_CAVEATS`); empty when it is the same rule. What llama.cpp did is still what is
    recorded; ``moescope compare`` with a transformers capture measures how far the two differ."""
    return [
        f"{c.text}. This trace records what llama.cpp did; compare it with a transformers capture "
        f"(moescope compare) to see how far the two differ (llama.cpp: {c.source})"
        for c in ROUTING_CAVEATS
        if c.applies(info)
    ]


# -- the eval callback ---------------------------------------------------------------------------------
class _GGMLTensor(ctypes.Structure):
    """The head of ``struct ggml_tensor`` (ggml.h, GGML_MAX_DIMS 4, GGML_MAX_SRC 10) up to its name."""

    _fields_ = (
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
    )


@dataclasses.dataclass
class _Grab:
    """One tensor copied out during a decode: its bytes and layout."""

    ggml_type: int
    ne: tuple[int, int, int, int]
    nb: tuple[int, int, int, int]
    raw: bytes

    def array(self, top_k: int) -> np.ndarray:
        """[tokens, k]: the strided tensor as a dense array (ggml's ne[0] is the fastest axis)."""
        dtype = _GGML_DTYPES[self.ggml_type]
        dense = np.ndarray(shape=self.ne[::-1], dtype=dtype, buffer=self.raw, strides=self.nb[::-1])
        return np.ascontiguousarray(dense).reshape(-1, top_k)


def _ggml_backend(lib: Any) -> ctypes.CDLL:
    """ggml's buffer functions, which llama-cpp-python does not bind: a fresh handle on its libllama (whose
    dependency libggml-base defines them), so setting argument types here touches nothing of llama_cpp's."""
    ggml = ctypes.CDLL(lib.llama_cpp._lib._name)
    ggml.ggml_backend_buffer_is_host.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_buffer_is_host.restype = ctypes.c_bool
    ggml.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    ggml.ggml_backend_tensor_get.restype = None
    return ggml


class _Tap:
    """The ``cb_eval`` callback: answers which tensors to observe and copies them out of the graph."""

    def __init__(self, lib: Any) -> None:
        self._ggml = _ggml_backend(lib)
        self.grabs: dict[tuple[str, int], list[_Grab]] = {}
        self.problems: list[str] = []
        self._wanted = frozenset((TOPK_TENSOR, *WEIGHT_STAGES))
        self.callback = lib.ggml_backend_sched_eval_callback(self._call)  # kept referenced: C holds the pointer

    def reset(self) -> None:
        self.grabs = {}
        self.problems = []

    def _call(self, tensor_p: int, ask: bool, _user: int) -> bool:
        t = _GGMLTensor.from_address(tensor_p)
        m = _NAME.match(t.name.decode("utf-8", "replace"))
        if m is None or m.group(1) not in self._wanted:
            return not ask  # True when not asking: never cancel the computation
        if ask:
            return True
        if t.type not in _GGML_DTYPES:
            self.problems.append(f"{t.name.decode()} has ggml type {t.type}, expected f32, f16 or i32")
            return True
        ne, nb = tuple(t.ne), tuple(t.nb)
        span = _GGML_DTYPES[t.type].itemsize + sum((n - 1) * s for n, s in zip(ne, nb, strict=True))
        if not t.buffer or self._ggml.ggml_backend_buffer_is_host(t.buffer):
            raw = ctypes.string_at(t.data, span)
        else:  # device memory: copy the view's byte span to the host
            buf = ctypes.create_string_buffer(span)
            self._ggml.ggml_backend_tensor_get(ctypes.c_void_p(tensor_p), buf, 0, span)
            raw = buf.raw
        self.grabs.setdefault((m.group(1), int(m.group(2))), []).append(_Grab(t.type, ne, nb, raw))
        return True

    def collect(self, layer_ids: Sequence[int], top_k: int, n_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """[tokens, layers, k] ids and weights observed since the last `reset`, then reset."""
        if self.problems:
            raise CaptureError(f"llama.cpp routing tensors could not be read: {'; '.join(self.problems[:3])}")
        experts = np.empty((n_tokens, len(layer_ids), top_k), dtype=np.int64)
        weights = np.empty((n_tokens, len(layer_ids), top_k), dtype=np.float32)
        for j, layer in enumerate(layer_ids):
            ids = self.grabs.get((TOPK_TENSOR, layer))
            stage = next((s for s in reversed(WEIGHT_STAGES) if (s, layer) in self.grabs), None)
            if ids is None or stage is None:
                seen = sorted({f"{n}-{i}" for n, i in self.grabs})[:6]
                raise CaptureError(
                    f"llama.cpp computed no {TOPK_TENSOR}-{layer} / {WEIGHT_STAGES[0]}-{layer} tensor (saw {seen}); "
                    f"this llama.cpp build names its MoE tensors differently: update moescope.capture.llama"
                )
            e = np.concatenate([g.array(top_k) for g in ids])
            w = np.concatenate([g.array(top_k) for g in self.grabs[(stage, layer)]])
            if e.shape[0] != n_tokens or w.shape[0] != n_tokens:
                raise CaptureError(
                    f"layer {layer} routed {e.shape[0]} tokens ({w.shape[0]} weights) for a {n_tokens}-token "
                    f"decode; the batch must mark every token as an output"
                )
            experts[:, j], weights[:, j] = e, w
        self.reset()
        return experts, weights


# -- the llama.cpp session -----------------------------------------------------------------------------
class LlamaSession:
    """A llama.cpp model and context with the routing tap installed; one sequence at a time.

    Parameters
    ----------
    path : the GGUF.
    info : its `read_gguf_moe` result.
    n_ctx : context size (the longest sequence to run).
    n_threads : CPU threads (default: all cores).
    flash_attn : True / False, or None for llama.cpp's automatic choice.
    kv_type : ``"f16"`` (llama.cpp's default) or ``"f32"`` KV cache.
    n_gpu_layers : layers to offload (GPU builds only).
    overrides : [(key, type, value)] from `parse_override`.
    record : install the routing tap (False: a plain context, the baseline of the overhead benchmark).

    Use as a context manager; `run(ids)` returns ``(experts, weights)`` each ``[len(ids), layers, k]``;
    `decode(ids)` runs the same batch without collecting anything.
    """

    def __init__(
        self,
        path: Path,
        info: GGUFModel,
        *,
        n_ctx: int,
        n_threads: int | None = None,
        flash_attn: bool | None = None,
        kv_type: str = "f16",
        n_gpu_layers: int = 0,
        overrides: Sequence[tuple[str, str, Any]] = (),
        record: bool = True,
    ) -> None:
        lib = self._lib = _llama_cpp()
        self.info, self.n_ctx = info, int(n_ctx)
        self.top_k = info.top_k
        for key, kind, value in overrides:
            if key == f"{info.architecture}.expert_used_count" and kind == "int":
                self.top_k = int(value)
        _route_logs(lib)
        lib.llama_backend_init()
        mparams = lib.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        self._overrides = _override_array(lib, overrides)
        if self._overrides is not None:
            mparams.kv_overrides = self._overrides
        self.model = lib.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise CaptureError(f"llama.cpp could not load {str(path)!r}; see the log above, or update llama-cpp-python")
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.tap = _Tap(lib)
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = self.n_ctx
        cparams.n_seq_max = 1
        threads = n_threads or os.cpu_count() or 1
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.flash_attn_type = {
            None: lib.LLAMA_FLASH_ATTN_TYPE_AUTO,
            True: lib.LLAMA_FLASH_ATTN_TYPE_ENABLED,
            False: lib.LLAMA_FLASH_ATTN_TYPE_DISABLED,
        }[flash_attn]
        cparams.type_k = cparams.type_v = KV_TYPES[kv_type]
        if record:
            cparams.cb_eval = self.tap.callback
            cparams.cb_eval_user_data = None
        cparams.no_perf = True
        self.ctx = lib.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise CaptureError(
                f"llama.cpp could not create a {self.n_ctx}-token context for {str(path)!r} "
                f"(flash_attn={flash_attn}, kv_type={kv_type}); try a smaller --seq-len"
            )
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self._batch = lib.llama_batch_init(self.n_ctx, 0, 1)

    def __enter__(self) -> LlamaSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        lib = self._lib
        if getattr(self, "ctx", None):
            lib.llama_batch_free(self._batch)
            lib.llama_free(self.ctx)
            lib.llama_model_free(self.model)
            self.ctx = self.model = None

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """The GGUF tokenizer's ids for `text` (`add_special`: BOS / EOS as the GGUF says)."""
        data = text.encode("utf-8")
        size = len(data) + 8
        for _ in range(2):
            buf = (self._lib.llama_token * size)()
            n = self._lib.llama_tokenize(self.vocab, data, len(data), buf, size, add_special, False)
            if n >= 0:
                return list(buf[:n])
            size = -n
        raise CaptureError(f"llama_tokenize failed on a {len(data)}-byte document")

    def clear(self) -> None:
        """Empty the KV cache: the next `run` starts a new sequence at position 0."""
        self._lib.llama_memory_clear(self._lib.llama_get_memory(self.ctx), True)

    def run(self, ids: Sequence[int], start_pos: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Decode `ids` at positions ``start_pos...`` of sequence 0, every token an output.

        Returns
        -------
        experts : [len(ids), layers, k] int64; weights : [len(ids), layers, k] float32.
        """
        self.tap.reset()
        self.decode(ids, start_pos)
        return self.tap.collect(self.info.layer_ids, self.top_k, len(ids))

    def decode(self, ids: Sequence[int], start_pos: int = 0, all_logits: bool = True) -> None:
        """`llama_decode` of `ids` at ``start_pos...`` (logits for every token, or only the last)."""
        n = len(ids)
        if n < 1 or start_pos + n > self.n_ctx:
            raise UsageError(f"{n} tokens at position {start_pos} do not fit the {self.n_ctx}-token context")
        bad = [t for t in ids if not 0 <= t < self.n_vocab]
        if bad:
            raise UsageError(f"token id {bad[0]} is outside the model's vocabulary 0..{self.n_vocab - 1}")
        b = self._batch
        b.n_tokens = n
        for i, tok in enumerate(ids):
            b.token[i], b.pos[i], b.n_seq_id[i] = int(tok), start_pos + i, 1
            b.logits[i] = all_logits or i == n - 1
            b.seq_id[i][0] = 0
        rc = self._lib.llama_decode(self.ctx, b)
        if rc != 0:
            raise CaptureError(f"llama_decode returned {rc} for a {n}-token batch at position {start_pos}")

    def logits(self, n: int) -> np.ndarray:
        """[n, vocab] float32: a copy of the logits of the last `decode` of n tokens with ``all_logits``."""
        ptr = self._lib.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(n, self.n_vocab)).copy()

    def argmax_last(self) -> int:
        """The greedy next token after the last `run`."""
        ptr = self._lib.llama_get_logits_ith(self.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))))

    def is_eog(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self.vocab, token))


_LOG_LEVELS = {3: logging.WARNING, 4: logging.ERROR}  # ggml_log_level WARN, ERROR; the rest is debug
_log_callback: list[Any] = []  # llama.cpp keeps the pointer process-wide: the ctypes object must live as long
_log_listeners: list[list[str]] = []  # `collect_llama_logs` blocks: every line llama.cpp logs, any level


def _forward_log(level: int, text: bytes, _user: int) -> None:
    """llama.cpp's log lines go to this module's logger (warnings and errors as such, the rest as debug)."""
    msg = text.decode("utf-8", "replace").rstrip()
    if msg:
        log.log(_LOG_LEVELS.get(level, logging.DEBUG), "llama.cpp: %s", msg)
        for lines in _log_listeners:
            lines.append(msg)


@contextlib.contextmanager
def collect_llama_logs() -> Iterator[list[str]]:
    """Every line llama.cpp logs inside the block (debug lines included), for checks that read its log."""
    _route_logs(_llama_cpp())
    lines: list[str] = []
    _log_listeners.append(lines)
    try:
        yield lines
    finally:
        _log_listeners.remove(lines)


def _route_logs(lib: Any) -> None:
    """Send llama.cpp's logging (process-wide) to `log` instead of stderr; done once."""
    if not _log_callback:
        _log_callback.append(lib.llama_log_callback(_forward_log))
        lib.llama_log_set(_log_callback[0], ctypes.c_void_p(0))


def _override_array(lib: Any, overrides: Sequence[tuple[str, str, Any]]) -> Any:
    if not overrides:
        return None
    arr = (lib.llama_model_kv_override * (len(overrides) + 1))()  # zeroed sentinel at the end
    tags = {
        "int": (lib.LLAMA_KV_OVERRIDE_TYPE_INT, "val_i64"),
        "float": (lib.LLAMA_KV_OVERRIDE_TYPE_FLOAT, "val_f64"),
        "bool": (lib.LLAMA_KV_OVERRIDE_TYPE_BOOL, "val_bool"),
        "str": (lib.LLAMA_KV_OVERRIDE_TYPE_STR, "val_str"),
    }
    for slot, (key, kind, value) in zip(arr, overrides, strict=False):
        slot.key = key.encode()
        slot.tag, field = tags[kind]
        setattr(slot.value, field, value.encode() if kind == "str" else value)
    return arr


# -- the capture ---------------------------------------------------------------------------------------
def _plan(
    items: Sequence[Document | Sequence[int]],
    tokenize: Callable[[str], list[int]],
    *,
    mode: str,
    seq_len: int,
    prompt_len: int | None,
    max_tokens: int | None,
) -> list[Seq]:
    """Documents (tokenised with the GGUF's tokenizer) or token-id lists -> the sequences to run."""
    kinds = {isinstance(it, Document) for it in items}
    if len(kinds) != 1:
        raise UsageError("give either Documents or token-id lists, not a mix (labels would be partial)")
    tokenised = (
        (tokenize(it.text), it.label) if isinstance(it, Document) else ([int(t) for t in it], None) for it in items
    )
    return cut_sequences(tokenised, mode=mode, seq_len=seq_len, prompt_len=prompt_len, max_tokens=max_tokens)


def capture_llama(
    gguf_path: str | os.PathLike,
    documents: Sequence[Document] | Sequence[Sequence[int]],
    out_path: str | os.PathLike,
    *,
    mode: str = "prefill",
    seq_len: int = 512,
    generate: int = 0,
    prompt_len: int | None = None,
    max_tokens: int | None = None,
    n_threads: int | None = None,
    flash_attn: bool | None = None,
    kv_type: str = "f16",
    n_gpu_layers: int = 0,
    overrides: Sequence[str] = (),
    add_special: bool = True,
    ignore_eos: bool = False,
    corpus: str | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Run a GGUF MoE model with llama.cpp over `documents` and stream its routing to a store at `out_path`.

    Parameters
    ----------
    gguf_path : a local ``.gguf`` file of a Mixture-of-Experts model.
    documents : [documents] `Document` (tokenised with the GGUF's tokenizer; labels kept), or
        [sequences] token-id lists (run as given, unlabelled; to compare with another capture on the
        same ids).
    out_path : the store to create (a Zarr folder, written in place and readable while it grows).
    mode : ``"prefill"`` (sequences of at most `seq_len` tokens, one decode each, fresh KV cache) or
        ``"decode"`` (`generate` greedy tokens after a prompt of the first `prompt_len` tokens, default
        `seq_len`; only generated tokens recorded; stops at an end-of-generation token unless `ignore_eos`).
    max_tokens : stop after this many recorded tokens.
    n_threads : CPU threads (default all).
    flash_attn : True / False / None (llama.cpp decides). Use False with ``kv_type="f32"`` for exactness.
    kv_type : ``"f16"`` or ``"f32"`` KV cache.
    n_gpu_layers : layers to offload on GPU builds.
    overrides : llama.cpp ``KEY=TYPE:VALUE`` metadata overrides (e.g. ``qwen3moe.expert_used_count=int:4``).
    add_special : let the GGUF's tokenizer add BOS / EOS as its metadata says.
    corpus : the corpus path, for the metadata.
    progress : called as ``progress(tokens_recorded, tokens_planned)`` after each decode.

    Returns
    -------
    `out_path`. The GGUF, options and corpus are checked before the store is created; a capture that
    fails later leaves every committed token readable, marked incomplete.
    """
    if kv_type not in KV_TYPES:
        raise UsageError(f"kv_type {kv_type!r} is not one of {', '.join(KV_TYPES)}")
    out = check_capture(
        mode,
        documents,
        out_path,
        seq_len=seq_len,
        generate=generate,
        prompt_len=prompt_len,
        max_tokens=max_tokens,
        overwrite=overwrite,
    )
    parsed = [parse_override(s) for s in overrides]
    path = Path(gguf_path)
    info = read_gguf_moe(path)
    llama_cpp = _llama_cpp()
    n_ctx = seq_len if mode == "prefill" else (prompt_len or seq_len) + generate
    with LlamaSession(
        path,
        info,
        n_ctx=n_ctx,
        n_threads=n_threads,
        flash_attn=flash_attn,
        kv_type=kv_type,
        n_gpu_layers=n_gpu_layers,
        overrides=parsed,
    ) as session:
        plan = _plan(
            documents,
            lambda text: session.tokenize(text, add_special),
            mode=mode,
            seq_len=seq_len,
            prompt_len=prompt_len,
            max_tokens=max_tokens,
        )
        planned = sum(len(s.ids) for s in plan) if mode == "prefill" else len(plan) * generate
        planned = min(planned, max_tokens or planned)
        session.run(plan[0].ids[:4])  # unreadable routing fails here, before the store exists
        session.clear()
        caveats = routing_caveats(info)
        for caveat in caveats:
            log.warning("%s", caveat)
        meta = TraceMeta(
            model=str(path),
            source=f"llama.cpp (llama-cpp-python {llama_cpp.__version__})",
            corpus=corpus,
            created=utc_now(),
            extra={
                "capture": {
                    "mode": mode,
                    "seq_len": seq_len,
                    "generate": generate,
                    "prompt_len": prompt_len,
                    "architecture": info.architecture,
                    "gguf_name": info.name,
                    "flash_attn": flash_attn,
                    "kv_type": kv_type,
                    "overrides": list(overrides),
                    "llama_cpp_python": llama_cpp.__version__,
                    "routing_caveats": caveats,
                }
            },
        )
        with capture_writer(
            out,
            n_experts=info.n_experts,
            top_k=session.top_k,
            layer_ids=info.layer_ids,
            mode=mode,
            meta=meta,
            overwrite=overwrite,
        ) as writer:
            labelled = plan[0].label is not None
            for seq in plan:
                session.clear()
                step = _decode if mode == "decode" else _prefill
                experts, weights, tokens = step(session, seq, generate, ignore_eos)
                room = planned - writer.n_tokens
                if experts.shape[0] == 0:
                    continue
                try:
                    writer.append(
                        experts[:room],
                        weights[:room],
                        labels=[seq.label] if labelled else None,
                        seq_starts=[0],
                        token_ids=tokens[:room],
                    )
                except TraceError as exc:
                    raise CaptureError(
                        f"the routing read from llama.cpp ({info.architecture}) failed the sanity check: {exc}; "
                        f"report this with the GGUF's architecture and llama-cpp-python version"
                    ) from exc
                if progress is not None:
                    progress(writer.n_tokens, planned)
                if writer.n_tokens >= planned:
                    break
    return out


Routed = tuple[np.ndarray, np.ndarray, list[int]]  # experts, weights [tokens, layers, k]; the token ids run


def _prefill(session: LlamaSession, seq: Seq, _generate: int, _ignore_eos: bool) -> Routed:
    return (*session.run(seq.ids), list(seq.ids))


def _decode(session: LlamaSession, seq: Seq, generate: int, ignore_eos: bool) -> Routed:
    """Greedy generation after the prompt; the routing of each generated token, in order."""
    session.run(seq.ids)  # the prompt's routing is not part of a decode trace
    pos, rows_e, rows_w, tokens = len(seq.ids), [], [], []
    for _step in range(generate):
        token = session.argmax_last()
        if not ignore_eos and session.is_eog(token):
            break
        e, w = session.run([token], start_pos=pos)
        rows_e.append(e)
        rows_w.append(w)
        tokens.append(token)
        pos += 1
    if not rows_e:
        shape = (0, len(session.info.layer_ids), session.top_k)
        return np.zeros(shape, np.int64), np.zeros(shape), []
    return np.concatenate(rows_e), np.concatenate(rows_w), tokens
