"""Run a GGUF with llama.cpp (llama-cpp-python's low-level API): a model and context with a routing tap.

`LlamaSession` loads a GGUF, decodes token batches and, through the eval callback of the context
(``cb_eval``, which the high-level ``llama_cpp.Llama`` does not expose), copies what each MoE layer of
``build_moe_ffn`` (``src/llama-graph.cpp``, tensors named ``<name>-<layer>``) routed:

- ``ffn_moe_topk-L``: the selected expert ids, ``[k, tokens]`` int32 (a view of the argsort: strided);
- the gate weights the layer applied: the last of ``ffn_moe_weights`` (``[1, k, tokens]``), then
  ``_softmax``, ``_norm``, ``_scaled`` that the graph computes (see `WEIGHT_STAGES`).

Two optional recordings (``LlamaSession(lookahead=N, router_logits=True)``), for prefetching studies:

- **router logits**: ``ffn_moe_logits-L`` (``[experts, tokens]``, ``mul_mat(ffn_gate_inp, x)``), plus the
  GGUF's ``blk.L.ffn_gate_inp.bias`` where it has one (gpt-oss; llama.cpp's f32 add, redone here, because
  the graph names the biased logits ``ffn_moe_probs`` when the gating is none), from which the capture takes
  each router's top-M candidates (`moescope.gguf.routing.top_candidates`);
- **lookahead N**: ``src[1]`` of ``ffn_moe_logits-L`` is ``x``, the hidden state entering layer L's router
  (``[n_embd, tokens]``, copied like the other tensors, from device memory too); in the callback the
  routers of the next N MoE layers, read from the GGUF, are applied to it with llama.cpp's selection rule
  for the architecture (`moescope.gguf.routing.Lookahead`; gating, ``exp_probs_b``, expert groups, top-k),
  and only their choices are kept, ``[tokens, N, k]`` per layer (-1 past the last MoE layer). This is
  numpy on dequantised router weights, not llama.cpp's kernels: it equals what llama.cpp would select from
  that hidden state except at near-ties (and, for quantised routers, up to the quantisation of the product).

Every token of a batch is marked as an output, because llama.cpp otherwise drops the rows not needed for
logits before the last layer's FFN and that layer would route only the final token. Also here: llama.cpp
metadata overrides (``--override-kv``), its log routed to Python logging (and collected for checks that
read it), KV cache types. Used by the llama.cpp capture, the top-k and split evaluations and the
tensor-override checks; nothing here writes a trace.

    >>> with LlamaSession(path, inspect_gguf(path), n_ctx=512) as session:
    ...     experts, weights = session.run(token_ids)     # [tokens, layers, k] each
    ...     experts, weights, extras = session.run_all(token_ids)   # + lookahead / router_logits when asked
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moescope.errors import CaptureError, UsageError, require
from moescope.gguf.inspect import GGUFModel
from moescope.gguf.routing import Lookahead, router_biases

log = logging.getLogger(__name__)

TOPK_TENSOR = "ffn_moe_topk"
# Gate weights in the order build_moe_ffn computes them; per layer, the last one present is what it applied.
WEIGHT_STAGES = ("ffn_moe_weights", "ffn_moe_weights_softmax", "ffn_moe_weights_norm", "ffn_moe_weights_scaled")
# mul_mat(ffn_gate_inp, x), before the router bias: its src[1] is x, the router's input (the lookahead's input)
LOGITS_TENSOR = "ffn_moe_logits"
KV_TYPES = {"f32": 0, "f16": 1}  # ggml_type of the KV cache
OVERRIDE_TYPES = ("int", "float", "bool", "str")
_GGML_DTYPES = {0: np.dtype(np.float32), 1: np.dtype(np.float16), 26: np.dtype(np.int32)}  # ggml_type -> numpy
_NAME = re.compile(r"^(.+)-(\d+)$")


def llama_cpp() -> Any:
    """The llama_cpp module (extra [llama]), imported when first needed."""
    return require("llama_cpp", "llama", "running GGUF models with llama.cpp")


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

    def array(self, width: int) -> np.ndarray:
        """[rows, width]: the strided tensor as a dense array (ggml's ne[0] is the fastest axis), e.g.
        [tokens, k] for ``ffn_moe_topk``."""
        dtype = _GGML_DTYPES[self.ggml_type]
        dense = np.ndarray(shape=self.ne[::-1], dtype=dtype, buffer=self.raw, strides=self.nb[::-1])
        return np.ascontiguousarray(dense).reshape(-1, width)


def _ggml_backend(lib: Any) -> ctypes.CDLL:
    """ggml's buffer functions, which llama-cpp-python does not bind: a fresh handle on its libllama (whose
    dependency libggml-base defines them), so setting argument types here touches nothing of llama_cpp's."""
    ggml = ctypes.CDLL(lib.llama_cpp._lib._name)
    ggml.ggml_backend_buffer_is_host.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_buffer_is_host.restype = ctypes.c_bool
    ggml.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    ggml.ggml_backend_tensor_get.restype = None
    return ggml


