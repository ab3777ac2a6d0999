"""The fuzz suite's long tier (``make fuzz``): N seeded cases over every readable format and hostile command
line arguments (tests/fuzz_harness.py), a table per format, and every failing case with its reproduction.

    .venv/bin/python tools/fuzz.py --cases 2400 --seed 1 --out fuzz-results.json
Exit 1 when any run ended in a traceback, a hang, runaway memory or a crash.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import fuzz_harness as fh  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=2400)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per run before it counts as a hang")
    ap.add_argument("--memory-gib", type=float, default=fh.MEMORY_CAP / 2**30, help="address space a run may add")
    ap.add_argument("--format", action="append", choices=sorted(fh.FORMATS), help="only these formats")
    ap.add_argument("--out", type=Path, default=ROOT / "fuzz-results.json")
    args = ap.parse_args()
    cases = fh.make_cases(args.cases, args.seed, args.format)
    t0 = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if done % 100 == 0 or done == total:
            print(f"  {done}/{total} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="moescope-fuzz-") as work:
        outcomes = fh.run_cases(
            cases, Path(work), args.jobs, args.timeout, int(args.memory_gib * 2**30), progress=progress
        )
    rows = fh.table(outcomes)
    cols = ("format", "cases", *fh.OUTCOMES)
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    bad = [o for o in outcomes if o.outcome in fh.BAD]
    for o in bad:
        print(f"\n{o.outcome} (rc {o.rc}, {o.seconds:.1f} s, {o.max_rss_mib:.0f} MiB): {o.case.label()}")
        print("    " + o.stderr_tail[-600:].replace("\n", "\n    "))
    doc = {
        "cases": args.cases,
        "seed": args.seed,
        "seconds": round(time.perf_counter() - t0, 1),
        "table": rows,
        "failures": [o.to_dict() for o in bad],
        "slowest": [o.to_dict() for o in sorted(outcomes, key=lambda o: -o.seconds)[:10]],
    }
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\n{len(outcomes)} runs in {doc['seconds']} s; {len(bad)} failed; details in {args.out}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
