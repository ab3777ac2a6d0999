"""Synthetic routing traces with planted, returned ground truth (to test analyses by recovery).

Generative model, per MoE layer ``l`` (``E`` experts, ``k`` slots, ``D`` domains; ``D = 1`` without domains):

1. **Sequences.** Lengths are i.i.d. geometric with mean ``seq_len`` (support 1, 2, ...), drawn until they
   cover ``n_tokens`` (the last one is cut). Sequence ``i`` gets a domain uniformly at random
   (``domain_order="random"``) or ``i % D`` (``"cycle"``); the domain name is its label.
2. **Popularity.** Rank ``r = 1..E`` has weight ``r**-zipf[l]`` (normalised). A random global order gives
   ``g_l``, a random order per domain gives ``h_ld``. With ``n_generalists`` random experts ``Γ_l`` and
   ``γ = generalist_share``, the base draw distribution is
   ``p_ld = (1-γ) [(1-σ) g_l + σ h_ld] + γ uniform(Γ_l)``, ``σ = domain_specificity`` (0 without domains).
3. **Teams.** ``n_teams`` disjoint random groups of ``team_size`` experts (disjoint from ``Γ_l``). Each
   token-layer draws one group with probability its mass under ``p_ld``; experts in no team form the
   group "none". For a team ``T`` the draw distribution is ``r = τ p_ld|T + (1-τ) p_ld`` (``τ =
   team_strength``, ``p|T`` = ``p`` restricted to ``T``, renormalised); for "none" it is ``p_ld``.
4. **Slots** ``0..k-1`` are filled in order. Unless the token opens its sequence, with probability
   ``stickiness`` a slot reuses one of the previous token's experts (same layer), uniformly among those not
   yet chosen. Otherwise it draws from ``r`` without replacement (Plackett-Luce): inverse-CDF draws with
   duplicates rejected, up to ``MAX_TRIES`` tries, then one exact draw over the remaining mass.
5. **Gate weights** are sorted ``Exp(1)`` draws (Rényi spacings), each plus ``_WEIGHT_FLOOR``, normalised:
   positive, descending along the slots (slot order = descending weight), summing to 1 up to rounding.

Each random number is a counter-based hash (splitmix64) of (seed, sequence, position, layer, draw index),
so a token depends only on those and the previous token's experts: chunked generation equals whole
generation exactly, for any chunk size, and jit-compiled and plain-Python runs agree. `truth` returns the
planted structure and the expected share of selections per layer and domain (``E[count_e] / (tokens k)``),
exact for ``stickiness = 0``; stickiness copies slots between tokens and so shifts shares somewhat (about
5% relative at 0.3, 10% at 0.7 for 4 of 32 experts). Apart from `save_synth`
(which streams a trace into a store, memory bounded by one chunk) this module does no I/O.

    >>> trace = synth_trace(SynthSpec(n_tokens=100_000, n_layers=8, n_teams=4, team_strength=0.8))
    >>> trace.meta.extra["synth"]["truth"]["teams"][0]   # layer 0's planted teams
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from moescope._jit import njit
from moescope._rng import GAMMA as _GAMMA
from moescope._rng import M1 as _M1
from moescope._rng import M2 as _M2
from moescope._rng import mix as _mix
from moescope._rng import uniform as _uniform
from moescope.errors import UsageError
from moescope.trace import MAX_EXPERTS, PHASES, RoutingTrace, TraceMeta

__all__ = [
    "MAX_TRIES",
    "SynthBlock",
    "SynthSpec",
    "save_synth",
    "synth_chunks",
    "synth_meta",
    "synth_trace",
    "truth",
]

MAX_TRIES = 16  # rejection tries per slot before the exact draw over the remaining mass
WEIGHT_DTYPES = (None, "float16", "float32")
DOMAIN_ORDERS = ("random", "cycle")
MAX_ZIPF = 10.0  # beyond this, tail experts' mass underflows next to the head's
_WEIGHT_FLOOR = 1e-3  # added to each gate exponential, so float16 never rounds a weight to 0
_LENGTH_BATCH = 4096  # sequence lengths drawn per call, so a longer trace extends a shorter one
_CHUNK = 1 << 16
_INCLUSION_FLOATS = 1 << 22  # bounds the scratch of `_inclusion` (about 100 MB at most)
_INTS = (
    ("n_tokens", 0),
    ("n_layers", 1),
    ("n_experts", 1),
    ("top_k", 1),
    ("seed", 0),
    ("n_teams", 0),
    ("team_size", 0),
    ("n_generalists", 0),
)
_PROBS = ("team_strength", "stickiness", "domain_specificity", "generalist_share")


@dataclasses.dataclass(frozen=True)
class SynthSpec:
    """What to generate (see the module docstring for each knob); validated on construction."""

    n_tokens: int = 10_000
    n_layers: int = 4
    n_experts: int = 64
    top_k: int = 8
    seq_len: float = 256.0
    seed: int = 0
    zipf: float | tuple[float, ...] = 1.0
    n_teams: int = 0
    team_size: int = 4
    team_strength: float = 0.0
    stickiness: float = 0.0
    domains: tuple[str, ...] = ()
    domain_specificity: float = 0.5
    domain_order: str = "random"
    n_generalists: int = 0
    generalist_share: float = 0.0
    weights_dtype: str | None = "float16"
    phase: str = "prefill"
    model: str = "synthetic"

    def __post_init__(self) -> None:
        def fail(name: str, expected: str, fix: str) -> None:
            raise UsageError(f"{name} is {getattr(self, name)!r}, expected {expected}; {fix}")

        for name, lo in _INTS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v < 2**63:
                fail(name, f"an integer >= {lo}", f"pass a whole number >= {lo}")
            object.__setattr__(self, name, int(v))
        if self.n_experts > MAX_EXPERTS:
            fail("n_experts", f"at most {MAX_EXPERTS}", "expert ids are stored as int16")
        if self.top_k > self.n_experts:
            fail("top_k", f"<= n_experts ({self.n_experts})", "a token cannot pick more experts than exist")
        if not _is_real(self.seq_len) or not 1 <= self.seq_len < 2**53:
            fail("seq_len", "a number >= 1 (mean tokens per sequence)", "pass e.g. seq_len=256")
        many = isinstance(self.zipf, (list, tuple, np.ndarray))
        if many and len(self.zipf) != self.n_layers:
            fail("zipf", f"one float or {self.n_layers} floats (one per layer)", "give one skew per layer")
        if not all(_is_real(z) and 0 <= z <= MAX_ZIPF for z in (self.zipf if many else [self.zipf])):
            fail("zipf", f"values in [0, {MAX_ZIPF}] (0 = uniform)", "pass a non-negative popularity skew")
        object.__setattr__(self, "zipf", tuple(map(float, self.zipf)) if many else float(self.zipf))
        for name in _PROBS:
            if not _is_real(getattr(self, name)) or not 0 <= getattr(self, name) <= 1:
                fail(name, "a probability in [0, 1]", f"pass {name}=0 to turn it off")
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "seq_len", float(self.seq_len))
        if self.n_teams and self.team_size < 1:
            fail("team_size", "an integer >= 1 when n_teams > 0", "pass team_size >= 1, or n_teams=0")
        used = self.n_teams * self.team_size + self.n_generalists
        if used > self.n_experts:
            fail(
                "n_teams",
                f"n_teams x team_size + n_generalists = {used} <= n_experts ({self.n_experts})",
                "teams and generalists are disjoint: use fewer or smaller teams, or fewer generalists",
            )
        if self.n_teams and self.team_strength == 1 and self.team_size < self.top_k:
            fail(
                "team_strength",
                f"< 1 when team_size ({self.team_size}) < top_k ({self.top_k})",
                "a team alone cannot fill k distinct slots; lower team_strength or enlarge the teams",
            )
        if self.n_generalists and not 0 < self.generalist_share < 1:
            fail("generalist_share", "in (0, 1) when n_generalists > 0", "give generalists some, not all, mass")
        names = isinstance(self.domains, (list, tuple)) and all(isinstance(d, str) and d for d in self.domains)
        if not names or len(set(self.domains)) < len(self.domains):
            fail("domains", "a sequence of distinct non-empty names", "pass e.g. domains=('code', 'math')")
        object.__setattr__(self, "domains", tuple(self.domains))
        if self.domain_order not in DOMAIN_ORDERS:
            fail("domain_order", f"one of {', '.join(DOMAIN_ORDERS)}", "pick one of those")
        if self.weights_dtype not in WEIGHT_DTYPES:
            fail("weights_dtype", "'float16', 'float32' or None", "pass None for a trace without weights")
        if self.phase not in PHASES:
            fail("phase", f"one of {', '.join(PHASES)}", "pick one of those")

    def zipf_per_layer(self) -> np.ndarray:
        """[layers] float64 popularity skew of each layer."""
        return np.broadcast_to(np.asarray(self.zipf, dtype=np.float64), (self.n_layers,)).copy()

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields; ``SynthSpec(**spec.to_dict())`` rebuilds the spec."""
        zipf = list(self.zipf) if isinstance(self.zipf, tuple) else self.zipf
        return {**dataclasses.asdict(self), "zipf": zipf, "domains": list(self.domains)}


