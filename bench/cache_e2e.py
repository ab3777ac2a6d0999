"""`moescope cache` end to end on a long trace store (called by `bench/run.py cache_e2e`).

Input: the synthetic 1M-token x 48-layer x 128-expert top-8 trace of `bench/run.py`'s SCALE (teams,
stickiness, two domains; no gate weights), written as a store. Timed: ``moescope cache STORE --json`` with
its default policies at its default capacities (16, 32, 64), run in a fresh interpreter after a JIT warm-up
on a small store; ``seconds`` is its wall time and ``peak_rss_mib`` its peak resident memory, the store
replayed a window of tokens at a time (`moescope.cache.windowed`). Then each policy's cost on one layer of
the same store (fit on its train halves if it learns, replayed at the three capacities, one thread), times
48: the CPU seconds the default set is chosen from (`moescope.cache.policies.DEFAULT_POLICIES`). Then peak
memory against length: the same default run on 2.5M, 10M and 40M tokens x 2 layers. Goals (issue 20): under
60 s and under 2 GB on 2 cores, and memory bounded at any trace length.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from run import _child  # bench/ is on sys.path when bench/run.py runs this module


def _cli(args: list[str]) -> dict:
    """Run the CLI in a fresh interpreter (`run._child`): its wall seconds, peak RSS (MiB) and JSON output."""
    return _child(
        "import contextlib, io, json, time\n"
        "from moescope.cli import main\n"
        "buf = io.StringIO()\n"
        "t = time.perf_counter()\n"
        "with contextlib.redirect_stdout(buf):\n"
        "    try:\n"
        f"        main({args!r})\n"
        "    except SystemExit as e:\n"
        "        assert not e.code, e.code\n"
        "text = buf.getvalue().strip()\n"
        "out = {'seconds': round(time.perf_counter() - t, 2),"
        " 'output': json.loads(text) if text.startswith('{') else None}\n"
    )


def _per_policy(store_path: Path) -> dict:
    """CPU seconds per policy for 48 layers: one layer's fit and replays at 16, 32 and 64, one thread, x 48."""
    from moescope.cache import make_policy
    from moescope.cache.policies import POLICIES, Stream
    from moescope.cache.simulate import build_streams
    from moescope.slicing import split_halves
    from moescope.store import TraceStore

    train, test = (build_streams(t)[0] for t in split_halves(TraceStore(store_path).routing_at([5])))
    warm = Stream(test.req[:2000], test.reset[:2000], test.n_items, test.n_experts)
    out = {}
    for name in POLICIES:
        if POLICIES[name].near_misses:  # the synthetic trace has no router candidates
            continue
        p = make_policy(name)
        if p.learns:
            p.fit(warm)
        p.run(warm, 16)  # JIT warm-up
        p = make_policy(name)
        t0 = time.process_time()
        if p.learns:
            p.fit(train)
        for c in (16, 32, 64):
            p.run(test, c)
        out[name] = round((time.process_time() - t0) * 48, 1)
    return dict(sorted(out.items(), key=lambda kv: kv[1]))


def measure(scale: dict) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="moescope-cache-e2e-"))
    try:
        return _measure(scale, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _measure(scale: dict, tmp: Path) -> dict:
    from moescope.cache.policies import default_policies
    from moescope.synth import SynthSpec, save_synth

    small, big = tmp / "small.zarr", tmp / "big.zarr"
    save_synth(SynthSpec(**(scale | {"n_tokens": 4000, "n_layers": 2})), small)
    _cli(["cache", str(small), "--json", "--policy", "all"])  # JIT warm-up (and cache load) of every kernel
    t0 = time.perf_counter()
    save_synth(SynthSpec(**scale), big)
    out: dict = {"shape": [scale["n_tokens"], scale["n_layers"], scale["top_k"]], "write_s": 0.0}
    out["write_s"] = round(time.perf_counter() - t0, 2)
    run = _cli(["cache", str(big), "--json"])
    rows = run.pop("output")["table"]["rows"]
    out["default_policies"] = default_policies()
    out["end_to_end"] = run | {
        "rows": [
            {k: r[k] for k in ("capacity", "policy", "demand_miss_rate", "lru_gap_closed", "transfers_vs_lru")}
            for r in rows
        ]
    }
    out["per_policy_cpu_s_48_layers"] = _per_policy(big)
    shutil.rmtree(big)
    out["lengths"] = _lengths(scale, tmp)
    out["goal"] = (
        "moescope cache, default policies at 3 capacities, 1M x 48 x top-8: under 60 s and 2 GB on 2 cores; "
        "peak memory bounded (under 2 GB) at any trace length"
    )
    return out


def _lengths(scale: dict, tmp: Path) -> list[dict]:
    """Peak memory against trace length: the default run on 2.5M, 10M and 40M tokens x 2 layers (16x the
    tokens; a whole layer's stream of 40M tokens at top-8 would alone take 1.3 GB as int32, and Belady's next
    uses 2.6 GB more), each store deleted before the next is written."""
    from moescope.synth import SynthSpec, save_synth

    out = []
    for n in (2_500_000, 10_000_000, 40_000_000):
        path = tmp / f"long-{n}.zarr"
        save_synth(SynthSpec(**(scale | {"n_tokens": n, "n_layers": 2, "weights_dtype": None})), path)
        run = _cli(["cache", str(path), "--json"])
        out.append({"tokens": n, "layers": 2, "seconds": run["seconds"], "peak_rss_mib": run["peak_rss_mib"]})
        shutil.rmtree(path)
    return out
