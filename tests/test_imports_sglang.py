"""Tests for the SGLang readers: CSV counts, per_token .pt dumps, stat .pt dumps (fixtures in tmp_path)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import moescope.imports.sglang as sg
from moescope.errors import FormatError, TraceError, UsageError
from moescope.imports.registry import READERS, ImportOptions, read_input
from moescope.trace import ExpertCounts, RoutingTrace

# ------------------------------------------------------------------------------------------------ CSV


def _csv(path: Path, rows: list[str], header: str = sg.CSV_HEADER) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def test_csv_counts_summed_over_rank_files(tmp_path):
    _csv(tmp_path / "expert_distribution_rank0_timestamp1712.5.csv", ["3,1,5", "1,0,2", "3,7,1"])
    _csv(tmp_path / "expert_distribution_rank1_timestamp1712.6.csv", ["3,1,4", "1,2,9"])
    assert READERS["sglang-csv"].detect(tmp_path)
    assert READERS["sglang-csv"].detect(tmp_path / "expert_distribution_rank0_timestamp1712.5.csv")
    counts = read_input(tmp_path, "sglang-csv", ImportOptions(n_experts=8, model="m"))
    assert isinstance(counts, ExpertCounts)
    assert counts.layer_ids.tolist() == [1, 3]
    assert counts.values.dtype == np.int64
    assert counts.values.tolist() == [[2, 0, 9, 0, 0, 0, 0, 0], [0, 9, 0, 0, 0, 0, 0, 1]]
    assert not counts.normalized and counts.mass == "counts" and counts.meta.model == "m"


def test_csv_needs_n_experts(tmp_path):
    f = _csv(tmp_path / "a.csv", ["0,1,1"])
    with pytest.raises(UsageError, match="pass --n-experts"):
        read_input(f, "sglang-csv", ImportOptions())


@pytest.mark.parametrize(
    ("rows", "header", "error", "match"),
    [
        (["0,1,1"], "layer,expert,count", FormatError, r"a\.csv:1: header is 'layer,expert,count'"),
        (["0,1,1", "UNKNOWN,2,3"], sg.CSV_HEADER, FormatError, r"a\.csv:3: 'UNKNOWN,2,3' is not layer_id,"),
        (["0,1"], sg.CSV_HEADER, FormatError, r"a\.csv:2: '0,1' is not layer_id,expert_id,count"),
        (["0,1,2", "0,2,-4"], sg.CSV_HEADER, FormatError, r"a\.csv:3: '0,2,-4' is not .* integers >= 0"),
        (["0,-1,2"], sg.CSV_HEADER, FormatError, r"a\.csv:2: '0,-1,2' is not .* integers >= 0"),
        (
            ["0,1,2", "1,1,2", "0,1,3"],
            sg.CSV_HEADER,
            FormatError,
            r"a\.csv:4: layer 0, expert 1 repeats line",
        ),
        (["0,1,2", "0,8,1"], sg.CSV_HEADER, TraceError, r"a\.csv:3: expert id 8 but --n-experts is 8"),
        ([], sg.CSV_HEADER, FormatError, "holds no count rows"),
    ],
)
def test_csv_bad_inputs(tmp_path, rows, header, error, match):
    f = _csv(tmp_path / "a.csv", rows, header)
    with pytest.raises(error, match=match):
        read_input(f, "sglang-csv", ImportOptions(n_experts=8))


def test_csv_detect_rejects_other_csv(tmp_path):
    f = _csv(tmp_path / "other.csv", ["1,2,3"], header="a,b,c")
    assert not sg.detect_csv(f)
    assert not sg.detect_csv(tmp_path)


# --------------------------------------------------------------------------------------------- .pt

needs_torch = pytest.mark.torch  # each .pt helper calls pytest.importorskip("torch"): CSV tests still run

N_LOG, K, EXTEND, DECODE, MIXED = 8, 6, 1, 2, 3
PHYS_MAP = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 0, 3]] * 3)  # slots 8, 9 replicate experts 0 and 3


def _routing(n_tok: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logical ``[tokens, 2, 6]`` routing and its physical ``[3, tokens, 8]`` dump (layer 0 dense)."""
    rng = np.random.default_rng(seed)
    logical = np.stack([rng.permutation(N_LOG)[:K] for _ in range(n_tok * 2)]).reshape(n_tok, 2, K)
    physical = logical.copy()
    replica = rng.random(logical.shape) < 0.5
    physical[(logical == 0) & replica] = 8
    physical[(logical == 3) & replica] = 9
    dump = np.full((3, n_tok, 8), -1, dtype=np.int32)
    dump[1:, :, :K] = physical.transpose(1, 0, 2)
    return logical, dump


def _record(fpid: int, mode: int, topk: np.ndarray, lens=None, positions=None, ids=None) -> dict:
    torch = pytest.importorskip("torch")
    n = topk.shape[1]
    return dict(
        forward_pass_id=fpid,
        rank=0,
        gatherer_key="primary",
        input_ids=list(range(100 + fpid, 100 + fpid + n)) if ids is None else ids,
        positions=list(range(n)) if positions is None else positions,
        extend_seq_lens=lens,
        forward_mode=mode,
        topk_ids_of_layer=torch.tensor(topk, dtype=torch.int32),
        misc_objects=[],
        global_physical_count=torch.zeros((3, 10), dtype=torch.int32),
    )


