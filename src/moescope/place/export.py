"""Placement files: moescope's placement JSON, and the EPLB map SGLang reads. Written atomically.

``placement.json`` (`write_placement`, read back by `read_placement`)::

    {"format": "moescope-placement", "version": 1, "model": ..., "method": ..., "n_experts": E,
     "n_devices": D, "slots_per_device": S, "replicas": R, "layer_ids": [...],
     "layers": {"<layer id>": {"<device>": [expert ids, copies included]}},
     "phy2log": [layers][D * S], "log2phy": [layers][E][max copies], "logcnt": [layers][E]}

The arrays follow DeepSeek EPLB / vLLM naming: physical slot ``p`` is slot ``p % S`` of device ``p // S``;
``phy2log`` gives its logical expert (-1: empty slot), ``log2phy`` each expert's physical slots (-1 padded),
``logcnt`` each expert's copies. Rows follow ``layer_ids`` (the trace's MoE layers, in order).

`write_eplb_map` writes ``{"physical_to_logical_map": phy2log}``, the file SGLang's
``--init-expert-location`` accepts. SGLang needs every physical slot filled and as many rows as the
model's layers: it is refused when a slot is empty (choose R so that D divides E + R), and rows cover only
the traced MoE layers (pad dense layers yourself if your engine indexes all layers).

    >>> write_placement(placement, "placement.json", model=trace.meta.model)
    >>> read_placement("placement.json").table.shape
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from moescope import _atomic
from moescope.errors import FormatError, UsageError
from moescope.place.layout import Placement, placement_errors, slot_capacity

FORMAT = "moescope-placement"
VERSION = 1


def placement_to_dict(placement: Placement, model: str | None = None) -> dict[str, Any]:
    """The JSON-able form of `placement` (see the module docstring)."""
    per_layer = placement.device_experts()
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": model,
        "method": placement.method,
        "n_experts": placement.n_experts,
        "n_devices": placement.n_devices,
        "slots_per_device": placement.slots,
        "replicas": placement.replicas,
        "layer_ids": placement.layer_ids.tolist(),
        "layers": {
            str(lid): {str(d): experts for d, experts in enumerate(per_layer[i])}
            for i, lid in enumerate(placement.layer_ids.tolist())
        },
        "phy2log": placement.phy2log().tolist(),
        "log2phy": placement.log2phy().tolist(),
        "logcnt": placement.logcnt().tolist(),
    }


def write_placement(
    placement: Placement, path: str | os.PathLike, overwrite: bool = False, model: str | None = None
) -> Path:
    """Write the placement JSON atomically; refuses to replace an existing file unless `overwrite`."""
    text = json.dumps(placement_to_dict(placement, model), separators=(",", ":")) + "\n"
    return _atomic.write_text_atomic(path, text, overwrite)


def write_eplb_map(placement: Placement, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``{"physical_to_logical_map": phy2log}`` (SGLang's ``--init-expert-location`` file), atomically."""
    p2l = placement.phy2log()
    if (p2l < 0).any():
        raise UsageError(
            f"{int((p2l[0] < 0).sum())} physical slot(s) per layer are empty ({placement.n_experts} experts + "
            f"{placement.replicas} replicas on {placement.n_devices} devices x {placement.slots} slots); SGLang "
            f"needs every slot filled: pick --replicas so that the devices divide experts + replicas"
        )
    text = json.dumps({"physical_to_logical_map": p2l.tolist()}, separators=(",", ":")) + "\n"
    return _atomic.write_text_atomic(path, text, overwrite)


def read_placement(path: str | os.PathLike) -> Placement:
    """Read a placement JSON written by `write_placement`, checking it is a valid placement."""
    p = Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"cannot read placement {str(p)!r}: {exc}; give a file written by 'moescope place'") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise FormatError(f'{str(p)!r} is not a moescope placement (no "format": "{FORMAT}")')
    if d.get("version") != VERSION:
        raise FormatError(f"{str(p)!r} has placement version {d.get('version')!r}; this moescope reads {VERSION}")
    try:
        n_exp, n_dev, slots = int(d["n_experts"]), int(d["n_devices"]), int(d["slots_per_device"])
        replicas, layer_ids = int(d["replicas"]), [int(x) for x in d["layer_ids"]]
        table = np.full((len(layer_ids), n_dev, slots), -1, dtype=np.int32)
        for i, lid in enumerate(layer_ids):
            for dev in range(n_dev):
                held = [int(e) for e in d["layers"][str(lid)][str(dev)]]
                if len(held) > slots:
                    raise FormatError(f"{str(p)!r}: layer {lid}, device {dev} lists {len(held)} > {slots} experts")
                table[i, dev, : len(held)] = held
    except FormatError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(
            f"{str(p)!r} is a malformed placement ({exc!r}); re-export it with 'moescope place'"
        ) from None
    if slots != slot_capacity(n_exp, n_dev, replicas):
        raise FormatError(f"{str(p)!r}: {slots} slots per device, expected {slot_capacity(n_exp, n_dev, replicas)}")
    errs = placement_errors(table, n_exp, replicas)
    if errs:
        raise FormatError(f"{str(p)!r} is not a valid placement: " + "; ".join(errs[:3]))
    if not np.array_equal(np.asarray(d.get("phy2log"), dtype=np.int64), table.reshape(len(layer_ids), -1)):
        raise FormatError(f"{str(p)!r}: phy2log disagrees with the per-device lists; the file was edited")
    return Placement(table, n_exp, np.asarray(layer_ids, dtype=np.int64), str(d.get("method")), replicas)
