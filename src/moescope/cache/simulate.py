"""Replay a routing trace through expert caches: tables per capacity x policy, miss-rate curves, budgets.

Streams. Per-layer caches (the default) replay one stream per MoE layer: token t's group is its k experts
at that layer. A pooled cache (``pooled=True``) replays one stream over (layer, expert) items in model
order, token by token and layer by layer, with capacity = per-layer capacity x layers (the same memory).

Split. With ``split="test"`` (the default) policies that learn (LFU-static, the co-activation prefetcher)
are fitted on the first half of every sequence and every policy replays the second halves, in trace order,
so no policy is scored on what it learned from; ``split="all"`` replays the whole trace and fits on it
(in-sample, flagged in the result). With ``reset_per_sequence`` each sequence (each test half) starts
with an empty cache; otherwise one long-lived cache serves all sequences, as in a server.

Layers and capacities run in parallel threads (the kernels release the GIL).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, overload

import numpy as np

from moescope.cache import kernels as K
from moescope.cache.policies import POLICIES, PolicyParams, Stream, default_policies, make_policy
from moescope.errors import UsageError
from moescope.slicing import EVAL_SPLITS, label_protocol, select_labels, split_part
from moescope.trace import RoutingTrace


def _reset_flags(trace: RoutingTrace, per_sequence: bool) -> np.ndarray:
    """[tokens] bool: where a cache starts empty."""
    reset = np.zeros(trace.n_tokens, dtype=np.bool_)
    if trace.n_tokens:
        reset[0] = True
        if per_sequence:
            reset[trace.seq_starts] = True
    return reset


class LayerStreams(Sequence[Stream]):
    """The per-layer `Stream` s of a trace, each built when indexed and not kept: a replay holds one layer's
    ``[tokens, k]`` int32 copy at a time per worker instead of every layer's at once (on 1M tokens x 48
    layers x top-8 that is 32 MB per worker instead of 1.5 GB). With `near`, each carries its near misses
    when the trace has candidates, with `weights` its gate weights when the trace has them (each built only
    for policies that read it)."""

    def __init__(self, trace: RoutingTrace, reset: np.ndarray, near: bool = False, weights: bool = False) -> None:
        self._experts, self._reset, self._e = trace.experts, reset, trace.n_experts
        self._cand = trace.extras.get("candidates") if near else None
        self._weights = trace.weights if weights else None

    def __len__(self) -> int:
        return int(self._experts.shape[1])

    @overload
    def __getitem__(self, i: int) -> Stream: ...
    @overload
    def __getitem__(self, i: slice) -> list[Stream]: ...
    def __getitem__(self, i: int | slice) -> Stream | list[Stream]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        req = np.ascontiguousarray(self._experts[:, i, :], dtype=np.int32)
        near = None if self._cand is None else near_misses(req, self._cand[:, i])
        w = None if self._weights is None else np.ascontiguousarray(self._weights[:, i, :], dtype=np.float32)
        return Stream(req, self._reset, self._e, self._e, near, w)


def reads_near_misses(names: Sequence[str]) -> bool:
    """Whether any of the policies `names` reads `Stream.near` (the others need no near-miss arrays built)."""
    return any(POLICIES[name].near_misses for name in names)


def stream_inputs(names: Sequence[str]) -> dict[str, bool]:
    """What the streams of policies `names` must carry besides expert ids (`build_streams`' ``near`` and
    ``weights``)."""
    return {"near": reads_near_misses(names), "weights": any(POLICIES[name].gate_weights for name in names)}


def reads_trace(names: Sequence[str]) -> bool:
    """Whether policies `names` read more than a store's layer files hold (expert ids): then a store is read
    whole, not in windows or layer groups."""
    return any(stream_inputs(names).values())


def near_misses(req: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """[groups, M] int32: each group's candidates (the router's top-M) that it did not choose, -1 elsewhere."""
    near = np.array(candidates, dtype=np.int32)
    chosen = (near[:, :, None] == req[:, None, :]).any(axis=2)
    near[chosen | (near < 0)] = -1
    return near


def build_streams(
    trace: RoutingTrace,
    *,
    pooled: bool = False,
    reset_per_sequence: bool = False,
    near: bool = False,
    weights: bool = False,
) -> Sequence[Stream]:
    """One `Stream` per MoE layer (in layer order; built on access, `LayerStreams`, with the near misses when
    `near` and the gate weights when `weights`), or a single pooled stream."""
    e, n_layers = trace.n_experts, trace.n_layers
    reset = _reset_flags(trace, reset_per_sequence)
    if pooled:  # item = layer * E + expert, a token's layers one group each in layer order
        offset = (np.arange(n_layers, dtype=np.int32) * e)[None, :, None]
        req = (trace.experts.astype(np.int32) + offset).reshape(trace.n_tokens * n_layers, trace.top_k)
        pooled_reset = np.zeros(req.shape[0], dtype=np.bool_)
        pooled_reset[::n_layers] = reset
        cand = trace.extras.get("candidates") if near else None
        near_ids = None
        if cand is not None:
            per_layer = np.stack([near_misses(trace.experts[:, i, :], cand[:, i]) for i in range(n_layers)], axis=1)
            near_ids = np.where(per_layer >= 0, per_layer + offset, -1).reshape(req.shape[0], -1).astype(np.int32)
        w = None
        if weights and trace.weights is not None:
            w = np.ascontiguousarray(trace.weights.reshape(req.shape), dtype=np.float32)
        return [Stream(np.ascontiguousarray(req), pooled_reset, e * n_layers, e, near_ids, w)]
    return LayerStreams(trace, reset, near, weights)


def split_streams(
    trace: RoutingTrace,
    split: str,
    *,
    pooled: bool,
    reset_per_sequence: bool,
    fit_labels: Sequence[str] | None = None,
    score_labels: Sequence[str] | None = None,
    near: bool = False,
    weights: bool = False,
) -> tuple[Sequence[Stream], Sequence[Stream], int]:
    """(train streams, test streams, test tokens) for a split mode, or for the labels protocol when
    `fit_labels` or `score_labels` is given (fit on those labels' whole sequences, replay the others'; see
    `moescope.slicing.label_protocol`); with `near` / `weights`, streams carry the near misses / the gate
    weights (`build_streams`)."""
    check_protocol(split, bool(fit_labels or score_labels))
    if fit_labels or score_labels:
        fit_l, score_l = label_protocol(trace, fit_labels, score_labels)
        train, test = select_labels(trace, fit_l), select_labels(trace, score_l)
    elif split == "all":
        streams = build_streams(trace, pooled=pooled, reset_per_sequence=reset_per_sequence, near=near, weights=weights)
        return streams, streams, trace.n_tokens
    else:
        train, test = split_part(trace, "train"), split_part(trace, "test")
    check_parts(train.n_tokens, test.n_tokens, bool(fit_labels or score_labels), trace.n_tokens, trace.n_sequences)
    return (
        build_streams(train, pooled=pooled, reset_per_sequence=reset_per_sequence, near=near, weights=weights),
        build_streams(test, pooled=pooled, reset_per_sequence=reset_per_sequence, near=near, weights=weights),
        test.n_tokens,
    )


def check_protocol(split: str, labelled: bool) -> None:
    """A split mode, or the labels protocol (`labelled`: fit or score labels given), that `split_streams` takes."""
    if split not in EVAL_SPLITS:
        raise UsageError(f"split {split!r}: expected one of {', '.join(EVAL_SPLITS)}")
    if labelled and split != "test":
        raise UsageError(f"--split {split} and --fit-labels / --score-labels are two protocols; give one of them")


def check_parts(train_tokens: int, test_tokens: int, labelled: bool, n_tokens: int, n_sequences: int) -> None:
    """Both sides of a train / test split (or of the labels protocol) hold tokens."""
    if test_tokens == 0 or train_tokens == 0:
        if labelled:
            raise UsageError(f"the {'fit' if train_tokens == 0 else 'scored'} labels hold no tokens")
        raise UsageError(
            f"the trace's sequences are too short to split into train and test halves ({n_tokens} tokens in "
            f"{n_sequences} sequences); use split='all' (--split all) to replay it in-sample"
        )


def policy_names(policies: Sequence[str] | None, params: PolicyParams) -> list[str]:
    """The policies named (None: `default_policies`), once each, every one known, and `params` valid."""
    names = list(dict.fromkeys(default_policies() if policies is None else policies))
    if not names:
        raise UsageError("no cache policy given; choose from " + ", ".join(POLICIES))
    for name in names:
        make_policy(name, params)  # an unknown name: a UsageError naming the choices
    check_params(params)
    return names


def curve_capacities(capacities: Sequence[int] | None, k: int, n_experts: int) -> np.ndarray:
    """The capacities a miss curve is taken at: those given (checked), or every one from top-k to E."""
    caps = list(range(k, n_experts + 1)) if capacities is None else list(capacities)
    return np.asarray(check_capacities(caps, k, n_experts), dtype=np.int64)


def check_params(params: PolicyParams) -> None:
    if params.aging < 0:
        raise UsageError(f"aging {params.aging} is negative; give 0 (off) or a number of tokens")
    if params.prefetch < 0:
        raise UsageError(f"prefetch {params.prefetch} is negative; give 0 (off) or the experts to prefetch")


def check_capacities(capacities: Sequence[int], k: int, n_items: int, what: str = "capacity") -> list[int]:
    out = []
    for c in capacities:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < k:
            raise UsageError(
                f"{what} {c!r} is below top-k = {k}: a token's {k} experts must fit in the cache together; "
                f"give capacities >= {k}"
            )
        out.append(int(min(c, n_items)))
    return out


def _pool(n_jobs: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, min(n_jobs, os.cpu_count() or 1)))


def default_capacities(k: int, n_experts: int) -> list[int]:
    """Capacities worth simulating when none are asked: about E/8, E/4 and E/2 experts per layer, each kept
    strictly between top-k (a cache of k holds one token's experts: only exact repeats hit) and E (the whole
    layer: only cold misses remain), distinct. Mixtral (E 8, k 2) gets 3 and 4; E 64, k 6: 8, 16, 32; E 128,
    k 8: 16, 32, 64. When no capacity lies strictly between (E <= k + 1), the one capacity left: E."""
    lo, hi = k + 1, n_experts - 1
    if lo > hi:
        return [n_experts]
    return sorted({min(max(n_experts // d, lo), hi) for d in (8, 4, 2)})


# why a policy may sit below the Belady floor of demand loading (see the package docstring)
BELOW_FLOOR_WHY = {
    "prefetches": "prefetches: its loads ahead of use are counted in transfers, not as demand misses",
    "bypass": "bypass: misses are served from slow memory without loading, which the demand-loading floor assumes",
}


@dataclasses.dataclass(frozen=True)
class CacheResult:
    """stats: [policies, capacities, streams, 4] int64 (hits, demand misses, prefetch loads, wasted
    prefetches); streams are the MoE layers (`layer_ids`) or one pooled stream. Capacities are per layer
    (a pooled cache holds capacity x layers items)."""

    policies: tuple[str, ...]
    capacities: tuple[int, ...]
    layer_ids: tuple[int, ...]
    stats: np.ndarray
    tokens: int
    top_k: int
    n_experts: int
    pooled: bool
    reset_per_sequence: bool
    split: str
    params: PolicyParams
    fit_labels: tuple[str, ...] = ()  # the labels protocol (split "labels"): whole sequences fitted / replayed
    score_labels: tuple[str, ...] = ()

    def totals(self) -> np.ndarray:
        """[policies, capacities, 4] summed over streams."""
        return self.stats.sum(axis=2)

    def miss_rate(self) -> np.ndarray:
        """[policies, capacities] demand misses / accesses."""
        t = self.totals()
        acc = t[..., 0] + t[..., 1]
        return np.divide(t[..., 1], acc, out=np.zeros(acc.shape), where=acc > 0)

    def rows(self, expert_bytes: float | None = None) -> list[dict[str, Any]]:
        """One dict per (capacity, policy): rates per token (summed over layers), the gap to Belady and, when
        LRU and Belady both ran, the share of LRU's gap to Belady the policy closes (``lru_gap_closed``: 0 is
        LRU, 1 is Belady; None where LRU is already at the floor) and its transfers per token over LRU's."""
        t = self.totals().astype(np.float64)
        rate = self.miss_rate()
        floor = self.policies.index("belady") if "belady" in self.policies else None
        lru = self.policies.index("lru") if "lru" in self.policies else None
        tok = max(self.tokens, 1)
        out = []
        for ci, cap in enumerate(self.capacities):
            for pi, name in enumerate(self.policies):
                _, misses, loads, wasted = t[pi, ci]
                row = {
                    "capacity": cap,
                    "policy": name,
                    "demand_miss_rate": float(rate[pi, ci]),
                    "demand_misses_per_token": misses / tok,
                    "prefetch_loads_per_token": loads / tok,
                    "wasted_prefetches_per_token": wasted / tok,
                    "transfers_per_token": (misses + loads) / tok,
                    "gap_to_belady": None if floor is None else float(rate[pi, ci] - rate[floor, ci]),
                    "lru_gap_closed": None,
                    "transfers_vs_lru": None,
                    "below_floor_because": None,
                }
                if lru is not None:
                    lru_t = t[lru, ci, 1] + t[lru, ci, 2]
                    row["transfers_vs_lru"] = float((misses + loads) / lru_t) if lru_t > 0 else None
                    gap = None if floor is None else rate[lru, ci] - rate[floor, ci]
                    if gap is not None and gap > 1e-12:
                        row["lru_gap_closed"] = float((rate[lru, ci] - rate[pi, ci]) / gap)
                if row["gap_to_belady"] is not None and row["gap_to_belady"] < -1e-12:
                    cls = POLICIES[name]
                    why = "prefetches" if cls.prefetches else "bypass" if cls.bypass else None
                    if why is None:  # a demand-loading policy below MIN is a bug, not a finding
                        raise AssertionError(f"{name} at capacity {cap} is below the Belady floor of demand loading")
                    row["below_floor_because"] = BELOW_FLOOR_WHY[why]
                if expert_bytes is not None:
                    row["bytes_per_token"] = (misses + loads) * expert_bytes / tok
                out.append(row)
        return out

    def to_dict(self, expert_bytes: float | None = None) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "top_k": self.top_k,
            "n_experts": self.n_experts,
            "layers": list(self.layer_ids),
            "pooled": self.pooled,
            "reset_per_sequence": self.reset_per_sequence,
            "split": self.split,
            "fit_labels": list(self.fit_labels),
            "score_labels": list(self.score_labels),
            "in_sample": self.split == "all",
            "params": dataclasses.asdict(self.params),
            "rows": self.rows(expert_bytes),
            "per_layer": {
                name: {
                    str(cap): {
                        "layer": list(self.layer_ids) if not self.pooled else ["pooled"],
                        "demand_misses": self.stats[pi, ci, :, 1].tolist(),
                        "prefetch_loads": self.stats[pi, ci, :, 2].tolist(),
                    }
                    for ci, cap in enumerate(self.capacities)
                }
                for pi, name in enumerate(self.policies)
            },
        }


