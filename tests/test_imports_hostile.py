"""Hostile inputs for every reader of `moescope.imports`: each must return data that validates, or raise a
one-line `MoescopeError`, never another exception, quickly and within bounded memory.

Each format starts from a small valid input built here, then is mutated: the findings of a fuzzing review
(zip bombs, corrupt members and headers, wrong-typed meta, big-endian ids, ids beyond int16, int64
overflows, deep JSON, task folders named like ranks) and seeded random byte flips and truncations. The
zip-bomb cases run in a child process under ``RLIMIT_AS`` (1 GiB above what its imports took).
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from conftest import random_trace
from moescope.errors import FormatError, MoescopeError, TraceError, UsageError
from moescope.imports import ImportOptions, read_input, write_output
from moescope.imports.npz import CHUNK_BYTES
from moescope.trace import ExpertCounts, RoutingTrace

# ------------------------------------------------------------------------------------------------ helpers


def read_clean(path: Path, fmt: str | None = None, options: ImportOptions | None = None):
    """`read_input`'s result after checking the contract: data that validates again, or the `MoescopeError`
    it raised (one line). Any other exception propagates and fails the test."""
    try:
        data = read_input(path, fmt, options or ImportOptions())
    except MoescopeError as exc:
        assert "\n" not in str(exc), str(exc)
        return exc
    if isinstance(data, RoutingTrace):
        data.replace()  # validates every array again
        assert data.experts.dtype == np.int16 and data.experts.dtype.isnative
    else:
        assert isinstance(data, ExpertCounts)
        ExpertCounts(
            data.values,
            data.n_experts,
            top_k=data.top_k,
            tokens=data.tokens,
            layer_ids=data.layer_ids,
            normalized=data.normalized,
            mass=data.mass,
        )
    return data


def refused(path: Path, fmt: str | None = None, options: ImportOptions | None = None, error=MoescopeError):
    """The error reading `path` raises (asserting it is of type `error`)."""
    got = read_clean(path, fmt, options)
    assert isinstance(got, error), f"expected {error.__name__}, got {got!r}"
    return got


def mutations(data: bytes, seed: int, n: int):
    """`n` seeded variants of `data`: every third a truncation, the others 1-5 random byte flips."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        b = bytearray(data)
        if i % 3 == 0:
            yield bytes(b[: int(rng.integers(0, len(b)))])
            continue
        for _ in range(int(rng.integers(1, 6))):
            b[int(rng.integers(0, len(b)))] = int(rng.integers(0, 256))
        yield bytes(b)


def fuzz(target: Path, read: Path, fmt: str | None, options: ImportOptions, seed: int, n: int = 45) -> None:
    """Overwrite `target` with mutations of itself; reading `read` must keep the contract each time."""
    data = target.read_bytes()
    assert isinstance(read_clean(read, fmt, options), RoutingTrace | ExpertCounts)  # the valid input reads
    for variant in mutations(data, seed, n):
        target.write_bytes(variant)
        read_clean(read, fmt, options)


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def npy_header(shape: tuple, descr: str, fortran: bool = False) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": fortran, "shape": shape})
    return buf.getvalue()


def write_zip(path: Path, members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def meta_bytes(meta) -> bytes:
    return npy_bytes(np.asarray(meta if isinstance(meta, str) else json.dumps(meta)))


TRACE = random_trace(n_tokens=40, n_experts=8, k=2, token_ids=True, lookahead=1, candidates=2)


def npz_members(**changes) -> dict[str, bytes]:
    """The members of a valid moescope .npz of `TRACE`, with some replaced (None drops one)."""
    arrays = {
        "experts.npy": npy_bytes(TRACE.experts),
        "weights.npy": npy_bytes(TRACE.weights),
        "seq_starts.npy": npy_bytes(TRACE.seq_starts),
        "seq_labels.npy": npy_bytes(TRACE.seq_labels),
        "meta.npy": meta_bytes({"n_experts": 8, "top_k": 2, "layer_ids": [1, 2], "phase": "prefill"}),
    }
    arrays.update({k + ".npy": v for k, v in changes.items()})
    return {k: v for k, v in arrays.items() if v is not None}


# -------------------------------------------------------------------------------------- zip bombs (child)


def _zip_raw(path: Path, members: list[tuple[str, int, bytes, int]]) -> Path:
    """A zip of raw members ``(name, method, compressed bytes, declared uncompressed size)``; the CRCs of
    deflated ones are left 0 (the readers must stop long before a CRC is checked)."""
    out, central = bytearray(), bytearray()
    for name, method, data, size in members:
        offset, raw, crc = len(out), name.encode(), zlib.crc32(data) if method == 0 else 0
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0, crc, len(data), size, len(raw), 0)
        out += raw + data
        central += struct.pack(
            "<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0, crc, len(data), size, len(raw), 0, 0, 0, 0, 0,
            offset,
        )  # fmt: skip
        central += raw
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), len(out), 0)
    path.write_bytes(bytes(out + central + end))
    return path


