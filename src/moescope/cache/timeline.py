"""A decode timeline: what tokens/s each way of placing experts gives on a stated machine, token by token.

Batch-1 decode runs the MoE layers in order for every token. Per layer (one "step"): the dense part of the
layer (attention, shared experts, router) runs on the GPU, then the token's k routed experts run where they
are: on the GPU when resident (read at GPU bandwidth), on the CPU (llama.cpp's hybrid path: read at CPU
bandwidth), or loaded over PCIe first. Decode is memory bound, so every cost is bytes / bandwidth.

The PCIe link is one FIFO queue: a transfer starts when the link is free and the request is issued, and
takes ``latency + bytes / bandwidth``. With ``overlap`` (the default), the GPU computes the dense part and
the resident experts while the layer's missing experts arrive, and the step ends when both are done:
``max(dense + hits x gpu, arrival of the last needed expert)``, the wait beyond the compute being a stall.
Without overlap the step is ``dense + hits x gpu + the transfers'`` time, which with zero latency is
exactly the closed-form model of `moescope.cache.cost` (a test checks it).

Strategies (`STRATEGIES`), each over the same tokens:

- ``cpu-moe``: every routed expert on the CPU (llama.cpp ``--cpu-moe``);
- ``static-layers``: whole layers' experts on the GPU, as many as the VRAM holds, the first layers' on the
  CPU (llama.cpp ``--n-cpu-moe N``);
- ``static-experts``: each layer's most frequent train experts pinned in the same VRAM, the
  rest read by the CPU (no transfers; what a per-expert ``-ot`` placement of a split GGUF does);
- ``cache:<policy>``: a per-layer expert cache in the same VRAM, each registered demand-loading policy
  (`moescope.cache.POLICIES`; Belady is offline, a reference);
- ``prefetch:<predictor>``: an LRU cache plus prefetches issued ``distance`` MoE layers ahead, queued on the
  same link: ``lookahead`` (the captured routers of later layers, `capture hf --lookahead`), the id-only
  ``cross-layer`` (this token's experts at layer l through a table learned on the train halves) and
  ``transition`` (the previous token's experts at the target layer, likewise), or ``oracle`` (the true
  experts: the best any predictor could do). A demand for an expert still in flight waits for it;
  prefetches count as bandwidth. (Prefetching the previous token's own experts would do nothing: LRU holds
  them already.)
- ``bound``: the least time any per-expert cache of this size could take: every expert computed on the GPU
  and Belady's transfers (no schedule, prefetching or not, loads fewer) fully hidden, ``max(compute,
  transfers)`` over the whole run.

Caches are per layer with ``slots // layers`` experts each (uniform); static layers get ``slots // E``
layers. Not modelled: batch > 1, kernel launch overheads, CPU/GPU contention, KV-cache growth.

    >>> result = simulate_timeline(trace, expert_bytes=eb, dense_bytes=d, slots=2048, machine=MACHINES[DEFAULT_MACHINE])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from moescope._jit import njit, njit_inline, njit_parallel, prange
from moescope.errors import UsageError
from moescope.trace import RoutingTrace

STATIC_STRATEGIES = ("cpu-moe", "static-layers")
PREDICTORS = ("lookahead", "cross-layer", "transition", "oracle")


@dataclasses.dataclass(frozen=True)
class Machine:
    """Bandwidths (GB/s) and the PCIe per-transfer latency (microseconds) of a stated machine."""

    name: str
    gpu_gbps: float
    cpu_gbps: float
    pcie_gbps: float
    pcie_latency_us: float = 10.0

    def __post_init__(self) -> None:
        for key in ("gpu_gbps", "cpu_gbps", "pcie_gbps", "pcie_latency_us"):
            v = getattr(self, key)
            if (
                isinstance(v, bool)
                or not isinstance(v, (int, float))
                or not np.isfinite(v)
                or v < 0
                or (v == 0 and key != "pcie_latency_us")
            ):
                flag = "--latency-us" if key == "pcie_latency_us" else f"--{key.replace('_', '-')}"
                raise UsageError(f"{flag} is {v!r}; give a positive number (the latency may be 0)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Presets: sustained figures, not peaks. PCIe x16 after protocol overhead (4.0 ~ 25, 5.0 ~ 50 GB/s); DDR5 ~ 35-40
# GB/s sustained per channel (dual channel ~ 70-80, quad ~ 150, a 12-channel server ~ 250 of what one
# process's threads get); GPUs: RTX 4090 class ~ 900, RTX 5090 class ~ 1500, H100 class ~ 3000 GB/s. The
# latency is a transfer's fixed cost (launch, synchronisation). Flags override each figure.
MACHINES = {
    m.name: m
    for m in (
        Machine("consumer-pcie4", gpu_gbps=900.0, cpu_gbps=70.0, pcie_gbps=25.0, pcie_latency_us=10.0),
        Machine("consumer-pcie5", gpu_gbps=1500.0, cpu_gbps=80.0, pcie_gbps=50.0, pcie_latency_us=8.0),
        Machine("workstation-pcie5", gpu_gbps=1500.0, cpu_gbps=150.0, pcie_gbps=50.0, pcie_latency_us=8.0),
        Machine("datacenter-pcie5", gpu_gbps=3000.0, cpu_gbps=250.0, pcie_gbps=50.0, pcie_latency_us=8.0),
    )
}
DEFAULT_MACHINE = "consumer-pcie4"


def machine_preset(name: str) -> Machine:
    """The preset called `name`; `UsageError` naming the presets for an unknown one (``--machine``)."""
    try:
        return MACHINES[name]
    except KeyError:
        raise UsageError(f"--machine {name!r}: unknown; choose from {', '.join(MACHINES)}") from None


ASSUMPTIONS = (
    "batch-1 decode is memory-bandwidth bound: a token reads each weight it uses once (bytes / bandwidth)",
    "dense weights (attention, shared experts, norms, output head) live in VRAM, read at GPU bandwidth, spread "
    "evenly over the MoE layers; the VRAM budget is what is left for routed experts",
    "one PCIe link, first in first out: each expert moved takes latency + bytes / bandwidth; transfers overlap "
    "GPU compute (not with --no-overlap); a layer's CPU and GPU work run one after the other",
    "caches are per layer with slots // layers experts each, start empty (cold misses counted) and live across "
    "sequences; static layers are slots // experts whole layers, the last ones (--n-cpu-moe N keeps the first N "
    "on the CPU)",
    "not modelled: batches above 1, kernel launches, KV-cache reads, CPU and GPU competing for memory bandwidth",
)

# which strategies a user can build (online) and which are references that know the future
REFERENCES = ("cache:belady", "prefetch:oracle", "bound")


@dataclasses.dataclass(frozen=True)
class StrategyResult:
    """One strategy's run: seconds per token, the share of it spent stalled on transfers, PCIe bytes per
    token, and the hit rate (accesses served from VRAM); None fields where a strategy has no such thing."""

    name: str
    seconds: float
    tokens: int
    stall_seconds: float
    pcie_bytes: float
    hits: int
    accesses: int
    prefetch_loads: int = 0
    wasted_prefetches: int = 0
    note: str = ""

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")

    @property
    def family(self) -> str:
        """``static`` (a fixed placement: llama.cpp's, or pinned experts), ``cache`` (an online per-expert
        cache, prefetching or not) or ``reference`` (knows the future: Belady, the oracle, the bound)."""
        if self.name in REFERENCES:
            return "reference"
        return "cache" if self.name.startswith(("cache:", "prefetch:")) else "static"

    @property
    def stall_share(self) -> float:
        return self.stall_seconds / self.seconds if self.seconds > 0 else 0.0

    @property
    def hit_rate(self) -> float | None:
        return self.hits / self.accesses if self.accesses else None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(
            family=self.family,
            tokens_per_second=self.tokens_per_second,
            stall_share=self.stall_share,
            pcie_bytes_per_token=self.pcie_bytes / max(self.tokens, 1),
            hit_rate=self.hit_rate,
        )
        return d


# ----------------------------------------------------------------------------------------------
# kernels


def _prefetch_timeline(experts, pred, distance, capacity, t_gpu, t_pcie, t_dense, latency, overlap):
    """LRU caches per layer plus prefetches, on one FIFO link, token by token and layer by layer.

    experts : [tokens, layers, k] ids; pred : [tokens, layers, P] ids to prefetch into layer l + distance,
    issued at (t, l) after that step's demand misses (-1: none); capacity, t_gpu, t_pcie, t_dense : [layers]
    experts per cache, seconds per expert read on the GPU / moved over PCIe, dense seconds per step.
    Returns [7] float64: seconds, stall seconds, hits, demand misses, prefetch loads, wasted prefetches,
    PCIe seconds moving bytes (latency excluded).

    Two passes, exact: what each layer's cache holds does not depend on timing (a layer sees, in order, the
    prefetches issued for token t, then token t's demand), so `_cache_events` replays every layer on its own
    (in parallel, each cache in L1); `_link_timeline` then walks the steps in order with O(1) work each.
    """
    n_tok, n_lay, _ = experts.shape
    hits = np.zeros((n_tok, n_lay), dtype=np.int16)
    misses = np.zeros((n_tok, n_lay), dtype=np.int16)
    issued = np.zeros((n_tok, n_lay), dtype=np.int16)
    dep = np.full((n_tok, n_lay), -1, dtype=np.int64)
    wasted = np.zeros(n_lay, dtype=np.int64)
    _cache_events(experts, pred, distance, capacity, hits, misses, issued, dep, wasted)
    now, stall, busy = _link_timeline(hits, misses, issued, dep, pred.shape[2], distance, t_gpu, t_pcie, t_dense,
                                      latency, overlap)  # fmt: skip
    return np.array(
        [now, stall, hits.sum(), misses.sum(), issued.sum(), wasted.sum(), busy], dtype=np.float64
    )  # fmt: skip


@njit_parallel
def _cache_events(experts, pred, distance, capacity, hits, misses, issued, dep, wasted):
    """Replay every layer's LRU cache with its prefetches; write per step ``(t, l)``: ``hits``, demand
    ``misses``, ``issued`` (prefetch loads the step issues, into ``l + distance``), ``dep`` (the latest
    prefetch load this step's hits wait for, as ``step * P + position in its batch``, -1: none) and per layer
    ``wasted`` (prefetched experts evicted, or left at the end, without a hit)."""
    n_tok, n_lay, k = experts.shape
    n_pred = pred.shape[2]
    n_exp = 1
    for t in range(n_tok):
        for lay in range(n_lay):
            for j in range(k):
                n_exp = max(n_exp, experts[t, lay, j] + 1)
            for j in range(n_pred):
                n_exp = max(n_exp, pred[t, lay, j] + 1)
    for lay in prange(n_lay):  # the work of a layer in its own function: numba optimises it fully there
        wasted[lay] = _layer_events(experts, pred, distance, lay, n_exp, capacity[lay], hits, misses, issued, dep)


@njit
def _layer_events(experts, pred, distance, lay, n_exp, cap, hits, misses, issued, dep):
    """`_cache_events` for one layer; returns its wasted prefetches.

    The LRU order is a circular doubly linked list over expert ids with sentinel ``s = n_exp`` (most recent
    at ``nxt[s]``, least at ``prv[s]``); list operations are `njit_inline` helpers (compiled into the loop: a
    plain jitted call that takes arrays costs more than the operation). The layer's ids are copied into
    contiguous columns first and its results written back at the end: a step's entries of the
    [tokens, layers, ...] arrays lie a whole token apart, and reading them in place made the kernel 1.6x slower
    (150k tokens x 48 layers, one thread: 2.5 s against 1.6 s)."""
    n_tok, n_lay, k = experts.shape
    n_pred = pred.shape[2]
    src = lay - distance
    ex = np.empty((n_tok, k), dtype=experts.dtype)
    pr = np.empty((n_tok, n_pred), dtype=pred.dtype)
    for t in range(n_tok):
        for j in range(k):
            ex[t, j] = experts[t, lay, j]
        if src >= 0:
            for j in range(n_pred):
                pr[t, j] = pred[t, src, j]
    o_hit = np.empty(n_tok, dtype=np.int16)
    o_iss = np.zeros(n_tok, dtype=np.int16)
    o_dep = np.empty(n_tok, dtype=np.int64)
    s = n_exp
    prv = np.full(n_exp + 1, s, dtype=np.int64)
    nxt = np.full(n_exp + 1, s, dtype=np.int64)
    cached = np.zeros(n_exp, dtype=np.bool_)
    origin = np.full(n_exp, -1, dtype=np.int64)  # prefetched and not hit yet: its load's code, else -1
    need = np.full(n_exp, -1, dtype=np.int64)
    size, waste = 0, 0
    for t in range(n_tok):
        if src >= 0:  # the prefetches issued at step (t, src) arrive in this layer first
            for j in range(n_pred):  # predicted and resident: refreshed first, as hits are
                x = pr[t, j]
                if x >= 0 and cached[x]:
                    _unlink(prv, nxt, x)
                    _push_front(prv, nxt, s, x)
            q = 0
            for j in range(n_pred):
                x = pr[t, j]
                if x < 0 or cached[x]:
                    continue
                if size == cap:  # evict the least recently used
                    v = prv[s]
                    waste += origin[v] >= 0
                    _unlink(prv, nxt, v)
                    cached[v] = False
                    origin[v] = -1
                    size -= 1
                cached[x] = True
                origin[x] = (t * n_lay + src) * n_pred + q
                q += 1
                size += 1
                _push_front(prv, nxt, s, x)
            o_iss[t] = q
        n_hit, d = 0, -1
        for j in range(k):  # hits first: to the front, so the tail is never an expert this step needs
            x = ex[t, j]
            need[x] = t
            if cached[x]:
                n_hit += 1
                d = max(d, origin[x])
                origin[x] = -1
                _unlink(prv, nxt, x)
                _push_front(prv, nxt, s, x)
        for j in range(k):
            x = ex[t, j]
            if cached[x]:
                continue
            if size == cap:
                v = prv[s]
                while need[v] == t:  # only this step's own misses, just loaded: skip them
                    v = prv[v]
                waste += origin[v] >= 0
                _unlink(prv, nxt, v)
                cached[v] = False
                origin[v] = -1
                size -= 1
            cached[x] = True
            size += 1
            _push_front(prv, nxt, s, x)
        for j in range(k - 1, -1, -1):  # as the `lru` policy: slot 0 ends most recent
            x = ex[t, j]
            _unlink(prv, nxt, x)
            _push_front(prv, nxt, s, x)
        o_hit[t] = n_hit
        o_dep[t] = d
    for t in range(n_tok):
        hits[t, lay] = o_hit[t]
        misses[t, lay] = k - o_hit[t]
        dep[t, lay] = o_dep[t]
        if src >= 0:
            issued[t, src] = o_iss[t]
    for x in range(n_exp):
        if cached[x] and origin[x] >= 0:
            waste += 1
    return waste


@njit_inline
def _unlink(prv, nxt, x):
    """Take x out of the circular doubly linked list ``prv, nxt``."""
    nxt[prv[x]], prv[nxt[x]] = nxt[x], prv[x]


@njit_inline
def _push_front(prv, nxt, s, x):
    """Insert x right after the sentinel s (the most recent end)."""
    h = nxt[s]
    prv[x], nxt[x], prv[h], nxt[s] = s, h, x, x


@njit
def _link_timeline(hits, misses, issued, dep, n_pred, distance, t_gpu, t_pcie, t_dense, latency, overlap):
    """Walk the steps in order on one FIFO link: ``(seconds, stall seconds, PCIe seconds moving bytes)``.

    A step starts when the previous one ends; its demand misses, then its prefetches, queue on the link at
    its start, each taking ``latency + t_pcie``; it ends at ``max(compute, the last demand load, the
    prefetch it depends on)`` with overlap, or after compute plus that wait without."""
    n_tok, n_lay = hits.shape
    start = np.zeros(n_tok * n_lay, dtype=np.float64)  # when each step's prefetch batch began on the link
    now, stall, link, busy = 0.0, 0.0, 0.0, 0.0
    for t in range(n_tok):
        for lay in range(n_lay):
            s = t * n_lay + lay
            t0 = now
            wait = t0
            m = misses[t, lay]
            if m > 0:
                link = max(link, t0) + m * (latency + t_pcie[lay])
                busy += m * t_pcie[lay]
                wait = link
            d = dep[t, lay]
            if d >= 0:
                src, q = d // n_pred, d % n_pred
                wait = max(wait, start[src] + (q + 1) * (latency + t_pcie[src % n_lay + distance]))
            p = issued[t, lay]
            if p > 0:
                tgt = lay + distance
                start[s] = max(link, t0)
                link = start[s] + p * (latency + t_pcie[tgt])
                busy += p * t_pcie[tgt]
            compute = t_dense[lay] + hits[t, lay] * t_gpu[lay]
            if overlap:
                now = max(t0 + compute, wait)
                stall += max(0.0, wait - (t0 + compute))
            else:
                now = t0 + compute + (wait - t0)
                stall += wait - t0
    return now, stall, busy


# ----------------------------------------------------------------------------------------------
# strategies


@dataclasses.dataclass(frozen=True)
class Costs:
    """Per layer: bytes of one expert; seconds to read one on the GPU, on the CPU, to move one over PCIe;
    dense seconds per step (the token's dense bytes spread evenly over the MoE layers); the link latency."""

    expert_bytes: np.ndarray
    t_gpu: np.ndarray
    t_cpu: np.ndarray
    t_pcie: np.ndarray
    t_dense: np.ndarray
    latency: float

    @classmethod
    def of(cls, expert_bytes: np.ndarray, dense_bytes: float, m: Machine) -> Costs:
        eb = np.asarray(expert_bytes, dtype=np.float64)
        gpu = m.gpu_gbps * 1e9
        dense = np.full(eb.size, dense_bytes / eb.size / gpu)
        return cls(eb, eb / gpu, eb / (m.cpu_gbps * 1e9), eb / (m.pcie_gbps * 1e9), dense, m.pcie_latency_us * 1e-6)


def static_layers(trace: RoutingTrace, n_gpu_layers: int, c: Costs, name: str) -> StrategyResult:
    """The last `n_gpu_layers` MoE layers' experts on the GPU, the rest on the CPU (llama.cpp --n-cpu-moe)."""
    on_gpu = np.arange(trace.n_layers) >= trace.n_layers - n_gpu_layers
    per_token = float(c.t_dense.sum() + trace.top_k * np.where(on_gpu, c.t_gpu, c.t_cpu).sum())
    accesses = trace.n_tokens * trace.n_layers * trace.top_k
    return StrategyResult(
        name, per_token * trace.n_tokens, trace.n_tokens, 0.0, 0.0, int(on_gpu.sum()) * trace.n_tokens * trace.top_k,
        accesses, note=f"{int(on_gpu.sum())} of {trace.n_layers} layers' experts in VRAM",
    )  # fmt: skip


@njit
def _miss_histogram(misses, k):
    """``[layers, k + 1]``: steps of each layer with 0..k demand misses (``misses [tokens, layers]``, at most k)."""
    n_tok, n_lay = misses.shape
    out = np.zeros((n_lay, k + 1), dtype=np.int64)
    for t in range(n_tok):
        for lay in range(n_lay):
            out[lay, misses[t, lay]] += 1
    return out


def _histogram(misses: np.ndarray, k: int) -> np.ndarray:
    """`_miss_histogram` after checking every count lies in 0..k (a policy's misses per step)."""
    if misses.size and not 0 <= int(misses.min()) <= int(misses.max()) <= k:
        raise AssertionError(f"misses per step outside 0..{k}: {int(misses.min())}..{int(misses.max())}")
    return _miss_histogram(np.ascontiguousarray(misses), k)


def demand_cache(
    trace: RoutingTrace, misses: np.ndarray, c: Costs, overlap: bool, name: str, note: str = ""
) -> StrategyResult:
    """A demand-loading cache from its misses per step ``[tokens, layers]``: each step's misses queue on the
    idle link at the step's start (nothing is in flight between steps). A step's time depends only on its
    layer and its miss count, so the sums run over the ``[layers, k + 1]`` histogram of steps."""
    k = trace.top_k
    count = _histogram(misses, k)
    m = np.arange(k + 1, dtype=np.float64)[None, :]
    compute = c.t_dense[:, None] + (k - m) * c.t_gpu[:, None]
    transfer = m * (c.latency + c.t_pcie[:, None])
    step = np.maximum(compute, transfer) if overlap else compute + transfer
    stall = np.maximum(transfer - compute, 0.0) if overlap else transfer
    n_miss = (count * m).sum(axis=1)
    return StrategyResult(
        name, float((count * step).sum()), trace.n_tokens, float((count * stall).sum()),
        float((n_miss * c.expert_bytes).sum()), int(misses.size * k - n_miss.sum()), int(misses.size * k), note=note,
    )  # fmt: skip


def pinned_experts(trace: RoutingTrace, misses: np.ndarray, c: Costs, name: str, note: str) -> StrategyResult:
    """A fixed set of experts per layer in VRAM, the rest read by the CPU where they live (no transfers):
    each step is ``dense + hits x gpu + misses x cpu``, the CPU and GPU parts one after the other."""
    k = trace.top_k
    count = _histogram(misses, k)
    m = np.arange(k + 1, dtype=np.float64)[None, :]
    step = c.t_dense[:, None] + (k - m) * c.t_gpu[:, None] + m * c.t_cpu[:, None]
    n_miss = (count * m).sum()
    return StrategyResult(
        name, float((count * step).sum()), trace.n_tokens, 0.0, 0.0, int(misses.size * k - n_miss),
        int(misses.size * k), note=note,
    )  # fmt: skip


def prefetch_cache(
    trace: RoutingTrace, pred: np.ndarray, distance: int, capacity: np.ndarray, c: Costs, m: Machine,
    overlap: bool, name: str,
) -> StrategyResult:  # fmt: skip
    """An LRU cache plus the prefetches in ``pred [tokens, layers, P]`` (into layer l + `distance`)."""
    out = _prefetch_timeline(
        trace.experts, np.ascontiguousarray(pred, dtype=np.int16), int(distance), capacity.astype(np.int64),
        c.t_gpu, c.t_pcie, c.t_dense, c.latency, overlap,
    )  # fmt: skip
    seconds, stall, hits, misses, loads, wasted, busy = out.tolist()
    return StrategyResult(
        name, seconds, trace.n_tokens, stall, busy * m.pcie_gbps * 1e9, int(hits), int(hits + misses), int(loads),
        int(wasted),
    )  # fmt: skip


@njit_parallel
def _top_rows(src, valid, table, out):
    """``out[t]``: the ``P`` experts with the highest ``sum over e in src[t] of table[e, :]`` (ties: lower id
    first; experts scoring 0 are never predicted, -1 pads), for tokens with ``valid[t]``; -1 elsewhere."""
    n, k = src.shape
    p = out.shape[1]
    n_exp = table.shape[1]
    chunk = 4096
    for c in prange((n + chunk - 1) // chunk):
        score = np.zeros(n_exp, dtype=table.dtype)
        best_s = np.zeros(p, dtype=table.dtype)
        best_e = np.zeros(p, dtype=np.int64)
        for t in range(c * chunk, min(n, (c + 1) * chunk)):
            for j in range(p):
                out[t, j] = -1
            if not valid[t]:
                continue
            for e in range(n_exp):  # explicit loops: array expressions here allocate and cost more
                score[e] = 0
            for i in range(k):
                r = src[t, i]
                for e in range(n_exp):
                    score[e] += table[r, e]
            m = 0  # best_s[:m] descending; a later (higher id) expert enters only on a strictly higher score
            for e in range(n_exp):
                s = score[e]
                if s <= 0 or (m == p and s <= best_s[p - 1]):
                    continue
                j = m if m < p else p - 1
                while j > 0 and best_s[j - 1] < s:
                    if j < p:
                        best_s[j], best_e[j] = best_s[j - 1], best_e[j - 1]
                    j -= 1
                if j < p:
                    best_s[j], best_e[j] = s, e
                m = min(m + 1, p)
            for j in range(m):
                out[t, j] = best_e[j]


def _pair_table(src: np.ndarray, dst: np.ndarray, starts, stops, n_experts: int) -> np.ndarray:
    """``table[e, e']``: train tokens with ``e`` in ``src[t]`` and ``e'`` in ``dst[t]`` (int32 when the sums of k
    rows cannot overflow it, else int64)."""
    from moescope.analyze.prefetch import _learn_cross

    table = np.zeros((n_experts, n_experts), dtype=np.int64)
    _learn_cross(src, dst, np.asarray(starts, np.int64), np.asarray(stops, np.int64), table)
    small = int(table.max(initial=0)) * src.shape[1] < 2**31 - 1
    return table.astype(np.int32) if small else table


def predictions(trace: RoutingTrace, predictor: str, distance: int, train: RoutingTrace | None = None) -> np.ndarray:
    """``[tokens, layers, k]`` experts to prefetch into layer ``l + distance`` at step ``(t, l)`` (-1: none).

    ``lookahead``: the trace's captured routers of later layers; ``cross-layer``: the k experts most often
    selected at ``l + distance`` by `train` tokens that selected this token's experts at ``l``;
    ``transition``: the k experts most often following the previous token's experts at ``l + distance`` in
    `train` (none at a sequence's first token); ``oracle``: the true experts. Learned tables come from `train`
    (default: `trace` itself).
    """
    n_tok, n_lay, k = trace.experts.shape
    out = np.full((n_tok, n_lay, k), -1, dtype=np.int16)
    fit = trace if train is None else train
    starts, stops = fit.seq_starts, fit.seq_ends
    if predictor == "lookahead":
        la = trace.extras.get("lookahead")
        if la is None or la.shape[2] < distance:
            have = 0 if la is None else la.shape[2]
            raise UsageError(
                f"prefetch:lookahead at distance {distance} needs a trace captured with --lookahead {distance} or "
                f"more (this one has {have}); capture it with moescope capture hf --lookahead, or use an id-only "
                f"predictor ({', '.join(p for p in PREDICTORS if p != 'lookahead')})"
            )
        out[:] = la[:, :, distance - 1]
    elif predictor == "oracle":
        out[:, : n_lay - distance] = trace.experts[:, distance:]
    elif predictor == "cross-layer":
        ok = np.ones(n_tok, dtype=np.bool_)
        for lay in range(n_lay - distance):
            table = _pair_table(fit.experts[:, lay], fit.experts[:, lay + distance], starts, stops, trace.n_experts)
            rows = np.empty((n_tok, k), dtype=np.int16)
            _top_rows(np.ascontiguousarray(trace.experts[:, lay]), ok, table, rows)
            out[:, lay] = rows
    elif predictor == "transition":
        ok = np.ones(n_tok, dtype=np.bool_)
        ok[trace.seq_starts] = False  # a sequence's first token has no previous token
        for lay in range(n_lay - distance):
            tgt = lay + distance
            prev = np.ascontiguousarray(fit.experts[:-1, tgt]) if fit.n_tokens > 1 else fit.experts[:0, tgt]
            table = _pair_table(prev, fit.experts[1:, tgt], starts, np.maximum(stops - 1, starts), trace.n_experts)
            rows = np.empty((n_tok, k), dtype=np.int16)
            _top_rows(np.ascontiguousarray(np.roll(trace.experts[:, tgt], 1, axis=0)), ok, table, rows)
            out[:, lay] = rows
    else:
        raise UsageError(f"predictor {predictor!r}: expected one of {', '.join(PREDICTORS)}")
    return out


@dataclasses.dataclass(frozen=True)
class Timeline:
    """Every strategy at one VRAM budget (in expert slots)."""

    slots: int
    capacity: int  # experts per layer of the caches
    gpu_layers: int  # layers the static strategy keeps in VRAM
    machine: Machine
    overlap: bool
    distance: int
    results: tuple[StrategyResult, ...]

    def best(self, family: str) -> StrategyResult | None:
        """The fastest strategy of a family (`StrategyResult.family`), or None."""
        rows = [r for r in self.results if r.family == family]
        return max(rows, key=lambda r: r.tokens_per_second) if rows else None

    def cache_wins(self) -> bool:
        """Whether the best online per-expert cache is faster than the best static placement."""
        cache, static = self.best("cache"), self.best("static")
        return cache is not None and static is not None and cache.tokens_per_second > static.tokens_per_second

    def verdict(self) -> str:
        """One sentence: does the best online per-expert cache beat the best static placement at this budget?"""
        cache, static = self.best("cache"), self.best("static")
        if cache is None or static is None:
            return (
                f"{self.slots} expert slots hold fewer than top-k experts per layer: no per-expert cache fits; "
                f"{static.name if static else 'static placement'} is what this budget allows"
            )
        ratio = cache.tokens_per_second / static.tokens_per_second
        verb = "beats" if ratio > 1 else "does not beat"
        llama = next((r for r in self.results if r.name == "static-layers"), None)
        also = (
            f"; llama.cpp's static layers: {llama.tokens_per_second:.1f} tok/s"
            if llama is not None and llama is not static
            else ""
        )
        return (
            f"the best online cache ({cache.name}, {cache.tokens_per_second:.1f} tok/s) {verb} the best static "
            f"placement ({static.name}, {static.tokens_per_second:.1f} tok/s): {ratio:.2f}x{also}"
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["results"] = [r.to_dict() for r in self.results]
        d["verdict"] = self.verdict()
        return d


def slot_bytes(expert_bytes: Sequence[float]) -> float:
    """Bytes of VRAM one expert slot takes: the largest expert of any layer (layers may differ in quant type),
    so ``slots x slot_bytes`` is a budget's VRAM and ``VRAM // slot_bytes`` its slots."""
    return float(np.max(np.asarray(expert_bytes, dtype=np.float64)))


def default_slots(n_layers: int, n_experts: int, top_k: int) -> list[int]:
    """VRAM budgets (expert slots) worth sweeping when none are given: 1/8, 1/4, 1/2 and 3/4 of every routed
    expert, each at least what a per-expert cache needs (k per layer); distinct, ascending."""
    total = n_layers * n_experts
    return sorted({max(round(total * f), top_k * n_layers) for f in (0.125, 0.25, 0.5, 0.75)})


def simulate_timeline(
    trace: RoutingTrace,
    *,
    expert_bytes: Sequence[float],
    dense_bytes: float,
    slots: int,
    machine: Machine,
    policies: Sequence[str] | None = None,
    predictors: Sequence[str] = PREDICTORS,
    distance: int = 1,
    overlap: bool = True,
    train: RoutingTrace | None = None,
) -> Timeline:
    """Every strategy (module docstring) over `trace`'s tokens with `slots` experts of VRAM.

    Parameters
    ----------
    trace : the tokens to decode (usually the test halves); its ``experts [tokens, layers, k]``.
    expert_bytes : [layers] bytes of one routed expert per layer; dense_bytes : bytes read per token besides
        the routed experts (all layers).
    slots : experts that fit in the VRAM left for them.
    policies : registered cache policies (default: `default_policies`) for ``cache:<policy>``; a bypassing
        one (lfu-static) gives ``static-experts``, a prefetching one is skipped (``prefetch:`` covers it);
        predictors : for ``prefetch:<predictor>`` (``lookahead`` is skipped when the trace has none).
    distance : MoE layers ahead the prefetches are issued.
    train : the trace learned policies (lfu-static) fit on (default: `trace` itself).
    """
    from moescope.cache.policies import POLICIES, PolicyParams, Stream, check_policies, make_policy
    from moescope.cache.simulate import LayerStreams, _pool, stream_inputs

    n_lay, k, e = trace.n_layers, trace.top_k, trace.n_experts
    eb = np.asarray(expert_bytes, dtype=np.float64)
    if eb.shape != (n_lay,):
        raise UsageError(f"expert_bytes has {eb.size} values for {n_lay} layers; give one per MoE layer")
    if slots < 0:
        raise UsageError(f"slots {slots}: expected a budget of 0 or more experts")
    if not 1 <= distance < max(n_lay, 2):
        raise UsageError(f"distance {distance}: expected 1..{max(n_lay - 1, 1)} MoE layers ahead")
    policies = check_policies(policies)
    costs = Costs.of(eb, dense_bytes, machine)
    gpu_layers = min(slots // e, n_lay)
    results = [
        static_layers(trace, 0, costs, "cpu-moe"),
        static_layers(trace, gpu_layers, costs, "static-layers"),
    ]
    capacity = min(slots // n_lay, e)
    if capacity < k:
        return Timeline(int(slots), int(capacity), int(gpu_layers), machine, bool(overlap), int(distance),
                        tuple(results))  # fmt: skip
    caps = np.full(n_lay, capacity, dtype=np.int64)

    def layer_streams(tr: RoutingTrace) -> list[Stream]:
        return list(LayerStreams(tr, _no_reset(tr), **stream_inputs(policies)))

    streams = layer_streams(trace)
    fit = streams if train is None else layer_streams(train)
    # Belady's misses also give the bound; a prefetching policy is not a demand-loading cache (`prefetch:`
    # covers prefetching): neither fitted nor run
    names = [name for name in dict.fromkeys([*policies, "belady"]) if not POLICIES[name].prefetches]

    def replay(job: tuple[str, int]) -> np.ndarray:
        pol = make_policy(job[0], PolicyParams())
        if pol.learns:
            pol.fit(fit[job[1]])
        return pol.misses_per_group(streams[job[1]], capacity)

    with _pool(len(names) * n_lay) as pool:  # the kernels release the GIL: layers run on every core
        per = list(pool.map(replay, [(name, i) for name in names for i in range(n_lay)]))
    belady = np.stack(per[names.index("belady") * n_lay :][:n_lay], axis=1)
    for n, name in enumerate(names):
        cls = POLICIES[name]
        if name not in policies:
            continue  # Belady kept for the bound only
        misses = np.stack(per[n * n_lay : (n + 1) * n_lay], axis=1)
        if cls.bypass:
            note = (
                f"each layer's {capacity} most frequent train experts pinned in VRAM ({name}), the rest read on the CPU"
            )
            results.append(pinned_experts(trace, misses, costs, "static-experts", note))
        else:
            note = "offline: knows the future" if cls.offline else ""
            results.append(demand_cache(trace, misses, costs, overlap, f"cache:{name}", note))
    for predictor in predictors:
        if predictor == "lookahead" and "lookahead" not in trace.extras:
            continue
        pred = predictions(trace, predictor, distance, train)
        results.append(prefetch_cache(trace, pred, distance, caps, costs, machine, overlap, f"prefetch:{predictor}"))
    results.append(_bound(trace, belady, costs))
    return Timeline(int(slots), int(capacity), int(gpu_layers), machine, bool(overlap), int(distance), tuple(results))


# ----------------------------------------------------------------------------------------------
# prefill

LLAMA_OFFLOAD_MIN_BATCH = 32
"""llama.cpp's CUDA backend runs a CPU-resident weight's matmul on the GPU (copying the whole tensor over
PCIe) when the batch has at least this many tokens (ggml-cuda.cu, ``ggml_backend_cuda_device_offload_op``)."""


@dataclasses.dataclass(frozen=True)
class PrefillRow:
    """Prefill in micro-batches of `ubatch` tokens: bytes over PCIe and read by the CPU per token, and the
    fastest the weights' movement and reads allow (compute not modelled: an upper bound on tokens/s)."""

    name: str
    ubatch: int
    pcie_bytes_per_token: float
    cpu_bytes_per_token: float
    seconds_per_token: float
    note: str

    @property
    def tokens_per_second(self) -> float:
        return 1.0 / self.seconds_per_token if self.seconds_per_token > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "tokens_per_second_at_most": self.tokens_per_second}


EXPERT_TENSORS = 3
"""Tensors holding a layer's routed experts (gate, up, down; ``gate_up`` merged has 2): each whole-tensor copy
of llama.cpp's large-batch path is one transfer, one latency."""


@njit
def _ubatch_lru(lay, starts, stops, ubatch, capacity, n_exp, big):
    """One layer's micro-batches (``ubatch`` tokens of a sequence at a time): ``(distinct experts summed over
    batches, loads into an LRU cache of `capacity` that keeps the most recently used experts, batches, distinct
    experts summed over the batches of at least `big` tokens, those batches)``. A batch loads its experts not
    resident after the previous batch; ties in recency go to the lower id."""
    stamp = np.full(n_exp, -1, dtype=np.int64)
    resident = np.zeros(n_exp, dtype=np.bool_)
    used = np.zeros(n_exp, dtype=np.bool_)
    distinct, loads, b, d_big, b_big = 0, 0, 0, 0, 0
    for r in range(starts.size):
        for a in range(starts[r], stops[r], ubatch):
            z = min(a + ubatch, stops[r])
            used[:] = False
            for t in range(a, z):
                for j in range(lay.shape[1]):
                    used[lay[t, j]] = True
            n = 0
            for x in range(n_exp):
                if used[x]:
                    n += 1
                    if not resident[x]:
                        loads += 1
                    stamp[x] = b
            distinct += n
            if z - a >= big:
                d_big += n
                b_big += 1
            order = np.argsort(-stamp * (n_exp + 1) + np.arange(n_exp), kind="mergesort")
            resident[:] = False
            for i in range(min(capacity, n_exp)):
                if stamp[order[i]] >= 0:
                    resident[order[i]] = True
            b += 1
    return distinct, loads, b, d_big, b_big


def prefill_estimate(trace: RoutingTrace, c: Costs, gpu_layers: int, capacity: int, ubatch: int) -> list[PrefillRow]:
    """Prefill of `trace`'s sequences in micro-batches of `ubatch` tokens (a sequence's last batch may be
    shorter), for llama.cpp's placements and an LRU expert cache (``capacity`` experts per layer; skipped below
    top-k). A batch reads each distinct expert it uses once. llama.cpp: in a batch of
    `LLAMA_OFFLOAD_MIN_BATCH` tokens or more, every CPU-resident layer's whole expert tensors (all E experts,
    `EXPERT_TENSORS` transfers) cross PCIe and the GPU computes; in a shorter one the CPU reads the batch's
    distinct experts. The cache loads the batch's experts it does not hold, transfers overlapping compute."""
    n_lay, e = trace.n_layers, trace.n_experts
    starts, stops = trace.seq_starts, trace.seq_ends
    distinct, loads, d_big = np.zeros(n_lay), np.zeros(n_lay), np.zeros(n_lay)
    batches = n_big = 1
    for i in range(n_lay):
        lay = np.ascontiguousarray(trace.experts[:, i])
        out = _ubatch_lru(lay, starts, stops, int(ubatch), max(int(capacity), 0), e, LLAMA_OFFLOAD_MIN_BATCH)
        distinct[i], loads[i], batches, d_big[i], n_big = out
    n_tok = max(trace.n_tokens, 1)
    dense = float(c.t_dense.sum()) * batches  # the dense weights are read once per batch
    d_small = distinct - d_big
    rows = []
    for name, n_gpu in (("cpu-moe", 0), ("static-layers", gpu_layers)):
        cpu = np.arange(n_lay) < n_lay - n_gpu
        moved = float((e * n_big * c.expert_bytes)[cpu].sum())
        cpu_bytes = float((d_small * c.expert_bytes)[cpu].sum())
        seconds = (
            dense
            + float((distinct * c.t_gpu)[~cpu].sum())
            + float((n_big * (e * c.t_pcie + EXPERT_TENSORS * c.latency) + d_big * c.t_gpu)[cpu].sum())
            + float((d_small * c.t_cpu)[cpu].sum())
        )
        if n_big == batches:
            note = "CPU layers' whole expert tensors copied to the GPU per batch"
        elif n_big == 0:
            note = f"batches below {LLAMA_OFFLOAD_MIN_BATCH} tokens: the CPU computes its layers"
        else:
            note = (
                f"{n_big} of {batches} batches of {LLAMA_OFFLOAD_MIN_BATCH}+ tokens copy CPU layers' whole expert "
                f"tensors to the GPU; the CPU computes its layers in the shorter ones"
            )
        rows.append(PrefillRow(name, ubatch, moved / n_tok, cpu_bytes / n_tok, seconds / n_tok, note))
    if capacity >= trace.top_k:
        compute = dense + float((distinct * c.t_gpu).sum())
        link = float((loads * (c.t_pcie + c.latency)).sum())
        moved = float((loads * c.expert_bytes).sum())
        note = "the batch's experts not held are loaded, overlapped with compute"
        rows.append(PrefillRow("cache:lru", ubatch, moved / n_tok, 0.0, max(compute, link) / n_tok, note))
    return rows


def _bound(trace: RoutingTrace, belady: np.ndarray, c: Costs) -> StrategyResult:
    """The least time any per-expert cache of this size could take (demand or prefetching, any predictor):
    every expert computed on the GPU and Belady's transfers (no schedule loads fewer) fully hidden behind
    compute, ``max(compute, link)``. Not a bound on the CPU strategies: reading an expert on the CPU can be
    faster than moving it over PCIe."""
    compute = trace.n_tokens * float(c.t_dense.sum() + trace.top_k * c.t_gpu.sum())
    link = float((belady * (c.latency + c.t_pcie[None, :])).sum())
    accesses = belady.size * trace.top_k
    return StrategyResult(
        "bound", max(compute, link), trace.n_tokens, 0.0, float((belady * c.expert_bytes[None, :]).sum()),
        int(accesses - belady.sum()), int(accesses), note="Belady's transfers, perfectly overlapped",
    )  # fmt: skip


def _no_reset(trace: RoutingTrace) -> np.ndarray:
    """A server's caches live across sequences: only the first group resets."""
    reset = np.zeros(trace.n_tokens, dtype=np.bool_)
    reset[:1] = True
    return reset
