"""`moescope compare`: token-aligned routing agreement of two traces, against a naive reference."""

from __future__ import annotations

import json

import numpy as np
import pytest

import reference_compare
from conftest import random_trace, run
from moescope.analyze.compare import compare_traces, margins
from moescope.errors import UsageError
from moescope.imports import write_output


def perturbed(trace, share, seed=1, jitter=0.0):
    """`trace` with `share` of its token-layers' last expert swapped for an unused one, weights jittered."""
    rng = np.random.default_rng(seed)
    ex, w = trace.experts.copy(), trace.weights.astype(np.float32).copy()
    t, layer = np.nonzero(rng.random(ex.shape[:2]) < share)
    for a, b in zip(t.tolist(), layer.tolist(), strict=True):
        free = np.setdiff1d(np.arange(trace.n_experts), ex[a, b])
        ex[a, b, -1] = rng.choice(free)
    w = w * (1 + jitter * rng.standard_normal(w.shape))
    w = np.abs(w) / np.abs(w).sum(axis=2, keepdims=True)
    return trace.replace(experts=ex, weights=w.astype(np.float32))


@pytest.mark.parametrize("seed", range(3))
def test_matches_reference(seed):
    a = random_trace(n_tokens=300, n_layers=3, n_experts=16, k=4, n_seq=5, seed=seed, token_ids=True)
    b = perturbed(a, 0.2, seed=seed, jitter=0.02)
    # a permuted slot order changes nothing
    order = np.random.default_rng(seed).permuted(np.tile(np.arange(4), (300, 3, 1)), axis=2)
    b = b.replace(experts=np.take_along_axis(b.experts, order, 2), weights=np.take_along_axis(b.weights, order, 2))
    got = compare_traces(a, b, near_tie=0.05)
    want = reference_compare.agreement(a, b, 0.05)
    for layer in got.layers:
        ref = want[layer.layer_id]
        assert layer.identical == pytest.approx(ref["identical"])
        assert layer.overlap == pytest.approx(ref["overlap"])
        assert layer.top1 == pytest.approx(ref["top1"])
        assert layer.weight_error == pytest.approx(ref["weight_error"], rel=1e-5)
        assert (layer.disagreements, layer.first_divergence) == (ref["disagreements"], ref["first"])
        assert layer.near_tie == pytest.approx(ref["near_tie"])
        assert layer.median_margin == pytest.approx(ref["median_margin"], rel=1e-6)
    assert got.aligned_by == "token ids"
    assert got.overall.disagreements == sum(x.disagreements for x in got.layers)
    assert [d.token for d in got.divergences] == sorted(d.token for d in got.divergences)
    assert got.divergences[0].token == min(x.first_divergence for x in got.layers)


def test_identical_traces_and_a_top_k_reduction():
    a = random_trace(n_tokens=80, n_layers=2, n_experts=16, k=4, seed=3)
    same = compare_traces(a, a)
    assert same.overall.identical == 1.0 and same.overall.top1 == 1.0 and same.overall.weight_error == 0.0
    assert same.overall.disagreements == 0 and same.divergences == () and same.overall.near_tie is None
    # top-2 from the same router: the two heaviest experts of each top-4 set are inside it
    order = np.argsort(-a.weights, axis=2, kind="stable")[..., :2]
    b = a.replace(experts=np.take_along_axis(a.experts, order, 2), weights=np.take_along_axis(a.weights, order, 2))
    red = compare_traces(a, b)
    assert red.top_k == (4, 2) and red.overall.identical is None and red.overall.overlap == 1.0
    assert red.overall.top1 == 1.0 and red.overall.disagreements == 0


