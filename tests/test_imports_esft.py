"""Tests for the ESFT routing-log reader and writer (fixtures built in tmp_path)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import moescope.imports.esft as esft
from moescope.errors import FormatError, OutputExistsError, TraceError, UsageError
from moescope.imports.registry import READERS, WRITERS, ImportOptions, read_input, write_output
from moescope.trace import RoutingTrace

OPTS = ImportOptions(n_experts=8, top_k=2)

# two sequences (3 tokens, 1 token) at layers 1 and 3, k=2, written the way ESFT writes them
LAYER_1 = "0\t1\t2\t3\t4\t5\t\t0.5\t0.25\t0.4521\t0.1\t1.0\t0.0\n6\t7\t\t0.0012\t0.9988\n"
LAYER_3 = "7\t6\t5\t4\t3\t2\t\t0.3\t0.2\t0.1\t0.6\t0.5\t0.5\n1\t0\t\t0.75\t0.25\n"


def _write(folder: Path, files: dict[int, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for layer, text in files.items():
        (folder / f"expert_weights_{layer}.txt").write_text(text, encoding="utf-8", newline="\n")
    return folder


def _tiny_trace(labels: list[str] | None = None) -> RoutingTrace:
    rng = np.random.default_rng(0)
    n_tok, n_lay, k, n_exp = 7, 2, 2, 8
    experts = np.stack([rng.permutation(n_exp)[:k] for _ in range(n_tok * n_lay)]).reshape(n_tok, n_lay, k)
    weights = np.round(rng.random((n_tok, n_lay, k)), 4).astype(np.float32)
    return RoutingTrace(experts, n_exp, weights=weights, seq_starts=[0, 3, 5], seq_labels=labels, layer_ids=[2, 5])


def test_hand_written_fixture(tmp_path):
    folder = _write(tmp_path / "logs", {3: LAYER_3, 1: LAYER_1})
    assert READERS["esft"].detect(folder)
    trace = read_input(folder, "esft", ImportOptions(n_experts=8, top_k=2, model="tiny"))
    assert trace.experts.shape == (4, 2, 2)
    assert trace.layer_ids.tolist() == [1, 3]
    assert trace.seq_starts.tolist() == [0, 3]
    assert trace.seq_labels is None
    assert trace.weights.dtype == np.float32
    assert trace.experts[:, 0].tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert trace.experts[:, 1].tolist() == [[7, 6], [5, 4], [3, 2], [1, 0]]
    np.testing.assert_array_equal(trace.weights[1, 0], np.float32([0.4521, 0.1]))
    assert trace.meta.model == "tiny"
    assert trace.phase == "prefill"


def test_text_trace_text_is_byte_identical(tmp_path):
    src = _write(tmp_path / "logs", {1: LAYER_1, 3: LAYER_3})
    trace = read_input(src, "esft", OPTS)
    out = write_output(trace, tmp_path / "again", "esft")
    for layer in (1, 3):
        name = f"expert_weights_{layer}.txt"
        assert (out / name).read_bytes() == (src / name).read_bytes()


def test_writer_reader_round_trip(tmp_path):
    trace = _tiny_trace()
    out = esft.write_esft(trace, tmp_path / "out", False)
    assert sorted(p.name for p in out.iterdir()) == ["expert_weights_2.txt", "expert_weights_5.txt"]
    back = read_input(out, "esft", OPTS)
    assert back.equals(trace, check_meta=False)


def test_labels_become_task_folders_and_back(tmp_path):
    trace = _tiny_trace(["intent", "intent", "law"])
    out = write_output(trace, tmp_path / "tasks", "esft")
    assert sorted(p.name for p in out.iterdir()) == ["intent", "law"]
    assert READERS["esft"].detect(out)
    back = read_input(out, "esft", OPTS)
    assert back.equals(trace, check_meta=False)
    assert back.labels() == ["intent", "law"]


def test_rank_layout_concatenates_in_numeric_rank_order(tmp_path):
    root = tmp_path / "run"
    _write(root / "rank_10", {1: "4\t5\t\t0.5\t0.5\n", 2: "0\t1\t\t0.5\t0.5\n"})
    two = "0.1\t0.2\t0.3\t0.4\n"
    _write(root / "rank_2", {1: "0\t1\t2\t3\t\t" + two, 2: "6\t7\t5\t4\t\t" + two})
    assert READERS["esft"].detect(root)
    trace = read_input(root, "esft", OPTS)
    assert trace.seq_starts.tolist() == [0, 2]
    assert trace.experts[:, 0].tolist() == [[0, 1], [2, 3], [4, 5]]


def test_task_layout_with_rank_folders(tmp_path):
    root = tmp_path / "expert_scores"
    _write(root / "summary" / "rank_0", {1: LAYER_1, 3: LAYER_3})
    _write(root / "intent", {1: "0\t1\t\t0.5\t0.5\n", 3: "2\t3\t\t0.5\t0.5\n"})
    (root / "notes").mkdir()  # a folder without logs is not a task
    trace = read_input(root, "esft", OPTS)
    assert trace.seq_labels.tolist() == ["intent", "summary", "summary"]
    assert trace.seq_starts.tolist() == [0, 1, 4]


def test_detect_rejects_other_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "x.txt").write_text("hi")
    assert not esft.detect_esft(tmp_path / "empty")
    assert not esft.detect_esft(tmp_path / "x.txt")


@pytest.mark.parametrize(
    ("options", "flag"),
    [(ImportOptions(n_experts=8), "--top-k"), (ImportOptions(top_k=2), "--n-experts")],
)
def test_missing_options(tmp_path, options, flag):
    folder = _write(tmp_path / "logs", {1: LAYER_1})
    with pytest.raises(UsageError, match=f"pass {flag}.*DeepSeek-V2-Lite"):
        read_input(folder, "esft", options)


def test_bad_top_k_value(tmp_path):
    folder = _write(tmp_path / "logs", {1: LAYER_1})
    with pytest.raises(UsageError, match="--top-k is 0"):
        read_input(folder, "esft", ImportOptions(n_experts=8, top_k=0))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("0\t1\t0.5\t0.5\n", r"expert_weights_1\.txt:1: found 0 double tabs"),
        ("0\t1\t\t0.5\t0.5\n0\tx\t\t0.5\t0.5\n", r"expert_weights_1\.txt:2: expert id 'x' is not a number"),
        ("0\t1\t2\t\t0.5\t0.5\t0.1\n", r"expert_weights_1\.txt:1: 3 expert ids is not a multiple of top-k 2"),
        ("0\t1\t\t0.5\n", r":1: 2 expert ids but 1 gate weights"),
        ("0\t1\t\t0.5\tnan\n", r":1: gate weight nan is negative or not finite"),
        ("", r"expert_weights_1\.txt is empty"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, text, match):
    folder = _write(tmp_path / "logs", {1: text})
    with pytest.raises(FormatError, match=match):
        read_input(folder, "esft", OPTS)


def test_mismatched_line_counts_between_layers(tmp_path):
    folder = _write(tmp_path / "logs", {1: LAYER_1, 3: LAYER_3.split("\n")[0] + "\n"})
    with pytest.raises(FormatError, match=r"_3\.txt has 1 lines but expert_weights_1\.txt has 2"):
        read_input(folder, "esft", OPTS)


def test_mismatched_token_counts_between_layers(tmp_path):
    folder = _write(tmp_path / "logs", {1: LAYER_1, 3: "1\t2\t\t0.5\t0.5\n1\t0\t\t0.75\t0.25\n"})
    with pytest.raises(FormatError, match=r"_3\.txt:1 has 2 expert ids but expert_weights_1\.txt:1"):
        read_input(folder, "esft", OPTS)


def test_id_out_of_range_is_a_trace_error(tmp_path):
    folder = _write(tmp_path / "logs", {1: "0\t9\t\t0.5\t0.5\n"})
    with pytest.raises(TraceError, match="expert id 9 but the trace declares 8 experts"):
        read_input(folder, "esft", OPTS)


def test_empty_folder_and_file_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match=r"is not a folder holding expert_weights_<L>\.txt"):
        read_input(tmp_path / "empty", "esft", OPTS)
    (tmp_path / "f.txt").write_text("0\t1\t\t0.5\t0.5\n")
    with pytest.raises(FormatError, match=r"f\.txt is not a folder holding"):
        read_input(tmp_path / "f.txt", "esft", OPTS)


def test_reader_does_not_touch_input(tmp_path):
    folder = _write(tmp_path / "logs", {1: LAYER_1, 3: LAYER_3})
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    read_input(folder, "esft", OPTS)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_writer_refusals_and_atomicity(tmp_path):
    trace = _tiny_trace()
    with pytest.raises(UsageError, match="need gate weights but this trace has none"):
        esft.write_esft(trace.replace(weights=None), tmp_path / "a", False)
    with pytest.raises(UsageError, match="label 'rank_0' cannot be an ESFT task folder"):
        esft.write_esft(trace.replace(seq_labels=["a", "rank_0", "a"]), tmp_path / "b", False)
    out = esft.write_esft(trace, tmp_path / "c", False)
    with pytest.raises(OutputExistsError):
        esft.write_esft(trace, out, False)
    esft.write_esft(trace.replace(layer_ids=[7, 9]), out, True)
    assert sorted(p.name for p in out.iterdir()) == ["expert_weights_7.txt", "expert_weights_9.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert WRITERS["esft"].suffixes == ()


@pytest.mark.realdata
@pytest.mark.slow
def test_real_dsv2lite_trace_round_trips_through_text(realdata, tmp_path):
    z = np.load(realdata / "esft-dsv2lite" / "trace.npz", allow_pickle=False)
    meta = json.loads(str(z["meta"]))
    trace = RoutingTrace(
        z["experts"],
        meta["n_experts"],
        weights=z["weights"],
        seq_starts=z["seq_starts"],
        layer_ids=meta["layer_ids"],
    )
    out = esft.write_esft(trace, tmp_path / "logs", False)
    back = read_input(out, "esft", ImportOptions(n_experts=64, top_k=6))
    assert np.array_equal(back.experts, trace.experts) and np.array_equal(back.seq_starts, trace.seq_starts)
    assert back.layer_ids.tolist() == list(range(1, 27))
    np.testing.assert_allclose(back.weights, trace.weights.astype(np.float32), atol=1e-4)
    again = esft.write_esft(back, tmp_path / "again", False)
    assert all((out / p.name).read_bytes() == p.read_bytes() for p in again.iterdir())