def _is_real(x: Any) -> bool:
    real = isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)
    return real and math.isfinite(x)


@dataclasses.dataclass(frozen=True)
class SynthBlock:
    """One streamed piece of a trace: ``experts [n, layers, k] int16``, ``weights [n, layers, k]`` (or None),
    ``seq_starts [m] int64`` of the sequences beginning in the block, relative to its first token (a block
    whose ``seq_starts`` does not start with 0 continues the previous block's sequence), their ``labels
    [m] str`` (None without domains), and ``token_offset``, the index of the block's first token."""

    experts: np.ndarray
    weights: np.ndarray | None
    seq_starts: np.ndarray
    labels: np.ndarray | None
    token_offset: int


@dataclasses.dataclass(frozen=True)
class _Model:
    """Planted structure. Shapes: L layers, D domains (1 without), T teams of S experts, E experts."""

    popularity: np.ndarray  # [L, D, E] float64, base draw distribution p_ld
    base_cdf: np.ndarray  # [L, D, E] cumsum of popularity
    guide: np.ndarray  # [L, D, 2E] int64 guide table of base_cdf (see `_guide_table`)
    teams: np.ndarray  # [L, T, S] int64 members, ascending
    team_of: np.ndarray  # [L, E] int64 team of each expert, -1 for none
    group_mass: np.ndarray  # [L, D, T + 1] probability of each group (teams, then none)
    group_cdf: np.ndarray  # [L, D, T + 1] cumsum of group_mass
    team_cdf: np.ndarray  # [L, D, T, S] cumsum of popularity over each team's members
    generalists: np.ndarray  # [L, G] int64
    global_order: np.ndarray  # [L, E] experts by descending global preference
    domain_order: np.ndarray  # [L, D, E] experts by descending domain preference