@functools.cache
def _openblas_threads() -> tuple[Any, Any] | None:
    """The (get, set) thread-count functions of the OpenBLAS numpy loaded (numpy's wheels bundle one), found
    in ``/proc/self/maps``; None elsewhere (another BLAS, or no /proc: its threads are left as configured)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    paths = {line.split()[-1] for line in maps.splitlines() if "openblas" in line.lower() and ".so" in line}
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:  # e.g. a mapping whose file is gone: leave the threads alone
            continue
        for prefix, suffix in (("scipy_", "64_"), ("scipy_", ""), ("", "64_"), ("", "")):
            get = getattr(lib, f"{prefix}openblas_get_num_threads{suffix}", None)
            put = getattr(lib, f"{prefix}openblas_set_num_threads{suffix}", None)
            if get is not None and put is not None:
                return get, put
    return None


@contextlib.contextmanager
def _blas_single_thread() -> Iterator[None]:
    """numpy's OpenBLAS on one thread inside the block. Its worker threads busy-wait after each call, and in
    the eval callback they would spin against llama.cpp's (measured: 2.5-3x slower decodes with lookahead)."""
    fns = _openblas_threads()
    if fns is None:
        yield
        return
    get, put = fns
    n = get()
    put(1)
    try:
        yield
    finally:
        put(n)


