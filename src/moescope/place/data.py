"""What placement methods learn from: the train split of a trace and the tables derived from it, computed once.

- ``load [layers, E] int64``: train selections per expert;
- ``coact [layers, E, E] int64``: train tokens choosing both experts (selections on the diagonal);
- ``drift_cov [layers, E, E] float64``: how expert loads drift *within* sequences, ``sum_s d_s d_s^T`` over
  train sequences ``s`` with ``d_s [E]`` = selections in the second half of the sequence's train part minus
  those in its first half. Held-out tokens are later tokens of the same sequences, so their expert loads
  differ from the train loads by such drifts; experts that drift together on one device make that device
  a straggler on held-out tokens even when train loads are balanced. ``1_d^T drift_cov 1_d`` summed over
  devices is the placement's *drift variance*;
- `sample`: at most ``max_tokens`` evenly strided train tokens (bounding the search's cost), with a weight
  per token: ``late_weight`` in the second half of its sequence, else 1.

*Given loads* (`balance_table`, ``TrainData(..., balance=)``): the expert loads to balance may come from
elsewhere than the train tokens -- the expert counts of the workload the placement will serve (a llama.cpp
imatrix, a counts file, a short capture of that workload) -- while co-activation and the token sets still come
from the train tokens. Expert loads hardly carry over from one workload to another (on the shared ESFT /
DeepSeek-V2-Lite trace the per-layer correlation of expert loads between its three tasks is 0.04 to 0.23),
whereas which experts a token picks together does: coact-refined fitted on law and summary cuts intent's devices
per token by 23% against frequency (fitted in-sample on intent itself: 27-30%) but at load CV 0.13-0.15 above
frequency's. So a placement fitted on other workloads keeps its locality on a new one but not its balance; counts
of 10% of the new workload's sequences restore the balance (`bench/place_generalisation.py`, section
``given_loads``). ``load`` is then the given loads rescaled to the
train selections of each layer (the units every cap and penalty is tuned in), for every method alike.

Kernels are parallel across layers. No I/O.

    >>> data = TrainData(split_part(trace, "train"))
    >>> data.load.shape, data.coact.shape
"""

from __future__ import annotations

import functools

import numpy as np

from moescope._jit import njit_parallel, prange
from moescope.analyze.coact import coact_counts
from moescope.errors import UsageError
from moescope.trace import ExpertCounts, RoutingTrace, expert_mass


@njit_parallel
def _seq_drift(experts, starts, ends, out):
    """``out [sequences, layers, E]``: selections in each sequence's second half minus its first half."""
    n_lay, k = experts.shape[1], experts.shape[2]
    for layer in prange(n_lay):
        for s in range(starts.shape[0]):
            mid = starts[s] + (ends[s] - starts[s]) // 2
            for t in range(starts[s], ends[s]):
                sign = 1.0 if t >= mid else -1.0
                for j in range(k):
                    out[s, layer, experts[t, layer, j]] += sign


PROTOCOLS = ("halves", "labels", "all")
"""How a fit is scored: on the later halves of its own sequences, on other labels' sequences, or in-sample."""


