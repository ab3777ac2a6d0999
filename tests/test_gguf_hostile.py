"""Hostile GGUF files: every corrupt header is refused with a one-line `FormatError`, quickly and in bounded
memory, before gguf-py parses it (`moescope.imports.gguf_header.read_header`); valid files read as before.

The hostile opens run in one child process whose address space may grow by at most `MEMORY_CAP` bytes (set
with ``RLIMIT_AS`` once its imports are done) under a wall-clock timeout, so a reader that loops or allocates
without bound fails the test instead of the machine. Files are raw ``struct.pack`` headers built here, and
truncations, byte edits and seeded byte flips of the committed fixture model and imatrix.
"""

from __future__ import annotations

import json
import random
import re
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from conftest import run
from moescope import fixture
from moescope.errors import FormatError
from moescope.gguf import inspect_gguf, open_gguf
from moescope.imports import read_input
from moescope.imports.gguf_header import MAX_ARRAY_ITEMS, read_header

IMATRIX = Path(__file__).resolve().parent / "data" / "tiny-moe.imatrix.gguf"
MODEL = fixture.GGUF
MEMORY_CAP = 2**30  # bytes the child's address space may grow by after its imports
CASE_SECONDS = 5.0  # a generous bound: a valid open of the fixture model takes about 0.3 s
CHILD_TIMEOUT = 120

# The child: reads a JSON list of cases, builds each file (a copy of `src` cut to `size`, with `edits`
# [offset, bytes-as-hex] applied), runs `op` on it and reports the outcome.
CHILD = textwrap.dedent(
    """
    import json, resource, sys, time, traceback
    from pathlib import Path
    from moescope.errors import MoescopeError
    from moescope.gguf import inspect_gguf
    from moescope.imports import read_input

    def summary(op, result):
        if op == "inspect":
            total = sum(t.n_bytes for t in result.tensors)
            return {
                "layer_ids": list(result.layer_ids), "expert_bytes": sorted(result.expert_bytes.values()),
                "n_experts": result.n_experts, "top_k": result.top_k, "architecture": result.architecture,
                "balanced": result.routed_expert_bytes + result.other_bytes + result.mtp_bytes == total,
                "keys_ok": sorted(result.expert_bytes) == list(result.layer_ids), "tensors": len(result.tensors),
            }
        return {"layer_ids": result.layer_ids.tolist(), "values": result.values.tolist()}

    OPS = {"inspect": inspect_gguf, "import": lambda p: read_input(p, "imatrix")}
    cases = json.loads(Path(sys.argv[1]).read_text())
    sources = {}
    page = resource.getpagesize()
    vm = int(Path("/proc/self/statm").read_text().split()[0]) * page
    cap = vm + int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    out = []
    for case in cases:
        path = Path(case["path"])
        if case.get("src"):
            data = bytearray(sources.setdefault(case["src"], Path(case["src"]).read_bytes()))
            del data[case.get("size", len(data)):]
            for offset, raw in case.get("edits", []):
                data[offset : offset + len(raw) // 2] = bytes.fromhex(raw)
            path.write_bytes(data)
        t = time.perf_counter()
        try:
            rec = {"ok": True, "summary": summary(case["op"], OPS[case["op"]](path))}
        except MoescopeError as exc:
            rec = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
        except Exception as exc:  # reported, so the parent fails the test naming it
            rec = {"ok": False, "error": type(exc).__name__, "message": traceback.format_exc()}
        rec["seconds"] = time.perf_counter() - t
        out.append(rec)
    print(json.dumps(out))
    """
)


def run_child(cases: list[dict], tmp_path: Path) -> list[dict]:
    """Run `cases` in a memory-capped child; one outcome per case."""
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps(cases))
    env = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "PATH": ""}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(spec), str(MEMORY_CAP)],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
        env={**env, "PYTHONPATH": ":".join(sys.path)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out) == len(cases)
    return out


