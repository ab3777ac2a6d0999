"""The fuzz suite: seeded mutations of small valid inputs of every format moescope reads, and hostile command
line arguments, each run through the CLI entry point in a child process with a memory cap and a time limit.

Every run must end in exit 0 (accepted) or exit 2 with one clean ``error:`` line (or click's usage error);
anything else is a finding: a traceback or ``internal error`` (a bug), a hang (over the time limit), runaway
memory (``out of memory`` or over the cap), or a crash (a signal).

Inputs: the seeds in ``tests/data/fuzz/`` (`tools/make_fuzz_seeds.py` writes them) and the committed fixture
model GGUF. Mutators (`MUTATORS`) work on bytes (bit flips, interesting bytes, truncation, insertion,
huge or negative integers written over header fields, duplicated regions), on JSON (wrong types, huge and
fractional numbers, deep nesting, markup and unicode in strings), on npz archives (member data and .npy
headers, the meta record, declared sizes, a zip bomb) and on store folders (any file inside, or deleting
one). `ARGUMENTS` lists hostile values per command line option.

Children are forked from one server process (`serve`) that imported moescope once, so a case costs tens of
milliseconds rather than a Python start; a child gets ``RLIMIT_AS`` = the server's own address space plus
`MEMORY_CAP`, its own working folder, and is killed at the time limit. `run_cases` drives one or more
servers and returns one `Outcome` per case. Used by tests/test_fuzz.py (the fast tier, in ``make test``)
and tools/fuzz.py (the long tier, ``make fuzz``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SEEDS = ROOT / "tests" / "data" / "fuzz"
MODEL_GGUF = ROOT / "src" / "moescope" / "data" / "tiny-moe" / "tiny-moe-f32.gguf"
MEMORY_CAP = 2 << 30  # bytes of address space a child may add to the server's (runaway memory beyond it)
OUTCOMES = ("accepted", "clean", "traceback", "hang", "memory", "crash", "other")
BAD = ("traceback", "hang", "memory", "crash", "other")


@dataclasses.dataclass(frozen=True)
class Format:
    """A readable format: its seed (relative to `SEEDS`, or absolute), the input flags it needs, and the
    commands run on a mutated copy (``{in}`` the input, ``{out}`` a fresh output folder)."""

    name: str
    seed: Path
    flags: tuple[str, ...]
    commands: tuple[tuple[str, ...], ...]


TRACE_COMMANDS = (
    ("trace", "info", "{in}", "--json"),
    ("concentration", "{in}"),
    ("rank", "{in}", "-o", "{out}/r.csv"),
    ("trace", "convert", "{in}", "{out}/t.npz"),
    ("trace", "convert", "{in}", "{out}/t.zarr"),
    ("place", "{in}", "-d", "2,4", "-m", "frequency,coact-refined"),
    ("cache", "{in}", "--capacity", "4"),
    ("locality", "{in}"),
    ("coact", "{in}", "--n-null", "4"),
    ("simulate", "{in}", "--slots", "16", "--expert-bytes", "1MiB", "--dense-bytes", "8MiB"),
    ("trace", "slice", "{in}", "{out}/s.npz", "--split", "train"),
    ("report", "{in}", "-o", "{out}/report.html"),
)
COUNTS_COMMANDS = (
    ("trace", "info", "{in}", "--json"),
    ("concentration", "{in}"),
    ("rank", "{in}", "-o", "{out}/r.csv"),
    ("trace", "convert", "{in}", "{out}/c.json"),
    ("place", str(SEEDS / "trace.npz"), "-d", "2,4", "--balance-loads", "{in}"),  # counts as loads to balance
)
GGUF_COMMANDS = (
    ("gguf", "inspect", "{in}", "--json"),
    ("plan", "offload", "{in}", "--vram", "8MiB"),
    ("plan", "offload", "{in}", "--vram", "4MiB,4MiB", "--flavor", "ik_llama.cpp", "--json"),
    ("split", "{in}", "-g", "2", "-o", "{out}/parts"),
)

FORMATS = {
    f.name: f
    for f in (
        Format("npz", Path("trace.npz"), (), TRACE_COMMANDS),
        Format("zarr", Path("trace.zarr"), (), TRACE_COMMANDS),
        Format("esft", Path("esft"), ("--n-experts", "16", "--top-k", "2"), TRACE_COMMANDS),
        Format("vllm", Path("vllm_routed_experts.npy"), ("--n-experts", "16"), TRACE_COMMANDS),
        Format("sglang-pt", Path("expert_distribution_recorder_1712_0.pt"), ("--n-experts", "16"), TRACE_COMMANDS),
        Format("sglang-csv", Path("expert_distribution_rank0_timestamp1712.5.csv"), ("--n-experts", "16"),
               COUNTS_COMMANDS),
        Format("counts-json", Path("counts.json"), (), COUNTS_COMMANDS),
        Format("imatrix", Path("tiny-moe.imatrix.gguf"), (), COUNTS_COMMANDS),
        Format("gguf", MODEL_GGUF, (), GGUF_COMMANDS),
        Format("plan-json", Path("plan.json"), (), (("plan", "offload", "--from", "{in}"),
                                                   ("plan", "offload", "--from", "{in}", "--json"))),
        Format("ranking-csv", Path("ranking.csv"), (), (("split", str(MODEL_GGUF), "-g", "2", "--mode", "ranked",
                                                         "--ranking", "{in}", "-o", "{out}/parts"),)),
        Format("groups-json", Path("groups.json"), (), (("split", str(MODEL_GGUF), "--mode", "custom",
                                                         "--groups-file", "{in}", "-o", "{out}/parts"),)),
    )
}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# mutators: (rng, bytes) -> bytes


INTERESTING_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFF, 0x20, 0x5B, 0x5D)
HUGE_INTS = (2**62, 2**63 - 1, 2**64 - 1, 2**32 - 1, 2**31, 0x7FFFFFFF, 2**40, 0)


def flip_bits(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        if b:
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def set_bytes(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        if b:
            b[rng.randrange(len(b))] = rng.choice(INTERESTING_BYTES)
    return bytes(b)


def truncate(rng: random.Random, data: bytes) -> bytes:
    return data[: rng.randrange(max(1, len(data)))]


def insert_bytes(rng: random.Random, data: bytes) -> bytes:
    i = rng.randrange(len(data) + 1)
    return data[:i] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))) + data[i:]


def huge_int(rng: random.Random, data: bytes) -> bytes:
    """A huge, negative or zero integer over an aligned 4- or 8-byte field near the start (declared counts and
    sizes live in headers)."""
    if len(data) < 8:
        return flip_bits(rng, data)
    width = rng.choice((4, 8))
    i = rng.randrange(0, min(len(data) - width, 4096) + 1, width)
    value = rng.choice(HUGE_INTS) if rng.random() < 0.8 else -rng.randint(1, 2**31)
    packed = (value % (1 << (8 * width))).to_bytes(width, "little")  # negatives in two's complement
    return data[:i] + packed + data[i + width :]


def duplicate(rng: random.Random, data: bytes) -> bytes:
    if not data:
        return data
    a = rng.randrange(len(data))
    b = min(len(data), a + rng.randint(1, 256))
    return data[:b] + data[a:b] * rng.randint(1, 4) + data[b:]


BYTE_MUTATORS: dict[str, Callable[[random.Random, bytes], bytes]] = {
    "flip": flip_bits,
    "bytes": set_bytes,
    "truncate": truncate,
    "insert": insert_bytes,
    "huge-int": huge_int,
    "duplicate": duplicate,
}

HOSTILE_STRINGS = ("[/]", "[bold]x[/bold]", "[link=x]", "\u202e\u0645", "\x1b[31mred", "x" * 5000, "", "\x00", "é")
HOSTILE_VALUES: tuple[Any, ...] = (
    None, True, -1, 0, 16.7, 2**70, -(2**63), 1e308, float("nan"), "16", [], {}, [1, [2]], {"a": 1},
    *HOSTILE_STRINGS,
)  # fmt: skip


def _json_paths(doc: Any, prefix: tuple = ()) -> Iterator[tuple]:
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _json_paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:50]):
            yield from _json_paths(v, (*prefix, i))


def _set(doc: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    parent[path[-1]] = value
    return doc


def mutate_json(rng: random.Random, data: bytes) -> bytes:
    """A structural JSON mutation (wrong type, odd number, hostile string, deep nesting, dropped key), or a
    byte mutation when `data` is not JSON."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return rng.choice(list(BYTE_MUTATORS.values()))(rng, data)
    choice = rng.random()
    if choice < 0.1:
        depth = rng.choice((50, 2_000, 200_000))
        return ("[" * depth + "]" * depth).encode()
    paths = list(_json_paths(doc))
    path = rng.choice(paths)
    if choice < 0.2 and path:
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        if isinstance(parent, dict):
            parent.pop(path[-1], None)
        elif isinstance(parent, list) and parent:
            parent.pop()
        return json.dumps(doc).encode()
    value = rng.choice(HOSTILE_VALUES)
    return json.dumps(_set(doc, path, value), allow_nan=True).encode()


