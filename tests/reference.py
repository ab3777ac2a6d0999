"""Slow, obviously-correct versions of the fast kernels, for comparison in tests.

Synthetic traces (`moescope.synth`): `synth_routing` is the sampling kernel written out with Python ints and
floats, plain lists and linear scans, driven by the same counter-based uniforms; it must equal `synth_trace`
bit for bit (experts) and to float rounding (weights). `plackett_luce_inclusion` enumerates every ordered
k-tuple.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from moescope import synth


def first_bad_selection(experts: np.ndarray, n_experts: int) -> tuple[int, int, int, int]:
    """Reference of `moescope.trace._first_bad_selection`: (code, token, layer, slot)."""
    for t in range(experts.shape[0]):
        for layer in range(experts.shape[1]):
            seen: set[int] = set()
            for s in range(experts.shape[2]):
                e = int(experts[t, layer, s])
                if not 0 <= e < n_experts:
                    return 1, t, layer, s
                if e in seen:
                    return 2, t, layer, s
                seen.add(e)
    return 0, -1, -1, -1


def expert_mass(experts: np.ndarray, n_experts: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Reference of `moescope.trace.expert_mass`: [layers, experts] counts or gate mass."""
    out = np.zeros((experts.shape[1], n_experts), dtype=np.float64 if weights is not None else np.int64)
    for t in range(experts.shape[0]):
        for layer in range(experts.shape[1]):
            for s in range(experts.shape[2]):
                out[layer, experts[t, layer, s]] += 1 if weights is None else float(weights[t, layer, s])
    return out


def split_tokens(seq_starts: np.ndarray, n_tokens: int, part: str) -> list[int]:
    """Token indices of the train (first half) or test (second half) part of every sequence."""
    out: list[int] = []
    bounds = [*seq_starts.tolist(), n_tokens]
    for a, b in itertools.pairwise(bounds):
        mid = a + (b - a) // 2
        out.extend(range(a, mid) if part == "train" else range(mid, b))
    return out


# -- moescope.synth ---------------------------------------------------------------------------------
SPLITMIX_MASK = (1 << 64) - 1
SPLITMIX_GAMMA, SPLITMIX_M1, SPLITMIX_M2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def splitmix64(z: int) -> int:
    """splitmix64's finaliser on Python ints."""
    z &= SPLITMIX_MASK
    z = ((z ^ (z >> 30)) * SPLITMIX_M1) & SPLITMIX_MASK
    z = ((z ^ (z >> 27)) * SPLITMIX_M2) & SPLITMIX_MASK
    return z ^ (z >> 31)


def hash_uniform(state: int, j: int) -> float:
    return ((splitmix64(state + (j + 1) * SPLITMIX_GAMMA) >> 11) + 0.5) * 2.0**-53


def running_sum(xs: list[float]) -> list[float]:
    out, acc = [], 0.0
    for x in xs:
        acc += x
        out.append(acc)
    return out


def first_above(cum: list[float], x: float) -> int:
    """Inverse CDF: the first index whose cumulative value exceeds x (the last index if none does)."""
    for i, c in enumerate(cum):
        if c > x:
            return i
    return len(cum) - 1


