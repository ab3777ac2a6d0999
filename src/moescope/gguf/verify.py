"""Apply tensor-override rules through llama.cpp's own loader and read back where it put each tensor.

An offload plan's ``-ot PATTERN=BUFFER`` and ``--n-cpu-moe N`` flags are only right if llama.cpp, matching
them its own way, moves exactly the planned tensors. This module asks llama.cpp itself (llama-cpp-python's
``libllama``): it parses the rules as ``common/arg.cpp`` does (``parse_tensor_buffer_overrides``: comma
separated, each split at its first ``=``, the buffer type looked up by name among the devices' buffer types
of this build), passes them as ``llama_model_params.tensor_buft_overrides``, loads the model's metadata
only (``no_alloc``, no mmap: nothing of the weights is read, so a 100 GB GGUF checks in seconds) and reads
llama.cpp's debug log line ``tensor <name> (...) buffer type overridden to <buffer>``, one per matched
tensor (``llama-model-loader.cpp``: ``std::regex_search``, the first matching rule wins).

``--n-cpu-moe N`` is expanded by llama.cpp's ``common`` library, not by libllama; `n_cpu_moe_rules` mirrors
``llm_add_n_cpu_ffn_overrides`` (``common/common.h``), and the zoo test checks that mirror against the
header of the same llama.cpp source.

Multi-GPU plans name device buffers (``CUDA0``, ``CUDA1``, ``Vulkan0`` ...) that a CPU build of llama.cpp
does not have. `llama_placement` can emulate them: each emulated name is a copy of the CPU device's buffer
type whose only difference is the name it reports, so llama.cpp's own override matching runs unchanged and
its log names the emulated buffer. What it checks is which tensors each rule sends where; not whether
they fit, nor anything a real GPU backend would do with them afterwards.

    >>> moves = llama_overrides("model.gguf", parse_override_value(r"blk\\.(0|1)\\.ffn_.*_exps=CPU"))
    >>> where = llama_placement("model.gguf", parse_override_value(r"blk\\.0\\.=CUDA0"), emulate=["CUDA0"])
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from moescope.errors import CaptureError, UsageError
from moescope.gguf.plan import block_regex

_DEVICE_TYPE_CPU = 0  # enum ggml_backend_dev_type (ggml-backend.h)
_OVERRIDDEN = re.compile(r"^tensor (\S+) \(.*\) buffer type overridden to (\S+)$")
# Device buffer names as backends spell them: GGML_CUDA_NAME (CUDA, ROCm, MUSA), GGML_VK_NAME, GGML_SYCL_NAME + index
EMULATED_NAME = re.compile(r"^[A-Za-z][A-Za-z_]*[0-9]*$")
MAX_EMULATED = 16  # GGML_SCHED_MAX_BACKENDS (ggml-backend.cpp): what one llama.cpp scheduler can drive


class _Override(ctypes.Structure):
    """``struct llama_model_tensor_buft_override`` (llama.h): a pattern and a buffer type."""

    _fields_ = (("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p))


class _BuftIface(ctypes.Structure):
    """``struct ggml_backend_buffer_type_i`` (``ggml/src/ggml-backend-impl.h``, backend API version 2), its
    function pointers in declaration order; only ``get_name`` is ever replaced, the others are copied."""

    _fields_ = (
        ("get_name", ctypes.c_void_p),
        ("alloc_buffer", ctypes.c_void_p),
        ("get_alignment", ctypes.c_void_p),
        ("get_max_size", ctypes.c_void_p),
        ("get_alloc_size", ctypes.c_void_p),
        ("is_host", ctypes.c_void_p),
    )


class _Buft(ctypes.Structure):
    """``struct ggml_backend_buffer_type { iface; ggml_backend_dev_t device; void * context; }``."""

    _fields_ = (("iface", _BuftIface), ("device", ctypes.c_void_p), ("context", ctypes.c_void_p))


# const char * (*get_name)(ggml_backend_buffer_type_t): the returned pointer is a buffer kept alive by us
_GET_NAME = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)


def parse_override_value(value: str) -> list[tuple[str, str]]:
    """``-ot`` values as llama.cpp's ``common/arg.cpp`` reads them: ``PATTERN=BUFFER[,PATTERN=BUFFER...]``."""
    out = []
    for item in value.split(","):
        pattern, sep, buft = item.partition("=")
        if not sep:
            raise UsageError(f"-ot rule {item!r} has no '='; llama.cpp expects PATTERN=BUFFER (e.g. ...=CPU)")
        out.append((pattern, buft))
    return out