def check_refused(case: dict, rec: dict, match: str | None = None) -> None:
    """The case was refused with a one-line FormatError (naming the file), in time."""
    label = f"{case.get('label', case['path'])}: {rec}"
    assert not rec["ok"] and rec["error"] == "FormatError", label
    assert "\n" not in rec["message"] and Path(case["path"]).name in rec["message"], label
    assert match is None or match in rec["message"], f"{label} lacks {match!r}"
    assert rec["seconds"] < CASE_SECONDS, label


# -- raw GGUF bytes ---------------------------------------------------------------------------------------
def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def kv_str(key: str, value: str) -> bytes:
    return kv(key, 8, s(value))


def tensor(name: str, dims: list[int], ggml_type: int = 0, offset: int = 0) -> bytes:
    return s(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset)


def gguf_bytes(kvs=(), tensors=(), data=b"", *, version=3, n_tensors=None, n_kv=None, align=32) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors, len(kvs))
    if n_kv is not None:
        head = head[:16] + struct.pack("<Q", n_kv)
    head += b"".join(kvs) + b"".join(tensors)
    return head + b"\0" * (-len(head) % align) + data


IMATRIX_KVS = [kv_str("general.type", "imatrix"), kv("imatrix.chunk_count", 4, struct.pack("<I", 1))]
COUNTS = "blk.0.ffn_up_exps.weight.counts"
# name -> (bytes, the op that reads it, a fragment of the expected message)
HOSTILE = {
    "array count 2**62": (
        gguf_bytes([*IMATRIX_KVS, kv("imatrix.datasets", 9, struct.pack("<IQ", 8, 2**62) + b"\0" * 60_000)]),
        "import",
        "declares length 4,611,686,018,427,387,904",
    ),
    "u8 array count 2**62": (
        gguf_bytes([*IMATRIX_KVS, kv("x.bytes", 9, struct.pack("<IQ", 0, 2**62))]),
        "import",
        "declares length",
    ),
    "string length 2**60": (gguf_bytes([kv("general.type", 8, struct.pack("<Q", 2**60) + b"imatrix")]), "import", ""),
    "key length 2**60": (gguf_bytes([struct.pack("<Q", 2**60) + b"general.type"]), "inspect", "bytes long"),
    "tensor count 2**62": (gguf_bytes(IMATRIX_KVS, n_tensors=2**62), "import", "4,611,686,018,427,387,904 tensors"),
    "tensor count 100k in 1 KB": (gguf_bytes(IMATRIX_KVS, n_tensors=100_000), "import", "need at least"),
    "kv count 2**62": (gguf_bytes(IMATRIX_KVS, n_kv=2**62), "import", "keys"),
    "kv count 1000 in 100 B": (gguf_bytes(IMATRIX_KVS, n_kv=1000), "import", "need at least"),
    "n_dims 9": (gguf_bytes(IMATRIX_KVS, [tensor(COUNTS, [1] * 9)], b"\0" * 64), "import", "9 dimensions"),
    "unknown value type": (gguf_bytes([*IMATRIX_KVS, kv("x.y", 13, b"\0" * 16)]), "import", "value type 13"),
    "unknown array item type": (
        gguf_bytes([*IMATRIX_KVS, kv("x.y", 9, struct.pack("<IQ", 77, 1) + b"\0" * 8)]),
        "import",
        "item type 77",
    ),
    "unknown ggml type": (gguf_bytes(IMATRIX_KVS, [tensor(COUNTS, [1, 4], 99)], b"\0" * 64), "import", "ggml type 99"),
    "tensor offset past the end": (
        gguf_bytes(IMATRIX_KVS, [tensor(COUNTS, [1, 4], 0, 2**40)], b"\0" * 64),
        "import",
        "spans bytes",
    ),
    "tensor bigger than the file": (
        gguf_bytes(IMATRIX_KVS, [tensor(COUNTS, [1, 2**20])], b"\0" * 64),
        "import",
        "spans bytes",
    ),
    "dims overflow int64": (
        gguf_bytes(IMATRIX_KVS, [tensor(COUNTS, [2**32, 2**32])], b"\0" * 64),
        "import",
        "overflows int64",
    ),
    "quantized row not a whole block": (
        gguf_bytes(IMATRIX_KVS, [tensor(COUNTS, [33, 1], 8)], b"\0" * 64),
        "import",
        "multiple of its ggml type's block of 32",
    ),
    "nested arrays 1000 deep": (
        gguf_bytes([*IMATRIX_KVS, kv("x.y", 9, struct.pack("<IQ", 9, 1) * 1000 + struct.pack("<IQ", 0, 0))]),
        "import",
        "nests arrays 9 deep",
    ),
    "array items over the cap": (
        gguf_bytes(
            [*IMATRIX_KVS, kv("x.y", 9, struct.pack("<IQ", 0, MAX_ARRAY_ITEMS + 1) + bytes(MAX_ARRAY_ITEMS + 1))]
        ),
        "import",
        f"expected at most {MAX_ARRAY_ITEMS:,}",
    ),
    "key not UTF-8": (gguf_bytes([*IMATRIX_KVS, kv(b"x.\xff\xfe", 4, b"\0" * 4)]), "import", "is not UTF-8"),
    "tensor name not UTF-8": (
        gguf_bytes(IMATRIX_KVS, [s(b"blk.\xff") + struct.pack("<IQIQ", 1, 1, 0, 0)], b"\0" * 64),
        "import",
        "is not UTF-8",
    ),
    "duplicate key": (gguf_bytes([*IMATRIX_KVS, IMATRIX_KVS[1]]), "import", "appears twice"),
    "duplicate tensor": (
        gguf_bytes(IMATRIX_KVS, [tensor(COUNTS, [1, 2]), tensor(COUNTS, [1, 2], offset=32)], b"\0" * 64),
        "import",
        "appears twice",
    ),
    "alignment 3": (gguf_bytes([*IMATRIX_KVS, kv("general.alignment", 4, struct.pack("<I", 3))]), "import", "power"),
    "alignment as a string": (gguf_bytes([*IMATRIX_KVS, kv_str("general.alignment", "32")]), "import", "power"),
    "version 1": (gguf_bytes(IMATRIX_KVS, version=1), "import", "GGUF version 1"),
    "version 2**31": (gguf_bytes(IMATRIX_KVS, version=2**31 + 7), "import", "GGUF version"),
    "magic only": (b"GGUF", "import", "shorter than"),
    "empty": (b"", "import", "not the GGUF magic"),
    # the legacy .dat imatrix (int32 entry count, then entries) is not read: refused by its magic
    "legacy .dat imatrix": (struct.pack("<ii", 2**30, 2**30) + b"blk.0.ffn_up_exps.weight", "import", "GGUF magic"),
    # gguf-py itself would raise (IndexError in quant_shape_to_byte_shape): turned into a FormatError
    "quantized scalar tensor": (gguf_bytes(IMATRIX_KVS, [tensor(COUNTS, [], 8)], b"\0" * 64), "import", "IndexError"),
    # string values are decoded lazily by gguf-py: decoding this one fails in inspect's field()
    "architecture not UTF-8": (gguf_bytes([kv("general.architecture", 8, s(b"qwen\xff"))]), "inspect", "UnicodeDecode"),
}