def _model(spec: SynthSpec) -> _Model:
    rng = np.random.default_rng([spec.seed, 2])
    n_lay, n_exp, n_dom, n_teams = spec.n_layers, spec.n_experts, max(1, len(spec.domains)), spec.n_teams
    sigma = spec.domain_specificity if spec.domains else 0.0
    share = spec.generalist_share if spec.n_generalists else 0.0
    pop = np.empty((n_lay, n_dom, n_exp))
    g_order = np.empty((n_lay, n_exp), dtype=np.int64)
    d_order = np.empty((n_lay, n_dom, n_exp), dtype=np.int64)
    teams = np.empty((n_lay, n_teams, spec.team_size if n_teams else 0), dtype=np.int64)
    gens = np.empty((n_lay, spec.n_generalists), dtype=np.int64)
    for layer, s in enumerate(spec.zipf_per_layer()):
        rank_w = np.arange(1, n_exp + 1, dtype=np.float64) ** -s
        rank_w /= rank_w.sum()
        g_order[layer] = rng.permutation(n_exp)
        special = rng.permutation(n_exp)[: spec.n_generalists + teams.shape[1] * teams.shape[2]]
        gens[layer] = np.sort(special[: spec.n_generalists])
        teams[layer] = np.sort(special[spec.n_generalists :].reshape(teams.shape[1:]), axis=1)
        for d in range(n_dom):
            d_order[layer, d] = rng.permutation(n_exp)
            pop[layer, d, g_order[layer]] = (1 - share) * (1 - sigma) * rank_w
            pop[layer, d, d_order[layer, d]] += (1 - share) * sigma * rank_w
            pop[layer, d, gens[layer]] += share / max(1, gens.shape[1])
    team_of = np.full((n_lay, n_exp), -1, dtype=np.int64)
    for t in range(n_teams):
        np.put_along_axis(team_of, teams[:, t], t, axis=1)
    group = np.where(team_of < 0, n_teams, team_of)[:, None, None, :] == np.arange(n_teams + 1)[:, None]
    # running sums in expert order, the same additions as a plain loop (the naive reference matches bits)
    group_mass = np.cumsum(pop[:, :, None, :] * group, axis=3)[..., -1]
    base_cdf = np.cumsum(pop, axis=2)
    return _Model(
        popularity=pop,
        base_cdf=base_cdf,
        guide=_guide_table(base_cdf, 2 * n_exp),
        teams=teams,
        team_of=team_of,
        group_mass=group_mass,
        group_cdf=np.cumsum(group_mass, axis=2),
        team_cdf=np.cumsum(np.take_along_axis(pop[:, :, None, :], teams[:, None], axis=3), axis=3),
        generalists=gens,
        global_order=g_order,
        domain_order=d_order,
    )