def _deflate_bomb(prefix: bytes, zero_mib: int) -> bytes:
    """A raw deflate stream of `prefix` then `zero_mib` MiB of zeros, ~1 KB per MiB: after a full flush
    the compressor's state is reset, so one compressed MiB of zeros can be repeated as it is."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(prefix) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(bytes(1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)
    return head + block * zero_mib + c.flush()


CHILD = r"""
import json, resource, sys
import numpy as np
from moescope.errors import MoescopeError
from moescope.imports import ImportOptions, read_input
from moescope.trace import validate_experts

validate_experts(np.zeros((1, 1, 1), np.int16), 1)  # compile (or load) the kernel before the limit
def vm_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
def run(cases):
    for path, fmt, n_experts in cases:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            read_input(path, fmt, ImportOptions(n_experts=n_experts))
            res = ["ok", ""]
        except MoescopeError as exc:
            res = [type(exc).__name__, str(exc)]
        except BaseException as exc:
            res = ["BUG " + type(exc).__name__, str(exc)[:300]]
        yield res + [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before]  # KiB
unlimited = list(run(json.loads(sys.argv[1])))
limit = vm_bytes() + (1 << 30)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
print(json.dumps(unlimited + list(run(json.loads(sys.argv[2])))))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc and RLIMIT_AS")
def test_zip_bombs_are_refused_within_bounded_memory(tmp_path):
    pytest.importorskip("resource")
    gib3 = 3 * 1024  # MiB of zeros: a 3 GiB experts array from a ~3 MB file
    rows = gib3 * (1 << 20) // 8  # [rows, 2, 2] int16
    header = npy_header((rows, 2, 2), "<i2")
    meta = meta_bytes({"n_experts": 8})
    zeros = _zip_raw(
        tmp_path / "zeros.npz",
        [("meta.npy", 0, meta, len(meta)), ("experts.npy", 8, _deflate_bomb(header, gib3), len(header) + (rows * 8))],
    )
    # a first chunk of valid routing, then zeros: the whole array is allocated before the zeros are reached
    valid_rows = CHUNK_BYTES // 8
    good = np.stack([np.arange(valid_rows) % 8, (np.arange(valid_rows) + 1) % 8], axis=1)
    good = np.repeat(good[:, None, :], 2, axis=1).astype("<i2").tobytes()
    tail = _zip_raw(
        tmp_path / "tail.npz",
        [
            ("meta.npy", 0, meta, len(meta)),
            ("experts.npy", 8, _deflate_bomb(header + good, gib3 - 4), len(header) + rows * 8),
        ],
    )
    # declared sizes beyond what the compressed bytes can expand to (deflate's 1032:1)
    liar = _zip_raw(
        tmp_path / "liar.npz",
        [("meta.npy", 0, meta, len(meta)), ("experts.npy", 8, _deflate_bomb(header, 16), len(header) + rows * 8)],
    )
    vllm_bomb = _zip_raw(tmp_path / "v.npz", [("a.npy", 8, _deflate_bomb(header, gib3), len(header) + rows * 8)])
    # without the limit: 1 GiB declared, allocated lazily, and only the chunks read before the bad one touched
    rows_1g = (1 << 30) // 8
    header_1g = npy_header((rows_1g, 2, 2), "<i2")
    tail_1g = _zip_raw(
        tmp_path / "tail1g.npz",
        [
            ("meta.npy", 0, meta, len(meta)),
            ("experts.npy", 8, _deflate_bomb(header_1g + good, 1020), len(header_1g) + rows_1g * 8),
        ],
    )
    # a version-2 .npy header may declare 4 GiB of header text, which numpy would read before refusing it
    v2 = b"\x93NUMPY\x02\x00" + struct.pack("<I", 3 << 30)
    header_bomb = _zip_raw(tmp_path / "h.npz", [("a.npy", 8, _deflate_bomb(v2, gib3), len(v2) + (3 << 30))])
    unlimited = [[str(tail_1g), None, None]]
    limited = [[str(zeros), None, None], [str(tail), None, None], [str(liar), None, None], [str(vllm_bomb), None, 8]]
    limited.append([str(header_bomb), "vllm", 8])
    cases = unlimited + limited
    assert all(Path(p).stat().st_size < 4 << 20 for p, _, _ in cases)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(unlimited), json.dumps(limited)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.splitlines()[-1])
    for (kind, message, grew_kib), (path, _, _) in zip(results, cases, strict=True):
        assert kind in ("FormatError", "TraceError"), (path, kind, message)
        assert grew_kib < 256 * 1024, (path, grew_kib)  # peak RSS grew by under 256 MiB, not by GiBs
    assert results[0][0] == "TraceError" and f"token {valid_rows}, layer index 0" in results[0][1]  # chunk 2
    assert results[1][0] == "TraceError" and "token 0, layer index 0 selects expert 0 twice" in results[1][1]
    assert "allocate" in results[2][1]  # 3 GiB cannot be had under the limit: refused before reading on
    assert "more than deflate can expand" in results[3][1]
    assert "allocate" in results[4][1]
    assert "header declares 3221225484 bytes, over 65536" in results[5][1]


