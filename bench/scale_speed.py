"""Production-size analysis: a 5M-token x 48-layer x top-8 synthetic store (~1.9 billion routing decisions)
analysed chunk by chunk in one process (peak RSS must stay under 4 GB), then on a 2-worker Dask
LocalCluster; both results are compared and the speed-up reported (`bench/run.py scale_analyses`).

Each step runs in its own process so its peak RSS is its own. The store is written by `save_synth`
(streamed). Analyses: counts, concentration, ranking, coact, temporal, prefetch (every chunked analysis the store
allows; `gate` needs gate weights, which this store is written without).

Placement (parallel across layers as Dask tasks): ``frequency`` and ``coact-refined`` at D = 8 fitted on the
first 1M tokens of the same store (whole sequences; placement needs its train tokens in memory), in
process and on the 2-worker LocalCluster; reports identical and the speed-up.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run import SCALE  # the 1M x 48 x 128 top-8 routing of the other scale benches

SPEC = {**SCALE, "n_tokens": 5_000_000, "weights_dtype": None, "seq_len": 512.0}

_STEP = """
import json, resource, sys, time
import numpy as np
from moescope.scale import run_chunked
t = time.perf_counter()
res = run_chunked(sys.argv[1], None, scheduler=None if sys.argv[2] == "none" else sys.argv[2])
dt = time.perf_counter() - t
digest = {
    "counts_sum": int(res["counts"].values.sum()),
    "coact_median_excess": res["coact"].median_excess,
    "temporal_first_layers": [r.to_dict() for r in res["temporal"].layers[:4]],
    "prefetch_first_layer": res["prefetch"][0][0].to_dict(),
}
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": round(dt, 2), "peak_rss_mib": round(rss, 1), "digest": digest}))
"""


_PLACE = """
import json, resource, sys, time
import numpy as np
from moescope.place import compare_placements
from moescope.store import TraceStore
st = TraceStore(sys.argv[1])
i = int(np.searchsorted(st.seq_starts, 1_000_000))  # the first sequence start at or after 1M tokens
stop = int(st.seq_starts[i]) if i < st.n_sequences else st.n_tokens
trace = st.read(0, stop).trace
t = time.perf_counter()
rep = compare_placements(trace, [8], ["coact-refined"], scheduler=None if sys.argv[2] == "none" else sys.argv[2])
dt = time.perf_counter() - t
d = rep.to_dict(layers=True)
for row in d["rows"]:
    row.pop("fit_seconds")
digest = {"rows": d["rows"], "tables": [p.table.tolist() for p in rep.placements.values()]}
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out = {"seconds": round(dt, 2), "peak_rss_mib": round(rss, 1), "tokens": trace.n_tokens,
       "coact_refined_vs_frequency": round(rep.row(8, "coact-refined").vs_frequency, 4),
       "digest": __import__("hashlib").sha256(json.dumps(digest).encode()).hexdigest()}
print(json.dumps(out))
"""


def _run(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure() -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="moescope-scale-"))
    try:
        store = tmp / "big.zarr"
        t = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from pathlib import Path; from moescope.synth import SynthSpec, "
                f"save_synth; save_synth(SynthSpec(**{SPEC!r}), Path(sys.argv[1]))",
                str(store),
            ],
            check=True,
        )
        write_s = time.perf_counter() - t
        inproc = _run(_STEP, str(store), "none")
        dask = _run(_STEP, str(store), "local:2")
        place_here = _run(_PLACE, str(store), "none")
        place_dask = _run(_PLACE, str(store), "local:2")
        return {
            "shape": [SPEC["n_tokens"], SPEC["n_layers"], SPEC["top_k"]],
            "decisions": SPEC["n_tokens"] * SPEC["n_layers"] * SPEC["top_k"],
            "store_write_s": round(write_s, 1),
            "in_process": {k: v for k, v in inproc.items() if k != "digest"},
            "dask_local_2": {k: v for k, v in dask.items() if k != "digest"},
            "speedup_dask_vs_in_process": round(inproc["seconds"] / dask["seconds"], 3),
            "results_identical": inproc["digest"] == dask["digest"],
            "place": {
                "in_process": {k: v for k, v in place_here.items() if k != "digest"},
                "dask_local_2": {k: v for k, v in place_dask.items() if k != "digest"},
                "speedup_dask_vs_in_process": round(place_here["seconds"] / place_dask["seconds"], 3),
                "results_identical": place_here["digest"] == place_dask["digest"],
            },
            "goal": "in-process peak RSS < 4096 MiB; Dask results identical",
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