def test_margins_separate_near_ties_from_real_differences():
    # one shared expert (id 0, weight 0.5); A chose 1, B chose 2
    ea, eb = np.array([[0, 1]]), np.array([[2, 0]])
    near = margins(ea, np.array([[0.5, 0.30]]), eb, np.array([[0.301, 0.5]]))
    far = margins(ea, np.array([[0.5, 0.30]]), eb, np.array([[0.05, 0.5]]))
    assert near[0] == pytest.approx(abs(np.log(0.30 / 0.5) - np.log(0.301 / 0.5)))
    assert far[0] > 1.0
    assert np.isnan(margins(np.array([[0, 1]]), np.ones((1, 2)), np.array([[2, 3]]), np.ones((1, 2))))[0]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            lambda t: t.replace(
                experts=t.experts[:-1], weights=t.weights[:-1], token_ids=t.token_ids[:-1], seq_starts=t.seq_starts
            ),
            "hold 60 and 59 tokens",
        ),
        (lambda t: t.replace(seq_starts=[0, 30], seq_labels=None), "different sequences"),
        (lambda t: t.replace(token_ids=np.r_[t.token_ids[:7], 49_999, t.token_ids[8:]]), "token 7"),
        (lambda t: t.replace(layer_ids=[10, 11]), "share no MoE layer"),
    ],
)
def test_misaligned_inputs_are_refused(change, match):
    a = random_trace(n_tokens=60, n_seq=4, token_ids=True)
    if match == "token 7":
        a = a.replace(token_ids=np.where(np.arange(60) == 7, 1, a.token_ids))
    with pytest.raises(UsageError, match=match):
        compare_traces(a, change(a))


def test_cli_table_json_and_errors(capsys, tmp_path):
    a = random_trace(n_tokens=120, n_layers=2, n_experts=16, k=4, n_seq=3, token_ids=True)
    write_output(a, tmp_path / "a.zarr")
    write_output(perturbed(a, 0.1), tmp_path / "b.npz")
    code, out, err = run(capsys, "compare", tmp_path / "a.zarr", tmp_path / "b.npz", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["aligned_by"] == "token ids" and len(doc["layers"]) == 2 and doc["divergences"]
    assert doc["overall"]["identical"] == pytest.approx(compare_traces(a, perturbed(a, 0.1)).overall.identical)
    code, out, _ = run(capsys, "compare", tmp_path / "a.zarr", tmp_path / "b.npz", "--layers", "2")
    assert code == 0 and "identical sets" in out and "first divergences" in out
    write_output(random_trace(n_tokens=50), tmp_path / "c.npz")
    code, _, err = run(capsys, "compare", tmp_path / "a.zarr", tmp_path / "c.npz")
    assert code == 2 and "hold 120 and 50 tokens" in err


def test_fixture_hf_and_llama_captures_agree_exactly(capsys, tmp_path):
    """The issue's acceptance check: the fixture's transformers and llama.cpp captures of the same text,
    llama.cpp in exact mode (f32 KV cache, flash attention off), have 100% identical expert sets; a third
    capture replays the first's token ids (--tokens-from) and agrees too."""
    pytest.importorskip("torch")
    pytest.importorskip("llama_cpp")
    from moescope import fixture

    hf, ll, replay = tmp_path / "hf.zarr", tmp_path / "ll.zarr", tmp_path / "replay.zarr"
    common = ("--seq-len", 128, "--max-tokens", 1500)
    assert run(capsys, "-q", "capture", "hf", fixture.MODEL_DIR, fixture.HELDOUT_DIR, "-o", hf, *common)[0] == 0
    exact = ("--flash-attn", "off", "--kv-type", "f32")
    assert run(capsys, "-q", "capture", "llama", fixture.GGUF, fixture.HELDOUT_DIR, "-o", ll, *common, *exact)[0] == 0
    args = ("capture", "llama", fixture.GGUF, "-o", replay, "--tokens-from", hf, "--seq-len", 128, *exact)
    assert run(capsys, "-q", *args)[0] == 0
    for other in (ll, replay):
        code, out, err = run(capsys, "compare", hf, other, "--json")
        assert code == 0, err
        doc = json.loads(out)
        assert doc["aligned_by"] == "token ids" and doc["tokens"] == 1500
        assert doc["overall"]["identical"] == 1.0 and doc["overall"]["disagreements"] == 0
    code, out, _ = run(capsys, "compare", hf, ll)
    assert code == 0 and "identical sets 100%" in " ".join(out.split())