class TrainData:
    """The routing a placement is fitted to (the train split), with derived tables cached on first use.

    trace : the train tokens; ``trace.experts [tokens, layers, k]``.
    protocol : how the placement will be scored (`PROTOCOLS`): ``"halves"`` (later tokens of these
        sequences), ``"labels"`` (other workloads' sequences) or ``"all"`` (these tokens, in-sample). The
        refined methods validate their balance margin the same way (`moescope.place.calibrate`).
    balance : ``[layers, E]`` given expert loads to balance instead of the train tokens' (`balance_table`),
        or None.
    """

    def __init__(self, trace: RoutingTrace, protocol: str = "halves", balance: np.ndarray | None = None) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol {protocol!r}: expected one of {PROTOCOLS}")
        if balance is not None and balance.shape != (trace.n_layers, trace.n_experts):
            raise ValueError(f"balance {balance.shape}: expected {(trace.n_layers, trace.n_experts)}")
        self.protocol = protocol
        self.balance = balance
        if trace.n_tokens == 0:
            raise UsageError(
                "no train tokens: the train split (first half of every sequence) is empty; use a trace with "
                "sequences of 2+ tokens, or --split all"
            )
        self.trace = trace
        self.experts = trace.experts
        self.n_experts = trace.n_experts

    @property
    def layer_ids(self) -> np.ndarray:
        """[layers] int64 model layer ids (random streams are keyed by them, not by position)."""
        return self.trace.layer_ids

    @property
    def n_layers(self) -> int:
        return int(self.experts.shape[1])

    @functools.cached_property
    def load(self) -> np.ndarray:
        """[layers, E] int64 train selections per expert, or the given loads (``balance``) rescaled to each
        layer's train selections and rounded."""
        own = expert_mass(self.experts, self.n_experts)
        if self.balance is None:
            return own
        scale = own.sum(axis=1, keepdims=True) / self.balance.sum(axis=1, keepdims=True)
        return np.rint(self.balance * scale).astype(np.int64)

    @functools.cached_property
    def coact(self) -> np.ndarray:
        """[layers, E, E] int64 co-activation counts (tokens choosing both; selections on the diagonal)."""
        return coact_counts(self.experts, self.n_experts)

    @functools.cached_property
    def drift_cov(self) -> np.ndarray:
        """[layers, E, E] float64 within-sequence drift covariance (see the module docstring)."""
        tr = self.trace
        keep = tr.seq_lengths >= 2
        diff = np.zeros((int(keep.sum()), self.n_layers, self.n_experts), dtype=np.float64)
        _seq_drift(self.experts, tr.seq_starts[keep], tr.seq_ends[keep], diff)
        return np.stack([diff[:, i].T @ diff[:, i] for i in range(self.n_layers)])

    def sample(self, max_tokens: int, late_weight: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Every ``ceil(tokens / max_tokens)``-th train token, ``[<= max_tokens, layers, k]``, and its weight
        ``[<= max_tokens] int64``: `late_weight` in the second half of its sequence, else 1."""
        tr = self.trace
        pos = np.arange(tr.n_tokens) - np.repeat(tr.seq_starts, tr.seq_lengths)
        late = 2 * pos >= np.repeat(tr.seq_lengths, tr.seq_lengths)
        tw = np.where(late, late_weight, 1).astype(np.int64)
        stride = -(-self.experts.shape[0] // max(1, max_tokens))
        if stride <= 1:
            return self.experts, tw
        return np.ascontiguousarray(self.experts[::stride]), np.ascontiguousarray(tw[::stride])


def balance_table(counts: ExpertCounts, layer_ids: np.ndarray, n_experts: int, source: str) -> np.ndarray:
    """``[layers, E] float64``: the rows of `counts` for the model layers `layer_ids` (matched by id), checked to
    be usable as loads to balance (same expert count, every layer present, non-negative, not all zero); `source`
    names the file in errors."""
    if counts.n_experts != n_experts:
        raise UsageError(
            f"--balance-loads {source}: {counts.n_experts} experts per layer, but the trace has {n_experts}; give "
            "counts of the same model"
        )
    row = {int(lid): i for i, lid in enumerate(counts.layer_ids.tolist())}
    missing = [int(x) for x in layer_ids.tolist() if int(x) not in row]
    if missing:
        have = ", ".join(str(x) for x in counts.layer_ids.tolist()[:12])
        raise UsageError(
            f"--balance-loads {source}: no counts for model layer(s) {', '.join(map(str, missing[:12]))} of the "
            f"trace (the counts have layers {have}{', ...' if counts.n_layers > 12 else ''}); give counts of the same "
            "model's layers, or cut the trace with --layers"
        )
    table = np.asarray(counts.values, dtype=np.float64)[[row[int(x)] for x in layer_ids.tolist()]]
    bad = ~np.isfinite(table) | (table < 0)
    if bad.any():
        raise UsageError(f"--balance-loads {source}: a load is negative or not finite; expected counts or shares >= 0")
    empty = [int(layer_ids[i]) for i in np.flatnonzero(table.sum(axis=1) <= 0)]
    if empty:
        raise UsageError(
            f"--balance-loads {source}: layer(s) {', '.join(map(str, empty[:12]))} have no load at all; give counts "
            "with routing in every placed layer, or cut the trace with --layers"
        )
    return np.ascontiguousarray(table)


def device_loads(assign: np.ndarray, load: np.ndarray, n_devices: int) -> np.ndarray:
    """[layers, D] float64 summed ``load [layers, E]`` of the experts on each device of ``assign [layers, E]``."""
    out = np.zeros((assign.shape[0], n_devices))
    for layer in range(assign.shape[0]):
        np.add.at(out[layer], assign[layer], load[layer])
    return out


def drift_cv(assign: np.ndarray, cov: np.ndarray, load: np.ndarray, n_devices: int) -> np.ndarray:
    """[layers] ``sqrt(drift variance / D) / mean device load`` of ``assign [layers, E]`` (see the module).

    cov : [layers, E, E] drift covariance; load : [layers, E] train load (for the mean).
    """
    out = np.empty(assign.shape[0])
    for layer in range(assign.shape[0]):
        onehot = np.zeros((assign.shape[1], n_devices))
        onehot[np.arange(assign.shape[1]), assign[layer]] = 1.0
        var = float(np.einsum("ed,ef,fd->", onehot, cov[layer], onehot))
        mean = load[layer].sum() / n_devices
        out[layer] = np.sqrt(max(var, 0.0) / n_devices) / mean if mean > 0 else 0.0
    return out