# -------------------------------------------------------------------------------------------------- npz


def test_npz_random_flips_and_truncations(tmp_path):
    path = write_output(TRACE, tmp_path / "t.npz")
    fuzz(path, path, None, ImportOptions(), seed=1)


def test_npz_corrupt_member_names_file_and_member(tmp_path):
    path = write_output(TRACE, tmp_path / "t.npz")
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("experts.npy")
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    for i in range(start + 20, start + info.compress_size - 20, 7):  # garble the deflate stream
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    err = refused(path, error=FormatError)
    assert "t.npz (experts)" in str(err)


@pytest.mark.parametrize(
    ("member", "match"),
    [
        (b"\x93NUMPY\x01\x00" + struct.pack("<H", 6) + b"{junk}", "not a valid .npy array header"),
        (b"\x93NUMPY\x01\x00\xff", "not a valid .npy array header"),
        (b"\x93NUMPY\x03\x00" + bytes(20), r"version \(3, 0\)"),
        (b"not numpy at all", "not a valid .npy array header"),
        (npy_header((-5, 2, 2), "<i2"), "negative shape"),
        (npy_header((40, 2, 2), "|O"), "needs unpickling"),
        (npy_header((40, 2, 2), "<c16") + bytes(40 * 4 * 16), "not a plain number"),
        (npy_header((40, 2, 2), "<U0"), "not a plain number"),
        (npy_bytes(np.zeros((40, 2), [("a", "<i2"), ("b", "<i2")])), "not a plain number"),
        (npy_header((40, 2, 2), "<i2") + bytes(10), r"holds 10 bytes of data"),
        (npy_header((2**50, 2, 2), "<i2") + bytes(8), r"holds 8 bytes of data"),  # huge declared shape
        (npy_bytes(TRACE.experts.astype(np.float32)), "expected \\[tokens, layers, k\\] integers"),
        (npy_bytes(np.asfortranarray(TRACE.experts)), "Fortran order"),
        (npy_header((0, 2**12, 2**11), "<i2"), "ids per token"),
    ],
)
def test_npz_bad_experts_member(tmp_path, member, match):
    path = write_zip(tmp_path / "t.npz", npz_members(experts=member))
    with pytest.raises(FormatError, match=match):
        read_input(path)


@pytest.mark.parametrize(
    ("name", "array", "match"),
    [
        ("weights", np.zeros((40, 2, 3), np.float32), "expected numbers of the experts' shape"),
        ("seq_starts", np.arange(41), r"\[<= 40\] integers"),
        ("seq_labels", np.array(["a"] * 3), "one label per sequence"),
        ("seq_labels", np.array(["x" * 5000] * 4), "at most 4096 characters"),
        ("token_ids", np.zeros(39, np.int32), "with 40 tokens"),
        ("lookahead", np.zeros((40, 2, 100, 2), np.int16), "lookahead"),
        ("meta", np.array(["{}", "{}"]), "one JSON string"),
    ],
)
def test_npz_inconsistent_members(tmp_path, name, array, match):
    path = write_zip(tmp_path / "t.npz", npz_members(**{name: npy_bytes(array)}))
    with pytest.raises(FormatError, match=match):
        read_input(path)


@pytest.mark.parametrize(
    "literal", ['"16"', "[16]", "16.7", "true", "0", "40000", str(2**70), "NaN", "Infinity", "1e400", '{"n": 16}']
)
def test_npz_meta_n_experts_must_be_an_exact_integer(tmp_path, literal):
    path = write_zip(tmp_path / "t.npz", npz_members(meta=meta_bytes('{"n_experts": ' + literal + "}")))
    with pytest.raises(FormatError, match=r"meta n_experts is .* expected an integer in 1\.\.32768"):
        read_input(path)


@pytest.mark.parametrize("n_experts", [16, 16.0])
def test_npz_meta_n_experts_exact_integers_are_accepted(tmp_path, n_experts):
    path = write_zip(tmp_path / "t.npz", npz_members(meta=meta_bytes({"n_experts": n_experts})))
    assert read_input(path).n_experts == 16