def test_hostile_headers_are_refused_quickly_in_bounded_memory(tmp_path):
    cases = []
    for i, (label, (data, op, _)) in enumerate(HOSTILE.items()):
        path = tmp_path / f"hostile{i}.{'imatrix.gguf' if op == 'import' else 'gguf'}"
        path.write_bytes(data)
        cases.append({"label": label, "path": str(path), "op": op})
    for case, rec, (_, _, match) in zip(cases, run_child(cases, tmp_path), HOSTILE.values(), strict=True):
        check_refused(case, rec, match)


def test_hostile_headers_in_process_and_through_the_cli(tmp_path, capsys):
    """The same refusals from `read_header`, `open_gguf` and the command line (exit 2, one ``error:`` line)."""
    data = HOSTILE["array count 2**62"][0]
    path = tmp_path / "x.imatrix.gguf"
    path.write_bytes(data)
    t = time.perf_counter()
    with pytest.raises(FormatError, match=r"x\.imatrix\.gguf: not a readable GGUF: the array of key 'imatrix"):
        read_header(path)
    with pytest.raises(FormatError, match="declares length"):
        open_gguf(path)
    assert time.perf_counter() - t < 1.0
    code, out, err = run(capsys, "import", "imatrix", path, "--json")
    assert code == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1 and "x.imatrix" in err
    model = tmp_path / "m.gguf"
    model.write_bytes(HOSTILE["tensor count 2**62"][0])
    code, out, err = run(capsys, "gguf", "inspect", model)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "tensors" in err