def _dump(path: Path, records: list[dict], phys_map: np.ndarray = PHYS_MAP) -> Path:
    torch = pytest.importorskip("torch")
    torch.save({"records": records, "last_physical_to_logical_map": torch.tensor(phys_map)}, path)
    return path


@needs_torch
def test_per_token_prefill(tmp_path):
    a, dump_a = _routing(5, 0)
    b, dump_b = _routing(4, 1)
    _, dump_d = _routing(1, 2)
    f = _dump(
        tmp_path / "expert_distribution_recorder_1712345678.25_0.pt",
        [
            _record(0, EXTEND, dump_a, lens=[3, 2]),
            _record(1, DECODE, dump_d, positions=[3]),
            _record(2, EXTEND, dump_b, lens=[4]),
            _record(3, MIXED, dump_b, lens=[4]),
        ],
    )
    assert READERS["sglang-pt"].detect(f) and not READERS["sglang-stat"].detect(f)
    trace = read_input(f, "sglang-pt", ImportOptions(model="dsv3"))
    assert isinstance(trace, RoutingTrace)
    np.testing.assert_array_equal(trace.experts, np.concatenate([a, b]))
    assert trace.n_experts == N_LOG and trace.top_k == K
    assert trace.layer_ids.tolist() == [1, 2]
    assert trace.seq_starts.tolist() == [0, 3, 5]
    assert trace.phase == "prefill" and trace.weights is None
    assert trace.meta.extra["skipped_records"] == {"DECODE": 1, "MIXED": 1}
    assert trace.meta.extra["dropped_dense_layers"] == [0]


@needs_torch
def test_per_token_decode_chains_positions_and_splits_files(tmp_path):
    logical, dump = _routing(6, 3)
    pos = [10, 11, 12, 13, 5, 6]
    recs = [_record(i, DECODE, dump[:, i : i + 1], positions=[p]) for i, p in enumerate(pos)]
    recs.insert(2, _record(9, EXTEND, dump[:, :2], lens=[2]))  # a new request's prefill ends the chain
    _dump(tmp_path / "expert_distribution_recorder_1712345678.25_0.pt", recs[:6])
    _dump(tmp_path / "expert_distribution_recorder_1712345678.25_1.pt", recs[6:])
    assert READERS["sglang-pt"].detect(tmp_path)
    trace = read_input(tmp_path, "sglang-pt", ImportOptions(phase="decode"))
    np.testing.assert_array_equal(trace.experts, logical)
    assert trace.seq_starts.tolist() == [0, 2, 4, 5]  # prefill between, position jump, new rank file
    assert trace.phase == "decode" and trace.meta.extra["skipped_records"] == {"EXTEND": 1}


@needs_torch
def test_per_token_batched_decode_is_refused(tmp_path):
    _, dump = _routing(2, 4)
    f = _dump(tmp_path / "d.pt", [_record(0, DECODE, dump, positions=[7, 9])])
    with pytest.raises(FormatError, match="decode batch of 2 requests; per-request order cannot be recovered"):
        read_input(f, "sglang-pt", ImportOptions(phase="decode"))


@needs_torch
def test_per_token_options(tmp_path):
    logical, dump = _routing(3, 5)
    f = _dump(tmp_path / "d.pt", [_record(0, EXTEND, dump, lens=[3])], phys_map=np.zeros((3, 10), int))
    np.save(tmp_path / "map.npy", PHYS_MAP)
    (tmp_path / "map.json").write_text(json.dumps(PHYS_MAP.tolist()))
    for name in ("map.npy", "map.json"):
        trace = read_input(f, "sglang-pt", ImportOptions(phys_to_log=tmp_path / name, n_experts=16))
        np.testing.assert_array_equal(trace.experts, logical)
        assert trace.n_experts == 16
    trace = read_input(f, "sglang-pt", ImportOptions(phys_to_log=tmp_path / "map.npy", moe_layers=(2,)))
    np.testing.assert_array_equal(trace.experts, logical[:, 1:])
    with pytest.raises(UsageError, match="--moe-layers 3 is out of range"):
        read_input(f, "sglang-pt", ImportOptions(moe_layers=(1, 3)))
    with pytest.raises(FormatError, match="token 0 at layer 0 has 0 routed experts but others have 6"):
        read_input(f, "sglang-pt", ImportOptions(phys_to_log=tmp_path / "map.npy", moe_layers=(0, 1)))
    np.save(tmp_path / "short.npy", PHYS_MAP[:, :8])
    with pytest.raises(FormatError, match=r"physical expert id 9, expected -1\.\.7"):
        read_input(f, "sglang-pt", ImportOptions(phys_to_log=tmp_path / "short.npy"))
    with pytest.raises(UsageError, match=r"--phys-to-log .* does not exist"):
        read_input(f, "sglang-pt", ImportOptions(phys_to_log=tmp_path / "missing.npy"))
    with pytest.raises(UsageError, match="--phase 'both' is not one of prefill, decode"):
        read_input(f, "sglang-pt", ImportOptions(phase="both"))
    with pytest.raises(TraceError, match="declares 7 experts"):
        read_input(f, "sglang-pt", ImportOptions(phys_to_log=tmp_path / "map.npy", n_experts=7))