def n_cpu_moe_rules(n: int) -> list[tuple[str, str]]:
    """The overrides llama.cpp's ``--n-cpu-moe N`` adds: each of blocks 0..N-1's experts to the CPU."""
    return [(block_regex(i), "CPU") for i in range(n)]


def _ggml(lib: Any) -> ctypes.CDLL:
    """ggml's device functions (not bound by llama-cpp-python), from a fresh handle on its libllama."""
    ggml = ctypes.CDLL(lib.llama_cpp._lib._name)
    for name, args, res in (
        ("ggml_backend_dev_count", [], ctypes.c_size_t),
        ("ggml_backend_dev_get", [ctypes.c_size_t], ctypes.c_void_p),
        ("ggml_backend_dev_type", [ctypes.c_void_p], ctypes.c_int),
        ("ggml_backend_dev_buffer_type", [ctypes.c_void_p], ctypes.c_void_p),
        ("ggml_backend_dev_backend_reg", [ctypes.c_void_p], ctypes.c_void_p),
        ("ggml_backend_reg_get_proc_address", [ctypes.c_void_p, ctypes.c_char_p], ctypes.c_void_p),
        ("ggml_backend_buft_name", [ctypes.c_void_p], ctypes.c_char_p),
        ("ggml_backend_buft_is_host", [ctypes.c_void_p], ctypes.c_bool),
        ("ggml_backend_buft_get_alignment", [ctypes.c_void_p], ctypes.c_size_t),
        ("ggml_backend_buft_get_max_size", [ctypes.c_void_p], ctypes.c_size_t),
        ("ggml_backend_buft_get_device", [ctypes.c_void_p], ctypes.c_void_p),
    ):
        fn = getattr(ggml, name)
        fn.argtypes, fn.restype = args, res
    return ggml


def buffer_types(lib: Any) -> dict[str, int]:
    """Buffer type name -> handle, over this llama.cpp build's devices (as ``parse_tensor_buffer_overrides``)."""
    ggml = _ggml(lib)
    out = {}
    for i in range(ggml.ggml_backend_dev_count()):
        buft = ggml.ggml_backend_dev_buffer_type(ggml.ggml_backend_dev_get(i))
        if buft:
            out[ggml.ggml_backend_buft_name(buft).decode()] = buft
    return out


def host_buffer_types(lib: Any) -> set[str]:
    """Names of the CPU device's buffer types: its own and its extra ones (``CPU_REPACK`` ...), which
    llama.cpp picks from for a tensor overridden to the CPU (``select_weight_buft`` over the CPU list)."""
    ggml = _ggml(lib)
    names = set()
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        if ggml.ggml_backend_dev_type(dev) != _DEVICE_TYPE_CPU:
            continue
        names.add(ggml.ggml_backend_buft_name(ggml.ggml_backend_dev_buffer_type(dev)).decode())
        reg = ggml.ggml_backend_dev_backend_reg(dev)
        addr = ggml.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts") if reg else None
        if addr:
            extras = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(addr)(dev)
            j = 0
            while extras and extras[j]:
                names.add(ggml.ggml_backend_buft_name(extras[j]).decode())
                j += 1
    return names


def _cpu_buffer_type(ggml: ctypes.CDLL) -> int:
    """The CPU device's own buffer type (``ggml_backend_dev_buffer_type`` of the CPU device)."""
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        if ggml.ggml_backend_dev_type(dev) == _DEVICE_TYPE_CPU:
            buft = ggml.ggml_backend_dev_buffer_type(dev)
            if buft:
                return buft
    raise CaptureError("this llama.cpp build has no CPU device, so device buffers cannot be emulated")