def simulate(
    trace: RoutingTrace,
    capacities: Sequence[int],
    policies: Sequence[str] | None = None,
    *,
    pooled: bool = False,
    reset_per_sequence: bool = False,
    split: str = "test",
    params: PolicyParams | None = None,
    progress: Callable[[int, int], None] | None = None,
    scheduler: str | None = None,
    fit_labels: Sequence[str] | None = None,
    score_labels: Sequence[str] | None = None,
) -> CacheResult:
    """Replay `trace` through every policy at every capacity.

    Parameters
    ----------
    trace : the routing to replay.
    capacities : experts per layer that fit in fast memory (each >= top-k; values above E act as E).
    policies : names from `POLICIES` (None: `default_policies`).
    pooled : one cache over all layers holding capacity x layers experts, instead of one per layer.
    reset_per_sequence : every sequence starts with an empty cache (otherwise one cache serves all).
    split : "test" (fit on first halves, replay second halves) or "all" (in-sample).
    fit_labels, score_labels : the labels protocol instead of `split`: policies that learn are fitted on the
        whole sequences labelled `fit_labels` and every policy replays those labelled `score_labels` (either
        may be omitted for "every other label"); the result's split is then ``"labels"``.
    params : LFU aging, prefetch budget.
    progress : called with (jobs done, jobs) as replays finish.
    scheduler : run the replays as Dask tasks (``"local:N"`` or a scheduler address) instead of threads:
        one task per policy and layer, and with `reset_per_sequence` each layer's stream cut at sequence
        starts into independent pieces whose counts add up exactly.

    Returns
    -------
    CacheResult
    """
    params = params or PolicyParams()
    names = policy_names(policies, params)
    instances = {name: make_policy(name, params) for name in names}
    train, test, tokens = split_streams(
        trace, split, pooled=pooled, reset_per_sequence=reset_per_sequence, fit_labels=fit_labels,
        score_labels=score_labels, **stream_inputs(names),
    )  # fmt: skip
    fit_l, score_l = label_protocol(trace, fit_labels, score_labels) if fit_labels or score_labels else ((), ())
    scale = trace.n_layers if pooled else 1
    caps = check_capacities(list(capacities), trace.top_k, trace.n_experts)
    fitted = _fit_all(names, params, train, instances)
    stats = np.zeros((len(names), len(caps), len(test), 4), dtype=np.int64)
    if scheduler is not None:
        _simulate_dask(scheduler, names, params, train, test, [c * scale for c in caps], reset_per_sequence, stats,
                       progress)  # fmt: skip
    else:
        jobs = [(pi, ci, s) for pi in range(len(names)) for ci in range(len(caps)) for s in range(len(test))]

        def work(job: tuple[int, int, int]) -> None:
            pi, ci, s = job
            stats[pi, ci, s] = fitted[names[pi], s].run(test[s], caps[ci] * scale)

        _run_jobs(work, jobs, progress)
    return CacheResult(
        tuple(names),
        tuple(caps),
        tuple(int(x) for x in trace.layer_ids),
        stats,
        tokens,
        trace.top_k,
        trace.n_experts,
        pooled,
        reset_per_sequence,
        "labels" if fit_l else split,
        params,
        fit_l,
        score_l,
    )