@pytest.mark.parametrize(
    "meta",
    [
        {"n_experts": 8, "layer_ids": 5},
        {"n_experts": 8, "layer_ids": "ab"},
        {"n_experts": 8, "layer_ids": [1.5, 2]},
        {"n_experts": 8, "layer_ids": [True, 2]},
        {"n_experts": 8, "layer_ids": [2**64, 2]},
        {"n_experts": 8, "phase": 0},
        {"n_experts": 8, "phase": ["prefill"]},
        {"n_experts": 8, "top_k": "2"},
        {"n_experts": 8, "top_k": None},
        {"n_experts": 8, "task_starts": {"a": "0"}},
        {"n_experts": 8, "task_starts": {"a": [0]}},
        {"n_experts": 8, "task_starts": ["a"]},
        {"n_experts": 8, "model": ["m"]},
        {"n_experts": 8, "source": 3},
        [8],
        "just a string",
    ],
)
def test_npz_wrong_typed_meta(tmp_path, meta):
    members = npz_members(meta=meta_bytes(json.dumps(meta)), seq_labels=None)
    path = write_zip(tmp_path / "t.npz", members)
    refused(path, error=FormatError)


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"n_experts": 8, "x": ' + "[" * 70 + "]" * 70 + "}"])
def test_npz_deep_meta_json(tmp_path, text):
    path = write_zip(tmp_path / "t.npz", npz_members(meta=meta_bytes(text)))
    with pytest.raises(FormatError, match="nests JSON deeper"):
        read_input(path)


def test_npz_big_endian_arrays_keep_their_values(tmp_path):
    members = npz_members(
        experts=npy_bytes(TRACE.experts.astype(">i4")),
        weights=npy_bytes(TRACE.weights.astype(">f4")),
        seq_starts=npy_bytes(TRACE.seq_starts.astype(">i8")),
        token_ids=npy_bytes(TRACE.token_ids.astype(">i4")),
        seq_labels=npy_bytes(TRACE.seq_labels.astype(">U4")),
    )
    got = read_clean(write_zip(tmp_path / "t.npz", members))
    assert isinstance(got, RoutingTrace)
    np.testing.assert_array_equal(got.experts, TRACE.experts)
    np.testing.assert_array_equal(got.weights, TRACE.weights)
    np.testing.assert_array_equal(got.seq_starts, TRACE.seq_starts)
    np.testing.assert_array_equal(got.token_ids, TRACE.token_ids)
    assert got.seq_labels.tolist() == TRACE.seq_labels.tolist()
    assert all(a.dtype.isnative for a in (got.experts, got.weights, got.seq_starts, got.token_ids))
    assert got.counts().values.sum() == TRACE.n_tokens * 2 * 2  # numba kernels ran on them


def test_npz_fortran_order_weights_and_wide_ids(tmp_path):
    fortran = npy_bytes(np.asfortranarray(TRACE.weights))
    members = npz_members(weights=fortran, experts=npy_bytes(TRACE.experts.astype(np.uint64)))
    got = read_clean(write_zip(tmp_path / "t.npz", members))
    np.testing.assert_array_equal(got.weights, TRACE.weights)
    wide = TRACE.experts.astype(np.uint64)
    wide[3, 1, 0] = 2**64 - 1  # must not wrap into a valid int16 id
    with pytest.raises(TraceError, match="token 3, layer index 1, slot 0 has expert id 18446744073709551615"):
        read_input(write_zip(tmp_path / "w.npz", npz_members(experts=npy_bytes(wide))))


def test_npz_archive_level_refusals(tmp_path):
    members = npz_members()
    refused(write_zip(tmp_path / "bz.npz", members, zipfile.ZIP_BZIP2), error=FormatError)
    dup = write_zip(tmp_path / "dup.npz", members)
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(dup, "a") as zf:
        zf.writestr("experts.npy", members["experts.npy"])
    assert "two members" in str(refused(dup, "npz", error=FormatError))
    (tmp_path / "dir.npz").mkdir()
    refused(tmp_path / "dir.npz", "npz", error=FormatError)
    (tmp_path / "empty.npz").write_bytes(b"")
    refused(tmp_path / "empty.npz", "npz", error=FormatError)


# ------------------------------------------------------------------------------------------------- vLLM

VLLM = ImportOptions(n_experts=8)


def _vllm_ids(dtype="<i4") -> np.ndarray:
    ids = TRACE.experts.astype(np.int64)
    ids[:, 0] = 0  # a dense layer
    return ids.astype(dtype)