def _check_emulated(names: Sequence[str], real: set[str]) -> list[str]:
    """`names` validated: device-like names, none twice, none a real buffer type name, at most 16."""
    if isinstance(names, str):
        raise UsageError(f"emulate={names!r} is one string; pass a list of buffer names, e.g. [{names!r}]")
    names = list(names)
    bad = [n for n in names if not isinstance(n, str) or not EMULATED_NAME.match(n)]
    if bad:
        raise UsageError(
            f"emulated buffer name(s) {bad} are not device buffer names; expected letters then an optional "
            f"number, as llama.cpp's backends name them (CUDA0, ROCm1, Vulkan0, SYCL0)"
        )
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UsageError(f"emulated buffer name(s) {twice} are listed more than once; list each once")
    clash = sorted(set(names) & real)
    if clash:
        raise UsageError(
            f"emulated buffer name(s) {clash} are real buffer types of this llama.cpp build "
            f"({sorted(real)}); emulate only names it lacks"
        )
    if len(names) > MAX_EMULATED:
        raise UsageError(f"{len(names)} emulated buffer names; at most {MAX_EMULATED} are supported")
    return names


@contextlib.contextmanager
def _emulated_buffer_types(ggml: ctypes.CDLL, names: Sequence[str]) -> Iterator[dict[str, int]]:
    """Buffer types named `names`, each a copy of the CPU device's with only ``get_name`` replaced:
    ``{name: handle}``, valid inside the block (the structs, callbacks and name strings live until it ends;
    llama.cpp must hold no handle past it, which is so once the model loaded inside it is freed).

    Each copy is read back through ggml's own accessors before use: ``ggml_backend_buft_name`` must give
    the emulated name (so ``get_name`` is the first field, as in the layout of `_Buft`), and ``_is_host``,
    ``_get_alignment``, ``_get_max_size``, ``_get_device`` must answer as for the CPU's. A struct that grew
    past `_Buft`'s fields in a later llama.cpp is not detectable this way; see `_BuftIface`.
    """
    cpu = _cpu_buffer_type(ggml)
    keep: list[Any] = []  # what C points into, referenced until the block ends
    out = {}
    for name in names:
        text = ctypes.create_string_buffer(name.encode())
        callback = _GET_NAME(lambda _buft, _text=text: ctypes.addressof(_text))
        clone = _Buft.from_buffer_copy(_Buft.from_address(cpu))
        clone.iface.get_name = ctypes.cast(callback, ctypes.c_void_p).value
        keep += [text, callback, clone]
        handle = ctypes.addressof(clone)
        probes = ("buft_is_host", "buft_get_alignment", "buft_get_max_size", "buft_get_device")
        same = all(
            getattr(ggml, f"ggml_backend_{p}")(handle) == getattr(ggml, f"ggml_backend_{p}")(cpu) for p in probes
        )
        if ggml.ggml_backend_buft_name(handle) != name.encode() or not same:
            raise CaptureError(
                f"emulating buffer {name!r} failed: this llama.cpp's struct ggml_backend_buffer_type is not laid "
                f"out as ggml-backend-impl.h of backend API version 2; emulation needs that layout"
            )
        out[name] = handle
    try:
        yield out
    finally:
        keep.clear()