def _guide_table(cdf: np.ndarray, n_buckets: int) -> np.ndarray:
    """[..., n_buckets] int64: for each bucket ``[b/n, (b+1)/n)`` of ``v``, a lower bound of the inverse CDF.

    The inverse CDF at ``v`` is then a short forward scan from ``guide[int(v n)]`` (Chen & Asau's indexed
    search): the same index as a binary search, without its mispredicted branches.
    """
    thr = np.arange(n_buckets) / n_buckets * (1 - 1e-9)  # margin: v * cdf[-1] may round down
    flat = cdf.reshape(-1, cdf.shape[-1])
    rows = [np.searchsorted(c, thr * c[-1], side="right") for c in flat]
    guide = np.minimum(np.array(rows, dtype=np.int64).reshape(-1, n_buckets), cdf.shape[-1] - 1)
    return guide.reshape(*cdf.shape[:-1], n_buckets)


def _plan(spec: SynthSpec) -> tuple[np.ndarray, np.ndarray, np.uint64]:
    """Sequence starts [S + 1] int64 (last = n_tokens), domain per sequence [S] int64, and the hash key."""
    rng = np.random.default_rng([spec.seed, 0])
    lengths, total = [np.zeros(1, dtype=np.int64)], 0
    while total < spec.n_tokens:
        lengths.append(rng.geometric(1.0 / spec.seq_len, size=_LENGTH_BATCH))
        total += int(lengths[-1].sum())
    starts = np.cumsum(np.concatenate(lengths)).astype(np.int64)
    n_seq = int(np.searchsorted(starts, spec.n_tokens, side="left"))
    starts = np.append(starts[:n_seq], spec.n_tokens)
    n_dom = max(1, len(spec.domains))
    if spec.domain_order == "cycle":
        dom = np.arange(n_seq, dtype=np.int64) % n_dom
    else:
        dom = np.random.default_rng([spec.seed, 1]).integers(n_dom, size=n_seq, dtype=np.int64)
    return starts, dom, np.random.SeedSequence([spec.seed, 3]).generate_state(1, np.uint64)[0]