def _fit_all(
    names: Sequence[str], params: PolicyParams, train: Sequence[Stream], first: dict[str, Any] | None = None
) -> dict[tuple[str, int], Any]:
    """One policy object per (policy, stream), fitted on its train stream if it learns (``first``: objects to
    use for stream 0). Each train stream is built once, and only when some policy learns; fitting is cheap
    next to the replays."""
    fitted: dict[tuple[str, int], Any] = {}
    learns = any(POLICIES[name].learns for name in names)
    for s in range(len(train)):
        tr_stream = train[s] if learns else None
        for name in names:
            pol = first[name] if first is not None and s == 0 else make_policy(name, params)
            if pol.learns:
                pol.fit(tr_stream)
            fitted[name, s] = pol
    return fitted


def replay(name: str, params: PolicyParams, train: Stream, test: Stream, capacities: Sequence[int]) -> np.ndarray:
    """[capacities, 4] stats of one policy fitted on `train` and replayed on `test` (a Dask task)."""
    pol = make_policy(name, params)
    if pol.learns:
        pol.fit(train)
    return np.stack([pol.run(test, int(c)) for c in capacities])


def cut_at_resets(stream: Stream, pieces: int) -> list[Stream]:
    """Up to `pieces` consecutive parts of `stream`, cut only where the cache restarts empty (so each part
    replays independently and the parts' counts add up to the whole stream's)."""
    starts = np.flatnonzero(stream.reset)
    if pieces <= 1 or starts.size <= 1:
        return [stream]
    n = stream.req.shape[0]
    want = np.linspace(0, n, pieces + 1)[1:-1]
    cuts = sorted({int(starts[np.argmin(np.abs(starts - w))]) for w in want} - {0})
    bounds = [0, *cuts, n]
    return [
        Stream(
            stream.req[a:b], stream.reset[a:b], stream.n_items, stream.n_experts,
            None if stream.near is None else stream.near[a:b],
            None if stream.weights is None else stream.weights[a:b],
        )
        for a, b in itertools.pairwise(bounds)
    ]  # fmt: skip