def synth_routing(spec: synth.SynthSpec) -> tuple[np.ndarray, np.ndarray]:
    """Experts [tokens, layers, k] int16 and float32 weights of `spec`, one token-layer at a time.

    Takes the sequence plan from `synth._plan` and the planted distributions from `synth.truth`.
    """
    starts, domains, key = synth._plan(spec)
    t = synth.truth(spec)
    n_exp, k, ts_all, stick = spec.n_experts, spec.top_k, spec.team_strength, spec.stickiness
    n_teams = spec.n_teams
    experts = np.zeros((spec.n_tokens, spec.n_layers, k), dtype=np.int16)
    weights = np.zeros((spec.n_tokens, spec.n_layers, k), dtype=np.float32)
    for layer in range(spec.n_layers):
        teams = t["teams"][layer]
        group_of = [n_teams] * n_exp
        for g, members in enumerate(teams):
            for c in members:
                group_of[c] = g
        for seq in range(len(starts) - 1):
            d = int(domains[seq])
            p = t["popularity"][layer][d]
            base_cdf = running_sum(p)
            gmass = [
                running_sum([p[c] if group_of[c] == g else 0.0 for c in range(n_exp)])[-1] for g in range(n_teams + 1)
            ]
            group_cdf = running_sum(gmass)
            stream = splitmix64(splitmix64(int(key) + seq * SPLITMIX_GAMMA) + (layer + 1) * SPLITMIX_M1)
            for pos in range(int(starts[seq + 1] - starts[seq])):
                tok = int(starts[seq]) + pos
                st = splitmix64(stream + (pos + 1) * SPLITMIX_M2)
                draws = itertools.count()
                g = n_teams
                if n_teams and ts_all > 0:
                    g = first_above(group_cdf, hash_uniform(st, next(draws)) * group_cdf[-1])
                ts = ts_all if g < n_teams else 0.0

                chosen: list[int] = []
                prev = [int(x) for x in experts[tok - 1, layer]] if pos else []
                for _slot in range(k):
                    e = -1
                    if pos and stick > 0 and hash_uniform(st, next(draws)) < stick:
                        free = [c for c in prev if c not in chosen]
                        e = free[int(hash_uniform(st, next(draws)) * len(free))]
                    for _ in range(synth.MAX_TRIES if e < 0 else 0):
                        u = hash_uniform(st, next(draws))
                        if u < ts:
                            team_cdf = running_sum([p[c] for c in teams[g]])
                            c = teams[g][first_above(team_cdf, u / ts * team_cdf[-1])]
                        else:
                            c = first_above(base_cdf, (u - ts) / (1.0 - ts) * base_cdf[-1])
                        if c not in chosen:
                            e = c
                            break
                    if e < 0:  # exact draw over the remaining mass
                        total = 0.0
                        for c in range(n_exp):
                            if c not in chosen:
                                total += synth_draw_mass(c, g, ts, p, group_of, gmass)
                        x, acc = hash_uniform(st, next(draws)) * total, 0.0
                        for c in range(n_exp):
                            m = synth_draw_mass(c, g, ts, p, group_of, gmass)
                            if c not in chosen and m > 0.0:
                                e, acc = c, acc + m
                                if acc > x:
                                    break
                    chosen.append(e)
                experts[tok, layer] = chosen
                j = next(draws)
                x, spacings = 0.0, [0.0] * k
                for q in range(k):
                    x -= math.log(hash_uniform(st, j + q)) / (k - q)
                    spacings[k - 1 - q] = x
                total = running_sum(spacings[::-1])[-1] + k * synth._WEIGHT_FLOOR
                weights[tok, layer] = [(s + synth._WEIGHT_FLOOR) / total for s in spacings]
    return experts, weights


def synth_draw_mass(c: int, g: int, ts: float, p: list[float], group_of: list[int], gmass: list[float]) -> float:
    """Unnormalised draw mass of expert c when the token-layer drew group g (team strength ts)."""
    m = (1.0 - ts) * p[c]
    if ts > 0.0 and group_of[c] == g:
        m += ts * p[c] / gmass[g]
    return m


def plackett_luce_inclusion(rates: list[float], k: int) -> list[float]:
    """P(expert among the first k draws without replacement, each draw ∝ rates of the rest), enumerated."""
    total = sum(rates)
    out = [0.0] * len(rates)
    for order in itertools.permutations(range(len(rates)), k):
        prob, left = 1.0, total
        for e in order:
            prob *= rates[e] / left
            left -= rates[e]
        for e in order:
            out[e] += prob
    return out


# -- moescope.analyze.concentration ---------------------------------------------------------------------
def hot_experts(row: list[float], coverage: float) -> int:
    """Experts, hottest first, until their summed share reaches `coverage` (shares sum to 1)."""
    total, n = 0.0, 0
    for share in sorted(row, reverse=True):
        total += share
        n += 1
        if total >= coverage - 1e-9:
            return n
    return n


def concentration_score(row: list[float]) -> float:
    """1 - entropy / log(E)."""
    if len(row) == 1:
        return 1.0
    return 1.0 - sum(-p * math.log(p) for p in row if p > 0) / math.log(len(row))


def gini(row: list[float]) -> float:
    """Mean absolute difference over all ordered pairs, divided by twice the mean."""
    n, mean = len(row), sum(row) / len(row)
    return sum(abs(a - b) for a in row for b in row) / (2 * n * n * mean) if mean > 0 else 0.0


# -- moescope.analyze.ranking ---------------------------------------------------------------------------
def ranking(experts: np.ndarray, n_experts: int, layer: int) -> list[int]:
    """Experts of one layer index, most selected first, ties by lower id."""
    counts = [0] * n_experts
    for row in experts[:, layer, :]:
        for e in row:
            counts[int(e)] += 1
    return sorted(range(n_experts), key=lambda e: (-counts[e], e))


def group_mass(experts: np.ndarray, layer: int, group: set[int]) -> tuple[float, float]:
    """(selections inside / all selections, tokens with every slot inside / all tokens) of one layer index."""
    inside = total = full = 0
    for row in experts[:, layer, :]:
        hits = sum(int(e) in group for e in row)
        inside += hits
        total += len(row)
        full += hits == len(row)
    return inside / total, full / experts.shape[0]