def llama_placement(
    path: str | os.PathLike, rules: Sequence[tuple[str, str]], *, emulate: Sequence[str] = ()
) -> dict[str, str]:
    """Where llama.cpp puts the tensors that `rules` match: ``{tensor name: buffer type name}``, with device
    buffers this build lacks emulated.

    Each rule's buffer is looked up by exact name among the buffer types of this build's devices, as
    ``parse_tensor_buffer_overrides`` (``common/arg.cpp``) does, plus the emulated ones. A tensor matched by
    a rule naming ``CPU`` may land in one of the CPU's extra buffer types (``CPU_REPACK``...), as in
    llama.cpp; a tensor matched by an emulated buffer's rule is reported under that buffer's name. Tensors
    no rule matches are absent (llama.cpp places them by its layer assignment, ``-ngl``).

    Why the emulation is faithful (checked in the llama.cpp that llama-cpp-python 0.3.36 vendors):

    - ``llama_model_loader::create_tensor`` (``src/llama-model-loader.cpp``), ``buft_for_tensor``: for the
      first rule whose pattern ``std::regex_search`` finds in the name, a buft that is not the pointer
      ``ggml_backend_cpu_buffer_type()`` is used as given (``buft = overrides->buft``: no support check,
      no ``select_weight_buft``), and the debug line names it with ``ggml_backend_buft_name(buft)``, which
      calls ``iface.get_name`` (``ggml/src/ggml-backend.cpp``). A real CUDA0 buft takes the same branch.
    - After that it calls ``ggml_backend_buft_get_device`` (the copied ``device``: NULL for the CPU buft,
      so the mmap host-buffer swap is skipped; mmap is off here anyway) and compares the buft with the
      layer's default to count moved tensors; ``ctx_for_buft`` makes one ggml context per buft.
    - ``llama_model_base::load_tensors`` (``src/llama-model.cpp``): ``no_alloc`` allocates, per context, a
      dummy zero-size buffer with ``ggml_backend_buft_alloc_buffer(buft, 0)`` (``ggml_backend_buffer_init``
      with an empty interface: ``alloc_buffer`` is not called), sets its usage, logs its size under
      ``ggml_backend_buffer_name`` and returns before reading any weight; the NULL device falls back to the
      CPU device for ``ggml_backend_dev_get_props``. ``llama_model_free`` frees those dummy buffers without
      calling into the buft. Nothing compares the buft's ``get_name`` pointer on these CPU paths (such
      checks exist only inside the CUDA, Metal, Vulkan, SYCL and OpenVINO backends).

    Parameters
    ----------
    path : the GGUF (its metadata is loaded by llama.cpp; no weights are read).
    rules : ``[(pattern, buffer type name)]`` in priority order, e.g. from `parse_override_value`.
    emulate : device buffer names this build lacks, e.g. ``["CUDA0", "CUDA1"]``: letters then an optional
        number, none a real buffer type name (nor ``CPU_REPACK`` and the like), at most 16.

    Raises
    ------
    UsageError : a rule's buffer is neither a real nor an emulated buffer type (the names that exist are
        listed), or a bad emulated name.
    CaptureError : llama.cpp cannot load the file, or emulation does not fit this llama.cpp.
    """
    from moescope.gguf.runtime import collect_llama_logs, llama_cpp

    lib = llama_cpp()
    with collect_llama_logs() as lines:
        lib.llama_backend_init()
        ggml = _ggml(lib)
        real = buffer_types(lib)
        names = _check_emulated(emulate, set(real) | host_buffer_types(lib))
        with _emulated_buffer_types(ggml, names) as emulated:
            bufts = {**real, **emulated}
            unknown = sorted({b for _, b in rules if b not in bufts})
            if unknown:
                raise UsageError(
                    f"buffer type(s) {unknown} are not devices of this llama.cpp build (it has {sorted(real)}"
                    f"{f', emulated {sorted(emulated)}' if emulated else ''}); use those names, as llama.cpp's "
                    f"-ot does, or emulate the device buffers of the build the rules are for"
                )
            table = (_Override * (len(rules) + 1))()  # zeroed sentinel at the end
            patterns = [p.encode() for p, _ in rules]  # kept referenced while llama.cpp reads them
            for slot, pattern, (_, buft) in zip(table, patterns, rules, strict=False):
                slot.pattern, slot.buft = pattern, bufts[buft]
            params = lib.llama_model_default_params()
            params.tensor_buft_overrides = ctypes.addressof(table) if rules else None
            params.no_alloc = True
            params.load_mode = lib.LLAMA_LOAD_MODE_NONE  # no_alloc maps nothing (llama-model.cpp asserts it)
            params.n_gpu_layers = 0
            model = lib.llama_model_load_from_file(str(Path(path)).encode(), params)
            if not model:
                raise CaptureError(f"llama.cpp could not load {str(path)!r}; see its log (--verbose)")
            lib.llama_model_free(model)  # before the emulated bufts go: its dummy buffers point at them
    return {m.group(1): m.group(2) for line in lines if (m := _OVERRIDDEN.match(line))}


def llama_overrides(path: str | os.PathLike, rules: Sequence[tuple[str, str]]) -> dict[str, str]:
    """`llama_placement` with this build's buffer types only (none emulated)."""
    return llama_placement(path, rules)


