"""Tests for the vLLM routed-experts reader (fixtures built in tmp_path)."""

from __future__ import annotations

import numpy as np
import pytest

import moescope.imports.vllm as vllm
from moescope.errors import FormatError, TraceError, UsageError
from moescope.imports.registry import READERS, ImportOptions, read_input

OPTS = ImportOptions(n_experts=8)


def _routing(n_tok: int, seed: int, n_layers: int = 3, k: int = 2, dense: tuple = (0,)) -> np.ndarray:
    """``[tokens, n_layers, k]`` int32 ids with distinct experts per token; `dense` layers read all 0."""
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.permutation(8)[:k] for _ in range(n_tok * n_layers)]).reshape(n_tok, n_layers, k)
    ids[:, list(dense)] = 0
    return ids.astype(np.int32)


def test_npy_with_dense_layer_and_cached_tokens(tmp_path):
    ids = _routing(6, 0)
    ids[:2] = -1  # prefix-cached: no routing computed (all layers, as vLLM returns it)
    ids[4, 2, 1] = -1  # one partially cached token
    f = tmp_path / "prompt_routed_experts.npy"
    np.save(f, ids)
    assert READERS["vllm"].detect(f)
    trace = read_input(f, "vllm", ImportOptions(n_experts=8, model="qwen3", phase="decode"))
    np.testing.assert_array_equal(trace.experts, ids[[2, 3, 5]][:, 1:])
    assert trace.layer_ids.tolist() == [1, 2]
    assert trace.seq_starts.tolist() == [0]
    assert trace.phase == "decode" and trace.weights is None and trace.meta.model == "qwen3"
    assert trace.meta.extra == {"dropped_dense_layers": [0], "dropped_cached_tokens": 3}


def test_npz_of_sequences_in_file_order(tmp_path):
    seqs = {"req-b": _routing(3, 1), "req-a": _routing(2, 2), "cached": _routing(2, 3), "c": _routing(4, 4)}
    seqs["cached"][:, 1:] = -1  # fully prefix-cached: the sequence disappears
    f = tmp_path / "routed.npz"
    np.savez(f, **seqs)
    assert READERS["vllm"].detect(f)
    trace = read_input(f, "vllm", OPTS)
    expected = np.concatenate([seqs["req-b"], seqs["req-a"], seqs["c"]])[:, 1:]
    np.testing.assert_array_equal(trace.experts, expected)
    assert trace.seq_starts.tolist() == [0, 3, 5]
    assert trace.seq_labels is None and trace.phase == "prefill"
    assert trace.meta.extra["dropped_cached_tokens"] == 2


def test_moe_layers_override_and_k1_keeps_zero_layers(tmp_path):
    ids = _routing(4, 5, n_layers=4, dense=(0, 2))
    f = tmp_path / "r.npy"
    np.save(f, ids)
    trace = read_input(f, "vllm", ImportOptions(n_experts=8, moe_layers=(3, 1)))
    assert trace.layer_ids.tolist() == [3, 1]
    np.testing.assert_array_equal(trace.experts, ids[:, [3, 1]])
    assert trace.meta.extra["dropped_dense_layers"] == [0, 2]
    with pytest.raises(UsageError, match="--moe-layers 4 is out of range"):
        read_input(f, "vllm", ImportOptions(n_experts=8, moe_layers=(1, 4)))
    with pytest.raises(UsageError, match="repeats a layer"):
        read_input(f, "vllm", ImportOptions(n_experts=8, moe_layers=(1, 1)))
    np.save(f, ids[:, :, :1])  # k = 1: a layer reading 0 may be real routing, so it is kept
    assert read_input(f, "vllm", OPTS).layer_ids.tolist() == [0, 1, 2, 3]


def test_detect_leaves_moescope_npz_and_others_alone(tmp_path):
    own = tmp_path / "trace.npz"
    np.savez(own, experts=_routing(2, 6), seq_starts=np.array([0]))
    assert not vllm.detect_vllm(own)
    two_d = tmp_path / "flat.npy"
    np.save(two_d, np.zeros((3, 4), np.int32))
    assert not vllm.detect_vllm(two_d)
    floats = tmp_path / "f.npz"
    np.savez(floats, a=np.zeros((2, 2, 2)))
    assert not vllm.detect_vllm(floats)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    assert not vllm.detect_vllm(tmp_path / "junk.npz")
    assert not vllm.detect_vllm(tmp_path)


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.zeros((3, 4), np.int32), r"array 'x' has shape \(3, 4\) and dtype int32, expected \[tokens"),
        (np.zeros((3, 2, 2), np.float32), r"array 'x' has shape \(3, 2, 2\) and dtype float32"),
        (np.array([None, 1], dtype=object), r"\(x\) cannot be loaded as plain numpy arrays"),
    ],
)
def test_bad_arrays(tmp_path, array, match):
    f = tmp_path / "bad.npz"
    np.savez(f, ok=_routing(2, 7), x=array)
    with pytest.raises(FormatError, match=match):
        read_input(f, "vllm", OPTS)


def test_object_npy_is_refused_without_unpickling(tmp_path):
    f = tmp_path / "obj.npy"
    np.save(f, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert not vllm.detect_vllm(f)
    with pytest.raises(FormatError, match="object arrays need pickle"):
        read_input(f, "vllm", OPTS)


def test_missing_n_experts_and_out_of_range(tmp_path):
    f = tmp_path / "r.npy"
    np.save(f, _routing(3, 8))
    with pytest.raises(UsageError, match="pass --n-experts"):
        read_input(f, "vllm", ImportOptions())
    with pytest.raises(TraceError, match="expert id 7 but the trace declares 6 experts"):
        read_input(f, "vllm", ImportOptions(n_experts=6))


def test_inconsistent_or_empty_inputs(tmp_path):
    f = tmp_path / "mixed.npz"
    np.savez(f, a=_routing(2, 9), b=_routing(2, 10, n_layers=4))
    with pytest.raises(FormatError, match=r"array 'b' has \[layers, top_k\] \(4, 2\) but 'a' has \(3, 2\)"):
        read_input(f, "vllm", OPTS)
    empty = tmp_path / "empty.npz"
    np.savez(empty)
    with pytest.raises(FormatError, match="holds no arrays"):
        read_input(empty, "vllm", OPTS)
    zeros = tmp_path / "zeros.npy"
    np.save(zeros, np.zeros((2, 3, 2), np.int16))
    with pytest.raises(FormatError, match="looks dense"):
        read_input(zeros, "vllm", OPTS)
    cached = tmp_path / "cached.npy"
    np.save(cached, np.full((2, 3, 2), -1, np.int16))
    with pytest.raises(FormatError, match="no token with routing in every kept layer"):
        read_input(cached, "vllm", OPTS)


def test_reader_does_not_touch_input(tmp_path):
    f = tmp_path / "r.npy"
    np.save(f, _routing(3, 12))
    before = f.read_bytes()
    read_input(f, "vllm", OPTS)
    assert f.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["r.npy"]