class _Tap:
    """The ``cb_eval`` callback: answers which tensors to observe and copies them out of the graph.

    router_logits : also copy the router logits (`LOGITS_TENSOR`); lookahead : a `Lookahead` applied, in the
    callback, to the input of every MoE router (its choices kept in ``ahead``, the hidden state dropped).
    """

    def __init__(
        self,
        lib: Any,
        layer_ids: Sequence[int] = (),
        *,
        router_logits: bool = False,
        lookahead: Lookahead | None = None,
    ) -> None:
        self._ggml = _ggml_backend(lib)
        self.grabs: dict[tuple[str, int], list[_Grab]] = {}
        self.ahead: dict[int, list[np.ndarray]] = {}  # layer -> [tokens, N, k] per ubatch
        self.problems: list[str] = []
        self.router_logits, self.lookahead = router_logits, lookahead
        self._position = {layer: j for j, layer in enumerate(layer_ids)}
        logits = (LOGITS_TENSOR,) if router_logits or lookahead is not None else ()
        self._wanted = frozenset((TOPK_TENSOR, *WEIGHT_STAGES, *logits))
        self.callback = lib.ggml_backend_sched_eval_callback(self._call)  # kept referenced: C holds the pointer

    def reset(self) -> None:
        self.grabs = {}
        self.ahead = {}
        self.problems = []

    def _call(self, tensor_p: int, ask: bool, _user: int) -> bool:
        t = _GGMLTensor.from_address(tensor_p)
        m = _NAME.match(t.name.decode("utf-8", "replace"))
        if m is None or m.group(1) not in self._wanted:
            return not ask  # True when not asking: never cancel the computation
        if ask:
            return True
        name, layer = m.group(1), int(m.group(2))
        if name != LOGITS_TENSOR or self.router_logits:
            grab = self._copy(tensor_p, t)
            if grab is not None:
                self.grabs.setdefault((name, layer), []).append(grab)
        if name == LOGITS_TENSOR and self.lookahead is not None:
            self._look_ahead(layer, t)
        return True

    def _copy(self, tensor_p: int, t: _GGMLTensor) -> _Grab | None:
        """The tensor's bytes (from host or device memory); None, with a problem noted, for a type not read."""
        if t.type not in _GGML_DTYPES:
            self.problems.append(f"{t.name.decode()} has ggml type {t.type}, expected f32, f16 or i32")
            return None
        ne, nb = tuple(t.ne), tuple(t.nb)
        span = _GGML_DTYPES[t.type].itemsize + sum((n - 1) * s for n, s in zip(ne, nb, strict=True))
        if not t.buffer or self._ggml.ggml_backend_buffer_is_host(t.buffer):
            raw = ctypes.string_at(t.data, span)
        else:  # device memory: copy the view's byte span to the host
            buf = ctypes.create_string_buffer(span)
            self._ggml.ggml_backend_tensor_get(ctypes.c_void_p(tensor_p), buf, 0, span)
            raw = buf.raw
        return _Grab(t.type, ne, nb, raw)

    def _look_ahead(self, layer: int, logits: _GGMLTensor) -> None:
        """Apply the lookahead routers to ``src[1]`` of layer `layer`'s ``ffn_moe_logits`` (its router input)."""
        assert self.lookahead is not None
        j = self._position.get(layer)
        if j is None:  # a router outside the trace's layers (an MTP block's): nothing to predict
            return
        if not logits.src[1]:
            self.problems.append(f"{logits.name.decode()} has no src[1]; this llama.cpp build routes differently")
            return
        src = _GGMLTensor.from_address(logits.src[1])
        n_embd = self.lookahead.n_embd
        if src.ne[0] != n_embd or src.ne[2] != 1 or src.ne[3] != 1:
            self.problems.append(
                f"the router input of layer {layer} ({src.name.decode()}) has shape {tuple(src.ne)}, expected "
                f"[{n_embd}, tokens]: this llama.cpp build routes differently; capture without --lookahead"
            )
            return
        grab = self._copy(logits.src[1], src)
        if grab is not None:
            hidden = grab.array(n_embd).astype(np.float32, copy=False)
            with _blas_single_thread():  # llama.cpp's threads wait; numpy's BLAS threads would spin against them
                self.ahead.setdefault(layer, []).append(self.lookahead.predict(j, hidden))

    def collect_all(
        self, layer_ids: Sequence[int], top_k: int, n_tokens: int
    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """What was observed since the last `reset`, then reset.

        Returns
        -------
        experts : [tokens, layers, k] int64; weights : [tokens, layers, k] float32.
        extras : with lookahead, ``lookahead`` [tokens, layers, N, k] int64 (-1 past the last MoE layer); with
            router logits, ``router_logits`` [tokens, layers, experts] float32.
        """
        if self.problems:
            raise CaptureError(f"llama.cpp routing tensors could not be read: {'; '.join(self.problems[:3])}")
        experts = np.empty((n_tokens, len(layer_ids), top_k), dtype=np.int64)
        weights = np.empty((n_tokens, len(layer_ids), top_k), dtype=np.float32)
        logits: list[np.ndarray] = []
        ahead: list[np.ndarray] = []
        for j, layer in enumerate(layer_ids):
            ids = self.grabs.get((TOPK_TENSOR, layer))
            stage = next((s for s in reversed(WEIGHT_STAGES) if (s, layer) in self.grabs), None)
            if ids is None or stage is None:
                seen = sorted({f"{n}-{i}" for n, i in self.grabs})[:6]
                raise CaptureError(
                    f"llama.cpp computed no {TOPK_TENSOR}-{layer} / {WEIGHT_STAGES[0]}-{layer} tensor (saw {seen}); "
                    f"this llama.cpp build names its MoE tensors differently: update moescope.gguf.runtime"
                )
            e = np.concatenate([g.array(top_k) for g in ids])
            w = np.concatenate([g.array(top_k) for g in self.grabs[(stage, layer)]])
            parts = {"experts": e, "weights": w}
            if self.router_logits:
                parts["router logits"] = self._logits(layer)
                logits.append(parts["router logits"])
            if self.lookahead is not None:
                parts["lookahead"] = self._ahead(layer)
                ahead.append(parts["lookahead"])
            short = {what: len(x) for what, x in parts.items() if len(x) != n_tokens}
            if short:
                raise CaptureError(
                    f"layer {layer} gave {short} rows for a {n_tokens}-token decode; the batch must mark every "
                    f"token as an output"
                )
            experts[:, j], weights[:, j] = e, w
        extras = {}
        if self.lookahead is not None:
            extras["lookahead"] = np.stack(ahead, axis=1)
        if self.router_logits:
            extras["router_logits"] = np.stack(logits, axis=1).astype(np.float32, copy=False)
        self.reset()
        return experts, weights, extras

    def _logits(self, layer: int) -> np.ndarray:
        """[tokens, experts] layer `layer`'s router logits (`LOGITS_TENSOR`, before any router bias)."""
        grabs = self.grabs.get((LOGITS_TENSOR, layer))
        if grabs is None:
            raise CaptureError(
                f"llama.cpp computed no {LOGITS_TENSOR}-{layer} tensor: this architecture's graph gives the "
                f"router no logits of its own (build_moe_ffn's probs_in); capture without --candidates / --lookahead"
            )
        return np.concatenate([g.array(g.ne[0]) for g in grabs])

    def _ahead(self, layer: int) -> np.ndarray:
        if layer not in self.ahead:
            raise CaptureError(
                f"llama.cpp computed no {LOGITS_TENSOR}-{layer} tensor, whose input the lookahead reads: this "
                f"architecture's graph gives the router no logits of its own; capture without --lookahead"
            )
        return np.concatenate(self.ahead[layer])


# -- the llama.cpp session -----------------------------------------------------------------------------
def session_top_k(info: GGUFModel, overrides: Sequence[tuple[str, str, Any]] = ()) -> int:
    """Experts per token llama.cpp routes for this GGUF: ``{arch}.expert_used_count``, or its int override."""
    from gguf import Keys

    top_k = info.top_k
    for key, kind, value in overrides:
        if key == Keys.LLM.EXPERT_USED_COUNT.format(arch=info.architecture) and kind == "int":
            top_k = int(value)
    return top_k


class LlamaSession:
    """A llama.cpp model and context with the routing tap installed; one sequence at a time.

    Parameters
    ----------
    path : the GGUF.
    info : its `moescope.gguf.inspect_gguf` layout.
    n_ctx : context size (the longest sequence to run).
    n_threads : CPU threads (default: all cores).
    flash_attn : True / False, or None for llama.cpp's automatic choice.
    kv_type : ``"f16"`` (llama.cpp's default) or ``"f32"`` KV cache.
    n_gpu_layers : layers to offload (GPU builds only).
    overrides : [(key, type, value)] from `parse_override`.
    record : install the routing tap (False: a plain context, the baseline of the overhead benchmark).
    lookahead : N, also apply the routers of the next N MoE layers to each router's input (module docstring;
        `UsageError` for an architecture whose selection rule `moescope.gguf.routing` does not know).
    router_logits : also copy every router's logits.

    Use as a context manager; `run(ids)` returns ``(experts, weights)`` each ``[len(ids), layers, k]``,
    `run_all(ids)` those and the extras asked for; `decode(ids)` runs the same batch without collecting anything.
    Attributes: top_k (overrides included), lookahead (the `moescope.gguf.routing.Lookahead`, or None).
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
        lookahead: int = 0,
        router_logits: bool = False,
    ) -> None:
        lib = self._lib = llama_cpp()
        self.info, self.n_ctx = info, int(n_ctx)
        self.top_k = session_top_k(info, overrides)
        # the routers are read (and an unknown architecture refused) before llama.cpp loads the model
        self.lookahead = Lookahead(info, top_k=self.top_k, distance=lookahead) if lookahead else None
        self._gate_bias = router_biases(info) if router_logits else {}
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
        self.tap = _Tap(lib, info.layer_ids, router_logits=router_logits, lookahead=self.lookahead)
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
        experts, weights, _ = self.run_all(ids, start_pos)
        return experts, weights

    def run_all(self, ids: Sequence[int], start_pos: int = 0) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """`run`, with the extras the session was asked for.

        Returns
        -------
        experts : [len(ids), layers, k] int64; weights : [len(ids), layers, k] float32.
        extras : with lookahead N, ``lookahead`` [len(ids), layers, N, k] int64 (-1 past the last MoE layer);
            with router logits, ``router_logits`` [len(ids), layers, experts] float32 (what each router
            selected from, before gating: ``ffn_moe_logits`` plus the GGUF's router bias where it has one).
        """
        self.tap.reset()
        self.decode(ids, start_pos)
        experts, weights, extras = self.tap.collect_all(self.info.layer_ids, self.top_k, len(ids))
        logits = extras.get("router_logits")
        if logits is not None and logits.shape[2] != self.info.n_experts:
            raise CaptureError(
                f"llama.cpp's router logits have {logits.shape[2]} columns for {self.info.n_experts} experts; "
                f"this architecture routes over another expert count: capture without --candidates"
            )
        for j, bias in self._gate_bias.items():
            logits[:, j] += bias
        return experts, weights, extras

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
    _route_logs(llama_cpp())
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
