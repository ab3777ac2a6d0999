"""moescope benchmarks (`make bench`): each writes bench/results/<name>.json. Not part of CI.

Speed is reported as measured seconds and, where a reference exists, as a ratio measured in the same
run; memory is the peak RSS of a fresh subprocess doing only that step.

    python bench/run.py --out bench/results [--only store_scale]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REALDATA = ROOT.parent / "shared" / "realdata"
MOESCOPE = [sys.executable, "-m", "moescope.cli"]


def _child(code: str) -> dict:
    """Run `code` in a fresh interpreter; it must leave its results in a dict named `out`.

    Adds the child's own peak RSS (MiB) and its wall time.
    """
    # Peak RSS is the process image's own high-water mark (VmHWM, Linux), not getrusage's ru_maxrss: Linux
    # carries ru_maxrss across fork and exec, so a child started by a large process (a bench that wrote a
    # big store first) would report that process's RSS as its own floor.
    epilogue = (
        "\nimport json as _j, resource as _r\n"
        "def _hwm_mib():\n"
        "    try:\n"
        "        for _line in open('/proc/self/status'):\n"
        "            if _line.startswith('VmHWM:'):\n"
        "                return int(_line.split()[1]) / 1024\n"
        "    except OSError:\n"
        "        pass\n"
        "    return _r.getrusage(_r.RUSAGE_SELF).ru_maxrss / 1024\n"
        "out['peak_rss_mib'] = round(_hwm_mib(), 1)\n"
        "print(_j.dumps(out))\n"
    )
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code + epilogue], check=True, capture_output=True, text=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = round(time.perf_counter() - t0, 3)
    return result


def _timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


def bench_store_realdata(tmp: Path) -> dict:
    """ESFT DeepSeek-V2-Lite trace (25,028 x 26 x 6): npz -> store, then `trace info`, as CLI runs."""
    src = REALDATA / "esft-dsv2lite" / "trace.npz"
    if not src.is_file():
        return {"skipped": f"{src} is absent"}
    store = tmp / "esft.zarr"
    convert = _timed([*MOESCOPE, "trace", "convert", str(src), str(store)])
    info = _timed([*MOESCOPE, "trace", "info", str(store), "--json"])
    startup = _timed([*MOESCOPE, "--version"])
    return {
        "input": str(src),
        "convert_s": round(convert, 3),
        "info_s": round(info, 3),
        "cli_startup_s": round(startup, 3),
        "store_mib": round(sum(p.stat().st_size for p in store.rglob("*") if p.is_file()) / 2**20, 2),
        "goal": "each well under 5 s",
    }


SCALE = dict(
    n_tokens=1_000_000,
    n_layers=48,
    n_experts=128,
    top_k=8,
    n_teams=8,
    team_size=8,
    team_strength=0.4,
    stickiness=0.2,
    domains=("a", "b"),
    seed=1,
)


def bench_store_scale(tmp: Path) -> dict:
    """1M tokens x 48 layers x top-8 (384M decisions): streamed write, streamed read, each in its own process."""
    path = tmp / "scale.zarr"
    write = _child(
        "import json, time\n"
        "from pathlib import Path\n"
        "from moescope.synth import SynthSpec\n"
        "from moescope.synth import save_synth\n"
        f"spec = SynthSpec(**{SCALE!r})\n"
        "t = time.perf_counter()\n"
        f"save_synth(spec, Path({str(path)!r}))\n"
        "out = {'write_s': round(time.perf_counter() - t, 3)}\n"
    )
    read = _child(
        "import json, time\n"
        "import numpy as np\n"
        "from moescope.store import TraceStore\n"
        "from moescope.trace import expert_mass\n"
        "t = time.perf_counter()\n"
        f"s = TraceStore({str(path)!r})\n"
        "tot = np.zeros((s.n_layers, s.n_experts), dtype=np.int64)\n"
        "for c in s.iter_chunks():\n"
        "    tot += expert_mass(c.trace.experts, s.n_experts)\n"
        "assert int(tot.sum()) == s.n_tokens * s.n_layers * s.top_k\n"
        "out = {'read_s': round(time.perf_counter() - t, 3), 'tokens': s.n_tokens}\n"
    )
    in_memory = SCALE["n_tokens"] * SCALE["n_layers"] * SCALE["top_k"] * (2 + 2) / 2**20
    return {
        "shape": [SCALE["n_tokens"], SCALE["n_layers"], SCALE["top_k"]],
        "write": write,
        "read_validate_count": read,
        "whole_trace_in_memory_mib": round(in_memory, 1),
        "store_mib": round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20, 1),
    }


def bench_synth_speed(tmp: Path) -> dict:
    """Token-layers generated per second (after JIT warm-up), 1M tokens x 10 layers x top-8 of 64."""
    return _child(
        "import json, time\n"
        "from moescope.synth import SynthSpec, synth_trace\n"
        "kw = dict(n_layers=10, n_experts=64, top_k=8, n_teams=4, team_strength=0.5, stickiness=0.3,"
        " domains=('a', 'b'), seed=3)\n"
        "synth_trace(SynthSpec(n_tokens=2000, **kw))\n"
        "t = time.perf_counter()\n"
        "tr = synth_trace(SynthSpec(n_tokens=1_000_000, **kw))\n"
        "dt = time.perf_counter() - t\n"
        "out = {'seconds': round(dt, 3), 'token_layers': 10_000_000, 'token_layers_per_s': round(10_000_000 / dt)}\n"
    )


def bench_capture_hf_overhead(tmp: Path) -> dict:
    """Router hooks' cost: forward + collect with `RouterRecorder` over a plain forward, same inputs; and with
    ``lookahead=2, candidates=8`` (the next two routers applied at every MoE layer, top-8 near misses kept).

    Random Qwen3-MoE (hidden 256, 4 layers, 32 experts, top-4), batch 8 x 256 tokens, float32, on CUDA
    when available else CPU. Hooked and plain runs alternate (order swapped every pair); the ratio is the
    median of per-pair ratios, measured in this one run.
    """
    return _child(
        "import statistics, time\n"
        "import torch, transformers as tf\n"
        "from moescope.capture import RouterRecorder\n"
        "dev = 'cuda' if torch.cuda.is_available() else 'cpu'\n"
        "sync = torch.cuda.synchronize if dev == 'cuda' else (lambda: None)\n"
        "torch.manual_seed(0)\n"
        "cfg = tf.Qwen3MoeConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,"
        " num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=32,"
        " num_experts_per_tok=4)\n"
        "model = tf.AutoModelForCausalLM.from_config(cfg).to(dev).eval()\n"
        "ids = torch.randint(0, 1024, (8, 256), device=dev)\n"
        "mask = torch.ones_like(ids)\n"
        "rec = RouterRecorder(model)\n"
        "ahead = RouterRecorder(model, lookahead=2, candidates=8)\n"
        "def plain():\n"
        "    model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)\n"
        "def hooked():\n"
        "    with rec:\n"
        "        plain()\n"
        "        experts, weights = rec.collect(mask)\n"
        "    assert experts.shape == (8 * 256, 4, 4)\n"
        "def lookahead():\n"
        "    with ahead:\n"
        "        plain()\n"
        "        experts, weights, extras = ahead.collect_all(mask)\n"
        "    assert extras['lookahead'].shape == (8 * 256, 4, 2, 4)\n"
        "def timed(fn):\n"
        "    sync(); t = time.perf_counter(); fn(); sync()\n"
        "    return time.perf_counter() - t\n"
        "times = {'plain': [], 'hooked': [], 'lookahead': []}\n"
        "with torch.inference_mode():\n"
        "    for fn in (plain, hooked, lookahead, plain, hooked, lookahead):\n"
        "        fn()\n"
        "    for r in range(15):\n"
        "        order = (('plain', plain), ('hooked', hooked), ('lookahead', lookahead))\n"
        "        for name, fn in order if r % 2 == 0 else order[::-1]:\n"
        "            times[name].append(timed(fn))\n"
        "ratios = [h / p for h, p in zip(times['hooked'], times['plain'])]\n"
        "la_ratios = [h / p for h, p in zip(times['lookahead'], times['plain'])]\n"
        "med = {k: statistics.median(v) for k, v in times.items()}\n"
        "out = {'device': dev, 'threads': torch.get_num_threads(), 'tokens_per_forward': 8 * 256, 'repeats': 15,\n"
        "       'plain_s': round(med['plain'], 4), 'hooked_s': round(med['hooked'], 4),\n"
        "       'overhead_ratio': round(statistics.median(ratios), 4),\n"
        "       'ratio_min_max': [round(min(ratios), 4), round(max(ratios), 4)],\n"
        "       'tokens_per_s_plain': round(2048 / med['plain']), 'tokens_per_s_hooked': round(2048 / med['hooked']),\n"
        "       'lookahead_2_candidates_8': {'seconds': round(med['lookahead'], 4),\n"
        "           'overhead_ratio': round(statistics.median(la_ratios), 4),\n"
        "           'ratio_min_max': [round(min(la_ratios), 4), round(max(la_ratios), 4)]},\n"
        "       'torch': torch.__version__, 'transformers': tf.__version__, 'goal': 'overhead_ratio <= 1.05'}\n"
    )


def bench_capture_llama_overhead(tmp: Path) -> dict:
    """The eval callback's cost: `LlamaSession.run` (tap on) over `decode` of a tap-less session, same batch;
    and with ``lookahead=2`` and router logits (+ top-4 candidates from them, as ``capture llama --lookahead 2
    --candidates 4`` records).

    The fixture GGUF (tiny: each asked tensor splits the graph and syncs, a fixed cost that weighs most on a
    tiny model), 512-token batches of its held-out text, all logits requested in both (the capture needs
    them); the tap-less run with last-token logits only is reported too. Alternating, median of pair ratios.
    """
    return _child(
        "import statistics, time\n"
        "from moescope import fixture\n"
        "from moescope.corpus import read_corpus\n"
        "from moescope.gguf import inspect_gguf\n"
        "from moescope.gguf.routing import top_candidates\n"
        "from moescope.gguf.runtime import LlamaSession\n"
        "info = inspect_gguf(fixture.GGUF)\n"
        "kw = dict(n_ctx=512, n_threads=2, flash_attn=False, kv_type='f16')\n"
        "tap = LlamaSession(fixture.GGUF, info, record=True, **kw)\n"
        "plain = LlamaSession(fixture.GGUF, info, record=False, **kw)\n"
        "ahead = LlamaSession(fixture.GGUF, info, record=True, lookahead=2, router_logits=True, **kw)\n"
        "text = ' '.join(d.text for d in read_corpus(fixture.HELDOUT_DIR))\n"
        "ids = plain.tokenize(text)[:512]\n"
        "def timed(fn):\n"
        "    t = time.perf_counter(); fn(); return time.perf_counter() - t\n"
        "def cap():\n"
        "    tap.clear(); tap.run(ids)\n"
        "def base():\n"
        "    plain.clear(); plain.decode(ids)\n"
        "def last():\n"
        "    plain.clear(); plain.decode(ids, all_logits=False)\n"
        "def look():\n"
        "    ahead.clear(); _, _, x = ahead.run_all(ids)\n"
        "    top_candidates(x['router_logits'].reshape(-1, info.n_experts), 4)\n"
        "for f in (cap, base, last, look): f()\n"
        "ratios, la_ratios, tc, tb, tl, ta = [], [], [], [], [], []\n"
        "for i in range(30):\n"
        "    a, b = (timed(cap), timed(base)) if i % 2 else (timed(base), timed(cap))[::-1]\n"
        "    c = timed(look)\n"
        "    tc.append(a); tb.append(b); tl.append(timed(last)); ta.append(c); ratios.append(a / b)\n"
        "    la_ratios.append(c / b)\n"
        "out = {'tokens_per_batch': len(ids), 'repeats': 30, 'capture_s': round(statistics.median(tc), 5),\n"
        "       'plain_all_logits_s': round(statistics.median(tb), 5),\n"
        "       'plain_last_logit_s': round(statistics.median(tl), 5),\n"
        "       'overhead_ratio': round(statistics.median(ratios), 4),\n"
        "       'ratio_vs_last_logit_only': round(statistics.median(tc) / statistics.median(tl), 4),\n"
        "       'tokens_per_s_capture': round(len(ids) / statistics.median(tc)),\n"
        "       'lookahead_2_candidates_4': {'seconds': round(statistics.median(ta), 5),\n"
        "           'overhead_ratio': round(statistics.median(la_ratios), 4),\n"
        "           'ratio_vs_capture': round(statistics.median(ta) / statistics.median(tc), 4)},\n"
        "       'goal': 'overhead_ratio <= 1.05'}\n"
    )


def bench_locality(tmp: Path) -> dict:
    """`locality` (reuse vs shuffle, gaps, working sets, cross-layer, 4 predictors x 3 budgets, train/test split)
    on the 1M x 48 x top-8-of-128 synthetic trace in a fresh process after JIT warm-up; the CLI on ESFT.

    Wall and CPU seconds of the analysis alone (not the synthesis); peak RSS is the whole child's (the trace
    itself is 768 MiB of int16 ids), with the RSS before the analysis beside it.
    """
    scale = _child(
        "import resource, time\n"
        "from moescope.synth import SynthSpec, synth_trace\n"
        "from moescope.analyze.locality import locality\n"
        "locality(synth_trace(SynthSpec(n_tokens=3000, n_layers=3, n_experts=128, top_k=8, weights_dtype=None)))\n"
        f"tr = synth_trace(SynthSpec(**{SCALE!r}, weights_dtype=None))\n"
        "rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
        "t, c = time.perf_counter(), time.process_time()\n"
        "r = locality(tr)\n"
        "out = {'seconds': round(time.perf_counter() - t, 3), 'cpu_s': round(time.process_time() - c, 3),\n"
        "       'rss_before_analysis_mib': round(rss0, 1),\n"
        "       'reuse_ratio_median': round(r.summary['reuse_ratio'].median, 4),\n"
        "       'hit_rate_last_b8': round(r.prefetch_overall['last'][0].mean, 4),\n"
        "       'goal': 'seconds < 25 (all analyses < 60), peak_rss_mib well under 4096'}\n"
    )
    src = REALDATA / "esft-dsv2lite" / "trace.npz"
    if not src.is_file():
        esft = {"skipped": f"{src} is absent"}
    else:
        esft = {"input": str(src), "cli_json_s": round(_timed([*MOESCOPE, "locality", str(src), "--json"]), 3)}
    return {"shape": [SCALE["n_tokens"], SCALE["n_layers"], SCALE["top_k"]], "scale": scale, "esft": esft}


def bench_coact_scale(tmp: Path) -> dict:
    """`coactivation` on 1M tokens x 48 layers x top-8 of 128 (SCALE, no weights): pair counts, 3 nulls per
    layer and the balanced clustering of 4 matrices per layer, with each null; after a JIT warm-up on 2,000
    tokens. RSS before the analysis (the trace itself, ~0.8 GB) and the process peak are both reported."""
    return _child(
        "import time\n"
        "import numpy as np\n"
        "from moescope.analyze.coact import coact_counts, coactivation\n"
        "from moescope.slicing import select_tokens\n"
        "from moescope.synth import SynthSpec, synth_trace\n"
        f"tr = synth_trace(SynthSpec(**{SCALE!r}, weights_dtype=None))\n"
        "coactivation(select_tokens(tr, 0, 2000), layers=[0], null='swap')\n"
        "coactivation(select_tokens(tr, 0, 2000), layers=[0], null='shuffle')\n"
        "def rss_mib():\n"
        "    return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20\n"
        "out = {'shape': [tr.n_tokens, tr.n_layers, tr.top_k], 'n_experts': tr.n_experts, 'groups': 8, 'n_null': 3,\n"
        "       'rss_before_mib': round(rss_mib(), 1)}\n"
        "t = time.perf_counter(); coact_counts(tr.experts, tr.n_experts)\n"
        "out['counts_only_s'] = round(time.perf_counter() - t, 3)\n"
        "for null in ('swap', 'shuffle'):\n"
        "    t = time.perf_counter(); r = coactivation(tr, groups=8, n_null=3, null=null)\n"
        "    out[null] = {'seconds': round(time.perf_counter() - t, 3), 'median_gain': round(r.median_gain, 4),\n"
        "                 'median_null_gain': round(r.median_null_gain, 4),\n"
        "                 'median_excess': round(r.median_excess, 4),\n"
        "                 'structured_layers': r.structured_layers}\n"
        "out['goal'] = 'swap seconds well under 25 on 2 cores; peak RSS - rss_before well under 4 GB'\n"
    )


def bench_cache_replay(tmp: Path) -> dict:
    """Cache replays vs libCacheSim on the same 8M-access stream (see bench/cache_speed.py)."""
    return _bench_module("cache_speed")


def bench_cache_e2e(tmp: Path) -> dict:
    """`moescope cache` with its defaults on a 1M x 48 x top-8 store, time and memory (see bench/cache_e2e.py)."""
    return _child(
        f"import sys\nsys.path.insert(0, {str(ROOT / 'bench')!r})\n"
        f"import cache_e2e\nout = cache_e2e.measure({SCALE!r})\n"
    )


def bench_cache_generalisation(tmp: Path) -> dict:
    """Online cache policies fitted on halves / on two ESFT tasks, replayed on the rest, with each fitted
    policy's hindsight ceiling (see bench/cache_generalisation.py)."""
    return _bench_on_esft("cache_generalisation")


