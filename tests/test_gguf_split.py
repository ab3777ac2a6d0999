"""GGUF inspection and the expert splitter: tiny GGUFs written in the test (float, Q8_0, merged gate_up,
router bias, exp_probs_b, grouped routing, per-layer top-k), byte-identical slices, every mode, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run
from moescope import fixture
from moescope.analyze import rank_experts, read_ranking_csv, write_ranking_csv
from moescope.errors import FormatError, OutputExistsError, UsageError
from moescope.gguf import inspect_gguf, open_gguf
from moescope.gguf.split import plan_groups, split_gguf
from moescope.imports import read_input
from moescope.trace import RoutingTrace

E, EMBD, FF = 8, 32, 4


def tiny_gguf(
    path, *, n_experts=E, used=2, group_count=None, group_used=1, used_per_layer=False, experts=True, nextn=0
):
    """A 2-block MoE GGUF: block 0 float experts with a router bias, block 1 Q8_0 merged gate_up; `nextn`
    MTP blocks after them (``nextn_predict_layers``: router and float experts, as GLM-4.5's converter writes)."""
    import gguf

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    w.add_block_count(2 + nextn)
    if nextn:
        w.add_nextn_predict_layers(nextn)
    w.add_embedding_length(EMBD)
    w.add_name("tiny test")
    if experts:
        w.add_expert_count(n_experts)
        if used_per_layer:
            w.add_array("qwen3moe.expert_used_count", [used, used])
        else:
            w.add_expert_used_count(used)
        if group_count:
            w.add_expert_group_count(group_count)
            w.add_expert_group_used_count(group_used)
    w.add_tensor("token_embd.weight", rng.standard_normal((10, EMBD)).astype(np.float32))
    for b in range(2):
        w.add_tensor(f"blk.{b}.attn_norm.weight", np.ones(EMBD, dtype=np.float32))
        w.add_tensor(f"blk.{b}.ffn_gate_inp.weight", rng.standard_normal((n_experts, EMBD)).astype(np.float32))
        if b == 0:
            w.add_tensor("blk.0.ffn_gate_inp.bias", rng.standard_normal(n_experts).astype(np.float32))
            w.add_tensor("blk.0.exp_probs_b.bias", rng.standard_normal(n_experts).astype(np.float32))
            for name in ("gate", "up"):
                arr = rng.standard_normal((n_experts, FF, EMBD)).astype(np.float16)
                w.add_tensor(f"blk.0.ffn_{name}_exps.weight", arr)
            w.add_tensor("blk.0.ffn_down_exps.weight", rng.standard_normal((n_experts, EMBD, FF)).astype(np.float32))
        else:
            merged = rng.standard_normal((n_experts, 2 * FF, EMBD)).astype(np.float32)
            q = gguf.quants.quantize(merged, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor("blk.1.ffn_gate_up_exps.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            down = rng.standard_normal((n_experts, EMBD, 32)).astype(np.float32)
            qd = gguf.quants.quantize(down, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor("blk.1.ffn_down_exps.weight", qd, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor("blk.1.ffn_up_shexp.weight", rng.standard_normal((FF, EMBD)).astype(np.float32))
    for b in range(2, 2 + nextn):
        w.add_tensor(f"blk.{b}.nextn.eh_proj.weight", rng.standard_normal((EMBD, 2 * EMBD)).astype(np.float32))
        w.add_tensor(f"blk.{b}.ffn_gate_inp.weight", rng.standard_normal((n_experts, EMBD)).astype(np.float32))
        for name in ("gate", "up", "down"):
            w.add_tensor(
                f"blk.{b}.ffn_{name}_exps.weight", rng.standard_normal((n_experts, FF, EMBD)).astype(np.float32)
            )
    w.add_tensor("output.weight", rng.standard_normal((10, EMBD)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def model(tmp_path):
    return tiny_gguf(tmp_path / "tiny.gguf")


def _bytes(reader, name):
    t = next(t for t in reader.tensors if t.name == name)
    return np.asarray(reader.data[t.data_offset : t.data_offset + t.n_bytes])


def test_inspect(model):
    m = inspect_gguf(model)
    assert (m.architecture, m.n_experts, m.top_k, m.layer_ids, m.n_blocks) == ("qwen3moe", E, 2, (0, 1), 2)
    per0 = (2 * FF * EMBD * 2 + EMBD * FF * 4) // 1  # two f16 tensors and one f32 per expert
    assert m.expert_bytes[0] == per0
    assert m.expert_bytes[1] == (2 * FF * EMBD + EMBD * 32) // 32 * 34  # Q8_0: 34 bytes per 32 values
    shexp = next(t for t in m.tensors if "shexp" in t.name)
    assert not shexp.per_expert and m.routed_expert_bytes + m.other_bytes == sum(t.n_bytes for t in m.tensors)
    assert m.dense_bytes_per_token == m.other_bytes - 10 * EMBD * 4
    assert m.to_dict()["leading_dense_blocks"] == 0


def test_mtp_blocks_are_not_routed_layers(tmp_path, capsys):
    """GLM-4.5's converter keeps its MTP block (nextn_predict_layers = 1): stored, never routed in normal
    decoding; inspect lists it apart, the plan leaves it out of VRAM, split subsets it like the last layer."""
    from moescope.gguf.plan import plan_offload

    plain, mtp = tiny_gguf(tmp_path / "p.gguf"), tiny_gguf(tmp_path / "m.gguf", nextn=1)
    a, b = inspect_gguf(plain), inspect_gguf(mtp)
    assert b.layer_ids == (0, 1) and b.mtp_blocks == (2,) and (b.n_blocks, b.trunk_blocks) == (3, 2)
    assert b.expert_bytes == a.expert_bytes and b.routed_expert_bytes == a.routed_expert_bytes
    assert b.other_bytes == a.other_bytes and b.dense_bytes_per_token == a.dense_bytes_per_token
    assert b.mtp_bytes == sum(t.n_bytes for t in b.tensors if t.name.startswith("blk.2."))
    assert b.mtp_bytes + b.routed_expert_bytes + b.other_bytes == sum(t.n_bytes for t in b.tensors)
    pa, pb = plan_offload(a, 2**30, ctx=64), plan_offload(b, 2**30, ctx=64)
    assert (pb.weights, pb.kv_cache, pb.experts_in_vram) == (pa.weights, pa.kv_cache, pa.experts_in_vram)
    assert pb.expert_layer_bytes == pa.expert_layer_bytes
    out = tmp_path / "out"
    out.mkdir()
    res = split_gguf(mtp, out, plan_groups(b, 2, "contiguous"))
    src = open_gguf(mtp)
    for path, entry in zip(res.paths, json.loads(res.manifest.read_text())["groups"], strict=True):
        part, dst = inspect_gguf(path), open_gguf(path)
        assert part.mtp_blocks == (2,) and part.layer_ids == (0, 1)
        keep = entry["experts"]["1"]
        a_, c_ = _bytes(src, "blk.2.ffn_up_exps.weight"), _bytes(dst, "blk.2.ffn_up_exps.weight")
        per = a_.size // E
        assert np.array_equal(c_, np.concatenate([a_[i * per : (i + 1) * per] for i in keep]))
        assert any("MTP" in n for n in entry["notes"])
    code, out, _ = run(capsys, "gguf", "inspect", mtp)
    assert code == 0 and "MTP / NextN block(s) [2]" in out


@pytest.mark.parametrize("mode", ["contiguous", "balanced", "ranked"])
def test_split_slices_are_byte_identical(model, tmp_path, mode):
    m = inspect_gguf(model)
    trace = RoutingTrace(
        np.array([[[0, 1], [2, 3]], [[0, 5], [7, 3]], [[4, 0], [3, 1]]], dtype=np.int16), E, layer_ids=[0, 1]
    )
    groups = plan_groups(m, 3, mode, ranking=rank_experts(trace), core=1 if mode != "contiguous" else 0)
    out = tmp_path / "out"
    out.mkdir()
    res = split_gguf(model, out, groups)
    src = open_gguf(model)
    manifest = json.loads(res.manifest.read_text())
    for path, g, entry in zip(res.paths, groups, manifest["groups"], strict=True):
        part = inspect_gguf(path)
        size = len(g[0])
        assert part.n_experts == size and part.top_k == 2 and entry["experts"]["0"] == g[0]
        dst = open_gguf(path)
        for b in (0, 1):
            keep = g[b]
            for name in [t.name for t in src.tensors if t.name.startswith(f"blk.{b}.")]:
                a, c = _bytes(src, name), _bytes(dst, name)
                if "exps" in name or "gate_inp" in name or "exp_probs_b" in name:
                    per = a.size // E
                    want = np.concatenate([a[i * per : (i + 1) * per] for i in keep])
                    assert np.array_equal(c, want), name
                else:
                    assert np.array_equal(a, c), name
        for name in ("token_embd.weight", "output.weight"):
            assert np.array_equal(_bytes(src, name), _bytes(dst, name))
        assert dst.fields["general.name"].contents() == "tiny test"
    assert sum(len(g[0]) for g in groups) == E + (len(groups) - 1) * (1 if mode != "contiguous" else 0)


def test_modes_by_hand(model, tmp_path):
    m = inspect_gguf(model)
    assert plan_groups(m, 2, "contiguous")[1][0] == [4, 5, 6, 7]
    counts = np.array([[80, 70, 60, 50, 40, 30, 20, 10]] * 2)
    from moescope.analyze.ranking import Ranking

    rk = Ranking(np.array([0, 1]), np.argsort(-counts, axis=1, kind="stable"), counts, None, "counts")
    assert plan_groups(m, 2, "ranked", ranking=rk)[0][0] == [0, 3, 4, 7]  # snake: 0,1,1,0,0,1,1,0
    bal = plan_groups(m, 2, "balanced", ranking=rk)
    assert sorted(sum(counts[0, g[0]]) for g in bal) == [180, 180]
    core = plan_groups(m, 3, "ranked", ranking=rk, core=2)
    assert all(set(g[1]) >= {0, 1} for g in core) and [len(g[0]) for g in core] == [4, 4, 4]
    custom = tmp_path / "groups.json"
    custom.write_text(json.dumps({"groups": [{"0": [7, 1], "1": [2, 3]}, {"0": [0, 2], "1": [5, 6]}]}))
    assert plan_groups(m, 0, "custom", custom=custom)[0] == {0: [7, 1], 1: [2, 3]}


def test_metadata_adjustments(tmp_path):
    model = tiny_gguf(tmp_path / "g.gguf", used=4, group_count=4, used_per_layer=True)
    m = inspect_gguf(model)
    out = tmp_path / "out"
    out.mkdir()
    res = split_gguf(model, out, plan_groups(m, 3, "contiguous"))
    sizes = [3, 3, 2]
    for path, size in zip(res.paths, sizes, strict=True):
        r = open_gguf(path)
        assert r.fields["qwen3moe.expert_count"].contents() == size
        assert r.fields["qwen3moe.expert_used_count"].contents() == [min(4, size)] * 2
        assert r.fields["qwen3moe.expert_group_count"].contents() == 1  # 4 groups cannot divide 3 or 2
        assert r.fields["qwen3moe.expert_group_used_count"].contents() == 1
    notes = json.loads(res.manifest.read_text())["groups"][2]["notes"]
    assert any("expert_used_count" in n for n in notes) and any("grouped routing" in n for n in notes)


def _llama_group_checks(path):
    """llama.cpp's load-time checks on grouped routing (llama-model.cpp, load_hparams), as (ok, values)."""
    r = open_gguf(path)
    n = r.fields["qwen3moe.expert_count"].contents()
    g = r.fields["qwen3moe.expert_group_count"].contents()
    u = r.fields["qwen3moe.expert_group_used_count"].contents()
    ok = g < n and (g <= 1 or (n % g == 0 and 0 < u < g))
    return ok, (n, g, u)


@pytest.mark.parametrize(
    ("n_experts", "n_group", "used", "parts", "mode", "want"),
    [
        # DeepSeek-V3-like in small: each part is one whole source group -> grouping off (was: kept 4 groups
        # of 1 expert, which llama.cpp aborts on: n_expert_groups < n_expert)
        (16, 4, 2, 4, "contiguous", (4, 1, 1)),
        # two whole groups each, the source uses two: all of them, the same as no grouping -> off
        (16, 4, 2, 2, "contiguous", (8, 1, 1)),
        # four whole groups of 2 each, two used: the source's rule survives in the part
        (16, 8, 2, 2, "contiguous", (8, 4, 2)),
        # ranked parts scatter the groups -> off
        (16, 8, 2, 2, "ranked", (8, 1, 1)),
        # the old test's case: one whole group of 4 per part (was kept as 2 groups of 2, another rule)
        (8, 2, 1, 2, "contiguous", (4, 1, 1)),
    ],
)
def test_split_keeps_grouped_routing_loadable(tmp_path, n_experts, n_group, used, parts, mode, want):
    model = tiny_gguf(tmp_path / "g.gguf", n_experts=n_experts, group_count=n_group, group_used=used)
    m = inspect_gguf(model)
    trace = RoutingTrace(np.tile(np.array([[[0, 1], [2, 3]]], dtype=np.int16), (3, 1, 1)), n_experts, layer_ids=[0, 1])
    out = tmp_path / "out"
    out.mkdir()
    res = split_gguf(model, out, plan_groups(m, parts, mode, ranking=rank_experts(trace)))
    manifest = json.loads(res.manifest.read_text())
    for path, entry in zip(res.paths, manifest["groups"], strict=True):
        ok, values = _llama_group_checks(path)
        assert ok and values == want, (path.name, values)
        if values[1:] != (n_group, used):
            assert any("expert_group_count" in n for n in entry["notes"])


def test_bad_input_leaves_nothing(tmp_path, model):
    out = tmp_path / "out"
    out.mkdir()
    m = inspect_gguf(model)
    (tmp_path / "x.gguf").write_bytes(b"NOPE" + b"\0" * 64)
    with pytest.raises(FormatError, match="not the GGUF magic"):
        inspect_gguf(tmp_path / "x.gguf")
    data = model.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 3])
    with pytest.raises(FormatError, match="not a readable GGUF"):
        inspect_gguf(tmp_path / "cut.gguf")
    with pytest.raises(FormatError, match="not a Mixture-of-Experts"):
        inspect_gguf(tiny_gguf(tmp_path / "dense.gguf", experts=False))
    with pytest.raises(UsageError, match="more than the 8 experts"):
        plan_groups(m, 9, "contiguous")
    with pytest.raises(UsageError, match="needs a per-layer ranking"):
        plan_groups(m, 2, "ranked")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"groups": [{"0": [1, 9], "1": [0, 1]}]}))
    with pytest.raises(UsageError, match=r"name \[9\], outside 0..7"):
        plan_groups(m, 0, "custom", custom=bad)
    bad.write_text(json.dumps({"groups": [{"0": [1, 2], "1": [0]}]}))
    with pytest.raises(UsageError, match="same \\(non-zero\\) number"):
        plan_groups(m, 0, "custom", custom=bad)
    assert list(out.iterdir()) == []
    split_gguf(model, out, plan_groups(m, 2, "contiguous"))
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(OutputExistsError, match="already exists"):
        split_gguf(model, out, plan_groups(m, 2, "contiguous"))
    assert sorted(p.name for p in out.iterdir()) == before and model.read_bytes() == data


def test_ranking_csv_roundtrip_and_refusals(tmp_path):
    tr = read_input(fixture.FIXTURE_DIR / fixture.TRACE)
    r = rank_experts(tr)
    write_ranking_csv(r, tmp_path / "r.csv")
    back = read_ranking_csv(tmp_path / "r.csv")
    assert np.array_equal(back.order, r.order) and np.array_equal(back.counts, r.counts)
    text = (tmp_path / "r.csv").read_text().replace("\n0,3,", "\n0,33,", 1)
    (tmp_path / "bad.csv").write_text(text)
    with pytest.raises(UsageError, match=r"expected each of 0\.\.15 exactly once"):
        read_ranking_csv(tmp_path / "bad.csv")


def test_cli_split_fixture_and_errors(capsys, tmp_path):
    gguf_path = fixture.FIXTURE_DIR / fixture.GGUF
    code, out, err = run(capsys, "rank", fixture.FIXTURE_DIR / fixture.TRACE, "-o", tmp_path / "r.csv")
    assert code == 0, err
    code, out, err = run(
        capsys,
        "split",
        gguf_path,
        "-o",
        tmp_path / "ranked",
        "-g",
        "2",
        "--mode",
        "ranked",
        "--ranking",
        tmp_path / "r.csv",
        "--core",
        "2",
        "--json",
    )
    assert code == 0, err
    d = json.loads(out)
    assert len(d["files"]) == 2 and all(len(g["0"]) == 9 for g in d["groups"])
    code, out, _ = run(capsys, "gguf", "inspect", gguf_path, "--json")
    assert code == 0 and json.loads(out)["n_experts"] == 16
    code, _, err = run(capsys, "split", gguf_path, "-o", tmp_path / "g17", "-g", "17")
    assert code == 2 and "more than the 16 experts" in err
    code, _, err = run(capsys, "split", tmp_path / "r.csv", "-o", tmp_path / "x")
    assert code == 2 and "GGUF magic" in err
    # never into a folder moescope did not write, nor one holding an input
    code, _, err = run(capsys, "split", gguf_path, "-o", tmp_path, "--ranking", tmp_path / "r.csv", "--mode", "ranked")
    assert code == 2 and "holds the input" in err
    code, _, err = run(capsys, "split", gguf_path, "-o", tmp_path, "--overwrite")
    assert code == 2 and "is a folder that moescope did not write (2 entries)" in err
    # a missing folder is created, whole: the parts and the manifest appear together
    code, out, err = run(capsys, "split", gguf_path, "-o", tmp_path / "parts", "-g", "2", "--json")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == sorted(
        [Path(f).name for f in json.loads(out)["files"]] + ["split.json"]
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    # an earlier split output is replaced whole, and only with --overwrite
    code, _, err = run(capsys, "split", gguf_path, "-o", tmp_path / "parts", "-g", "3")
    assert code == 2 and "already exists; pass --overwrite" in err
    code, out, err = run(capsys, "split", gguf_path, "-o", tmp_path / "parts", "-g", "3", "--overwrite", "--json")
    assert code == 0, err
    files = [Path(f).name for f in json.loads(out)["files"]]
    assert len(files) == 3
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == sorted([*files, "split.json"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    code, _, err = run(capsys, "split", gguf_path, "-o", tmp_path / "no" / "parts")
    assert code == 2 and "does not exist" in err and not (tmp_path / "no").exists()
    code, _, err = run(capsys, "split", gguf_path, "-o", tmp_path / "r.csv")
    assert code == 2 and "is not a folder" in err


@pytest.mark.slow
def test_split_outputs_load_and_generate_in_llama_cpp(tmp_path):
    pytest.importorskip("llama_cpp")
    from moescope.gguf.runtime import LlamaSession

    src = fixture.FIXTURE_DIR / fixture.GGUF
    m = inspect_gguf(src)
    perm = np.random.default_rng(0)
    (tmp_path / "all").mkdir()
    full = split_gguf(src, tmp_path / "all", [{b: perm.permutation(16).tolist() for b in m.layer_ids}]).paths[0]
    (tmp_path / "two").mkdir()
    halves = split_gguf(src, tmp_path / "two", plan_groups(m, 2, "contiguous")).paths
    logits = []
    for path in (src, full, *halves):
        with LlamaSession(path, inspect_gguf(path), n_ctx=128, record=False) as s:
            ids = s.tokenize("The quick brown fox jumps over the lazy dog. It was not a dog.")[:40]
            s.decode(ids)
            logits.append(s.logits(len(ids)))
            s.clear()
            s.decode(ids[:8], all_logits=False)
            assert 0 <= s.argmax_last() < s.n_vocab  # generates
    np.testing.assert_allclose(logits[1], logits[0], atol=1e-4)  # all experts, permuted: same model
    assert not np.allclose(logits[2], logits[0], atol=1e-2)  # half the experts: a different model


@pytest.mark.slow
def test_reduce_and_split_evaluate_on_fixture(capsys, tmp_path):
    pytest.importorskip("llama_cpp")
    gguf_path = fixture.FIXTURE_DIR / fixture.GGUF
    heldout = fixture.HELDOUT_DIR
    code, out, err = run(capsys, "reduce", gguf_path, "--corpus", heldout, "--max-tokens", "600", "--json")
    assert code == 0, err
    d = json.loads(out)
    k2, k1 = d["scores"]
    assert (k2["k"], k1["k"]) == (2, 1) and k2["kl_vs_reference"] == 0 and k2["top1_agreement"] == 1
    assert k1["perplexity"] > k2["perplexity"] and k1["kl_vs_reference"] > 0.01 and k1["top1_agreement"] < 1
    assert d["recommended_k"] == 2 and d["llama_cpp_flag"] == "--override-kv qwen3moe.expert_used_count=int:2"
    code, out, _ = run(capsys, "reduce", gguf_path, "--corpus", heldout, "--max-tokens", "300", "--tolerance", "10")
    assert code == 0 and "recommended k = 1" in out
    code, _, err = run(capsys, "reduce", gguf_path, "--corpus", heldout, "--k", "0")
    assert code == 2 and "each k must be in 1..16" in err
    # k above the model's own is said, and never recommended even when it scores within tolerance
    args = ("reduce", gguf_path, "--corpus", heldout, "--max-tokens", "200", "--k", "4,2", "--tolerance", "10")
    code, out, err = run(capsys, *args, "--json")
    assert code == 0, err
    d = json.loads(out)
    assert [s["k"] for s in d["scores"]] == [4, 2] and d["recommended_k"] == 2
    assert d["notes"] and "above the model's own top-k 2" in d["notes"][0]
    code, out, _ = run(capsys, *args)
    assert code == 0 and "note: k = 4 is above" in out
    code, out, err = run(
        capsys,
        "split",
        gguf_path,
        "-o",
        tmp_path,
        "-g",
        "2",
        "--evaluate",
        "--corpus",
        heldout,
        "--trace",
        fixture.FIXTURE_DIR / fixture.TRACE,
        "--max-tokens",
        "300",
        "--json",
    )
    assert code == 0, err
    ev = json.loads(out)["evaluation"]
    assert len(ev) == 2 and all(r["kl_vs_reference"] > 0 and 0 < r["routing_mass_kept"] < 1 for r in ev)
    code, _, err = run(capsys, "split", gguf_path, "-o", tmp_path, "--evaluate", "--overwrite")
    assert code == 2 and "--evaluate needs --corpus" in err


def test_ranking_of_another_model_is_refused(model, tmp_path):
    m = inspect_gguf(model)
    wide = RoutingTrace(np.array([[[0, 11], [2, 3]]], dtype=np.int16), 12, layer_ids=[0, 1])
    with pytest.raises(UsageError, match="ranks 12 experts per layer but the model has 8"):
        plan_groups(m, 2, "ranked", ranking=rank_experts(wide))
    other_layers = RoutingTrace(np.array([[[0, 1], [2, 3]]], dtype=np.int16), E, layer_ids=[5, 6])
    with pytest.raises(UsageError, match=r"MoE blocks \[0, 1\] are not among them"):
        plan_groups(m, 2, "balanced", ranking=rank_experts(other_layers))