# npz: archives of .npy members and a meta record


def _npy_bytes(header: dict, body: bytes) -> bytes:
    text = repr(header).encode("latin1")
    pad = 64 - (10 + len(text) + 1) % 64
    text = text + b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + body


_BOMBS: dict[int, bytes] = {}
BOMB_BYTES = 3 << 30  # the zip bomb's declared .npy size: more than the memory cap, about 3 MB deflated


def zip_bomb(seed: bytes) -> bytes:
    """The seed npz with its ``experts`` member replaced by 3 GiB of zero ids of the same layers and k (about
    3 MB deflated; built once per seed, about 10 s): a reader that loads it whole runs out of memory."""
    key = zlib.crc32(seed)
    if key not in _BOMBS:
        zin = zipfile.ZipFile(io.BytesIO(seed))
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=1, allowZip64=True) as zout:
            for info in zin.infolist():
                raw = zin.read(info)
                if not info.filename.startswith("experts"):
                    zout.writestr(info.filename, raw)
                    continue
                header = _npy_header(raw) or {"descr": "<i4", "fortran_order": False, "shape": (1, 1, 1)}
                shape = tuple(header["shape"])
                per_token = int(np.prod(shape[1:])) * np.dtype(header["descr"]).itemsize
                head = _npy_bytes(dict(header, shape=(BOMB_BYTES // per_token, *shape[1:])), b"")
                with zout.open(info.filename, "w", force_zip64=True) as fh:
                    fh.write(head)
                    zero = bytes(1 << 24)
                    for _ in range(BOMB_BYTES // len(zero)):
                        fh.write(zero)
        _BOMBS[key] = out.getvalue()
    return _BOMBS[key]


def _npy_header(raw: bytes) -> dict | None:
    """The header dict of an .npy blob, or None when it is not one this harness can parse."""
    if not raw.startswith(b"\x93NUMPY") or len(raw) < 10:
        return None
    hlen = struct.unpack("<H", raw[8:10])[0]
    try:
        import ast

        header = ast.literal_eval(raw[10 : 10 + hlen].decode("latin1"))
    except (ValueError, SyntaxError, UnicodeDecodeError, MemoryError, RecursionError):
        return None
    return header if isinstance(header, dict) else None


def mutate_npz(rng: random.Random, data: bytes) -> bytes:
    """Mutate one member of an npz: its .npy header (shape, dtype), its data, the meta record (JSON), the
    zip's declared sizes; or swap the experts member for a zip bomb (`zip_bomb`)."""
    try:
        zin = zipfile.ZipFile(io.BytesIO(data))
        members = {i.filename: zin.read(i) for i in zin.infolist()}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, zlib.error):
        return rng.choice(list(BYTE_MUTATORS.values()))(rng, data)
    how = rng.random()
    if how < 0.06:
        return zip_bomb(data)
    name = rng.choice(sorted(members))
    raw = members[name]
    header = _npy_header(raw)
    if how < 0.35 and header is not None:
        hlen = struct.unpack("<H", raw[8:10])[0]
        field = rng.choice(("shape", "descr", "fortran_order"))
        if field == "shape":
            shape = list(header.get("shape", ()))
            if shape and rng.random() < 0.7:
                shape[rng.randrange(len(shape))] = rng.choice((2**40, 2**31, 0, 10**6, 3))
            else:
                shape = rng.choice(([], [2**20, 2**20, 2**20], [1] * 40, [7]))
            header["shape"] = tuple(shape)
        elif field == "descr":
            header["descr"] = rng.choice((">i4", ">i8", "|O", "<f8", "<U8", "|b1", "<c16", "|V4", "<i2"))
        else:
            header["fortran_order"] = True
        members[name] = _npy_bytes(header, raw[10 + hlen :])
    elif how < 0.6 and "meta" in name and header is not None and str(header.get("descr", "")).startswith("<U"):
        # the meta record: a 0-d unicode array holding JSON
        hlen = struct.unpack("<H", raw[8:10])[0]
        text = raw[10 + hlen :].decode("utf-32-le", errors="replace").rstrip("\x00")
        new = mutate_json(rng, text.encode()).decode("utf-8", errors="replace")
        members[name] = _npy_bytes({"descr": f"<U{max(1, len(new))}", "fortran_order": False, "shape": ()},
                                   new.encode("utf-32-le", errors="replace"))  # fmt: skip
    else:
        members[name] = rng.choice(list(BYTE_MUTATORS.values()))(rng, raw)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zout:
        for n, b in members.items():
            zout.writestr(n, b)
    blob = out.getvalue()
    return _lie_about_sizes(rng, blob) if how > 0.9 else blob


def _lie_about_sizes(rng: random.Random, blob: bytes) -> bytes:
    """Overwrite the declared uncompressed size of a random central-directory entry."""
    b = bytearray(blob)
    sig = b"PK\x01\x02"
    offsets = [i for i in range(len(b) - 46) if b[i : i + 4] == sig]
    if offsets:
        i = rng.choice(offsets)
        b[i + 24 : i + 28] = rng.choice((0xFFFFFFFE, 0x7FFFFFFF, 1, 0)).to_bytes(4, "little")
    return bytes(b)


# ----------------------------------------------------------------------------------------------
# cases


@dataclasses.dataclass(frozen=True)
class Case:
    """One run: the format (or "cli"), the mutation applied, the argv (``{in}`` / ``{out}`` filled by
    `prepare`), and the seed that reproduces it."""

    fmt: str
    mutation: str
    argv: tuple[str, ...]
    seed: int

    def label(self) -> str:
        return f"{self.fmt}/{self.mutation} seed={self.seed}: moescope {' '.join(self.argv)}"


def make_cases(n: int, seed: int = 0, formats: Iterable[str] | None = None, cli_share: float = 0.15) -> list[Case]:
    """`n` cases spread evenly over `formats` (default: all) plus a `cli_share` of hostile-argument cases."""
    rng = random.Random(seed)
    names = list(formats or FORMATS)
    n_cli = round(n * cli_share) if formats is None else 0
    cases = []
    for i in range(n - n_cli):
        fmt = FORMATS[names[i % len(names)]]
        cmd = rng.choice(fmt.commands)
        case_seed = rng.randrange(2**31)
        mutation = _pick_mutation(random.Random(case_seed), fmt)
        cases.append(Case(fmt.name, mutation, (*cmd, *fmt.flags) if "{in}" in cmd else cmd, case_seed))
    for _ in range(n_cli):
        case_seed = rng.randrange(2**31)
        argv, what = hostile_arguments(random.Random(case_seed))
        cases.append(Case("cli", what, argv, case_seed))
    return cases


def _pick_mutation(rng: random.Random, fmt: Format) -> str:
    if fmt.name == "npz":
        return rng.choice(("npz",) * 3 + tuple(BYTE_MUTATORS))
    if fmt.name in ("counts-json", "groups-json", "plan-json"):
        return rng.choice(("json",) * 3 + tuple(BYTE_MUTATORS))
    if fmt.name in ("zarr", "esft"):
        return rng.choice(("folder-file",) * 4 + ("folder-delete", "folder-json"))
    return rng.choice(tuple(BYTE_MUTATORS))


def prepare(case: Case, work: Path) -> list[str]:
    """Write the mutated input of `case` under `work` and return its argv."""
    rng = random.Random(case.seed)
    out = work / "out"
    out.mkdir(parents=True, exist_ok=True)
    if case.fmt == "cli":
        src = work / "trace.npz"
        shutil.copy(SEEDS / "trace.npz", src)
        return [a.replace("{in}", str(src)).replace("{out}", str(out)) for a in case.argv]
    fmt = FORMATS[case.fmt]
    seed = fmt.seed if fmt.seed.is_absolute() else SEEDS / fmt.seed
    dst = work / seed.name
    if seed.is_dir():
        shutil.copytree(seed, dst)
        files = sorted(p for p in dst.rglob("*") if p.is_file())
        if case.mutation == "folder-delete":
            rng.choice(files).unlink()
        else:
            jsons = [p for p in files if p.suffix == ".json"]
            target = rng.choice(jsons if case.mutation == "folder-json" and jsons else files)
            data = target.read_bytes()
            as_json = target.suffix == ".json" and rng.random() < 0.6
            mut = mutate_json if as_json else rng.choice(list(BYTE_MUTATORS.values()))
            target.write_bytes(mut(rng, data))
    else:
        data = seed.read_bytes()
        if case.mutation == "npz":
            data = mutate_npz(rng, data)
        elif case.mutation == "json":
            data = mutate_json(rng, data)
        else:
            data = _mutate_file(rng, data, BYTE_MUTATORS[case.mutation])
        dst.write_bytes(data)
    return [a.replace("{in}", str(dst)).replace("{out}", str(out)) for a in case.argv]


def _mutate_file(rng: random.Random, data: bytes, mutator: Callable[[random.Random, bytes], bytes]) -> bytes:
    """Large binaries (the model GGUF): mostly mutate the first 64 KiB, the header a reader trusts."""
    cut = 1 << 16
    if len(data) > 1 << 20 and rng.random() < 0.8:
        return mutator(rng, data[:cut]) + data[cut:]
    return mutator(rng, data)


# hostile command line arguments, on a valid trace


ARGUMENTS: dict[tuple[str, ...], tuple[str, ...]] = {
    ("place", "{in}", "-d"): ("2-3000000000", "0", "-1", "99999", "1e3", "", ",", "4,4,4", "x-y", "[/]"),
    ("place", "{in}", "-d", "2", "--layers"): ("0-4294967296", "7", "-3", "0--1", "٣"),
    ("place", "{in}", "-d", "2", "--cv-margin"): ("nan", "inf", "-1", "1e999", "1e-320"),
    ("place", "{in}", "-d", "2", "--balance-margin"): ("nan", "inf", "-1e999", "auto ", "0x10"),
    ("cache", "{in}", "--capacity"): ("0", "2-3000000000", "100000", "1e2", "[bold]"),
    ("cache", "{in}", "--pcie-gbps"): ("nan", "inf", "0", "-5", "1e999"),
    ("simulate", "{in}", "--expert-bytes", "1MiB", "--dense-bytes", "8MiB", "--vram"): (
        "1e999",
        "nan",
        "0",
        "-1GiB",
        "1e30GiB",
        "99999999999999999999TiB",
        "[/]GiB",
        "1e-9GiB",
    ),
    ("simulate", "{in}", "--expert-bytes", "1MiB", "--dense-bytes", "8MiB", "--slots"): (
        "0",
        "2-3000000000",
        "1e9",
        "",
    ),
    ("simulate", "{in}", "--dense-bytes", "8MiB", "--expert-bytes"): ("1e999", "0", "nan", "-3", "1e300TiB"),
    ("locality", "{in}", "--budget"): ("0", "2-3000000000", "999999999"),
    ("trace", "slice", "{in}", "{out}/s.npz", "--sequences"): ("0-5000000000", "9999", "-1", "3-1"),
    ("trace", "slice", "{in}", "{out}/s.npz", "--labels"): ("[/]", "[bold]x", "\u202e", "a" * 10000, ","),
    ("trace", "slice", "{in}", "{out}/s.npz", "--tokens"): ("0:99999999999999999999", "5:1", "-1:3", "x"),
    ("trace", "info", "{in}", "--layers"): ("0-99999999999", "[/]"),
    ("place", "{in}", "-d", "2", "--balance-loads"): ("", "{out}", "{out}/absent.json", "[/]"),
    ("place", "{in}", "-d", "2", "--scheduler"): ("bogus", "local:0", "local:99999999", "tcp://", "local:x"),
    ("trace", "convert", "{in}", "--model"): ("[/]", "[bold]m[/bold]", "\x1b[2J", "\u0000x"),
    ("import", "npz", "{in}", "--model"): ("[/]", "[link=file:///etc/passwd]x"),
}
OUTPUT_ARGS: tuple[tuple[str, ...], ...] = (
    ("rank", "{in}", "-o", "{out}/ro/r.csv"),  # a read-only folder
    ("rank", "{in}", "-o", "{in}", "--overwrite"),  # output = input
    ("rank", "{in}", "-o", "{out}", "--overwrite"),  # a folder
    ("trace", "convert", "{in}", "{in}", "--overwrite"),
    ("trace", "slice", "{in}", "{in}", "--overwrite", "--split", "train"),
    ("rank", "{in}", "-o", "{out}/missing/r.csv"),
    ("trace", "convert", "{in}", "{out}/x.unknown"),
)


def hostile_arguments(rng: random.Random) -> tuple[tuple[str, ...], str]:
    if rng.random() < 0.2:
        argv = rng.choice(OUTPUT_ARGS)
        return argv, "output"
    head = rng.choice(sorted(ARGUMENTS))
    value = rng.choice(ARGUMENTS[head])
    if head[-1] in ("--model",):  # convert / import need an output
        argv = (*head, value, "-o" if head[0] == "import" else "", "{out}/m.npz")
        argv = tuple(a for a in argv if a)
        if head[0] == "trace":
            argv = ("trace", "convert", "{in}", "{out}/m.npz", "--model", value)
    else:
        argv = (*head, value)
    return argv, f"arg {head[-1]}"


# ----------------------------------------------------------------------------------------------
# running: a fork server


@dataclasses.dataclass(frozen=True)
class Outcome:
    case: Case
    outcome: str
    rc: int | None
    seconds: float
    max_rss_mib: float
    stderr_tail: str

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["case"] = dataclasses.asdict(self.case) | {"label": self.case.label()}
        return d


def classify(rc: int | None, stderr: str, timed_out: bool, over_memory: bool) -> str:
    if timed_out:
        return "hang"
    if over_memory or "out of memory" in stderr or "MemoryError" in stderr:
        return "memory"
    if "Traceback (most recent call last)" in stderr or "internal error" in stderr:
        return "traceback"
    if rc is not None and rc < 0:
        return "crash"
    if rc == 0:
        return "accepted"
    if rc == 2:
        lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
        if not lines:
            return "other"
        if lines[-1].startswith("error: ") or any("Usage:" in ln or "Error" in ln for ln in lines[:3]):
            return "clean"
        return "other"
    return "other"


def serve() -> None:  # pragma: no cover - runs in the server process
    """Read cases as JSON lines on stdin; for each, fork a child running the CLI; write one JSON result line."""
    import resource
    import signal

    import moescope.cli  # noqa: F401 - imported once, before forking
    from moescope.cli import main as cli_main

    for mod in ("numpy", "numba", "zarr", "gguf", "typer", "rich", "plotly", "torch"):
        with contextlib.suppress(ImportError):
            __import__(mod)
    base = _address_space()
    for line in sys.stdin:
        req = json.loads(line)
        case = Case(**{k: tuple(v) if k == "argv" else v for k, v in req["case"].items()})
        work = Path(req["work"])
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            argv = prepare(case, work)
        except Exception as exc:
            print(json.dumps({"error": f"prepare failed: {type(exc).__name__}: {exc}"}), flush=True)
            continue
        if case.fmt == "cli" and case.mutation == "output":
            ro = work / "out" / "ro"
            ro.mkdir(exist_ok=True)
            os.chmod(ro, 0o555)
        err_path = work / "stderr.txt"
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            try:
                os.chdir(work)
                fd_out = os.open(os.devnull, os.O_WRONLY)
                fd_err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(fd_out, 1)
                os.dup2(fd_err, 2)
                sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
                sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
                limit = base + req["memory_cap"]
                resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
                code = 0
                try:
                    cli_main(list(argv))
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                except BaseException:
                    import traceback

                    traceback.print_exc()
                    code = 1
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
            except BaseException:
                os._exit(99)
        timed_out = False
        deadline = t0 + req["timeout"]
        status, usage = 0, None
        while True:
            done, status, usage = os.wait4(pid, os.WNOHANG)
            if done:
                break
            if time.perf_counter() > deadline:
                timed_out = True
                os.kill(pid, signal.SIGKILL)
                _, status, usage = os.wait4(pid, 0)
                break
            time.sleep(0.005)
        seconds = time.perf_counter() - t0
        rc = os.waitstatus_to_exitcode(status)
        stderr = err_path.read_text(errors="replace") if err_path.exists() else ""
        rss = usage.ru_maxrss / 1024 if usage is not None else 0.0
        _chmod_back(work)
        print(
            json.dumps(
                {
                    "rc": rc,
                    "seconds": seconds,
                    "max_rss_mib": rss,
                    "stderr": stderr[-2000:],
                    "timed_out": timed_out,
                    "over_memory": rss * 1024 * 1024 > base + req["memory_cap"],
                }
            ),
            flush=True,
        )
        if not req.get("keep"):
            shutil.rmtree(work, ignore_errors=True)


def _chmod_back(work: Path) -> None:
    for p in work.rglob("*"):
        if p.is_dir():
            with contextlib.suppress(OSError):
                os.chmod(p, 0o755)


def _address_space() -> int:
    """This process's virtual memory size in bytes (Linux /proc), the base of a child's cap."""
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[0])
    return pages * os.sysconf("SC_PAGE_SIZE")


class Server:
    """A fork server subprocess (`serve`) and a lock, for one thread of `run_cases`."""

    def __init__(self, python: str) -> None:
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")])
        self.proc = subprocess.Popen(
            [python, "-c", "import fuzz_harness; fuzz_harness.serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=str(ROOT),
        )

    def run(self, case: Case, work: Path, timeout: float, memory_cap: int, keep: bool = False) -> Outcome:
        req = {"case": dataclasses.asdict(case), "work": str(work), "timeout": timeout, "memory_cap": memory_cap}
        req["keep"] = keep
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the fuzz server died")
        res = json.loads(line)
        if "error" in res:
            raise RuntimeError(f"{case.label()}: {res['error']}")
        outcome = classify(res["rc"], res["stderr"], res["timed_out"], res["over_memory"])
        tail = "\n".join(res["stderr"].strip().splitlines()[-12:])
        return Outcome(case, outcome, res["rc"], res["seconds"], res["max_rss_mib"], tail)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


def run_cases(
    cases: list[Case],
    work: Path,
    jobs: int = 2,
    timeout: float = 60.0,
    memory_cap: int = MEMORY_CAP,
    python: str = sys.executable,
    progress: Callable[[int, int], None] | None = None,
) -> list[Outcome]:
    """Run `cases` on `jobs` fork servers; outcomes in case order."""
    out: list[Outcome | None] = [None] * len(cases)
    lock = threading.Lock()
    todo = iter(range(len(cases)))
    done = [0]

    def worker(j: int) -> None:
        server = Server(python)
        try:
            while True:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                out[i] = server.run(cases[i], work / f"w{j}", timeout, memory_cap)
                with lock:
                    done[0] += 1
                    if progress:
                        progress(done[0], len(cases))
        finally:
            server.close()

    threads = [threading.Thread(target=worker, args=(j,)) for j in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [o for o in out if o is not None]


def table(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    """Per format: cases and the count of each outcome."""
    rows: dict[str, dict[str, Any]] = {}
    for o in outcomes:
        row = rows.setdefault(o.case.fmt, {"format": o.case.fmt, "cases": 0, **{k: 0 for k in OUTCOMES}})
        row["cases"] += 1
        row[o.outcome] += 1
    total = {"format": "all", "cases": len(outcomes), **{k: sum(r[k] for r in rows.values()) for k in OUTCOMES}}
    return [*rows.values(), total]
