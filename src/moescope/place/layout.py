"""A static expert placement as data: which device holds which expert, per MoE layer.

One representation for every method, with or without replicas:

- ``table: [layers, D, slots] int32`` -- the logical expert in each physical slot of each device, ``-1``
  for an empty slot. Device ``d`` owns physical ids ``d * slots .. (d + 1) * slots - 1`` (EPLB's
  convention: a device's physical experts are contiguous).
- ``slots = ceil(E / D) + ceil(R / D)`` for ``E`` experts, ``D`` devices and ``R`` replicas (extra copies)
  per layer: every device can hold an even share of the experts and of the copies, rounded up.

Derived EPLB-style arrays (the names DeepSeek EPLB, vLLM and SGLang use):

- ``phy2log: [layers, D * slots] int64`` -- logical expert of each physical slot (-1 empty);
- ``log2phy: [layers, E, max_copies] int64`` -- physical slots holding each logical expert, ascending,
  -1 padded;
- ``logcnt: [layers, E] int64`` -- copies of each logical expert (1 + its replicas).

A valid placement holds every expert at least once per layer, never twice on one device, and exactly
``R`` extra copies per layer. This module only describes and checks placements; methods live in
`moescope.place.methods`, scoring in `moescope.place.metrics`, files in `moescope.place.export`.

    >>> p = Placement.from_assign(assign, n_devices=8, layer_ids=trace.layer_ids, method="frequency")
    >>> p.phy2log().shape     # (layers, 8 * slots)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from moescope.errors import UsageError


def slot_capacity(n_experts: int, n_devices: int, replicas: int = 0) -> int:
    """Physical slots per device: ``ceil(E / D) + ceil(R / D)``."""
    return -(-n_experts // n_devices) + -(-replicas // n_devices)


def check_devices(n_devices: int, n_experts: int, replicas: int = 0) -> None:
    """Raise `UsageError` unless ``1 <= D <= E`` and ``0 <= R <= E * (D - 1)`` (a copy per other device at most)."""
    if isinstance(n_devices, bool) or not isinstance(n_devices, (int, np.integer)) or not 1 <= n_devices <= n_experts:
        raise UsageError(
            f"{n_devices!r} devices for {n_experts} experts per layer: expected 1..{n_experts}; "
            f"pick --devices at most the expert count"
        )
    if isinstance(replicas, bool) or not isinstance(replicas, (int, np.integer)) or replicas < 0:
        raise UsageError(f"--replicas {replicas!r}: expected an integer >= 0")
    if replicas > n_experts * (n_devices - 1):
        raise UsageError(
            f"--replicas {replicas} with {n_devices} device(s) and {n_experts} experts: at most "
            f"{n_experts * (n_devices - 1)} copies fit (one per expert per other device); use fewer replicas"
        )


def placement_errors(table: np.ndarray, n_experts: int, replicas: int) -> list[str]:
    """Every way ``table [layers, D, slots]`` breaks the placement rules (empty list when valid)."""
    errs: list[str] = []
    if table.ndim != 3:
        return [f"table must be [layers, devices, slots], got shape {table.shape}"]
    n_lay, n_dev, _ = table.shape
    if table.size and (table.min() < -1 or table.max() >= n_experts):
        errs.append(f"expert ids outside -1..{n_experts - 1} (min {table.min()}, max {table.max()})")
        return errs
    for layer in range(n_lay):
        ids = table[layer][table[layer] >= 0]
        counts = np.bincount(ids, minlength=n_experts)
        missing = np.flatnonzero(counts == 0)
        if missing.size:
            errs.append(f"layer index {layer}: experts {missing[:8].tolist()} are on no device")
        if int(counts.sum()) != n_experts + replicas:
            errs.append(f"layer index {layer}: {int(counts.sum())} copies placed, expected {n_experts + replicas}")
        for d in range(n_dev):
            held = table[layer, d][table[layer, d] >= 0]
            if np.unique(held).size != held.size:
                errs.append(f"layer index {layer}, device {d} holds an expert twice ({held.tolist()})")
    return errs


@dataclasses.dataclass(frozen=True, eq=False)
class Placement:
    """Experts on devices for every MoE layer (see the module docstring for the table's layout).

    table : [layers, D, slots] int32 expert ids, -1 for an empty slot.
    n_experts : E, logical experts per layer.
    layer_ids : [layers] model layer index of each row.
    method : the method that produced it.
    replicas : R, extra copies per layer.
    """

    table: np.ndarray
    n_experts: int
    layer_ids: np.ndarray
    method: str
    replicas: int = 0

    def __post_init__(self) -> None:
        errs = placement_errors(self.table, self.n_experts, self.replicas)
        if errs:
            raise UsageError(f"invalid placement ({self.method}): " + "; ".join(errs[:4]))
        if self.slots != slot_capacity(self.n_experts, self.n_devices, self.replicas):
            raise UsageError(
                f"placement table has {self.slots} slots per device; {self.n_experts} experts and "
                f"{self.replicas} replicas on {self.n_devices} devices need "
                f"{slot_capacity(self.n_experts, self.n_devices, self.replicas)}"
            )
        if len(self.layer_ids) != self.table.shape[0]:
            raise UsageError(f"{len(self.layer_ids)} layer ids for a table of {self.table.shape[0]} layers")

    @property
    def n_layers(self) -> int:
        return int(self.table.shape[0])

    @property
    def n_devices(self) -> int:
        return int(self.table.shape[1])

    @property
    def slots(self) -> int:
        return int(self.table.shape[2])

    @classmethod
    def from_assign(
        cls, assign: np.ndarray, n_devices: int, layer_ids: Any, method: str, n_experts: int | None = None
    ) -> Placement:
        """A replica-free placement from ``assign [layers, E]`` (device of each expert), slots filled in id order."""
        assign = np.asarray(assign, dtype=np.int64)
        n_exp = assign.shape[1] if n_experts is None else n_experts
        slots = slot_capacity(n_exp, n_devices)
        table = np.full((assign.shape[0], n_devices, slots), -1, dtype=np.int32)
        for layer in range(assign.shape[0]):
            if assign[layer].min() < 0 or assign[layer].max() >= n_devices:
                raise UsageError(f"layer index {layer}: device ids outside 0..{n_devices - 1}")
            fill = np.zeros(n_devices, dtype=np.int64)
            for e in range(n_exp):
                d = assign[layer, e]
                if fill[d] == slots:
                    raise UsageError(
                        f"layer index {layer}: device {d} is given more than {slots} experts (ceil(E/D)); "
                        f"the method broke the slot capacity"
                    )
                table[layer, d, fill[d]] = e
                fill[d] += 1
        return cls(table, n_exp, np.asarray(layer_ids, dtype=np.int64), method, 0)

    def assign(self) -> np.ndarray:
        """[layers, E] int64 device of each expert's first copy (the only copy without replicas)."""
        out = np.full((self.n_layers, self.n_experts), -1, dtype=np.int64)
        for layer in range(self.n_layers):
            for d in range(self.n_devices - 1, -1, -1):
                held = self.table[layer, d][self.table[layer, d] >= 0]
                out[layer, held] = d
        return out

    def phy2log(self) -> np.ndarray:
        """[layers, D * slots] int64 logical expert of each physical slot (-1 empty)."""
        return self.table.reshape(self.n_layers, -1).astype(np.int64)

    def logcnt(self) -> np.ndarray:
        """[layers, E] int64 copies of each logical expert."""
        p2l = self.phy2log()
        return np.stack([np.bincount(row[row >= 0], minlength=self.n_experts) for row in p2l]).astype(np.int64)

    def log2phy(self) -> np.ndarray:
        """[layers, E, max copies] int64 physical slots of each logical expert, ascending, -1 padded."""
        p2l = self.phy2log()
        width = int(self.logcnt().max())
        out = np.full((self.n_layers, self.n_experts, width), -1, dtype=np.int64)
        for layer in range(self.n_layers):
            fill = np.zeros(self.n_experts, dtype=np.int64)
            for p, e in enumerate(p2l[layer].tolist()):
                if e >= 0:
                    out[layer, e, fill[e]] = p
                    fill[e] += 1
        return out

    def device_experts(self) -> list[list[list[int]]]:
        """[layers][D] lists of the expert ids on each device (copies included, slot order)."""
        return [[[int(e) for e in row if e >= 0] for row in layer] for layer in self.table]

    def experts_per_device(self) -> np.ndarray:
        """[layers, D] int64 occupied slots (experts and copies) on each device."""
        return (self.table >= 0).sum(axis=2).astype(np.int64)
