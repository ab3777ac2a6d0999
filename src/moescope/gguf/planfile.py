"""The offload plan file: a versioned JSON document other tools can consume, and its text rendering.

``moescope plan offload --json`` prints it; ``moescope plan offload --from plan.json`` reads it back and
prints its flags and accounting again (without the model). Layout (``version`` 1; bytes are integers)::

    {"format": "moescope.offload-plan", "version": 1,
     "model": {"path", "name", "architecture", "n_blocks", "layer_ids", "mtp_blocks", "n_experts", "top_k"},
     "assumptions": {"ctx", "kv_type", "ubatch", "compute_buffer", "hardware": {...}, "accounting"},
     "plan": {"flavor", "flavor_source", "devices": [{"name", "budget", "blocks", "expert_blocks",
              "output_layer", "bytes": {"weights", "kv_cache", "compute", "experts", "used", "free"},
              "tensors": [...]}], "cpu": {"expert_blocks", "tensors", "bytes"}, "gpu_blocks", "cpu_blocks",
              "n_cpu_moe", "tensor_split", "rules": [[pattern, buffer]], "flags": {form: flags},
              "forms_agree", "notes"},
     "projection": {...}, "baseline": {"plan": {...}, "projection": {...}} | {"reason"},
     "cache": {...}?, "verified": {...}?}

A reader must refuse a ``format`` it does not know and a ``version`` above its own.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from moescope._units import format_bytes
from moescope.errors import FormatError, UsageError
from moescope.imports.registry import json_int, parse_json, short

PLAN_FORMAT = "moescope.offload-plan"
PLAN_VERSION = 1
MAX_PLAN_BYTES = 64 * 2**20  # a plan lists each tensor once: tens of thousands of names at most
ACCOUNTING = (
    "per GPU: its blocks' non-expert weights and KV cache (ctx x per-block K+V elements of the KV type; MLA: "
    "kv_lora_rank + rope dims), the routed experts it keeps, a compute-buffer allowance (the output GPU also "
    "ubatch x vocab x 4 bytes of logits) and the output head on the last GPU; the token embedding stays on "
    "the CPU; MTP / NextN blocks are not loaded and count nowhere"
)


def plan_document(model: Any, plan: Any, **parts: Any) -> dict[str, Any]:
    """The plan file of `plan` (a `moescope.gguf.offload.DevicePlan`) for `model`, with `parts`
    (assumptions, projection, baseline, cache, verified) added as given."""
    from moescope.gguf.offload import forms_agree

    body = plan.to_dict(model)
    body["forms_agree"] = forms_agree(plan, model)
    doc = {
        "format": PLAN_FORMAT,
        "version": PLAN_VERSION,
        "model": {
            "path": model.path,
            "name": model.name,
            "architecture": model.architecture,
            "n_blocks": model.n_blocks,
            "layer_ids": list(model.layer_ids),
            "mtp_blocks": list(model.mtp_blocks),
            "n_experts": model.n_experts,
            "top_k": model.top_k,
        },
        "plan": body,
    }
    doc.update({k: v for k, v in parts.items() if v is not None})
    return doc


def read_plan(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a plan file written by `plan_document` (as JSON).

    Raises
    ------
    UsageError : the path is not a file.
    FormatError : not a plan file, a newer version, or a field of the wrong type (named, with the fix).
    """
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--from {str(p)!r} does not exist or is not a file; give a plan written by --json")
    size = p.stat().st_size
    if size > MAX_PLAN_BYTES:
        raise FormatError(
            f"--from {str(p)!r} has {size} bytes; a plan file is at most {MAX_PLAN_BYTES} bytes: is it a plan?"
        )
    doc = parse_json(p.read_bytes(), f"plan file {str(p)!r}")
    what = f"plan file {str(p)!r}"
    if not isinstance(doc, dict) or doc.get("format") != PLAN_FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise FormatError(
            f"{what} has format {short(got)}, expected {PLAN_FORMAT!r}; give the output of "
            f"'moescope plan offload ... --json'"
        )
    version = json_int(doc.get("version"), f"{what}: version", 1)
    if version > PLAN_VERSION:
        raise FormatError(f"{what} is version {version}; this moescope reads up to {PLAN_VERSION}: upgrade moescope")
    plan = doc.get("plan")
    if not isinstance(plan, dict):
        raise FormatError(f"{what} has no 'plan' object; the file is incomplete, write it again with --json")
    _check_flags(plan.get("flags"), f"{what}: plan.flags")
    _check_devices(plan.get("devices"), f"{what}: plan.devices")
    for key in ("gpu_blocks", "cpu_blocks"):
        _ints(plan.get(key, []), f"{what}: plan.{key}")
    _check(plan, "flavor", str, what, "plan")
    _check(plan, "flavor_source", str, what, "plan")
    _check(plan, "forms_agree", bool, what, "plan")
    _check(plan, "tensor_split", list, what, "plan")
    notes = plan.get("notes", [])
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise FormatError(f"{what}: plan.notes is {short(notes)}, expected a list of strings")
    cpu = _check(plan, "cpu", dict, what, "plan") or {}
    _ints(cpu.get("expert_blocks", []), f"{what}: plan.cpu.expert_blocks")
    json_int(cpu.get("bytes", 0), f"{what}: plan.cpu.bytes")
    for key, sub in (("model", ("name", "path")), ("assumptions", ("kv_type",))):
        part = _check(doc, key, dict, what, "") or {}
        for k in sub:
            _check(part, k, str, what, key)
    ctx = (doc.get("assumptions") or {}).get("ctx", plan.get("ctx", 1))
    json_int(ctx, f"{what}: assumptions.ctx", 1)
    _check_projection(doc.get("projection"), f"{what}: projection")
    base = _check(doc, "baseline", dict, what, "")
    if base is not None:
        json_int(base.get("margin", 0), f"{what}: baseline.margin")
        _check(base, "reason", str, what, "baseline")
        if "plan" in base:
            bp = _check(base, "plan", dict, what, "baseline")
            _check_flags(bp.get("flags"), f"{what}: baseline.plan.flags")
            _ints(bp.get("gpu_blocks", []), f"{what}: baseline.plan.gpu_blocks")
            _check_projection(base.get("projection"), f"{what}: baseline.projection")
        elif "reason" not in base:
            raise FormatError(f"{what}: baseline has neither a plan nor a reason; write the plan again with --json")
    _check_verified(doc.get("verified"), f"{what}: verified")
    cache = _check(doc, "cache", dict, what, "")
    if cache and json_int(cache.get("slots", 0), f"{what}: cache.slots"):
        _number(cache.get("tokens_per_second"), f"{what}: cache.tokens_per_second")
        _number(cache.get("miss_rate"), f"{what}: cache.miss_rate")
    return doc