def _simulate_dask(scheduler, names, params, train, test, capacities, per_sequence, stats, progress) -> None:
    from distributed import as_completed

    from moescope._dask import dask_client

    with dask_client(scheduler) as client:
        n_workers = max(1, len(client.scheduler_info().get("workers", {})))
        futures, where = [], {}
        for s in range(len(test)):
            # streams are scattered once (not embedded in each task) and shared by every policy's tasks
            [fit_on] = client.scatter([train[s]])
            parts = client.scatter(cut_at_resets(test[s], 2 * n_workers) if per_sequence else [test[s]])
            for pi, name in enumerate(names):
                for part in parts:
                    fut = client.submit(replay, name, params, fit_on, part, capacities, pure=False)
                    futures.append(fut)
                    where[fut.key] = (pi, s)
        for done, fut in enumerate(as_completed(futures), 1):
            pi, s = where[fut.key]
            stats[pi, :, s] += fut.result()
            if progress:
                progress(done, len(futures))


def _run_jobs(work: Callable[[Any], None], jobs: Sequence[Any], progress: Callable[[int, int], None] | None) -> None:
    if progress:
        progress(0, len(jobs))
    with _pool(len(jobs)) as pool:
        for done, _ in enumerate(pool.map(work, jobs), 1):
            if progress:
                progress(done, len(jobs))


