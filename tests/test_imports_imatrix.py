"""The ``imatrix`` reader: llama-imatrix GGUF output read as per-expert selection counts.

``tests/data/tiny-moe.imatrix.gguf`` was written by the vendored llama.cpp's ``llama-imatrix`` over the
fixture GGUF (command in ``tests/data/README.md``). The oracle is a llama.cpp capture of the same token
ids cut into the same chunks: llama-imatrix tokenises the file (trailing newline dropped, BOS / EOS as the
vocab says, special tokens not parsed), cuts ``chunk_size`` tokens per chunk, puts BOS over the first
token of each chunk when the vocab adds BOS, and runs the first ``--chunks`` chunks each in a fresh KV
cache; every (token, top-k slot) adds one to its expert's count. Bad inputs are tiny GGUFs built here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import numpy as np
import pytest

from moescope import fixture
from moescope.errors import FormatError, MoescopeError
from moescope.imports import READERS, ImportOptions, detect_format, read_input
from moescope.imports.imatrix import expert_counts, gguf_type

DATA = Path(__file__).resolve().parent / "data"
IMATRIX = DATA / "tiny-moe.imatrix.gguf"
INPUT = DATA / "imatrix_input.txt"
CHUNK_SIZE, N_CHUNKS, TOP_K, N_LAYERS, N_EXPERTS = 128, 8, 2, 4, 16


def write_gguf(path: Path, kind: str | None, tensors: dict[str, np.ndarray], **kv: object) -> Path:
    """A tiny GGUF with ``general.type`` `kind` (omitted when None), string / u32 keys `kv` and `tensors`."""
    w = gguf.GGUFWriter(path, arch="tiny")
    if kind is not None:
        w.add_type(kind)
    for key, value in kv.items():
        key = key.replace("__", ".")
        if isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_uint32(key, int(value))
    for name, data in tensors.items():
        w.add_tensor(name, np.asarray(data, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def counts_tensors(rows: dict[int, list[float]], weights=("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")):
    """name -> [n_experts, 1] counts, as llama-imatrix stores them (GGUF ne = [1, n_experts])."""
    return {
        f"blk.{layer}.{w}.weight.counts": np.asarray(row, dtype=np.float32).reshape(-1, 1)
        for layer, row in rows.items()
        for w in weights
    }


# -- the committed file -------------------------------------------------------------------------------
def test_committed_imatrix_reads_as_counts():
    assert detect_format(IMATRIX) == "imatrix"
    assert gguf_type(IMATRIX) == "imatrix" and gguf_type(fixture.GGUF) == "model"
    counts = read_input(IMATRIX, options=ImportOptions(top_k=TOP_K, model="tiny-moe"))
    assert counts.values.shape == (N_LAYERS, N_EXPERTS) and counts.values.dtype == np.int64
    assert counts.layer_ids.tolist() == list(range(N_LAYERS))
    assert counts.n_experts == N_EXPERTS and counts.top_k == TOP_K and counts.tokens is None
    assert counts.mass == "counts" and not counts.normalized
    # every token of every chunk picks top_k distinct experts in every layer
    assert counts.values.sum(axis=1).tolist() == [N_CHUNKS * CHUNK_SIZE * TOP_K] * N_LAYERS
    meta = counts.meta.to_dict()
    assert meta["imatrix.chunk_count"] == N_CHUNKS and meta["imatrix.chunk_size"] == CHUNK_SIZE
    assert meta["imatrix.datasets"] == ["tests/data/imatrix_input.txt"]
    assert meta["model"] == "tiny-moe" and meta["source"] == str(IMATRIX)


def test_gate_up_down_counts_agree_in_committed_file():
    reader = gguf.GGUFReader(IMATRIX, "r")
    got = {t.name: np.asarray(t.data).reshape(-1) for t in reader.tensors if "_exps.weight.counts" in t.name}
    assert len(got) == 3 * N_LAYERS
    for layer in range(N_LAYERS):
        gate, up, down = (got[f"blk.{layer}.ffn_{w}_exps.weight.counts"] for w in ("gate", "up", "down"))
        assert np.array_equal(gate, up) and np.array_equal(gate, down)


def imatrix_chunks(session, llama_cpp) -> list[list[int]]:
    """The token ids of the chunks llama-imatrix ran, reproduced from its source (`compute_imatrix`)."""
    text = INPUT.read_bytes().decode("utf-8")
    text = text.removesuffix("\n")  # common/arg.cpp drops one trailing newline of -f files
    ids = session.tokenize(text, add_special=True)  # common_tokenize(ctx, prompt, true, parse_special=false)
    n_chunks = min(N_CHUNKS, len(ids) // CHUNK_SIZE)
    chunks = [ids[i * CHUNK_SIZE : (i + 1) * CHUNK_SIZE] for i in range(n_chunks)]
    if llama_cpp.llama_vocab_get_add_bos(session.vocab):
        bos = llama_cpp.llama_vocab_bos(session.vocab)
        chunks = [[bos, *c[1:]] for c in chunks]
    return chunks


def test_counts_equal_llama_cpp_capture_of_the_same_chunks(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    from moescope.capture.llama import capture_llama
    from moescope.gguf import inspect_gguf
    from moescope.gguf.runtime import LlamaSession
    from moescope.store import load_trace

    with LlamaSession(fixture.GGUF, inspect_gguf(fixture.GGUF), n_ctx=CHUNK_SIZE) as session:
        chunks = imatrix_chunks(session, llama_cpp)
    assert len(chunks) == N_CHUNKS and all(len(c) == CHUNK_SIZE for c in chunks)
    out = capture_llama(fixture.GGUF, chunks, tmp_path / "t.zarr", seq_len=CHUNK_SIZE, flash_attn=False, kv_type="f32")
    captured = load_trace(out).counts()
    imatrix = read_input(IMATRIX, "imatrix")
    assert imatrix.layer_ids.tolist() == captured.layer_ids.tolist()
    np.testing.assert_array_equal(imatrix.values, captured.values)


# -- the pure core ------------------------------------------------------------------------------------
def test_expert_counts_prefers_gate_and_accepts_merged_gate_up():
    rows = {1: [3, 1, 0, 4], 0: [2, 2, 2, 2]}
    tensors = counts_tensors(rows, ("ffn_gate_up_exps", "ffn_down_exps"))
    tensors["blk.0.attn_q.weight.counts"] = np.array([[99.0]])  # dense weights are ignored
    layer_ids, values = expert_counts(tensors, "x")
    assert layer_ids == [0, 1] and values.tolist() == [rows[0], rows[1]] and values.dtype == np.int64


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"blk.0.attn_q.weight.counts": np.ones((1, 1))}, "without blk.N.ffn_*_exps.weight.counts"),
        ({"blk.0.ffn_up_exps.weight.counts": np.ones((1, 1))}, "one count for all experts"),
        ({"blk.0.ffn_up_exps.weight.counts": np.full((2, 1), 0.5)}, "not whole numbers"),
        (
            {**counts_tensors({0: [1, 3]}, ("ffn_gate_exps",)), **counts_tensors({0: [3, 1]}, ("ffn_down_exps",))},
            "blk.0.ffn_down_exps counts [3, 1] differ from blk.0.ffn_gate_exps counts [1, 3]",
        ),
        (counts_tensors({0: [2, 2], 1: [1, 1, 1, 1]}), "experts per layer [2, 4]"),
        (counts_tensors({0: [2, 2], 1: [1, 1]}), "selections per layer [4, 2]"),
    ],
)
def test_expert_counts_refuses_bad_tables(tensors, message):
    with pytest.raises(FormatError, match=r"^x: .*" + re.escape(message)):
        expert_counts(tensors, "x")


# -- bad files ----------------------------------------------------------------------------------------
def test_not_a_gguf(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("hello, not a gguf\n")
    assert not READERS["imatrix"].detect(path)
    with pytest.raises(FormatError, match="not the GGUF magic"):
        read_input(path, "imatrix")


def test_model_gguf_is_refused_with_the_fix(tmp_path):
    assert not READERS["imatrix"].detect(fixture.GGUF)
    with pytest.raises(MoescopeError, match="this is a model GGUF, not an imatrix; run llama-imatrix"):
        read_input(fixture.GGUF, "imatrix")
    untyped = write_gguf(tmp_path / "untyped.gguf", None, {"w": np.zeros(4)})
    with pytest.raises(FormatError, match=r"general\.type None.*this is a model GGUF"):
        read_input(untyped, "imatrix")
    adapter = write_gguf(tmp_path / "lora.gguf", "adapter", {"w": np.zeros(4)})
    with pytest.raises(FormatError, match=r"general\.type 'adapter', not 'imatrix'"):
        read_input(adapter, "imatrix")


def test_dense_imatrix_is_refused(tmp_path):
    tensors = {"blk.0.attn_q.weight.in_sum2": np.ones((1, 8)), "blk.0.attn_q.weight.counts": np.full((1, 1), 128.0)}
    path = write_gguf(tmp_path / "dense.imatrix.gguf", "imatrix", tensors, imatrix__chunk_count=1)
    assert READERS["imatrix"].detect(path)
    with pytest.raises(FormatError, match="a dense model"):
        read_input(path, "imatrix")


def test_inconsistent_layers_are_refused(tmp_path):
    tensors = counts_tensors({0: [1, 3, 0, 0], 1: [1, 3, 0]})
    path = write_gguf(tmp_path / "mixed.imatrix.gguf", "imatrix", tensors, imatrix__chunk_size=2)
    with pytest.raises(FormatError, match=r"experts per layer \[4, 3\]"):
        read_input(path)


def test_small_written_imatrix_round_trip(tmp_path):
    tensors = counts_tensors({3: [2, 0, 1, 1], 5: [0, 2, 2, 0]})
    path = write_gguf(tmp_path / "ok.imatrix.gguf", "imatrix", tensors, imatrix__chunk_count=2, imatrix__chunk_size=1)
    counts = read_input(path, options=ImportOptions(top_k=2))
    assert counts.layer_ids.tolist() == [3, 5] and counts.values.tolist() == [[2, 0, 1, 1], [0, 2, 2, 0]]
    meta = counts.meta.to_dict()
    assert meta["imatrix.chunk_count"] == 2 and meta["imatrix.chunk_size"] == 1 and meta["imatrix.datasets"] is None


def test_cli_import_imatrix(capsys, tmp_path):
    from conftest import run

    code, out, _ = run(capsys, "import", "imatrix", IMATRIX, "--json")
    assert code == 0 and json.loads(out)["kind"] == "counts"
    code, _, _ = run(capsys, "import", "imatrix", IMATRIX, "-o", tmp_path / "c.json")
    assert code == 0 and read_input(tmp_path / "c.json").values.sum() > 0
    code, _, err = run(capsys, "import", "parquet", IMATRIX)
    assert code == 2 and "unknown format 'parquet'" in err
