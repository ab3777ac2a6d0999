"""Decode-timeline speed at scale, measured in one process (called by `bench/run.py timeline_speed`).

Input: the synthetic 1M-token x 48-layer x 128-expert top-8 trace of `bench/run.py`'s SCALE (teams,
stickiness, two domains; no gate weights), with a synthetic captured lookahead at distance 1 (layer l+1's
true experts, each replaced by a random expert with probability 0.2, about what the fixture's routers give)
so that every strategy runs. Timed after a JIT warm-up on a tiny trace: the train/test split, then
`simulate_timeline` at one budget (32 experts per layer: 1,536 slots) with every registered cache policy and
every predictor: the goal is all strategies under 60 s on 2 cores. Beside it, on the test halves of the
warm-up trace (3,000 tokens x 4 layers: about 1,500 tokens), the prefetch kernel against the naive
event-by-event reference of tests/reference_timeline.py (the ratio of their speeds, measured in one run, and
that they agree).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

SLOTS = 48 * 32


def _with_lookahead(trace, seed: int):
    """`trace` with a lookahead [tokens, layers, 1, k]: layer l+1's experts, 20% replaced at random (-1 at the
    last layer); a replaced id may repeat one already there, as a noisy predictor's could not, which only costs
    a wasted slot."""
    rng = np.random.default_rng(seed)
    la = np.full((trace.n_tokens, trace.n_layers, 1, trace.top_k), -1, dtype=np.int16)
    nxt = trace.experts[:, 1:].copy()
    noise = rng.random(nxt.shape) < 0.2
    nxt[noise] = rng.integers(0, trace.n_experts, int(noise.sum()))
    la[:, :-1, 0] = nxt
    return trace.replace(extras={**trace.extras, "lookahead": la})


def measure() -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import reference_timeline
    from moescope.cache.timeline import MACHINES, Costs, _prefetch_timeline, predictions, simulate_timeline
    from moescope.slicing import split_halves
    from moescope.synth import SynthSpec, synth_trace

    spec = dict(n_experts=128, top_k=8, n_teams=8, team_size=8, team_strength=0.4, stickiness=0.2)
    machine = MACHINES["consumer-pcie4"]
    kw = dict(dense_bytes=0.7e9, machine=machine)
    small = _with_lookahead(synth_trace(SynthSpec(n_tokens=3_000, n_layers=4, weights_dtype=None, **spec)), 0)
    s_train, s_test = split_halves(small)
    simulate_timeline(s_test, expert_bytes=np.full(4, 2.65e6), slots=128, train=s_train, **kw)  # JIT warm-up

    tr = _with_lookahead(
        synth_trace(SynthSpec(n_tokens=1_000_000, n_layers=48, domains=("a", "b"), seed=1, weights_dtype=None, **spec)),
        1,
    )
    t0 = time.perf_counter()
    c0 = time.process_time()
    train, test = split_halves(tr)
    res = simulate_timeline(test, expert_bytes=np.full(48, 2.65e6), slots=SLOTS, train=train, **kw)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = {
        "shape": [tr.n_tokens, tr.n_layers, tr.top_k],
        "n_experts": tr.n_experts,
        "simulated_tokens": test.n_tokens,
        "slots": SLOTS,
        "strategies": len(res.results),
        "seconds": round(seconds, 2),
        "cpu_s": round(cpu, 2),
        "tokens_per_s": {r.name: round(r.tokens_per_second, 2) for r in res.results},
        "goal": "seconds < 60 on 2 cores (every strategy at one budget)",
    }
    # the kernel vs the naive reference on the test halves of the warm-up trace
    part = split_halves(small)[1]
    c = Costs.of(np.full(4, 2.65e6), 0.7e9, machine)
    pred = predictions(part, "lookahead", 1)
    cap = np.full(4, 32)
    args = (part.experts, pred, 1, cap, c.t_gpu, c.t_pcie, c.t_dense, c.latency, True)
    t = time.perf_counter()
    fast = _prefetch_timeline(*args)
    t_fast = time.perf_counter() - t
    t = time.perf_counter()
    slow = reference_timeline.prefetch_timeline(*args)
    t_slow = time.perf_counter() - t
    out["kernel_vs_reference"] = {
        "steps": int(part.n_tokens * part.n_layers),
        "agree": bool(np.allclose(fast, slow, rtol=1e-9)),
        "speedup": round(t_slow / max(t_fast, 1e-9), 1),
    }
    return out