def test_vllm_random_flips_and_truncations(tmp_path):
    np.save(tmp_path / "r.npy", _vllm_ids())
    fuzz(tmp_path / "r.npy", tmp_path / "r.npy", "vllm", VLLM, seed=2)
    np.savez_compressed(tmp_path / "r.npz", a=_vllm_ids()[:25], b=_vllm_ids("<i2")[25:])
    fuzz(tmp_path / "r.npz", tmp_path / "r.npz", "vllm", VLLM, seed=3)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (
            b"\x93NUMPY\x01\x00" + struct.pack("<H", 70) + b"{'descr': '<i4', 'shape': (3,",
            "not a valid .npy array header",
        ),
        (npy_header((40, 2, 2), "<i4")[:-3], "not a valid .npy array header"),
        (npy_header((40, 2, 2), "<i4") + bytes(7), "holds 7 bytes of data"),
        (npy_header((2**40, 2, 2), "<i4") + bytes(16), "holds 16 bytes of data"),
        (b"", "not a valid .npy array header"),
    ],
)
def test_vllm_corrupt_npy_header(tmp_path, data, match):
    (tmp_path / "r.npy").write_bytes(data)
    with pytest.raises(FormatError, match=match):
        read_input(tmp_path / "r.npy", "vllm", VLLM)


def test_vllm_big_endian_and_fortran_ids(tmp_path):
    np.save(tmp_path / "r.npy", _vllm_ids(">i4"))
    got = read_clean(tmp_path / "r.npy", "vllm", VLLM)
    np.testing.assert_array_equal(got.experts, TRACE.experts[:, 1:])
    np.savez(tmp_path / "f.npz", a=np.asfortranarray(_vllm_ids(">i8")), b=_vllm_ids())  # checked whole
    got = read_clean(tmp_path / "f.npz", "vllm", VLLM)
    np.testing.assert_array_equal(got.experts, np.concatenate([TRACE.experts, TRACE.experts])[:, 1:])
    wide = np.asfortranarray(_vllm_ids())
    wide[7, 1, 0] = 70000
    np.save(tmp_path / "w.npy", wide)
    with pytest.raises(FormatError, match="token 7, layer 1, slot 0 holds 70000"):
        read_input(tmp_path / "w.npy", "vllm", VLLM)


@pytest.mark.parametrize("value", [40000, 32768, -2, 2**40])
def test_vllm_ids_beyond_int16_are_refused_not_wrapped(tmp_path, value):
    ids = _vllm_ids("<i8")
    ids[5, 0, 1] = value  # even in a layer --moe-layers drops
    np.save(tmp_path / "r.npy", ids)
    with pytest.raises(FormatError, match=f"token 5, layer 0, slot 1 holds {value}"):
        read_input(tmp_path / "r.npy", "vllm", ImportOptions(n_experts=8, moe_layers=(1,)))
    np.save(tmp_path / "u.npy", ids.astype(np.uint64) if value >= 0 else ids)
    refused(tmp_path / "u.npy", "vllm", VLLM, error=FormatError)


def test_vllm_folder_and_empty_file(tmp_path):
    (tmp_path / "d.npy").mkdir()
    refused(tmp_path / "d.npy", "vllm", VLLM, error=FormatError)
    (tmp_path / "e.npz").write_bytes(b"")
    refused(tmp_path / "e.npz", "vllm", VLLM, error=FormatError)
    np.save(tmp_path / "r.npy", _vllm_ids())
    with pytest.raises(UsageError, match="--moe-layers is empty"):
        read_input(tmp_path / "r.npy", "vllm", ImportOptions(n_experts=8, moe_layers=()))
    with pytest.raises(UsageError, match="--moe-layers 1180591620717411303424 is out of range"):
        read_input(tmp_path / "r.npy", "vllm", ImportOptions(n_experts=8, moe_layers=(2**70,)))


# ------------------------------------------------------------------------------------------------- ESFT

ESFT = ImportOptions(n_experts=8, top_k=2)
A = "0\t1\t\t0.5\t0.5\n"
B = "2\t3\t4\t5\t\t0.5\t0.5\t0.25\t0.75\n"