@needs_torch
def test_per_token_bad_dumps(tmp_path):
    _, dump = _routing(3, 6)
    f = _dump(tmp_path / "a.pt", [_record(0, EXTEND, dump, lens=[2])])
    with pytest.raises(FormatError, match=r"record 0: extend_seq_lens \[2\] do not sum to its 3 tokens"):
        read_input(f, "sglang-pt", ImportOptions())
    f = _dump(tmp_path / "b.pt", [_record(0, DECODE, dump[:, :1], positions=[0])])
    with pytest.raises(FormatError, match=r"has no prefill tokens \(skipped: \{'DECODE': 1\}\)"):
        read_input(f, "sglang-pt", ImportOptions())
    (tmp_path / "c.pt").write_bytes(b"not a torch file")
    with pytest.raises(FormatError, match=r"not a torch\.save file"):
        read_input(tmp_path / "c.pt", "sglang-pt", ImportOptions())
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match=r"holds no expert_distribution_recorder_<time>_<rank>\.pt files"):
        read_input(tmp_path / "empty", "sglang-pt", ImportOptions())


@needs_torch
def test_tensor_parallel_duplicates_are_refused(tmp_path):
    _, dump = _routing(3, 7)
    for rank in (0, 1):
        _dump(tmp_path / f"expert_distribution_recorder_1.5_{rank}.pt", [_record(0, EXTEND, dump, lens=[3])])
    with pytest.raises(FormatError, match=r"hold the same tokens \(tensor-parallel ranks\): read one"):
        read_input(tmp_path, "sglang-pt", ImportOptions())


CALLED: list[str] = []


def _side_effect() -> str:
    CALLED.append("unpickled")
    return "boom"


class Payload:
    """Unpickling this object would call `_side_effect`: a weights-only load must refuse it."""

    def __reduce__(self):
        return (_side_effect, ())


@needs_torch
def test_pickled_object_is_refused_not_executed(tmp_path):
    torch = pytest.importorskip("torch")
    f = tmp_path / "expert_distribution_recorder_1.5_0.pt"
    torch.save({"records": [Payload()], "last_physical_to_logical_map": torch.tensor(PHYS_MAP)}, f)
    with pytest.raises(FormatError, match=r"_side_effect\) that a weights-only load refuses"):
        read_input(f, "sglang-pt", ImportOptions())
    assert CALLED == []


def _stat(path: Path, counts: np.ndarray) -> Path:
    torch = pytest.importorskip("torch")
    torch.save(
        {
            "rank": 0,
            "logical_count": torch.tensor(counts, dtype=torch.int32),
            "average_utilization_rate_over_window": None,
        },
        path,
    )
    return path


@needs_torch
def test_stat_dumps(tmp_path):
    rng = np.random.default_rng(8)
    a = rng.integers(0, 5, (3, 3, N_LOG))
    a[:, 0] = 0  # dense layer
    b = rng.integers(0, 5, (2, 3, N_LOG))
    b[:, 0] = 0
    fa = _stat(tmp_path / "expert_distribution_recorder_1712345678.5.pt", a)
    _stat(tmp_path / "expert_distribution_recorder_1712345679.5.pt", b)
    assert READERS["sglang-stat"].detect(fa) and not READERS["sglang-pt"].detect(fa)
    assert READERS["sglang-stat"].detect(tmp_path)
    counts = read_input(tmp_path, "sglang-stat", ImportOptions(model="m"))
    assert isinstance(counts, ExpertCounts)
    assert counts.layer_ids.tolist() == [1, 2]
    np.testing.assert_array_equal(counts.values, (a.sum(0) + b.sum(0))[1:])
    counts = read_input(fa, "sglang-stat", ImportOptions(moe_layers=(0, 2)))
    np.testing.assert_array_equal(counts.values, a.sum(0)[[0, 2]])


@needs_torch
def test_stat_and_per_token_point_to_each_other(tmp_path):
    fs = _stat(tmp_path / "s.pt", np.ones((1, 3, N_LOG), int))
    with pytest.raises(FormatError, match=r"not a per_token dump .*--from sglang-stat"):
        read_input(fs, "sglang-pt", ImportOptions())
    _, dump = _routing(3, 9)
    fp = _dump(tmp_path / "p.pt", [_record(0, EXTEND, dump, lens=[3])])
    with pytest.raises(FormatError, match=r"no logical_count .*--from sglang-pt"):
        read_input(fp, "sglang-stat", ImportOptions())


@needs_torch
def test_pt_readers_do_not_touch_input(tmp_path):
    _, dump = _routing(3, 10)
    f = _dump(tmp_path / "expert_distribution_recorder_1.5_0.pt", [_record(0, EXTEND, dump, lens=[3])])
    before = f.read_bytes()
    read_input(f, "sglang-pt", ImportOptions())
    assert f.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [f.name]