def bench_split_gguf(tmp: Path) -> dict:
    """GGUF split throughput vs a plain copy of the same file (see bench/split_speed.py)."""
    return _bench_module("split_speed")


def bench_scale_analyses(tmp: Path) -> dict:
    """Every chunked analysis on 5M x 48 x top-8 in process and on Dask (see bench/scale_speed.py)."""
    return _bench_module("scale_speed")


def bench_place_speed(tmp: Path) -> dict:
    """A 128-expert x 48-layer x D=8 placement from a 1M-token trace (see bench/place_speed.py)."""
    return _bench_module("place_speed")


def bench_place_generalisation(tmp: Path) -> dict:
    """Placement fitted on halves / on two ESFT tasks, scored on the rest (see bench/place_generalisation.py)."""
    return _bench_on_esft("place_generalisation")


def bench_place_inner_split(tmp: Path) -> dict:
    """How the labels protocol folds its fitting data, decided on the fixture's domains (see
    bench/place_inner_split.py)."""
    return _bench_module("place_inner_split")


def bench_place_defaults(tmp: Path) -> dict:
    """coact-refined's late-token weight and coact-capped's merge penalty, chosen on the fixture's domains (see
    bench/place_defaults.py)."""
    return _bench_module("place_defaults")


def bench_timeline_speed(tmp: Path) -> dict:
    """Every decode-timeline strategy at one budget on 1M x 48 x top-8 (see bench/timeline_speed.py)."""
    return _bench_module("timeline_speed")