def _logs(folder: Path, files: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for layer, text in files.items():
        data = text if isinstance(text, bytes) else text.encode()
        (folder / f"expert_weights_{layer}.txt").write_bytes(data)
    return folder


def test_esft_random_flips_and_truncations(tmp_path):
    out = write_output(random_trace(n_tokens=30, n_seq=3), tmp_path / "logs", "esft")
    fuzz(out / "law" / "expert_weights_1.txt", out, "esft", ESFT, seed=4)


def test_esft_task_named_rank_0_keeps_every_task(tmp_path):
    root = tmp_path / "scores"
    _logs(root / "rank_0", {1: A, 3: A})
    _logs(root / "law", {1: B, 3: B})
    _logs(root / "code" / "rank_1", {1: A, 3: A})
    got = read_clean(root, "esft", ESFT)
    assert got.seq_labels.tolist() == ["code", "law", "rank_0"] and got.n_tokens == 4
    ranks = tmp_path / "ranks"  # rank folders alone are still ranks, concatenated in numeric order
    _logs(ranks / "rank_10", {1: A})
    _logs(ranks / "rank_2", {1: B})
    got = read_clean(ranks, "esft", ESFT)
    assert got.seq_labels is None and got.experts[:, 0].tolist() == [[2, 3], [4, 5], [0, 1]]


@pytest.mark.parametrize(
    ("files", "match"),
    [
        ({1: "", 2: A}, "is empty"),
        ({1: b"\xff\xfe\x00bad\t\t1\n"}, "not UTF-8"),
        ({1: "0\t1\x00\t\t0.5\t0.5\n"}, "is not a number"),
        ({1: "9223372036854775808\t1\t\t0.5\t0.5\n"}, "out of the 64-bit range"),
        ({1: "-9223372036854775809\t1\t\t0.5\t0.5\n"}, "out of the 64-bit range"),
        ({1: "9" * 5000 + "\t1\t\t0.5\t0.5\n"}, "is not a number"),
        ({1: "1e3\t1\t\t0.5\t0.5\n"}, "is not a number"),
        ({1: "0\t1\t\tinf\t0.5\n"}, "negative or not finite"),
        ({1: "0\t1\t\t-0.5\t0.5\n"}, "negative or not finite"),
        ({1: A, "01": A}, "both name layer 1"),
        ({"1" * 20: A}, "over 9 digits"),
    ],
)
def test_esft_bad_files(tmp_path, files, match):
    with pytest.raises(FormatError, match=match):
        read_input(_logs(tmp_path / "logs", files), "esft", ESFT)


def test_esft_other_refusals(tmp_path):
    (tmp_path / "a" / "expert_weights_1.txt").mkdir(parents=True)  # a folder named like a layer file
    assert "cannot be read" in str(refused(tmp_path / "a", "esft", ESFT, error=FormatError))
    _logs(tmp_path / "b", {1: A})
    _logs(tmp_path / "b" / "law", {1: A})
    assert "holds both" in str(refused(tmp_path / "b", "esft", ESFT, error=FormatError))
    _logs(tmp_path / "c", {1: "9223372036854775807\t1\t\t0.5\t0.5\n"})
    refused(tmp_path / "c", "esft", ESFT, error=TraceError)
    with pytest.raises(UsageError, match="--top-k is"):
        read_input(tmp_path / "c", "esft", ImportOptions(n_experts=8, top_k=10**30))


def test_esft_long_field_does_not_multiply_memory(tmp_path):
    """One 100k-character field among 100k short ones: a fixed-width string array of them would take 40 GB."""
    text = "\t".join(["1", "2"] * 50_000 + ["7" * 100_000, "3"]) + "\t\t" + "\t".join(["0.5"] * 100_002) + "\n"
    folder = _logs(tmp_path / "logs", {1: text})
    tracemalloc.start()
    try:
        refused(folder, "esft", ESFT, error=FormatError)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20


# ------------------------------------------------------------------------------------------- counts JSON


def test_counts_random_flips_and_truncations(tmp_path):
    path = write_output(random_trace(), tmp_path / "c.json")
    fuzz(path, path, None, ImportOptions(), seed=5)


@pytest.mark.parametrize(
    "doc",
    [
        {"layers": [[1, 2]], "n_experts": "2"},
        {"layers": [[1, 2]], "n_experts": 2.5},
        {"layers": [[1, 2]], "n_experts": True},
        {"layers": [[1, 2]], "n_experts": [2]},
        {"layers": [[1, 2]], "top_k": "1"},
        {"layers": [[1, 2]], "tokens": "3"},
        {"layers": [[1, 2]], "tokens": 1.5},
        {"layers": [[1, 2]], "tokens": -1},
        {"layers": [[1, 2]], "tokens": 2**70},
        {"layers": [[1, 2]], "top_k": 2, "tokens": 2**62},
        {"layers": [[1, 2]], "normalized": "false"},
        {"layers": [[1, 2]], "normalized": 1},
        {"layers": [[1, 2]], "mass": 5},
        {"layers": [[1, 2]], "mass": "other"},
        {"layers": [[1, 2]], "layer_ids": 3},
        {"layers": [[1, 2]], "layer_ids": ["a"]},
        {"layers": [[1, 2]], "layer_ids": [1.5]},
        {"layers": [[1, 2]], "model": ["m"]},
        {"layers": {"a": 1}},
        {"layers": [[1, [2]]]},
        {"layers": [[True, 2]]},
        {"layers": [[2**64, 2]]},
        {"layers": [[2**62, 2**62, 2**62]]},
        {"layers": [[1e308, 1e308]]},
        "a string",
        [],
    ],
)
def test_counts_wrong_types_are_format_errors(tmp_path, doc):
    (tmp_path / "c.json").write_text(json.dumps(doc))
    refused(tmp_path / "c.json", "counts-json", error=FormatError)


def test_counts_special_files(tmp_path):
    path = tmp_path / "c.json"
    for text in ("[" * 100_000 + "]" * 100_000, '{"layers": ' + "[" * 70 + "1" + "]" * 70 + "}", ""):
        path.write_text(text)
        refused(path, "counts-json", error=FormatError)
        assert isinstance(read_clean(path), FormatError)  # auto-detection does not crash on it either
    path.write_bytes(b'{"layers": [[1, 2]], "model": "\xff"}')
    refused(path, "counts-json", error=FormatError)
    path.write_text('{"layers": [[1, NaN]]}')
    refused(path, "counts-json", error=TraceError)
    path.write_text('{"layers": [[1, 2]], "n_experts": 2.0, "top_k": 1, "tokens": 3}')
    assert read_clean(path).n_experts == 2
    (tmp_path / "d.json").mkdir()
    refused(tmp_path / "d.json", "counts-json", error=FormatError)


# ----------------------------------------------------------------------------------------------- SGLang

CSV_NAME = "expert_distribution_rank0_timestamp1.5.csv"


def _csv(path: Path, rows: list[str]) -> Path:
    path.write_text("layer_id,expert_id,count\n" + "".join(r + "\n" for r in rows))
    return path


def test_sglang_csv_hostile(tmp_path):
    opts = ImportOptions(n_experts=8)
    path = _csv(tmp_path / CSV_NAME, ["0,1,5", "0,2,7", "1,3,4"])
    fuzz(path, path, "sglang-csv", opts, seed=6)
    refused(_csv(path, ["0,1," + "9" * 30]), "sglang-csv", opts, error=FormatError)
    wraps = [f"{layer},{e},{9 * 10**17}" for layer in (0, 1) for e in range(6)]  # 12 x 9e17 > 2**63
    assert "64-bit" in str(refused(_csv(path, wraps), "sglang-csv", opts, error=FormatError))
    with pytest.raises(UsageError, match="--n-experts is 1000000000"):
        read_input(_csv(path, ["0,1,1"]), "sglang-csv", ImportOptions(n_experts=10**9))
    (tmp_path / "x.csv").mkdir()  # a folder among the rank files
    refused(tmp_path, "sglang-csv", opts, error=FormatError)


N_LOG = 8


def _topk(n_tok: int, seed: int = 0) -> np.ndarray:
    """Physical ``[3, tokens, 8]`` ids: layer 0 dense (-1), two routed slots."""
    rng = np.random.default_rng(seed)
    topk = np.full((3, n_tok, 8), -1, np.int32)
    topk[1:, :, :2] = np.stack([rng.permutation(N_LOG)[:2] for _ in range(2 * n_tok)]).reshape(2, n_tok, 2)
    return topk


def _pt(path: Path, records: list[dict], phys_map=None) -> Path:
    torch = pytest.importorskip("torch")
    m = np.tile(np.arange(N_LOG), (3, 1)) if phys_map is None else phys_map
    torch.save({"records": records, "last_physical_to_logical_map": torch.tensor(m)}, path)
    return path


def _rec(n_tok: int = 5, **changes) -> dict:
    torch = pytest.importorskip("torch")
    rec = dict(
        forward_pass_id=0,
        input_ids=list(range(n_tok)),
        positions=list(range(n_tok)),
        extend_seq_lens=[n_tok],
        forward_mode=1,
        topk_ids_of_layer=torch.tensor(_topk(n_tok)),
    )
    rec.update(changes)
    return rec


PT_NAME = "expert_distribution_recorder_1.5_0.pt"
STAT_NAME = "expert_distribution_recorder_1.5.pt"


def test_sglang_pt_random_flips_and_truncations(tmp_path):
    path = _pt(tmp_path / PT_NAME, [_rec()])
    fuzz(path, path, "sglang-pt", ImportOptions(), seed=7, n=30)


def test_sglang_pt_map_ids_beyond_int16_are_refused(tmp_path):
    m = np.tile(np.arange(N_LOG), (3, 1))
    m[1, 3] = 40000  # would wrap to a negative int16
    with pytest.raises(FormatError, match=r"last_physical_to_logical_map holds 40000, expected 0\.\.32767"):
        read_input(_pt(tmp_path / PT_NAME, [_rec()], m), "sglang-pt")
    for bad in (np.zeros((3, 0), np.int64), -np.ones((3, 8), np.int64), np.full((3, 8), 2**63 - 1)):
        refused(_pt(tmp_path / PT_NAME, [_rec()], bad), "sglang-pt", error=FormatError)
    (tmp_path / "map.json").write_text(json.dumps([[2**70] * 8] * 3))
    refused(tmp_path / PT_NAME, "sglang-pt", ImportOptions(phys_to_log=tmp_path / "map.json"), error=FormatError)
    (tmp_path / "map.json").write_text("[" * 100_000)
    refused(tmp_path / PT_NAME, "sglang-pt", ImportOptions(phys_to_log=tmp_path / "map.json"), error=FormatError)
    (tmp_path / "map.npy").write_bytes(npy_header((3, 8), "<i8")[:-4])
    refused(tmp_path / PT_NAME, "sglang-pt", ImportOptions(phys_to_log=tmp_path / "map.npy"), error=FormatError)
    np.save(tmp_path / "map.npy", np.tile(np.arange(N_LOG), (3, 1)).astype(">i8"))  # big-endian map works
    got = read_clean(tmp_path / PT_NAME, "sglang-pt", ImportOptions(phys_to_log=tmp_path / "map.npy"))
    assert isinstance(got, RoutingTrace)


@pytest.mark.parametrize(
    "changes",
    [
        {"extend_seq_lens": [2**62, 2**62, 2**62, 2**62, 5]},  # wraps to 5 in int64
        {"extend_seq_lens": [7, -2]},
        {"extend_seq_lens": ["5"]},
        {"extend_seq_lens": [[1, 2], [3]]},
        {"positions": [2**63 - 1, 0, 1, 2, 3]},
        {"positions": [0, 1]},
        {"positions": "abc"},
        {"forward_pass_id": [1]},
        {"forward_pass_id": "x"},
        {"input_ids": [[1], [2, 3]]},
        {"input_ids": {"a": 1}},
    ],
)
def test_sglang_pt_bad_record_fields(tmp_path, changes):
    refused(_pt(tmp_path / PT_NAME, [_rec(**changes)]), "sglang-pt", error=FormatError)


def test_sglang_pt_bad_tensors_and_archives(tmp_path):
    torch = pytest.importorskip("torch")
    for topk in (torch.tensor(_topk(5), dtype=torch.float32), torch.tensor(_topk(5)).to(torch.bfloat16)):
        refused(_pt(tmp_path / PT_NAME, [_rec(topk_ids_of_layer=topk)]), "sglang-pt", error=FormatError)
    mixed = [_rec(), _rec(forward_pass_id=1, topk_ids_of_layer=torch.tensor(_topk(5)[:, :, :6]))]
    assert "[layers, slots]" in str(refused(_pt(tmp_path / PT_NAME, mixed), "sglang-pt", error=FormatError))
    odd_modes = [_rec(forward_mode=[1]), _rec(forward_mode=torch.tensor([1, 2])), _rec(forward_mode=None), _rec()]
    got = read_clean(_pt(tmp_path / PT_NAME, odd_modes), "sglang-pt")
    assert isinstance(got, RoutingTrace) and sum(got.meta.extra["skipped_records"].values()) == 3
    decode = [_rec(1, forward_mode=2, positions=[2**63 - 1], extend_seq_lens=None)]  # decode: positions diff
    refused(_pt(tmp_path / PT_NAME, decode), "sglang-pt", ImportOptions(phase="decode"), error=FormatError)
    # a deflated member: torch.save stores, so it is refused before torch.load could inflate it
    src = _pt(tmp_path / "src.pt", [_rec()])
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp_path / PT_NAME, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    assert "compressed" in str(refused(tmp_path / PT_NAME, "sglang-pt", error=FormatError))
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / PT_NAME).mkdir()
    refused(tmp_path / "dir", "sglang-pt", error=FormatError)


