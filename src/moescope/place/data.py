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
from moescope.trace import RoutingTrace, expert_mass


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
    """

    def __init__(self, trace: RoutingTrace, protocol: str = "halves") -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol {protocol!r}: expected one of {PROTOCOLS}")
        self.protocol = protocol
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
        """[layers, E] int64 train selections per expert."""
        return expert_mass(self.experts, self.n_experts)

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