def _bench_on_esft(name: str) -> dict:
    """Run `measure(path)` of bench/<name>.py on the shared ESFT trace in a fresh interpreter (skipped when
    `REALDATA` is absent)."""
    src = REALDATA / "esft-dsv2lite" / "trace.npz"
    if not src.is_file():
        return {"skipped": f"{src} is absent"}
    return _child(
        f"import sys\nfrom pathlib import Path\nsys.path.insert(0, {str(ROOT / 'bench')!r})\n"
        f"import {name}\nout = {name}.measure(Path({str(src)!r}))\n"
    )


def _bench_module(name: str) -> dict:
    """Run `measure()` of bench/<name>.py in a fresh interpreter (see `_child`)."""
    return _child(f"import sys\nsys.path.insert(0, {str(ROOT / 'bench')!r})\nimport {name}\nout = {name}.measure()\n")


BENCHES = {name[len("bench_") :]: fn for name, fn in globals().items() if name.startswith("bench_")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--only", choices=sorted(BENCHES), action="append")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    machine = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": __import__("os").cpu_count(),
    }
    for name in args.only or sorted(BENCHES):
        tmp = Path(tempfile.mkdtemp(prefix=f"moescope-bench-{name}-"))
        try:
            t0 = time.perf_counter()
            result = BENCHES[name](tmp)
            result["bench_wall_s"] = round(time.perf_counter() - t0, 3)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        result["machine"] = machine
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"{name}: {json.dumps(result)}")


if __name__ == "__main__":
    main()
