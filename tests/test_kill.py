"""kill -9 while moescope writes: after any kill the target is absent (no old output), the old output intact, or
the complete new output; after the same command runs again, no temporary is left beside it.

Commands: `trace convert` npz -> store and store -> npz, `split`, `capture llama` (the in-place store: a kill
may also leave a readable prefix of the capture, or a stub killed before its first commit, by design), each
with and without an old output. Kills come at every commit step (before and after each rename, swap or delete
touching the target's names: a counter in the child SIGKILLs it at step N) and after seeded random delays, one
in each of `DELAYS` equal slices of a full run (early, middle, late; ``MOESCOPE_KILL_DELAYS=30`` for a soak).
Folder replaces run with the one-step swap (renameat2) and with the two-rename fallback, whose half-way state
`recover` undoes.

The children are real processes killed with SIGKILL: a zygote (`python -c`, the venv's python) imports
moescope once (and runs a conversion, so numba's kernels are loaded, and keeps parsed GGUF headers) and forks
one child per run, which calls `moescope.cli.main([...])`; the zygote kills its own, not yet reaped, child and
reaps it, so the next run sees a dead writer. About 25 s in all.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from conftest import random_trace
from moescope import _atomic, fixture
from moescope.errors import MoescopeError
from moescope.imports import read_input, write_output
from moescope.store import TraceStore, load_trace
from test_gguf_split import tiny_gguf

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not hasattr(os, "fork"), reason="the harness forks (POSIX)")]

SEED = 20240611
DELAYS = int(os.environ.get("MOESCOPE_KILL_DELAYS", "3"))  # random-delay kills per case (more: a soak run)
MAX_STEPS = 24  # commit steps tried per case (the cases here have at most 9)

_ZYGOTE = r"""
import json, os, shutil, signal, sys, tempfile, time
import gguf
from moescope import _atomic
from moescope.cli import main
try:
    import llama_cpp  # noqa: F401  (captures then start as fast as the rest)
except ImportError:
    pass

# GGUF headers parsed once here (read-only; a capture parses the fixture's vocabulary twice, 0.6 s each)
_readers, _Reader = {}, gguf.GGUFReader


def _reader(path, mode="r"):
    key = (os.path.abspath(path), mode, os.stat(path).st_mtime_ns)
    if key not in _readers:
        _readers[key] = _Reader(path, mode)
    return _readers[key]


gguf.GGUFReader = _reader