def _check(obj: dict[str, Any], key: str, kind: type, what: str, where: str) -> Any:
    """obj[key] when present (None allowed), after checking its type."""
    value = obj.get(key)
    if value is not None and (not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))):
        name = f"{where}.{key}" if where else key
        raise FormatError(f"{what}: {name} is {short(value)}, expected a {kind.__name__}; fix or rewrite the file")
    return value


def _check_flags(flags: Any, what: str) -> None:
    if not isinstance(flags, dict) or not flags or not all(isinstance(v, str) for v in flags.values()):
        raise FormatError(f"{what} is {short(flags)}, expected an object of flag strings")


def _ints(value: Any, what: str) -> list[int]:
    if not isinstance(value, list):
        raise FormatError(f"{what} is {short(value)}, expected a list of integers")
    return [json_int(v, f"{what}[{i}]") for i, v in enumerate(value)]


def _number(value: Any, what: str, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:  # NaN
        raise FormatError(f"{what} is {short(value)}, expected a number")


def _check_devices(devices: Any, what: str) -> None:
    if not isinstance(devices, list) or not devices:
        raise FormatError(f"{what} is {short(devices)}, expected a list of devices")
    for i, d in enumerate(devices):
        if not isinstance(d, dict) or not isinstance(d.get("name"), str) or not isinstance(d.get("bytes"), dict):
            raise FormatError(f"{what}[{i}] is {short(d)}, expected an object with name and bytes")
        for key in ("weights", "kv_cache", "compute", "experts", "used"):
            json_int(d["bytes"].get(key), f"{what}[{i}].bytes.{key}")
        json_int(d.get("budget"), f"{what}[{i}].budget", 1)
        for key in ("blocks", "expert_blocks"):
            _ints(d.get(key), f"{what}[{i}].{key}")
        _check(d, "output_layer", bool, what, f"[{i}]")


def _check_projection(proj: Any, what: str) -> None:
    if proj is None:
        return
    if not isinstance(proj, dict):
        raise FormatError(f"{what} is {short(proj)}, expected an object")
    _number(proj.get("decode_tokens_per_s"), f"{what}.decode_tokens_per_s")
    _number(proj.get("prefill_pcie_bound_tokens_per_s"), f"{what}.prefill_pcie_bound_tokens_per_s", optional=True)


def _check_verified(v: Any, what: str) -> None:
    if v is None:
        return
    forms = v.get("forms") if isinstance(v, dict) else None
    if not isinstance(forms, dict):
        raise FormatError(f"{what} is {short(v)}, expected an object with forms")
    _check(v, "split", bool, what, "")
    for name, r in forms.items():
        w = f"{what}.forms.{name}"
        if not isinstance(r, dict) or not isinstance(r.get("ok"), bool) or not isinstance(r.get("planned"), dict):
            raise FormatError(f"{w} is {short(r)}, expected an object with ok and planned")
        for b, n in r["planned"].items():
            json_int(n, f"{w}.planned.{b}")
        json_int(r.get("moved"), f"{w}.moved")
        for key in ("buffers", "missing", "extra", "wrong"):
            items = r.get(key)
            if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
                raise FormatError(f"{w}.{key} is {short(items)}, expected a list of names")


def _blocks(blocks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, run = [], []
    for b in sorted(blocks):
        if run and b != run[-1] + 1:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(b)
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(out) or "none"


def render(doc: dict[str, Any]) -> list[str]:
    """The plan file as the lines ``plan offload`` prints."""
    plan = doc["plan"]
    m = doc.get("model") or {}
    a = doc.get("assumptions") or {}
    n_moe = len(plan.get("gpu_blocks", [])) + len(plan.get("cpu_blocks", []))
    lines = [
        f"{plan.get('flavor', 'llama.cpp')} plan for {m.get('name') or m.get('path', 'the model')}: "
        f"{len(plan['devices'])} GPU(s), ctx {a.get('ctx', plan.get('ctx'))} "
        f"({a.get('kv_type', plan.get('kv_type'))} KV); "
        f"{len(plan.get('gpu_blocks', []))} of {n_moe} MoE layers' experts in VRAM"
    ]
    for d in plan["devices"]:
        b = d["bytes"]
        lines.append(
            f"  {d['name']}: blocks {_blocks(d['blocks'])}{' + output' if d.get('output_layer') else ''}; "
            f"weights {format_bytes(b['weights'])} + KV {format_bytes(b['kv_cache'])} + compute "
            f"{format_bytes(b['compute'])} + experts {format_bytes(b['experts'])} ({len(d['expert_blocks'])} layer(s)) "
            f"= {format_bytes(b['used'])} of {format_bytes(d['budget'])}"
        )
    cpu = plan.get("cpu") or {}
    if cpu:
        lines.append(
            f"  CPU: experts of blocks {_blocks(cpu.get('expert_blocks', []))}, token embedding: "
            f"{format_bytes(cpu.get('bytes', 0))}"
        )
    for name, flag in plan["flags"].items():
        lines.append(f"  {name}: {flag}")
    if "forms_agree" in plan:
        lines.append(
            f"  the forms put every tensor where planned: {'yes' if plan['forms_agree'] else 'NO'}"
            + (
                " (-ts checked against llama.cpp's layer rule)"
                if plan.get("tensor_split") and plan.get("flavor", "llama.cpp") == "llama.cpp"
                else ""
            )
        )
    v = doc.get("verified")
    if v:
        for form, r in v["forms"].items():
            counts = ", ".join(f"{n} on {b}" for b, n in sorted(r["planned"].items()))
            lines.append(
                f"  verified in llama.cpp, {form}: "
                + (
                    f"exactly the planned tensors ({counts}; buffers {', '.join(r['buffers'])})"
                    if r["ok"]
                    else f"NO: {r['moved']} moved; missing {r['missing']}, extra {r['extra']}, wrong {r['wrong']}"
                )
            )
        if v.get("split") is not None:
            lines.append(f"  -ts under llama.cpp's layer rule: {'as planned' if v['split'] else 'NOT as planned'}")
    for note in plan.get("notes") or []:
        lines.append(f"  note: {note}")
    if plan.get("flavor_source"):
        lines.append(f"  flag semantics from: {plan['flavor_source']}")
    proj = doc.get("projection")
    base = doc.get("baseline")
    if proj:
        pre = proj.get("prefill_pcie_bound_tokens_per_s")
        lines.append(
            f"decode ~{proj['decode_tokens_per_s']:.1f} tok/s; prefill "
            + (f"<= {pre:.0f} tok/s (PCIe streaming of CPU-resident experts)" if pre else "not PCIe-bound")
        )
    if base:
        if "plan" in base:
            bp, bproj = base["plan"], base.get("projection") or {}
            lines.append(
                f"baseline, llama.cpp --fit (its rule, {format_bytes(base.get('margin', 0))} free per GPU): "
                f"{len(bp.get('gpu_blocks', []))} of {n_moe} MoE layers' experts in VRAM, decode "
                f"~{bproj.get('decode_tokens_per_s', float('nan')):.1f} tok/s: {next(iter(bp['flags'].values()))}"
            )
        else:
            lines.append(f"baseline, llama.cpp --fit: {base.get('reason')}")
    cache = doc.get("cache")
    if cache:
        lines.append(
            f"a per-expert cache in the same VRAM ({cache['slots']} slots): decode "
            f"~{cache['tokens_per_second']:.1f} tok/s (demand miss rate {cache['miss_rate']:.1%}, LRU, per-layer "
            f"sizes chosen for the budget)"
            if cache.get("slots")
            else f"a per-expert cache does not fit: {cache.get('reason')}"
        )
    return lines