# ----------------------------------------------------------------------------------------------
# kernel: Plackett-Luce draws from counter-based uniforms (moescope._rng)


@njit
def _scan(cdf, x, i):
    """First index >= i whose cumulative value exceeds x (the last index if none does)."""
    while i < cdf.shape[0] - 1 and cdf[i] <= x:
        i += 1
    return i


@njit
def _sticky_pick(prow, mark, stamp, u):
    """The ``int(u n)``-th of the n experts in `prow` not chosen yet (n >= 1 while slots remain)."""
    n_free = 0
    for c in prow:
        n_free += mark[c] != stamp
    pick = int(u * n_free)
    for c in prow:
        if mark[c] != stamp:
            if pick == 0:
                return c
            pick -= 1
    return -1


@njit
def _exact_draw(mark, stamp, p, team_of, g, ts, g_mass, u):
    """Inverse CDF over the experts not chosen yet, each weighted ``(1-ts) p_c + ts p_c / g_mass`` if in g."""
    total = 0.0
    for c in range(p.shape[0]):
        if mark[c] != stamp:
            total += (1.0 - ts) * p[c] + (ts * p[c] / g_mass if ts > 0.0 and team_of[c] == g else 0.0)
    x, acc, e = u * total, 0.0, -1
    for c in range(p.shape[0]):
        m = (1.0 - ts) * p[c] + (ts * p[c] / g_mass if ts > 0.0 and team_of[c] == g else 0.0)
        if mark[c] != stamp and m > 0.0:
            e, acc = c, acc + m
            if acc > x:
                break
    return e


@njit
def _generate(
    experts,
    weights,
    runs,
    prev,
    key,
    pop,
    base_cdf,
    guide,
    group_cdf,
    team_cdf,
    teams,
    team_of,
    group_mass,
    stickiness,
    team_strength,
    max_tries,
):
    """Fill ``experts [n, L, k]`` and, unless it has 0 rows, ``weights [n, L, k]`` float32.

    ``runs [R, 4]``: (sequence, first position, length, domain) of consecutive token runs. ``prev [L, k]``:
    the experts of the token before the first (read only if that token does not open its sequence).
    Per token-layer, uniforms are used in this order: the group (if teams), then per slot the sticky coin
    and pick (if stickiness and not the sequence's first token), the tries, the exact draw; then k weights.
    """
    n_lay, k = experts.shape[1], experts.shape[2]
    n_exp, n_teams, n_buckets = pop.shape[2], teams.shape[1], guide.shape[2]
    mark = np.zeros(n_exp, dtype=np.int64)  # mark[e] == stamp: e already chosen in this token-layer
    spacing = np.empty(k)
    s_run = np.empty(n_lay, dtype=np.uint64)
    stamp, t = 0, 0
    for r in range(runs.shape[0]):
        d = runs[r, 3]
        for layer in range(n_lay):
            s_run[layer] = _mix(_mix(key + np.uint64(runs[r, 0]) * _GAMMA) + np.uint64(layer + 1) * _M1)
        for pos in range(runs[r, 1], runs[r, 1] + runs[r, 2]):
            for layer in range(n_lay):
                st = _mix(s_run[layer] + np.uint64(pos + 1) * _M2)
                prow = experts[t - 1, layer] if t > 0 else prev[layer]
                bc, bg = base_cdf[layer, d], guide[layer, d]
                stamp += 1
                j, g = 0, n_teams
                if n_teams > 0 and team_strength > 0.0:
                    gc = group_cdf[layer, d]
                    g = _scan(gc, _uniform(st, 0) * gc[-1], 0)
                    j = 1
                ts = team_strength if g < n_teams else 0.0
                for slot in range(k):
                    e = -1
                    if pos > 0 and stickiness > 0.0:
                        j += 1
                        if _uniform(st, j - 1) < stickiness:
                            e = _sticky_pick(prow, mark, stamp, _uniform(st, j))
                            j += 1
                    for _ in range(max_tries if e < 0 else 0):
                        u = _uniform(st, j)
                        j += 1
                        if u < ts:
                            tc = team_cdf[layer, d, g]
                            c = teams[layer, g, _scan(tc, u / ts * tc[-1], 0)]
                        else:
                            v = (u - ts) / (1.0 - ts)
                            c = _scan(bc, v * bc[-1], bg[min(int(v * n_buckets), n_buckets - 1)])
                        if mark[c] != stamp:
                            e = c
                            break
                    if e < 0:
                        e = _exact_draw(
                            mark, stamp, pop[layer, d], team_of[layer], g, ts, group_mass[layer, d, g], _uniform(st, j)
                        )
                        j += 1
                    mark[e] = stamp
                    experts[t, layer, slot] = e
                if weights.shape[0] > 0:  # ascending Exp(1) order statistics by Renyi's spacings
                    x, total = 0.0, 0.0
                    for q in range(k):
                        x -= np.log(_uniform(st, j + q)) / (k - q)
                        spacing[k - 1 - q] = x
                        total += x
                    total += k * _WEIGHT_FLOOR
                    for slot in range(k):
                        weights[t, layer, slot] = (spacing[slot] + _WEIGHT_FLOOR) / total
            t += 1