def arm(target, kill_at, swap):
    # SIGKILL this process at commit step `kill_at`: before and after every rename / replace / swap, and before,
    # half-way through and after every folder delete, of a path named `target` or `.target.*`
    if not swap:
        _atomic._exchange = lambda a, b: False
    if kill_at is None:
        return
    steps = [0]

    def step():
        if steps[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        steps[0] += 1

    def mine(*paths):
        names = [os.path.basename(os.fspath(p)) for p in paths]
        return any(n == target or n.startswith("." + target + ".") for n in names)

    def wrap(fn):
        def inner(a, b, *args, **kwargs):
            if not mine(a, b):
                return fn(a, b, *args, **kwargs)
            step()
            out = fn(a, b, *args, **kwargs)
            step()
            return out
        return inner

    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if not mine(path):
            return real_rmtree(path, *args, **kwargs)
        step()
        first = next((os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs), None)
        if first:
            os.unlink(first)
        step()
        real_rmtree(path, *args, **kwargs)
        step()

    os.rename, os.replace = wrap(os.rename), wrap(os.replace)
    if swap:
        _atomic._exchange = wrap(_atomic._exchange)
    shutil.rmtree = rmtree


def warm(argv, cwd):
    # run a command in the zygote itself (numba's cached kernels loaded once, not in every child)
    saved = os.dup(1), os.dup(2), os.getcwd()
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    os.chdir(cwd)
    try:
        main(argv)
    except SystemExit:
        pass
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.chdir(saved[2])


fd, LOG = tempfile.mkstemp(prefix="moescope-kill-", suffix=".log")  # each child's stderr, sent back
os.close(fd)
print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    if req.get("warm"):
        warm(req["argv"], req["cwd"])
        print("{}", flush=True)
        continue
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            os.chdir(req["cwd"])
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            os.dup2(os.open(LOG, os.O_WRONLY | os.O_TRUNC), 2)
            arm(req["target"], req["kill_at"], req["swap"])
            try:
                main(req["argv"])
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
        finally:
            os._exit(code)
    killed = False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if req["delay"] is not None and time.monotonic() - t0 >= req["delay"] and not killed:
            os.kill(pid, signal.SIGKILL)  # our child, not reaped yet: the pid cannot have been reused
            killed = True
        time.sleep(0.001)
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
    res = {"killed": sig == signal.SIGKILL, "code": os.waitstatus_to_exitcode(status), "seconds": time.monotonic() - t0}
    with open(LOG, encoding="utf-8", errors="replace") as f:
        res["stderr"] = f.read()[-800:]
    print(json.dumps(res), flush=True)
os.unlink(LOG)
"""


class Zygote:
    """One `python -c` process that has imported moescope; `run` forks a child for one command line."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout.readline().strip() == "ready"

    def run(
        self, argv: list[str], cwd: Path, target: str, *, kill_at: int | None = None, delay: float | None = None,
        swap: bool = True,
    ) -> dict:  # fmt: skip
        req = {"argv": argv, "cwd": str(cwd), "target": target, "kill_at": kill_at, "delay": delay, "swap": swap}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def warm(self, argv: list[str], cwd: Path) -> None:
        """Run `argv` in the zygote itself, so that its children start with what it loads (numba kernels)."""
        self.proc.stdin.write(json.dumps({"warm": True, "argv": argv, "cwd": str(cwd)}) + "\n")
        self.proc.stdin.flush()
        self.proc.stdout.readline()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


def _tree(path: Path) -> dict[str, bytes]:
    """Every file under `path` (or the file itself) by relative name, with its bytes."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


class Case:
    """One command writing `target` in `work`; `same_as_new(path)` says whether `path` is the complete output
    of a reference run. `old` (a file or folder) is put at `target` before each run when given. `swap`: folder
    replaces use the one-step swap (else the two-rename fallback). `prefix_of`: the reference store of an
    in-place writer (a capture), whose interrupted store must hold a prefix of it."""

    def __init__(self, name, argv, work, target, same_as_new, old=None, swap=True, prefix_of=None):
        self.name, self.argv, self.work, self.target = name, argv, work, work / target
        self.same_as_new, self.old, self.swap, self.prefix_of = same_as_new, old, swap, prefix_of
        self.old_tree = None if old is None else _tree(old)
        self.again = argv if "--overwrite" in argv else [*argv, "--overwrite"]  # the rerun, to completion

    def reset(self) -> None:
        for p in [self.target, *(q for q, _, _ in _atomic.leftovers(self.target))]:
            _atomic.remove(p)
        for name in _hidden(self.work):  # a killed store writer's lock file
            _atomic.remove(self.work / name)
        if self.old is not None:
            copy = shutil.copytree if self.old.is_dir() else shutil.copy2
            copy(self.old, self.target)


def _outcome(case: Case, res: dict) -> str:
    """What a reader finds after the kill, once `recover` ran (as every writer's check does): "absent", "old",
    "old put back" (by `recover`, after a kill between the fallback's two renames), "new", or for an in-place
    capture "prefix"; fails on anything else."""
    t = case.target
    visible = os.path.lexists(t)
    if case.swap and case.old is not None and case.prefix_of is None:
        assert visible, f"{case.name}: with a one-step swap the target is never missing ({res})"
    _atomic.recover(t)
    if not os.path.lexists(t):
        assert case.old is None or case.prefix_of is not None, f"{case.name}: the old output is gone ({res})"
        return "absent"
    if case.old_tree is not None and _tree(t) == case.old_tree:
        return "old" if visible else "old put back"
    if case.same_as_new(t):
        return "new"
    assert case.prefix_of is not None, f"{case.name}: {t} is neither the old output nor the complete new one ({res})"
    head = _json(t / "zarr.json") if (t / "zarr.json").exists() else {}
    if not head.get("attributes"):
        # killed between creating the store and writing its first commit record (store.py writes the group's
        # attributes after its arrays): nothing committed and unreadable, but recognised as moescope's by the
        # dead writer's lock beside it, so the rerun with --overwrite replaces it
        kind = _atomic.folder_kind(t)
        assert kind in (_atomic.TRACE_STORE, _atomic.EMPTY), (case.name, sorted(p.name for p in t.iterdir()))
        return "stub"
    store = TraceStore(t)  # an interrupted capture: what it committed is readable and right
    got, ref = store.to_trace(), case.prefix_of.to_trace()
    n, m = store.n_tokens, store.n_sequences
    assert not store.complete and np.array_equal(got.experts, ref.experts[:n]), f"{case.name}: {n} tokens"
    assert np.array_equal(got.seq_starts, ref.seq_starts[:m]), f"{case.name}: {m} sequences"
    return "prefix"


def _rerun(zygote: Zygote, case: Case, when: str) -> dict:
    """The same command again, with --overwrite, to completion."""
    # (a lock is linked under its name only once its record is written: a kill never leaves an empty lock)
    return zygote.run(case.again, case.work, case.target.name, swap=case.swap)


def _run_delays(zygote: Zygote, case: Case, delays: list[float], seen: collections.Counter) -> None:
    for d in delays:
        case.reset()
        res = zygote.run(case.argv, case.work, case.target.name, swap=case.swap, delay=d)
        if not res["killed"]:
            assert res["code"] == 0 and case.same_as_new(case.target), (case.name, d, res)
            seen["delay: finished"] += 1
            continue
        seen[f"delay: {_outcome(case, res)}"] += 1
        again = _rerun(zygote, case, f"{d:.3f} s")
        assert again["code"] == 0 and case.same_as_new(case.target), (case.name, d, again)
        assert _atomic.leftovers(case.target) == [] and _hidden(case.work) == [], (case.name, d)


def _exercise(zygote: Zygote, case: Case, rng: np.random.Generator) -> collections.Counter:
    """Kill `case` at each commit step until it finishes, then after `DELAYS` random delays; returns outcomes."""
    case.reset()
    full = zygote.run(case.argv, case.work, case.target.name, swap=case.swap)
    assert full["code"] == 0 and case.same_as_new(case.target), (case.name, full)
    seen: collections.Counter = collections.Counter()
    for k in range(MAX_STEPS):
        case.reset()
        res = zygote.run(case.argv, case.work, case.target.name, swap=case.swap, kill_at=k)
        if not res["killed"]:
            assert res["code"] == 0 and case.same_as_new(case.target), (case.name, k, res)
            seen["steps"] = k
            break
        seen[f"step: {_outcome(case, res)}"] += 1
        again = _rerun(zygote, case, f"commit step {k}")
        assert again["code"] == 0 and case.same_as_new(case.target), (case.name, k, again)
        assert _atomic.leftovers(case.target) == [] and _hidden(case.work) == [], (case.name, k)
    else:
        pytest.fail(f"{case.name}: still killed after {MAX_STEPS} commit steps")
    edges = np.linspace(0.0, 1.05 * full["seconds"], DELAYS + 1)  # early, middle, late: one draw in each slice
    _run_delays(zygote, case, (edges[:-1] + rng.uniform(size=DELAYS) * np.diff(edges)).tolist(), seen)
    print(f"{case.name}: {dict(sorted(seen.items()))}")
    return seen


def _trace_equal(ref: Path) -> Callable[[Path], bool]:
    want = read_input(ref)

    def same(p: Path) -> bool:
        try:
            return read_input(p).equals(want)
        except (MoescopeError, OSError, KeyError, ValueError):  # half a store: not the new output
            return False

    return same


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, zygote):
    d = tmp_path_factory.mktemp("kill-inputs")
    trace = random_trace(n_tokens=3000, n_layers=4, n_experts=16, k=2, n_seq=12, seed=3)
    write_output(trace, d / "in.npz")
    write_output(trace, d / "in.zarr")
    old = random_trace(n_tokens=500, n_layers=4, n_experts=16, k=2, n_seq=3, seed=4)
    write_output(old, d / "old.npz")
    write_output(old, d / "old.zarr")
    warm = tmp_path_factory.mktemp("kill-warm")
    zygote.warm(["trace", "convert", str(d / "in.npz"), "w.zarr"], warm)
    zygote.warm(["trace", "convert", str(d / "in.zarr"), "w.npz"], warm)
    zygote.warm(["gguf", "inspect", str(fixture.GGUF), "--json"], warm)
    return d


@pytest.mark.parametrize(
    ("src", "out", "old", "swap"),
    [
        ("in.npz", "out.zarr", None, True),
        ("in.npz", "out.zarr", "old.zarr", True),
        ("in.npz", "out.zarr", "old.zarr", False),
        ("in.zarr", "out.npz", None, True),
        ("in.zarr", "out.npz", "old.npz", True),
    ],
    ids=["npz-to-store", "npz-to-store-over-old", "npz-to-store-over-old-two-renames", "store-to-npz",
         "store-to-npz-over-old"],
)  # fmt: skip
def test_kill_trace_convert(zygote, inputs, tmp_path, src, out, old, swap):
    ref = tmp_path / "ref" / out
    ref.parent.mkdir()
    write_output(read_input(inputs / src), ref)
    work = tmp_path / "work"
    work.mkdir()
    argv = ["trace", "convert", str(inputs / src), out] + (["--overwrite"] if old else [])
    case = Case(f"convert {src} -> {out}" + (f" over {old}" if old else ""), argv, work, out, _trace_equal(ref),
                old=None if old is None else inputs / old, swap=swap)  # fmt: skip
    seen = _exercise(zygote, case, np.random.default_rng([SEED, len(src), len(out), bool(old), swap]))
    assert seen["step: new"] >= 1 and seen["step: absent" if old is None else "step: old"] >= 1, seen
    assert swap or seen["step: old put back"] >= 1, seen  # the fallback's half-way state was met and undone


@pytest.mark.parametrize(("old", "swap"), [(False, True), (True, True), (True, False)],
                         ids=["new", "over-old", "over-old-two-renames"])  # fmt: skip
def test_kill_split(zygote, tmp_path, old, swap):
    model = tiny_gguf(tmp_path / "tiny.gguf")
    ref = tmp_path / "ref"
    assert zygote.run(["split", str(model), "-o", str(ref), "-g", "2"], tmp_path, "ref")["code"] == 0
    want = _tree(ref)
    old_dir = None
    if old:
        old_dir = tmp_path / "old"
        assert zygote.run(["split", str(model), "-o", str(old_dir), "-g", "4"], tmp_path, "old")["code"] == 0
    work = tmp_path / "work"
    work.mkdir()
    argv = ["split", str(model), "-o", "parts", "-g", "2"] + (["--overwrite"] if old else [])
    case = Case("split" + (" over an old split" if old else ""), argv, work, "parts",
                lambda p: p.is_dir() and _tree(p) == want, old=old_dir, swap=swap)  # fmt: skip
    seen = _exercise(zygote, case, np.random.default_rng([SEED, 7, old, swap]))
    assert seen["step: new"] >= 1 and seen["step: absent" if not old else "step: old"] >= 1, seen
    assert swap or seen["step: old put back"] >= 1, seen


@pytest.mark.parametrize("old", [False, True], ids=["new", "over-old"])
def test_kill_capture(zygote, inputs, tmp_path, old):
    pytest.importorskip("llama_cpp", reason="capture llama needs llama-cpp-python (extra [llama])")
    argv = ["capture", "llama", str(fixture.GGUF), str(fixture.HELDOUT_DIR / "prose"), "-o", "cap.zarr",
            "--max-tokens", "96", "--seq-len", "32", "--threads", "1"]  # fmt: skip
    ref = tmp_path / "ref"
    ref.mkdir()
    res = zygote.run(argv, ref, "cap.zarr")
    assert res["code"] == 0, res
    want = load_trace(ref / "cap.zarr")

    def same(p: Path) -> bool:
        try:
            store = TraceStore(p)
            return store.complete and np.array_equal(store.to_trace().experts, want.experts)
        except (MoescopeError, OSError, KeyError, ValueError):
            return False

    work = tmp_path / "work"
    work.mkdir()
    case = Case("capture llama" + (" over an old store" if old else ""), argv + (["--overwrite"] if old else []),
                work, "cap.zarr", same, old=inputs / "old.zarr" if old else None,
                prefix_of=TraceStore(ref / "cap.zarr"))  # fmt: skip
    seen = _exercise(zygote, case, np.random.default_rng([SEED, 11, old]))
    if old:  # the old store waits aside until the capture completes: a kill leaves it (put back) or the new one
        partial = sum(n for k, n in seen.items() if k.endswith(("absent", "prefix", "stub")))
        assert partial == 0 and seen["step: old"] + seen["step: old put back"] >= 1, seen
    else:
        assert seen["steps"] == 0, seen  # no rename at all: the store is written where it stands