# -- miss-rate curves -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MissCurves:
    """misses: [policies, layers, capacities] int64 demand misses; accesses: [layers] int64 (same for every
    policy); capacities from top-k to E. LRU and Belady come from one pass each (stack depths,
    `STACK_DEPTHS`); the others replay once per capacity."""

    policies: tuple[str, ...]
    capacities: np.ndarray
    layer_ids: tuple[int, ...]
    misses: np.ndarray
    accesses: np.ndarray
    tokens: int
    split: str

    def curve(self, policy: str) -> np.ndarray:
        """[layers, capacities] demand misses of one policy."""
        return self.misses[self.policies.index(policy)]

    def per_token(self, policy: str, capacities: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """([layers] accesses per token, [layers] demand misses per token) of `policy` with layer i at
        ``capacities[i]`` (e.g. an `Allocation`'s), the inputs of `moescope.cache.project_decode`."""
        pos = np.searchsorted(self.capacities, np.asarray(capacities))
        misses = self.curve(policy)[np.arange(len(self.layer_ids)), pos]
        return self.accesses / self.tokens, misses / self.tokens

    def to_dict(self) -> dict[str, Any]:
        rate = self.misses.sum(axis=1) / max(int(self.accesses.sum()), 1)
        return {
            "capacities": self.capacities.tolist(),
            "layers": list(self.layer_ids),
            "tokens": self.tokens,
            "split": self.split,
            "miss_rate": {p: rate[i].tolist() for i, p in enumerate(self.policies)},
            "per_layer_misses": {p: self.misses[i].tolist() for i, p in enumerate(self.policies)},
        }


# policies whose miss curve is one pass of stack depths (every capacity at once; `kernels.lru_depths`,
# `kernels.belady_depths`), not a replay per capacity
STACK_DEPTHS = {"lru": K.lru_depths, "belady": K.belady_depths}


def miss_curves(
    trace: RoutingTrace,
    policies: Sequence[str] = ("lru", "belady"),
    *,
    capacities: Sequence[int] | None = None,
    reset_per_sequence: bool = False,
    split: str = "test",
    params: PolicyParams | None = None,
    progress: Callable[[int, int], None] | None = None,
    fit_labels: Sequence[str] | None = None,
    score_labels: Sequence[str] | None = None,
) -> MissCurves:
    """Demand misses per layer at every capacity (default: top-k .. E), per policy (per-layer caches); the
    split or labels protocol as `simulate`."""
    params = params or PolicyParams()
    names = policy_names(policies, params)
    caps = curve_capacities(capacities, trace.top_k, trace.n_experts)
    train, test, tokens = split_streams(
        trace, split, pooled=False, reset_per_sequence=reset_per_sequence, fit_labels=fit_labels,
        score_labels=score_labels, **stream_inputs(names),
    )  # fmt: skip
    misses = np.zeros((len(names), len(test), caps.size), dtype=np.int64)
    jobs: list[tuple[int, int, int]] = []
    for pi, name in enumerate(names):
        for s in range(len(test)):
            if name in STACK_DEPTHS:
                jobs.append((pi, s, -1))
            else:
                jobs.extend((pi, s, ci) for ci in range(caps.size))
    fitted = _fit_all(names, params, train)

    def work(job: tuple[int, int, int]) -> None:
        pi, s, ci = job
        if ci < 0:
            stream = test[s]
            hist = STACK_DEPTHS[names[pi]](stream.req, stream.reset, stream.n_items)
            beyond = np.cumsum(hist[::-1])[::-1]  # beyond[d] = accesses at depth >= d (cold included)
            misses[pi, s] = beyond[caps]
        else:
            misses[pi, s, ci] = fitted[names[pi], s].run(test[s], int(caps[ci]))[1]

    _run_jobs(work, jobs, progress)
    accesses = np.array([st.req.size for st in test], dtype=np.int64)
    return MissCurves(tuple(names), caps, tuple(int(x) for x in trace.layer_ids), misses, accesses, tokens,
                      "labels" if fit_labels or score_labels else split)  # fmt: skip


# -- budget allocation ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Allocation:
    """Per-layer capacities for a total slot budget, and what they save over a uniform split."""

    policy: str
    budget_slots: int
    capacities: tuple[int, ...]
    misses: int
    uniform_capacities: tuple[int, ...]
    uniform_misses: int
    accesses: int
    tokens: int

    @property
    def gain(self) -> float:
        """Relative demand-miss reduction over the uniform split (0.1 = 10% fewer misses)."""
        return 1.0 - self.misses / self.uniform_misses if self.uniform_misses else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["gain_over_uniform"] = self.gain
        d["miss_rate"] = self.misses / max(self.accesses, 1)
        d["uniform_miss_rate"] = self.uniform_misses / max(self.accesses, 1)
        return d


def allocate(curves: MissCurves, budget_slots: int, policy: str = "lru") -> Allocation:
    """Per-layer capacities summing to at most `budget_slots` that minimise total demand misses.

    Exact: a dynamic programme over layers and slots (`kernels.allocate_slots`) on the per-layer curves,
    so non-convex curves are handled too (the greedy on marginal gains is optimal only for convex ones).
    Every layer gets at least top-k slots. The uniform split gives each layer floor(budget / layers).
    """
    if policy not in curves.policies:
        raise UsageError(f"no curve for policy {policy!r}; curves were computed for {', '.join(curves.policies)}")
    m = curves.curve(policy)
    caps = curves.capacities
    n_layers = m.shape[0]
    floor_total = int(caps[0]) * n_layers
    if budget_slots < floor_total:
        raise UsageError(
            f"a budget of {budget_slots} expert slots is below {floor_total} = top-k ({caps[0]}) x {n_layers} "
            f"layers, the least a per-expert cache needs; raise the budget or restrict the layers"
        )
    budget = min(int(budget_slots), int(caps[-1]) * n_layers)
    pos = K.allocate_slots(m, caps, budget)
    uniform_cap = min(budget_slots // n_layers, int(caps[-1]))
    u = int(np.searchsorted(caps, uniform_cap, side="right") - 1)
    return Allocation(
        policy,
        int(budget_slots),
        tuple(int(caps[j]) for j in pos),
        int(m[np.arange(n_layers), pos].sum()),
        tuple([int(caps[u])] * n_layers),
        int(m[:, u].sum()),
        int(curves.accesses.sum()),
        curves.tokens,
    )


def budget_projection(
    curves: MissCurves,
    budget_slots: int,
    policy: str,
    *,
    expert_bytes: np.ndarray,
    dense_bytes: float,
    top_k: int,
    n_experts: int,
    hw: Any = None,
) -> tuple[Allocation, list[Any]]:
    """A slot budget, end to end: the per-layer capacities that minimise `policy`'s demand misses on
    `curves` (`allocate`), then every placement's projected decode speed with that cache
    (`moescope.cache.project_decode`: all on CPU, whole layers static, the cache, the cache with misses
    computed on the CPU). One pipeline for ``moescope cache --vram`` and ``moescope plan offload --trace``.

    Parameters
    ----------
    expert_bytes : [layers] bytes of one routed expert per layer of the curves; dense_bytes : bytes read per
    token besides the routed experts; hw : `moescope.cache.Hardware` (default bandwidths when None).
    """
    from moescope.cache.cost import project_decode

    alloc = allocate(curves, budget_slots, policy)
    accesses, misses = curves.per_token(policy, alloc.capacities)
    projections = project_decode(
        expert_bytes=expert_bytes,
        top_k=top_k,
        n_experts=n_experts,
        dense_bytes=dense_bytes,
        budget_slots=budget_slots,
        cache_hits_per_token=accesses - misses,
        cache_loads_per_token=misses,
        cache_misses_per_token=misses,
        hw=hw,
    )
    return alloc, projections