# ----------------------------------------------------------------------------------------------
# public wrappers


def _blocks(
    spec: SynthSpec, chunk_tokens: int, out: np.ndarray | None = None
) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
    """Yield (token offset, experts, float32 weights or None) of consecutive blocks of `chunk_tokens`.

    With `out` ([tokens, layers, k] int16), each block's experts are written into (and are a view of) it.
    """
    m = _model(spec)
    starts, dom, key = _plan(spec)
    prev = np.zeros((spec.n_layers, spec.top_k), dtype=np.int16)
    for a in range(0, spec.n_tokens, chunk_tokens):
        b = min(a + chunk_tokens, spec.n_tokens)
        s0, s1 = int(np.searchsorted(starts, a, side="right")) - 1, int(np.searchsorted(starts, b))
        lo, hi = np.maximum(starts[s0:s1], a), np.minimum(starts[s0 + 1 : s1 + 1], b)
        runs = np.stack([np.arange(s0, s1), lo - starts[s0:s1], hi - lo, dom[s0:s1]], axis=1)
        experts = np.empty((b - a, spec.n_layers, spec.top_k), np.int16) if out is None else out[a:b]
        weights = np.empty((b - a if spec.weights_dtype else 0, *experts.shape[1:]), dtype=np.float32)
        with np.errstate(over="ignore"):  # uint64 hashing wraps on purpose (numpy warns only without JIT)
            _generate(
                experts,
                weights,
                runs.astype(np.int64),
                prev,
                key,
                m.popularity,
                m.base_cdf,
                m.guide,
                m.group_cdf,
                m.team_cdf,
                m.teams,
                m.team_of,
                m.group_mass,
                spec.stickiness,
                spec.team_strength,
                MAX_TRIES,
            )
        prev = experts[-1].copy()  # the caller may reuse the yielded block
        yield a, experts, weights if spec.weights_dtype else None


