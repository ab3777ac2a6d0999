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


def buffer_types(lib: Any) -> dict[str, int]:
    """Buffer type name -> handle, over this llama.cpp build's devices (as ``parse_tensor_buffer_overrides``)."""
    ggml = ctypes.CDLL(lib.llama_cpp._lib._name)
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_buffer_type.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_dev_buffer_type.restype = ctypes.c_void_p
    ggml.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_buft_name.restype = ctypes.c_char_p
    out = {}
    for i in range(ggml.ggml_backend_dev_count()):
        buft = ggml.ggml_backend_dev_buffer_type(ggml.ggml_backend_dev_get(i))
        if buft:
            out[ggml.ggml_backend_buft_name(buft).decode()] = buft
    return out


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
    from moescope.capture.llama import CaptureError, _llama_cpp, collect_llama_logs

    lib = _llama_cpp()
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

    Returns ``{"planned": n, "forms": {form: {"ok", "moved", "missing", "extra", "elsewhere"}}, "ok"}``;
    missing / extra / elsewhere list at most 8 names each (planned but not moved, moved but not planned,
    moved to a buffer other than CPU).
    """
    planned = {t.name for t in model.tensors if t.per_expert and t.block in plan.cpu_blocks}
    forms = {
        "override_tensor": parse_override_value(plan.ot) if plan.ot else [],
        "n_cpu_moe": n_cpu_moe_rules(plan.n_cpu_moe),
    }
    out: dict[str, Any] = {"planned": len(planned), "forms": {}}
    for name, rules in forms.items():
        moved = llama_overrides(model.path, rules)
        missing, extra = sorted(planned - set(moved)), sorted(set(moved) - planned)
        elsewhere = sorted(t for t, b in moved.items() if b != "CPU")
        out["forms"][name] = {
            "ok": not (missing or extra or elsewhere),
            "moved": len(moved),
            "missing": missing[:8],
            "extra": extra[:8],
            "elsewhere": elsewhere[:8],
        }
    out["ok"] = all(f["ok"] for f in out["forms"].values())
    return out