def _stat(path: Path, counts) -> Path:
    torch = pytest.importorskip("torch")
    counts = counts if isinstance(counts, torch.Tensor) else torch.tensor(counts)
    torch.save({"rank": 0, "logical_count": counts}, path)
    return path


def test_sglang_stat_hostile(tmp_path):
    path = _stat(tmp_path / STAT_NAME, np.ones((2, 3, N_LOG), np.int32))
    fuzz(path, path, "sglang-stat", ImportOptions(), seed=8, n=30)
    neg = np.ones((2, 3, N_LOG), np.int64)
    neg[0, 1, 2] = -5
    assert "holds -5" in str(refused(_stat(path, neg), "sglang-stat", error=FormatError))
    huge = np.full((4, 3, N_LOG), 2**62, np.int64)  # sums over steps wrap int64
    assert "beyond int64" in str(refused(_stat(path, huge), "sglang-stat", error=FormatError))
    torch = pytest.importorskip("torch")
    refused(_stat(path, torch.ones((2, 3, N_LOG), dtype=torch.float32)), "sglang-stat", error=FormatError)


# ------------------------------------------------------------------------------------------ data model


def test_trace_takes_big_endian_and_refuses_non_integers():
    got = RoutingTrace(TRACE.experts.astype(">i4"), 8)
    np.testing.assert_array_equal(got.experts, TRACE.experts)
    with pytest.raises(TraceError, match="must hold integers"):
        RoutingTrace(TRACE.experts.astype("m8[s]"), 8)
    with pytest.raises(TraceError, match="must hold integers"):
        RoutingTrace(np.full((1, 1, 1), 1e30), 8)