def verify_plan(model: Any, plan: Any) -> dict[str, Any]:
    """Check an `OffloadPlan`'s two forms in llama.cpp: each must move exactly the planned tensors (every
    per-expert tensor of the plan's CPU blocks) to the CPU, and nothing else.

    Returns ``{"planned": n, "forms": {form: {"ok", "moved", "missing", "extra", "elsewhere", "buffers"}},
    "ok"}``; missing / extra / elsewhere list at most 8 names each (planned but not moved, moved but not
    planned, moved to a buffer that is not the CPU's); buffers: the CPU buffer types used (llama.cpp may
    repack a quantized tensor, e.g. into ``CPU_REPACK``: still host memory).
    """
    from moescope.gguf.runtime import llama_cpp

    host = host_buffer_types(llama_cpp())
    planned = {t.name for t in model.tensors if t.per_expert and t.block in plan.cpu_blocks}
    forms = {
        "override_tensor": parse_override_value(plan.ot) if plan.ot else [],
        "n_cpu_moe": n_cpu_moe_rules(plan.n_cpu_moe),
    }
    out: dict[str, Any] = {"planned": len(planned), "forms": {}}
    for name, rules in forms.items():
        moved = llama_overrides(model.path, rules)
        missing, extra = sorted(planned - set(moved)), sorted(set(moved) - planned)
        elsewhere = sorted(t for t, b in moved.items() if b not in host)
        out["forms"][name] = {
            "ok": not (missing or extra or elsewhere),
            "moved": len(moved),
            "missing": missing[:8],
            "extra": extra[:8],
            "elsewhere": elsewhere[:8],
            "buffers": sorted(set(moved.values())),
        }
    out["ok"] = all(f["ok"] for f in out["forms"].values())
    return out


def verify_devices(model: Any, plan: Any) -> dict[str, Any]:
    """Check a `moescope.gguf.offload.DevicePlan`'s printed forms in llama.cpp's own override matching, the
    plan's GPU buffers emulated where this build lacks them (`llama_placement`).

    - ``override_tensor`` (the ``-ot`` form) must put exactly the planned tensors on each named buffer: on
      one GPU the experts of the CPU blocks on a host buffer; on several, every tensor of every block on its
      planned buffer (the rules pin blocks to GPUs), and nothing else.
    - ``n_cpu_moe`` (the flavour's ``--n-cpu-moe N``, expanded as `moescope.gguf.offload.n_cpu_moe_rules`
      mirrors the engine) must move exactly the CPU blocks' expert tensors to a host buffer; on several GPUs
      the ``-ts`` values must also put each block's layer on its GPU under llama.cpp's layer rule
      (`moescope.gguf.offload.check_split`, a mirror of ``get_layer_buft_list``: no GPU here to load onto).

    Returns ``{"forms": {form: {"ok", "planned": {buffer: tensors}, "moved", "missing", "extra", "wrong",
    "buffers"}}, "split": bool | None, "ok"}``; missing / extra / wrong list at most 8 names each (planned
    but not moved, moved but not planned, moved to another buffer than planned); split: None on one GPU and
    for ik_llama.cpp (see `check_split`).
    """
    from moescope.gguf.offload import check_split, n_cpu_moe_rules
    from moescope.gguf.runtime import llama_cpp

    lib = llama_cpp()
    host = host_buffer_types(lib)
    real = set(buffer_types(lib))
    where = plan.placement(model)
    gpus = [d.name for d in plan.devices]
    cpu_experts = {n: "CPU" for n, b in where.items() if b == "CPU" and not n.startswith("token_embd.")}
    pinned = {t.name: where[t.name] for t in model.tensors if t.block >= 0 and not t.mtp}
    forms: dict[str, tuple[list[tuple[str, str]], dict[str, str]]] = {
        "override_tensor": (list(plan.rules), cpu_experts if len(gpus) == 1 else pinned)
    }
    if plan.n_cpu_moe is not None:
        forms["n_cpu_moe"] = (n_cpu_moe_rules(plan.flavor, model, plan.n_cpu_moe), cpu_experts)
    emulate = [g for g in gpus if g not in real]
    out: dict[str, Any] = {"forms": {}}
    for form, (rules, expected) in forms.items():
        counts: dict[str, int] = {}
        for b in expected.values():
            counts[b] = counts.get(b, 0) + 1
        used = {b for _, b in rules}
        moved = llama_placement(model.path, rules, emulate=[g for g in emulate if g in used])
        missing = sorted(t for t in expected if t not in moved)
        extra = sorted(t for t in moved if t not in expected)
        wrong = sorted(
            t
            for t, b in moved.items()
            if t in expected and not (b == expected[t] or (expected[t] == "CPU" and b in host))
        )
        out["forms"][form] = {
            "ok": not (missing or extra or wrong),
            "planned": counts,
            "moved": len(moved),
            "missing": missing[:8],
            "extra": extra[:8],
            "wrong": wrong[:8],
            "buffers": sorted(set(moved.values())),
        }
    out["split"] = check_split(plan)
    out["ok"] = all(f["ok"] for f in out["forms"].values()) and out["split"] is not False
    return out