# -- the committed files, cut and edited -------------------------------------------------------------------
def data_end(path: Path) -> int:
    """The end of the last tensor's data: a shorter file is truncated, a longer one ends in padding."""
    return max(t.start + t.n_bytes for t in read_header(path).tensors)


def test_truncations_of_the_committed_files(tmp_path):
    cases = []
    for src, op, step in ((IMATRIX, "import", 97), (MODEL, "inspect", 4099)):
        header = read_header(src)
        cuts = {*range(0, header.data_offset + 64, step), *range(0, 64, 3), header.data_offset - 1}
        cuts |= {header.file_size - 1, header.file_size // 2, data_end(src) - 1}
        cases += [
            {"label": f"{src.name} cut at {n}", "path": str(tmp_path / f"cut{len(cases) + i}-{src.name}"),
             "src": str(src), "size": n, "op": op}
            for i, n in enumerate(sorted(cuts))
        ]  # fmt: skip
    for case, rec in zip(cases, run_child(cases, tmp_path), strict=True):
        check_refused(case, rec)


def _edit(path: Path, key: str, value: int) -> tuple[int, str]:
    """The [offset, hex] edit that sets u32 metadata `key` of the file at `path` to `value`."""
    data = path.read_bytes()
    at = data.index(s(key)) + len(s(key))
    assert struct.unpack_from("<I", data, at)[0] == 4  # a u32 value
    return at + 4, struct.pack("<I", value).hex()


def test_expert_count_that_disagrees_with_the_tensors_is_refused(tmp_path, capsys):
    """expert_count 8 over 16-expert tensors read as 0 bytes per expert, and split wrote two full-size parts
    llama.cpp refused: inspect (so plan and split) refuses the file."""
    from moescope.gguf.plan import plan_offload

    for name, key, value, match in (
        ("fewer.gguf", "qwen3moe.expert_count", 8, "has shape [64, 64, 16] (GGUF order, experts last) but qwen3moe"),
        ("more.gguf", "qwen3moe.expert_count", 17, "qwen3moe.expert_count is 17"),
        ("topk.gguf", "qwen3moe.expert_used_count", 99, "expert_used_count=99 experts per token out of"),
    ):
        data = bytearray(MODEL.read_bytes())
        at, raw = _edit(MODEL, key, value)
        data[at : at + 4] = bytes.fromhex(raw)
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(FormatError, match=re.escape(match)):
            inspect_gguf(path)
    with pytest.raises(FormatError):
        plan_offload(inspect_gguf(tmp_path / "fewer.gguf"), 2**30)
    out = tmp_path / "parts"
    code, _, err = run(capsys, "split", tmp_path / "fewer.gguf", "-o", out, "-g", "2")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "expert_count is 8" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["fewer.gguf", "more.gguf", "topk.gguf"]
    code, _, err = run(capsys, "gguf", "inspect", tmp_path / "more.gguf")
    assert code == 2 and "expert_count is 17" in err


def test_router_without_expert_tensors_is_refused(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "r.gguf"), "qwen3moe")
    w.add_block_count(1)
    w.add_expert_count(4)
    w.add_expert_used_count(2)
    w.add_tensor("blk.0.ffn_gate_inp.weight", np.zeros((4, 8), dtype=np.float32))
    w.add_tensor("blk.0.ffn_up.weight", np.zeros((16, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(FormatError, match=r"MoE block\(s\) \[0\] have a router but no blk\.N\.ffn_\*_exps tensors"):
        inspect_gguf(tmp_path / "r.gguf")


def flip_cases(src: Path, op: str, regions: list[tuple[int, int]], n: int, seed: int, tmp_path: Path) -> list[dict]:
    """`n` copies of `src`, each with 1-3 random bytes of `regions` XORed with a random non-zero byte."""
    rng = random.Random(seed)
    data = src.read_bytes()
    cases = []
    for i in range(n):
        edits = []
        for _ in range(rng.randint(1, 3)):
            lo, hi = rng.choice(regions)
            at = rng.randrange(lo, hi)
            edits.append([at, bytes([data[at] ^ rng.randrange(1, 256)]).hex()])
        label = f"{src.name} flipped at {[e[0] for e in edits]} (seed {seed}, case {i})"
        cases.append({"label": label, "path": str(tmp_path / f"flip{i}-{src.name}"), "src": str(src), "edits": edits,
                      "op": op})  # fmt: skip
    return cases


def test_random_header_byte_flips(tmp_path):
    """Seeded flips in the headers' structural bytes (counts, types, dims, offsets, short keys, tensor infos;
    the model's tokenizer strings are left out for speed): refused with a FormatError, or read with a result
    that is consistent (bytes add up, every MoE layer has experts)."""
    imatrix, model = read_header(IMATRIX), read_header(MODEL)
    tokens_at = MODEL.read_bytes().index(s("tokenizer.ggml.tokens"))
    cases = flip_cases(IMATRIX, "import", [(0, imatrix.data_offset)], 150, 1, tmp_path / "a")
    cases += flip_cases(
        MODEL, "inspect", [(0, tokens_at), (model.tensor_info_offset, model.data_offset)], 30, 2, tmp_path / "b"
    )
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    want = {IMATRIX.name: read_input(IMATRIX, "imatrix"), MODEL.name: inspect_gguf(MODEL)}
    outcomes = run_child(cases, tmp_path)
    for case, rec in zip(cases, outcomes, strict=True):
        if not rec["ok"]:
            check_refused(case, rec)
            continue
        got, label = rec["summary"], f"{case['label']}: {rec}"
        assert rec["seconds"] < CASE_SECONDS, label
        if case["op"] == "inspect":
            assert got["balanced"] and got["keys_ok"] and got["layer_ids"] and min(got["expert_bytes"]) > 0, label
            assert got["n_experts"] == want[MODEL.name].n_experts, label  # tensors pin it
        else:
            values = np.asarray(got["values"])
            assert values.ndim == 2 and values.shape[0] == len(got["layer_ids"]), label
            assert len(set(values.sum(axis=1).tolist())) == 1, label  # every layer routes every token
    refused = sum(not r["ok"] for r in outcomes)
    assert 0 < refused < len(cases)  # the flips reach both outcomes: the test sees real parsing


# -- valid files ------------------------------------------------------------------------------------------
def test_guard_agrees_with_gguf_py_on_valid_files(tmp_path):
    """Tensor spans, data offset and key count as gguf-py parses them, little- and big-endian; the committed
    files read as before."""
    be = tmp_path / "be.gguf"
    w = gguf.GGUFWriter(str(be), "tiny", endianess=gguf.GGUFEndian.BIG)
    w.add_array("tiny.words", ["a", "bb", ""])
    w.add_array("tiny.nested", [[1, 2], [3]])
    w.add_uint32("general.alignment", 64)
    w.add_tensor("t", np.arange(8, dtype=np.float32))
    w.add_tensor("q", gguf.quants.quantize(np.ones((2, 32), np.float32), gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # fmt: skip
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for path in (IMATRIX, MODEL, be):
        header, reader = read_header(path), gguf.GGUFReader(path)
        assert header.data_offset == reader.data_offset and header.n_kv + 3 == len(reader.fields)
        spans = [(t.name, t.start, t.n_bytes, t.ggml_type) for t in header.tensors]
        assert spans == [(t.name, t.data_offset, int(t.n_bytes), int(t.tensor_type)) for t in reader.tensors]
    assert read_header(be).byteorder == ">" and read_header(be).alignment == 64
    assert read_header(IMATRIX).values["general.type"] == "imatrix" and read_header(MODEL).array_items > 10_000
    m = inspect_gguf(MODEL)
    assert (m.architecture, m.n_experts, m.top_k, m.layer_ids) == ("qwen3moe", 16, 2, (0, 1, 2, 3))
    assert read_input(IMATRIX, "imatrix").values.shape == (4, 16)
