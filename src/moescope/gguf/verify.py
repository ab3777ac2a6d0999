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

    >>> moves = llama_overrides("model.gguf", parse_override_value(r"blk\\.(0|1)\\.ffn_.*_exps=CPU"))
"""

from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moescope.errors import UsageError
from moescope.gguf.plan import block_regex

_DEVICE_TYPE_CPU = 0  # enum ggml_backend_dev_type (ggml-backend.h)
_OVERRIDDEN = re.compile(r"^tensor (\S+) \(.*\) buffer type overridden to (\S+)$")


class _Override(ctypes.Structure):
    """``struct llama_model_tensor_buft_override`` (llama.h): a pattern and a buffer type."""

    _fields_ = (("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p))


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


def llama_overrides(path: str | os.PathLike, rules: Sequence[tuple[str, str]]) -> dict[str, str]:
    """Where llama.cpp puts the tensors that `rules` match: ``{tensor name: buffer type name}``.

    Parameters
    ----------
    path : the GGUF (its metadata is loaded by llama.cpp; no weights are read).
    rules : ``[(pattern, buffer type name)]`` in priority order, e.g. from `parse_override_value`.

    Raises
    ------
    UsageError : a buffer type this llama.cpp build does not have (the names it has are listed).
    CaptureError : llama.cpp cannot load the file.
    """
    from moescope.errors import CaptureError
    from moescope.gguf.runtime import collect_llama_logs, llama_cpp

    lib = llama_cpp()
    with collect_llama_logs() as lines:
        lib.llama_backend_init()
        bufts = buffer_types(lib)
        unknown = sorted({b for _, b in rules if b not in bufts})
        if unknown:
            raise UsageError(
                f"buffer type(s) {unknown} are not devices of this llama.cpp build (it has {sorted(bufts)}); "
                f"use those names, as llama.cpp's -ot does"
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
        lib.llama_model_free(model)
    return {m.group(1): m.group(2) for line in lines if (m := _OVERRIDDEN.match(line))}


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