def synth_chunks(spec: SynthSpec, chunk_tokens: int = _CHUNK) -> Iterator[SynthBlock]:
    """Generate `spec`'s trace as consecutive blocks of at most `chunk_tokens` tokens (bounded memory).

    Concatenating the blocks (``seq_starts`` shifted by ``token_offset``) gives exactly `synth_trace`;
    attach `synth_meta` to the written trace.
    """
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, (int, np.integer)) or chunk_tokens < 1:
        raise UsageError(f"chunk_tokens is {chunk_tokens!r}, expected an integer >= 1; pass e.g. 65536")
    starts, dom, _ = _plan(spec)
    names = np.asarray(spec.domains, dtype=str)
    for a, experts, w in _blocks(spec, int(chunk_tokens)):
        inside = np.arange(np.searchsorted(starts, a), np.searchsorted(starts, a + experts.shape[0]))
        yield SynthBlock(
            experts,
            None if w is None else w.astype(spec.weights_dtype, copy=False),
            starts[inside] - a,
            names[dom[inside]] if spec.domains else None,
            a,
        )


def synth_trace(spec: SynthSpec, chunk_tokens: int = _CHUNK) -> RoutingTrace:
    """Generate the whole trace of `spec` in memory, with `synth_meta` (spec and `truth`) attached.

    `chunk_tokens` bounds the float32 scratch used for the weights; it does not change the result.
    """
    shape = (spec.n_tokens, spec.n_layers, spec.top_k)
    experts = np.empty(shape, dtype=np.int16)
    weights = np.empty(shape, dtype=spec.weights_dtype) if spec.weights_dtype else None
    for a, e, w in _blocks(spec, chunk_tokens, out=experts):
        if weights is not None:
            weights[a : a + e.shape[0]] = w
    starts, dom, _ = _plan(spec)
    labels = np.asarray(spec.domains, dtype=str)[dom] if spec.domains else None
    return RoutingTrace(
        experts,
        spec.n_experts,
        weights=weights,
        seq_starts=starts[:-1],
        seq_labels=labels,
        phase=spec.phase,
        meta=synth_meta(spec),
        validate=False,
    )


def synth_meta(spec: SynthSpec) -> TraceMeta:
    """Provenance of `spec`'s trace: ``extra["synth"] = {"spec": spec.to_dict(), "truth": truth(spec)}``."""
    return TraceMeta(
        model=spec.model, source="moescope.synth", extra={"synth": {"spec": spec.to_dict(), "truth": truth(spec)}}
    )


