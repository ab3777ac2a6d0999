"""The Zarr trace store: round trips, chunked reads, the commit protocol, atomic writes."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from conftest import random_trace
from moescope.errors import FormatError, OutputExistsError, TraceError, UsageError
from moescope.store import TraceStore, TraceWriter, default_chunk_tokens, is_store, load_trace, save_trace
from moescope.trace import expert_mass


@pytest.mark.parametrize("chunk_tokens", [7, 16, 1000])
@pytest.mark.parametrize("weights", [None, "float16", "float32"])
def test_roundtrip_exact(tmp_path, chunk_tokens, weights):
    tr = random_trace(n_tokens=97, n_layers=3, n_experts=16, k=4, n_seq=9, weights=weights)
    save_trace(tr, tmp_path / "t.zarr", chunk_tokens=chunk_tokens)
    back = load_trace(tmp_path / "t.zarr")
    assert back.equals(tr)
    assert [p.name for p in tmp_path.iterdir()] == ["t.zarr"]  # no temp folder left


@pytest.mark.parametrize("chunk_tokens", [7, 1000])
def test_token_ids_roundtrip_and_chunked_reads(tmp_path, chunk_tokens):
    tr = random_trace(n_tokens=97, n_seq=9, token_ids=True)
    save_trace(tr, tmp_path / "t.zarr", chunk_tokens=chunk_tokens)
    store = TraceStore(tmp_path / "t.zarr")
    assert store.has_token_ids and store.summary()["has_token_ids"]
    assert load_trace(tmp_path / "t.zarr").equals(tr)
    chunks = [c.trace.token_ids for c in store.iter_chunks(chunk_tokens=10)]
    np.testing.assert_array_equal(np.concatenate(chunks), tr.token_ids)
    plain = random_trace(n_tokens=20)
    save_trace(plain, tmp_path / "p.zarr")
    assert not TraceStore(tmp_path / "p.zarr").has_token_ids and load_trace(tmp_path / "p.zarr").token_ids is None


def test_writer_token_ids_all_or_none(tmp_path):
    tr = random_trace(n_tokens=20, n_seq=1, labels=False, weights=None, token_ids=True)
    kw = {"n_experts": 8, "n_layers": 2, "top_k": 2}
    with TraceWriter(tmp_path / "a.zarr", token_ids=True, **kw) as w:
        with pytest.raises(TraceError, match=r"keeps the extra arrays \['token_ids'\] but the block gives none"):
            w.append(tr.experts[:5])
        with pytest.raises(TraceError, match=r"token_ids has shape \(4,\), expected \[tokens\] with 5 tokens"):
            w.append(tr.experts[:5], token_ids=tr.token_ids[:4])
        w.append(tr.experts[:5], token_ids=tr.token_ids[:5])
        w.append(tr.experts[5:], token_ids=tr.token_ids[5:], seq_starts=[])
    np.testing.assert_array_equal(load_trace(tmp_path / "a.zarr").token_ids, tr.token_ids)
    with TraceWriter(tmp_path / "b.zarr", **kw) as w, pytest.raises(TraceError, match=r"keeps the extra arrays none"):
        w.append(tr.experts, token_ids=tr.token_ids)


def test_chunks_cover_trace_and_carry_sequences(tmp_path):
    tr = random_trace(n_tokens=100, n_seq=7)
    save_trace(tr, tmp_path / "t.zarr", chunk_tokens=16)
    store = TraceStore(tmp_path / "t.zarr")
    chunks = list(store.iter_chunks(chunk_tokens=13))
    assert [c.start for c in chunks] == list(range(0, 100, 13))
    np.testing.assert_array_equal(np.concatenate([c.trace.experts for c in chunks]), tr.experts)
    total = sum(expert_mass(c.trace.experts, 8) for c in chunks)
    np.testing.assert_array_equal(total, tr.counts().values)
    for c in chunks:
        seq_of_first = int(np.searchsorted(tr.seq_starts, c.start, side="right")) - 1
        assert c.first_sequence == seq_of_first
        assert c.continues == (tr.seq_starts[seq_of_first] < c.start)
        starts_inside = tr.seq_starts[(tr.seq_starts >= c.start) & (tr.seq_starts < c.start + c.trace.n_tokens)]
        expected = ([0] if c.continues else []) + (starts_inside - c.start).tolist()
        assert c.trace.seq_starts.tolist() == expected
        assert c.trace.seq_labels.tolist() == tr.seq_labels[seq_of_first : seq_of_first + len(expected)].tolist()


def test_read_layers_by_model_id(tmp_path):
    tr = random_trace(n_layers=3)
    save_trace(tr, tmp_path / "t.zarr")
    sub = load_trace(tmp_path / "t.zarr", layers=[3, 1])
    assert sub.layer_ids.tolist() == [3, 1]
    np.testing.assert_array_equal(sub.experts, tr.experts[:, [2, 0]])
    with pytest.raises(Exception, match=r"layer\(s\) \[7\] are not in this trace"):
        load_trace(tmp_path / "t.zarr", layers=[7])


def test_streaming_writer_blocks_continue_sequences(tmp_path):
    tr = random_trace(n_tokens=60, n_seq=5)
    with TraceWriter(
        tmp_path / "s.zarr",
        n_experts=8,
        n_layers=2,
        top_k=2,
        layer_ids=[1, 2],
        weights_dtype="float32",
        chunk_tokens=8,
        meta=tr.meta,
    ) as w:
        # feed in blocks that cut sequences anywhere
        for lo in range(0, 60, 11):
            hi = min(60, lo + 11)
            mask = (tr.seq_starts >= lo) & (tr.seq_starts < hi)
            w.append(
                tr.experts[lo:hi],
                tr.weights[lo:hi],
                seq_starts=tr.seq_starts[mask] - lo,
                labels=tr.seq_labels[mask].tolist(),
            )
    assert load_trace(tmp_path / "s.zarr").equals(tr)
    assert TraceStore(tmp_path / "s.zarr").complete


def test_interrupted_capture_keeps_committed_chunks(tmp_path):
    tr = random_trace(n_tokens=64, n_seq=4, weights=None, labels=False)
    path = tmp_path / "cap.zarr"
    w = TraceWriter(path, n_experts=8, n_layers=2, top_k=2, chunk_tokens=16, atomic=False)
    w.append(tr.experts[:40])  # 2 full chunks committed, 8 tokens buffered
    assert is_store(path)
    mid = TraceStore(path)  # a reader while the capture runs
    assert mid.n_tokens == 32 and not mid.complete
    np.testing.assert_array_equal(mid.to_trace().experts, tr.experts[:32])
    del w  # the process "dies": buffered tokens are lost, nothing corrupt
    after = TraceStore(path)
    assert after.n_tokens == 32 and not after.complete
    assert after.to_trace().n_sequences == 1


def test_timed_commits_make_a_slow_capture_visible(tmp_path, monkeypatch):
    """commit_seconds: buffered tokens are committed (a partial chunk) once that long has passed; the chunk
    is rewritten whole as more tokens come, and the final store is the trace."""
    import moescope.store as store_mod

    clock = [100.0]
    monkeypatch.setattr(store_mod.time, "monotonic", lambda: clock[0])
    tr = random_trace(n_tokens=64, n_seq=4, weights="float16", labels=True)
    path = tmp_path / "cap.zarr"
    w = TraceWriter(path, n_experts=8, n_layers=2, top_k=2, layer_ids=tr.layer_ids, chunk_tokens=16,
                    weights_dtype="float16", atomic=False, commit_seconds=30.0)  # fmt: skip
    cuts = [0, 5, 9, 20, 23, 50, 64]
    seen = []
    for lo, hi in itertools.pairwise(cuts):
        inside = (tr.seq_starts >= lo) & (tr.seq_starts < hi)
        clock[0] += 31.0 if hi in (9, 23) else 1.0  # a slow moment before these blocks
        w.append(tr.experts[lo:hi], tr.weights[lo:hi], seq_starts=tr.seq_starts[inside] - lo,
                 labels=tr.seq_labels[inside].tolist())  # fmt: skip
        seen.append(TraceStore(path).n_tokens)
    # timed commits of everything buffered after the slow moments (9, 23: mid-chunk); otherwise a commit
    # waits for a chunk's worth of buffered tokens and stops at a chunk boundary (48, 64)
    assert seen == [0, 9, 9, 23, 48, 64]
    mid = TraceStore(path)
    assert not mid.complete
    np.testing.assert_array_equal(mid.to_trace().weights, tr.weights)  # partial chunks rewritten whole
    w.close()
    assert load_trace(path).equals(tr, check_meta=False)
    with pytest.raises(UsageError, match="commit_seconds"):
        TraceWriter(tmp_path / "x.zarr", n_experts=8, n_layers=2, top_k=2, commit_seconds=-1)


def test_failed_block_in_capture_commits_what_was_valid(tmp_path):
    tr = random_trace(n_tokens=20, n_seq=1, weights=None, labels=False)
    path = tmp_path / "cap.zarr"
    bad = tr.experts[:5].copy()
    bad[2, 0, 0] = 99
    with (
        pytest.raises(TraceError, match="token 12, layer index 0, slot 0 has expert id 99"),
        TraceWriter(path, n_experts=8, n_layers=2, top_k=2, chunk_tokens=16, atomic=False) as w,
    ):
        w.append(tr.experts[:10])
        w.append(bad, seq_starts=[])
    store = TraceStore(path)
    assert store.n_tokens == 10 and not store.complete


def test_atomic_writer_leaves_nothing_on_error(tmp_path):
    tr = random_trace(n_tokens=20, weights=None, labels=False)
    with (
        pytest.raises(RuntimeError),
        TraceWriter(tmp_path / "a.zarr", n_experts=8, n_layers=2, top_k=2, chunk_tokens=4) as w,
    ):
        w.append(tr.experts)
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_rules(tmp_path):
    tr = random_trace()
    save_trace(tr, tmp_path / "t.zarr")
    with pytest.raises(OutputExistsError, match="already exists; pass --overwrite"):
        save_trace(tr, tmp_path / "t.zarr")
    other = random_trace(seed=5)
    save_trace(other, tmp_path / "t.zarr", overwrite=True)
    assert load_trace(tmp_path / "t.zarr").equals(other)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.zarr"]


@pytest.mark.parametrize(
    ("kwargs", "block", "match"),
    [
        ({}, np.zeros((3, 2)), r"appended experts have shape \(3, 2\), expected \[n, 2, 2\]"),
        ({}, "first-without-start", r"first block must start a sequence"),
        ({"weights_dtype": "float16"}, "no-weights", r"this store has gate weights"),
    ],
)
def test_writer_rejects_bad_blocks(tmp_path, kwargs, block, match):
    tr = random_trace(weights=None, labels=False)
    with (
        pytest.raises(TraceError, match=match),
        TraceWriter(tmp_path / "w.zarr", n_experts=8, n_layers=2, top_k=2, **kwargs) as w,
    ):
        if isinstance(block, str):
            w.append(tr.experts[:5], seq_starts=[] if block == "first-without-start" else (0,))
        else:
            w.append(block)
    assert list(tmp_path.iterdir()) == []


def test_labels_all_or_none(tmp_path):
    tr = random_trace(weights=None, labels=False)
    with (
        pytest.raises(TraceError, match="label every sequence or none"),
        TraceWriter(tmp_path / "w.zarr", n_experts=8, n_layers=2, top_k=2) as w,
    ):
        w.append(tr.experts[:5], labels=["a"])
        w.append(tr.experts[5:9])


def test_not_a_store(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(FormatError, match="is not a moescope trace store"):
        TraceStore(tmp_path / "x")
    (tmp_path / "x" / "zarr.json").write_text("{not json")
    assert not is_store(tmp_path / "x")
    (tmp_path / "y.zarr").mkdir()
    with pytest.raises(FormatError, match=r"trace convert SOURCE y\.zarr$"):  # not y.zarr.zarr
        TraceStore(tmp_path / "y.zarr")
    with pytest.raises(UsageError, match=r"follow2\.zarr' does not exist"):
        TraceStore(tmp_path / "follow2.zarr")


def test_newer_version_refused(tmp_path):
    save_trace(random_trace(), tmp_path / "t.zarr")
    meta = json.loads((tmp_path / "t.zarr" / "zarr.json").read_text())
    meta["attributes"]["moescope"]["version"] = 99
    (tmp_path / "t.zarr" / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(FormatError, match="newer than this moescope reads"):
        TraceStore(tmp_path / "t.zarr")


def test_default_chunking_targets_8mib():
    assert default_chunk_tokens(26, 6) == 16384
    assert default_chunk_tokens(48, 8) * 48 * 8 * 2 <= 8 << 20
    assert default_chunk_tokens(1, 1) == 1 << 20


@pytest.mark.parametrize("chunk_tokens", [7, 1000])
def test_extras_roundtrip_chunks_and_layers(tmp_path, chunk_tokens):
    """Lookahead and candidates (layered extras) survive the store, chunked reads and a layer selection."""
    tr = random_trace(n_tokens=60, n_layers=3, n_experts=8, k=2, n_seq=4, token_ids=True, lookahead=2, candidates=4)
    save_trace(tr, tmp_path / "t.zarr", chunk_tokens=chunk_tokens)
    store = TraceStore(tmp_path / "t.zarr")
    assert set(store.extras) == {"token_ids", "lookahead", "candidates", "candidate_probs"}
    assert store.summary()["extras"]["lookahead"] == [3, 2, 2]
    assert load_trace(tmp_path / "t.zarr").equals(tr)
    sub = load_trace(tmp_path / "t.zarr", layers=[3, 1])
    assert (sub.extras["lookahead"] == -1).all()  # re-indexed (trace.extras_at_layers): no later layer kept
    gap = load_trace(tmp_path / "t.zarr", layers=[1, 3]).extras["lookahead"]
    np.testing.assert_array_equal(gap[:, 0, 0], tr.extras["lookahead"][:, 0, 1])
    np.testing.assert_array_equal(sub.extras["candidates"], tr.extras["candidates"][:, [2, 0]])
    np.testing.assert_array_equal(sub.token_ids, tr.token_ids)
    parts = [c.trace.extras["candidate_probs"] for c in store.iter_chunks(chunk_tokens=11)]
    np.testing.assert_array_equal(np.concatenate(parts), tr.extras["candidate_probs"])


def test_first_token_id_stores_still_read(tmp_path):
    """Stores written before the extras attribute (a bare "token_ids": true) keep their token ids."""
    tr = random_trace(n_tokens=30, token_ids=True)
    save_trace(tr, tmp_path / "t.zarr")
    meta = tmp_path / "t.zarr" / "zarr.json"
    doc = json.loads(meta.read_text())
    attrs = doc["attributes"]["moescope"]
    del attrs["extras"]
    attrs["token_ids"] = True
    meta.write_text(json.dumps(doc))
    np.testing.assert_array_equal(load_trace(tmp_path / "t.zarr").token_ids, tr.token_ids)
