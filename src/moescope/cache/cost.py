"""A simple, stated cost model for decode speed with experts in slow and fast memory.

Decode at batch size 1 is memory-bandwidth bound: each token reads every weight it uses once. The
model prices one token as

    dense_bytes / gpu + sum over layers of (experts read on the GPU x bytes / gpu
                                            + experts read on the CPU x bytes / cpu
                                            + experts moved over PCIe x bytes / pcie)

with three placements of the routed experts:

- ``all-cpu``: every expert on the CPU (llama.cpp ``--cpu-moe``): k experts per layer read at CPU speed;
- ``static-layers``: whole layers' experts on the GPU, as many as the slot budget holds (``--n-cpu-moe``),
  the rest on the CPU;
- ``expert-cache``: a per-expert cache in VRAM of the simulated capacities: hits read at GPU speed,
  every demand miss and every prefetch load moved over PCIe first (loads counted from the replay);
- ``expert-cache, misses on CPU``: the same cache, but the token computes a missing expert on the CPU
  (where its weights live) while its copy to VRAM runs in the background, so the cache holds what the
  replay says; the token takes the longer of that compute and the PCIe time of all its loads.

Assumptions, printed with every projection: batch 1; weights read once per token; no overlap of
transfers with compute (save the background copies above), nor of CPU with GPU work;
KV-cache reads, activations and kernel launch costs ignored; bandwidths are sustained, not peak.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from moescope.errors import UsageError

ASSUMPTIONS = (
    "batch 1, memory-bandwidth bound: each weight used by a token is read once",
    "no overlap of PCIe transfers with compute (except background copies of CPU-computed misses), "
    "nor of CPU with GPU work",
    "KV-cache reads, activations and launch overheads ignored; bandwidths are sustained figures",
)


@dataclasses.dataclass(frozen=True)
class Hardware:
    """Sustained bandwidths in GB/s (1e9 bytes per second)."""

    pcie_gbps: float = 25.0
    gpu_gbps: float = 900.0
    cpu_gbps: float = 60.0

    def __post_init__(self) -> None:
        for name in ("pcie_gbps", "gpu_gbps", "cpu_gbps"):
            v = getattr(self, name)
            if not np.isfinite(v) or v <= 0:
                raise UsageError(f"--{name.replace('_', '-')} is {v!r}; give a positive bandwidth in GB/s")


@dataclasses.dataclass(frozen=True)
class Projection:
    name: str
    seconds_per_token: float
    detail: str

    @property
    def tokens_per_second(self) -> float:
        return 1.0 / self.seconds_per_token if self.seconds_per_token > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "tokens_per_second": self.tokens_per_second}


def project_decode(
    *,
    expert_bytes: np.ndarray,
    top_k: int,
    n_experts: int,
    dense_bytes: float,
    budget_slots: int,
    cache_hits_per_token: np.ndarray | None = None,
    cache_loads_per_token: np.ndarray | None = None,
    cache_misses_per_token: np.ndarray | None = None,
    hw: Hardware | None = None,
) -> list[Projection]:
    """Seconds and tokens per second per token for each placement.

    Parameters
    ----------
    expert_bytes : [layers] bytes of one routed expert per layer (gate + up + down).
    top_k, n_experts : routing shape.
    dense_bytes : bytes of everything else read per token (attention, shared experts, norms, output head).
    budget_slots : expert slots of VRAM available for routed experts.
    cache_hits_per_token, cache_loads_per_token, cache_misses_per_token : [layers] from a replay (loads =
        demand misses + prefetch loads); omitted: no cache projection.
    hw : bandwidths.
    """
    hw = hw or Hardware()
    eb = np.asarray(expert_bytes, dtype=np.float64)
    gpu, cpu, pcie = hw.gpu_gbps * 1e9, hw.cpu_gbps * 1e9, hw.pcie_gbps * 1e9
    dense = dense_bytes / gpu
    out = [
        Projection("all-cpu", dense + float((top_k * eb).sum()) / cpu, "every routed expert read by the CPU"),
    ]
    # static: whole layers on the GPU, first come first served in layer order (the budget's slot count)
    n_gpu_layers = min(budget_slots // n_experts, eb.size)
    on_gpu = np.zeros(eb.size, dtype=bool)
    on_gpu[:n_gpu_layers] = True
    t_static = dense + float((top_k * eb[on_gpu]).sum()) / gpu + float((top_k * eb[~on_gpu]).sum()) / cpu
    out.append(
        Projection(
            "static-layers",
            t_static,
            f"{n_gpu_layers} of {eb.size} layers' experts in VRAM ({n_gpu_layers * n_experts} slots), rest on CPU",
        )
    )
    if cache_hits_per_token is not None and cache_loads_per_token is not None:
        hits = np.asarray(cache_hits_per_token, dtype=np.float64)
        loads = np.asarray(cache_loads_per_token, dtype=np.float64)
        t_cache = dense + float((hits * eb).sum()) / gpu + float((loads * eb).sum()) / pcie
        out.append(
            Projection(
                "expert-cache",
                t_cache,
                f"{hits.sum():.2f} hits/token read in VRAM, {loads.sum():.2f} loads/token over PCIe",
            )
        )
        if cache_misses_per_token is not None:
            miss = np.asarray(cache_misses_per_token, dtype=np.float64)
            compute = dense + float((hits * eb).sum()) / gpu + float((miss * eb).sum()) / cpu
            link = float((loads * eb).sum()) / pcie
            out.append(
                Projection(
                    "expert-cache, misses on CPU",
                    max(compute, link),
                    f"{miss.sum():.2f} misses/token computed on the CPU while copied to VRAM in the background"
                    + (" (PCIe-bound)" if link > compute else ""),
                )
            )
    return out