def save_synth(
    spec: SynthSpec,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Stream `spec`'s trace into a store at `path` (atomic; memory bounded by one chunk).

    `progress`, if given, is called as ``progress(tokens_written, n_tokens)`` after each block.
    """
    from moescope.store import TraceWriter

    with TraceWriter(
        path,
        n_experts=spec.n_experts,
        n_layers=spec.n_layers,
        top_k=spec.top_k,
        phase=spec.phase,
        meta=synth_meta(spec),
        weights_dtype=spec.weights_dtype,
        overwrite=overwrite,
    ) as writer:
        for block in synth_chunks(spec, writer.chunk_tokens):
            labels = None if block.labels is None else block.labels.tolist()
            writer.append(block.experts, block.weights, seq_starts=block.seq_starts, labels=labels)
            if progress is not None:
                progress(writer.n_tokens, spec.n_tokens)
    return Path(path)


def truth(spec: SynthSpec) -> dict[str, Any]:
    """The planted ground truth as a JSON-able dict of nested lists.

    Keys (L layers, D domains, T teams of S, G generalists, E experts): ``domains`` (names; ``["*"]``
    without domains), ``zipf`` [L], ``global_order`` [L][E] and ``domain_order`` [L][D][E] (experts by
    descending planted preference), ``teams`` [L][T][S], ``team_probability`` [L][D][T] (chance that a
    token-layer draws each team), ``generalists`` [L][G], ``popularity`` [L][D][E] (base draw distribution
    ``p_ld``) and ``expected_share`` [L][D][E] (expected share of selections, rows sum to 1; exact when
    ``stickiness == 0``).
    """
    m = _model(spec)
    rates, probs = _draw_mixtures(m, spec.team_strength)
    incl = _inclusion(rates.reshape(-1, spec.n_experts), spec.top_k).reshape(rates.shape)
    return {
        "domains": list(spec.domains) or ["*"],
        "zipf": spec.zipf_per_layer().tolist(),
        "global_order": m.global_order.tolist(),
        "domain_order": m.domain_order.tolist(),
        "teams": m.teams.tolist(),
        "team_probability": m.group_mass[:, :, :-1].tolist(),
        "generalists": m.generalists.tolist(),
        "popularity": m.popularity.tolist(),
        "expected_share": ((probs[..., None] * incl).sum(axis=2) / spec.top_k).tolist(),
    }


def _draw_mixtures(m: _Model, strength: float) -> tuple[np.ndarray, np.ndarray]:
    """Draw distributions ``[L, D, groups, E]`` and the probability of each group ``[L, D, groups]``."""
    n_teams = m.teams.shape[1]
    if n_teams == 0 or strength == 0:
        return m.popularity[:, :, None, :], np.ones((*m.popularity.shape[:2], 1))
    pop, mass = m.popularity[:, :, None, :], m.group_mass
    member = m.team_of[:, None, None, :] == np.arange(n_teams + 1)[:, None]
    rates = (1 - strength) * pop + strength * member * pop / np.where(mass > 0, mass, 1.0)[..., None]
    rates[:, :, n_teams] = m.popularity  # the "none" group draws from p
    return rates, mass


def _inclusion(rates: np.ndarray, k: int, step: float = 0.2) -> np.ndarray:
    """[C, E] P(expert among the first k draws) of Plackett-Luce sampling ∝ `rates` [C, E].

    Draw order = order of independent clocks ``X_e ~ Exp(rate_e)``, so ``P(e in top k) = ∫ rate_e
    exp(-rate_e t) P(fewer than k other clocks < t) dt``. The count of other clocks is Poisson-binomial
    (prefix x suffix products, truncated at k); the integral is a trapezoid in ``log t``, which converges
    exponentially for this smooth, doubly decaying integrand (error ~1e-13 at step 0.2).
    """
    n_exp = rates.shape[1]
    out = (rates > 0).astype(np.float64)  # exact when k draws exhaust the support
    srt = -np.sort(-rates, axis=1)
    rows = np.flatnonzero(srt[:, k] > 0) if k < n_exp else np.zeros(0, np.int64)
    per_point = (n_exp + 1) * k  # floats of one prefix (or suffix) table per row and t
    batch = max(1, _INCLUSION_FLOATS // (per_point * 256))
    for lo in range(0, rows.size, batch):
        sel = rows[lo : lo + batch]
        r = rates[sel][:, None, :]
        z = np.arange(np.log(1e-12 / srt[sel, 0].max()), np.log(60.0 / srt[sel, k].min()) + step, step)
        out[sel] = r[:, 0] * np.exp(z[0])  # the integral below the grid, where the integrand is ~rate_e
        span = max(1, _INCLUSION_FLOATS // (per_point * sel.size))
        for z_part in np.array_split(z, -(-z.size // span)):
            t = np.exp(z_part)[None, :, None]
            q = -np.expm1(-r * t)  # [c, nt, E] P(clock e rang before t)
            pre = np.zeros((n_exp + 1, *q.shape[:2], k))
            suf = np.zeros_like(pre)
            pre[0, ..., 0] = suf[n_exp, ..., 0] = 1.0
            for e in range(n_exp):
                pre[e + 1] = pre[e] * (1 - q[..., e, None])
                pre[e + 1, ..., 1:] += pre[e, ..., :-1] * q[..., e, None]
                b = n_exp - 1 - e
                suf[b] = suf[b + 1] * (1 - q[..., b, None])
                suf[b, ..., 1:] += suf[b + 1, ..., :-1] * q[..., b, None]
            cum = np.cumsum(suf, axis=-1)
            fewer = sum(pre[:n_exp, ..., a] * cum[1:, ..., k - 1 - a] for a in range(k))  # [E, c, nt]
            out[sel] += step * (r * t * np.exp(-r * t) * np.moveaxis(fewer, 0, -1)).sum(axis=1)
    return out
