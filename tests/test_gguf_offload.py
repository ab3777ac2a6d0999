"""Offload plans over several GPUs and flavours: accounting per device, the engines' layer-split rule, each
flavour's --n-cpu-moe, the --fit baseline, the plan file, and every printed form checked in llama.cpp."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from conftest import run
from moescope import fixture
from moescope.errors import UsageError
from moescope.gguf import inspect_gguf
from moescope.gguf.fit import fit_baseline
from moescope.gguf.offload import (
    FLAVORS,
    block_bytes,
    check_split,
    form_placement,
    forms_agree,
    layer_devices,
    n_cpu_moe_blocks,
    plan_devices,
)
from moescope.gguf.plan import plan_offload

KiB, MiB = 2**10, 2**20


def moe_gguf(path, n_blocks=8, dense_first=1, nextn=0, n_experts=4, embd=32, ff=16, f16_blocks=(), biases=False):
    """A MoE GGUF: `dense_first` dense blocks, then MoE blocks (f32 experts, f16 in `f16_blocks`), the last
    `nextn` blocks MTP; attention q/k/v per block (2 KV heads of 8 dims); expert biases when `biases`."""
    import gguf

    w = gguf.GGUFWriter(str(path), "qwen3moe")
    w.add_block_count(n_blocks)
    w.add_embedding_length(embd)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_key_length(8)
    w.add_value_length(8)
    w.add_expert_count(n_experts)
    w.add_expert_used_count(2)
    if nextn:
        w.add_uint32("qwen3moe.nextn_predict_layers", nextn)
    w.add_tensor("token_embd.weight", np.zeros((100, embd), dtype=np.float32))
    for b in range(n_blocks):
        w.add_tensor(f"blk.{b}.attn_q.weight", np.zeros((embd, embd), dtype=np.float32))
        w.add_tensor(f"blk.{b}.attn_norm.weight", np.zeros(embd, dtype=np.float32))
        if b < dense_first:
            w.add_tensor(f"blk.{b}.ffn_up.weight", np.zeros((ff, embd), dtype=np.float32))
            continue
        w.add_tensor(f"blk.{b}.ffn_gate_inp.weight", np.zeros((n_experts, embd), dtype=np.float32))
        dtype = np.float16 if b in f16_blocks else np.float32
        for name in ("gate", "up", "down"):
            w.add_tensor(f"blk.{b}.ffn_{name}_exps.weight", np.zeros((n_experts, ff, embd), dtype=dtype))
        if biases:
            w.add_tensor(f"blk.{b}.ffn_gate_exps.bias", np.zeros((n_experts, ff), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.zeros(embd, dtype=np.float32))
    w.add_tensor("output.weight", np.zeros((100, embd), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("offload")
    return {
        "plain": inspect_gguf(moe_gguf(d / "plain.gguf")),
        "mtp": inspect_gguf(moe_gguf(d / "mtp.gguf", n_blocks=9, nextn=1, dense_first=2)),
        "mixed": inspect_gguf(moe_gguf(d / "mixed.gguf", f16_blocks=(1, 2, 3), biases=True)),
    }


def _need(m, flavor="llama.cpp", ctx=64, compute=100 * KiB):
    """(bytes with every expert on the CPU, bytes of all experts) of one GPU holding everything else."""
    bb = block_bytes(m, ctx, "f16", FLAVORS[flavor])
    return int((bb.dense + bb.kv).sum()) + bb.output + compute, int(bb.experts.sum())


def test_layer_devices_mirrors_llama_cpp():
    # llama-model.cpp: -ts 1,1 with 48 blocks + the output layer: blocks 0..24 on device 0, the rest on 1
    got = layer_devices([1, 1], 48)
    assert got[:25] == [0] * 25 and got[25:] == [1] * 24
    assert layer_devices([3, 0, 2], 4) == [0, 0, 0, 2, 2]  # a device of share 0 gets nothing
    assert layer_devices([1], 4, n_gpu_layers=2) == [-1, -1, -1, 0, 0]  # -ngl counts the output layer
    rng = np.random.default_rng(0)
    for _ in range(300):  # integer layer counts put exactly that many layers on each device, in order
        counts = rng.integers(0, 40, size=int(rng.integers(1, 9)))
        counts[-1] += 1
        want = [d for d, c in enumerate(counts) for _ in range(c)]
        assert layer_devices(counts.astype(float), len(want) - 1) == want


@pytest.mark.parametrize("vram_kib", range(300, 1300, 50))
def test_one_gpu_equals_the_single_gpu_planner(models, vram_kib):
    """Single-GPU llama.cpp plans are unchanged: the same blocks, --n-cpu-moe and -ot rule as plan_offload."""
    for m in (models["plain"], models["mtp"]):
        try:
            old = plan_offload(m, vram_kib * KiB, ctx=64, compute=100 * KiB)
        except UsageError:
            with pytest.raises(UsageError, match="not hold even the non-expert"):
                plan_devices(m, [vram_kib * KiB], ctx=64, compute=100 * KiB)
            continue
        new = plan_devices(m, [vram_kib * KiB], ctx=64, compute=100 * KiB)
        assert (new.gpu_blocks, new.cpu_blocks, new.n_cpu_moe) == (old.gpu_blocks, old.cpu_blocks, old.n_cpu_moe)
        assert new.ot_value() == old.ot and new.tensor_split is None
        d = new.devices[0]
        assert (d.weights, d.kv_cache, d.experts) == (old.weights, old.kv_cache, old.experts_in_vram)
        assert forms_agree(new, m)


def _feasible(m, budgets, cpu, compute, flavor):
    """Brute force: some contiguous split of the blocks fits every GPU with `cpu` blocks' experts on the CPU."""
    bb = block_bytes(m, 64, "f16", FLAVORS[flavor])
    w = bb.dense + bb.kv + np.array([0 if b in cpu else e for b, e in enumerate(bb.experts)])
    n, nd = len(w), len(budgets)
    for cuts in itertools.combinations_with_replacement(range(n + 1), nd - 1):
        bounds = [0, *cuts, n]
        loads = [int(w[bounds[i] : bounds[i + 1]].sum()) + compute for i in range(nd)]
        loads[-1] += bb.output
        if all(x <= b for x, b in zip(loads, budgets, strict=True)):
            return True
    return False


def _best_subset_bytes(sizes, room):
    """Brute force: the most bytes of a subset of `sizes` within `room`."""
    best = 0
    for r in range(len(sizes) + 1):
        for combo in itertools.combinations(sizes, r):
            if sum(combo) <= room:
                best = max(best, sum(combo))
    return best


@pytest.mark.parametrize("flavor", list(FLAVORS))
def test_two_gpus_fit_and_keep_the_most(models, flavor):
    """Every GPU holds its share, blocks are contiguous and cover the trunk, no convention cut that fits any
    split keeps more expert bytes (brute force), each GPU keeps the most expert bytes its room allows (brute
    force over subsets), and --n-cpu-moe is printed only when it moves exactly the CPU blocks."""
    rng = np.random.default_rng(1)
    for name, m in models.items():
        light, experts = _need(m, flavor)
        bb = block_bytes(m, 64, "f16", FLAVORS[flavor])
        planned = 0
        for _ in range(25):
            total = int(light * rng.uniform(1.1, 1.0 + 1.4 * experts / light))
            a = int(total * rng.uniform(0.3, 0.7))
            budgets = [a, total - a]
            try:
                p = plan_devices(m, budgets, flavor=flavor, ctx=64, compute=100 * KiB)
            except UsageError:
                assert not _feasible(m, budgets, set(m.layer_ids), 100 * KiB, flavor)
                continue
            planned += 1
            assert all(d.used <= d.budget for d in p.devices)
            blocks = [b for d in p.devices for b in d.blocks]
            assert blocks == list(range(m.trunk_blocks)) and p.devices[-1].output
            moe = list(m.layer_ids)
            # no convention cut that fits some split keeps more expert bytes in VRAM
            for k in range(len(moe) + 1):
                cut = set(moe[:k] if flavor == "llama.cpp" else moe[len(moe) - k :])
                if _feasible(m, budgets, cut, 100 * KiB, flavor):
                    conv = sum(int(bb.experts[b]) for b in moe if b not in cut)
                    assert p.experts_in_vram >= conv, (name, k, p.cpu_blocks)
            for d in p.devices:
                room = d.budget - d.compute - d.weights - d.kv_cache
                sizes = [int(bb.experts[b]) for b in d.blocks if b in m.layer_ids]
                assert d.experts == _best_subset_bytes(sizes, room), (name, d)
            if p.n_cpu_moe is not None:
                assert p.cpu_blocks == n_cpu_moe_blocks(m, FLAVORS[flavor], p.n_cpu_moe)
            else:
                assert "n_cpu_moe" not in p.flags()
            assert forms_agree(p, m)
            assert check_split(p) is (True if flavor == "llama.cpp" else None)
            if flavor == "ik_llama.cpp":
                assert p.n_cpu_moe is None
        assert planned >= 5, name


def test_mixed_bytes_keep_more_than_the_convention(models):
    """Layers of different bytes (f16 experts in blocks 1-3, f32 after): the knapsack keeps more bytes in VRAM
    than the fewest-first-blocks convention, and says --n-cpu-moe cannot express it; a trace's prefill use
    picks among equal layers."""
    m = models["mixed"]
    bb = block_bytes(m, 64, "f16")
    light, _ = _need(m)
    f16, f32 = int(bb.experts[1]), int(bb.experts[7])
    assert f32 > f16
    p = plan_devices(m, [light + f32 + f16], ctx=64, compute=100 * KiB)  # room for one f32 and one f16 layer
    assert p.devices[0].experts == f32 + f16 and p.n_cpu_moe is None
    assert any("only the -ot form" in n for n in p.notes) and forms_agree(p, m)
    conv = plan_offload(m, light + f32 + f16, ctx=64, compute=100 * KiB)
    assert conv.experts_in_vram < p.devices[0].experts
    use = {b: float(b) for b in m.layer_ids}  # block 3 streams the most of the f16 ones
    q = plan_devices(m, [light + f16], ctx=64, compute=100 * KiB, prefill_use=use)
    assert q.gpu_blocks == (3,)
    use[1] = 99.0
    assert plan_devices(m, [light + f16], ctx=64, compute=100 * KiB, prefill_use=use).gpu_blocks == (1,)


def test_mtp_blocks_count_in_the_split_not_in_vram(models):
    m = models["mtp"]  # 9 blocks: 0, 1 dense, 2..7 MoE, 8 MTP
    assert m.mtp_blocks == (8,) and m.layer_ids == tuple(range(2, 8))
    light, experts = _need(m)
    p = plan_devices(m, [light, light + experts], ctx=64, compute=100 * KiB)
    assert sum(p.tensor_split) == m.n_blocks + 1  # the MTP block and the output layer count in -ts
    assert check_split(p) and all(not name.startswith("blk.8.") for name in p.placement(m))
    assert all(d.used <= d.budget for d in p.devices)


def test_ik_n_cpu_moe_is_the_last_expert_blocks(models):
    ik, main = FLAVORS["ik_llama.cpp"], FLAVORS["llama.cpp"]
    m = models["mtp"]
    assert n_cpu_moe_blocks(m, ik, 2) == (6, 7)  # the MTP block 8 never, counted from the end
    assert n_cpu_moe_blocks(m, ik, 99) == tuple(range(2, 8))
    assert n_cpu_moe_blocks(m, main, 3) == (2,)  # blocks 0..2: the two dense ones match nothing
    light, experts = _need(m, "ik_llama.cpp")
    p = plan_devices(m, [light + experts // 2], flavor="ik_llama.cpp", ctx=64, compute=100 * KiB)
    assert p.cpu_blocks == n_cpu_moe_blocks(m, ik, p.n_cpu_moe) and p.cpu_blocks[-1] == 7
    assert p.flags()["n_cpu_moe"].endswith(f"-ncmoe {p.n_cpu_moe}") and forms_agree(p, m)


def test_ik_leaves_expert_biases_with_the_layer(models):
    """ik's expert rule matches .weight / .scale only: a plan for ik counts expert biases as layer bytes and
    leaves them on the GPU, where its -ncmoe puts them; llama.cpp's rule moves them with the experts."""
    m = models["mixed"]
    light, experts = _need(m, "ik_llama.cpp")
    budget = [light + experts // 3]
    ik = plan_devices(m, budget, flavor="ik_llama.cpp", ctx=64, compute=100 * KiB)
    where = ik.placement(m)
    b = ik.cpu_blocks[0]
    assert where[f"blk.{b}.ffn_gate_exps.weight"] == "CPU" and where[f"blk.{b}.ffn_gate_exps.bias"] == "CUDA0"
    main = plan_devices(m, budget, ctx=64, compute=100 * KiB)
    assert main.placement(m)[f"blk.{main.cpu_blocks[0]}.ffn_gate_exps.bias"] == "CPU"
    assert forms_agree(ik, m) and forms_agree(main, m)


def test_form_placement_catches_a_wrong_rule(models):
    m = models["plain"]
    light, experts = _need(m)
    p = plan_devices(m, [light // 2 + experts // 2, light // 2 + experts // 2], ctx=64, compute=100 * KiB)
    assert forms_agree(p, m)
    swapped = [(pat, "CUDA1" if buf == "CUDA0" else buf) for pat, buf in p.rules]
    assert form_placement(p, m, swapped) != p.placement(m)


def test_fit_baseline_sends_the_last_layers(models):
    m = models["plain"]
    light, experts = _need(m)
    for frac in (0.2, 0.5, 0.8):
        budget = [light + int(experts * frac)]
        fit = fit_baseline(m, budget, ctx=64, compute=100 * KiB, margin=0)
        ours = plan_devices(m, budget, ctx=64, compute=100 * KiB)
        moe = list(m.layer_ids)
        k = len(fit.cpu_blocks)
        assert list(fit.cpu_blocks) == moe[len(moe) - k :]  # the highest layers' experts on the CPU
        assert k == len(ours.cpu_blocks)  # same accounting, no margin, equal layers: as many kept
        with_margin = fit_baseline(m, budget, ctx=64, compute=100 * KiB, margin=int(experts * 0.15))
        assert with_margin is None or len(with_margin.cpu_blocks) >= k
    two = fit_baseline(m, [light, light + experts], ctx=64, compute=100 * KiB, margin=0)
    assert all(d.used <= d.budget for d in two.devices)
    assert fit_baseline(m, [light // 3], ctx=64, compute=100 * KiB) is None


def test_bad_arguments(models):
    m = models["plain"]
    with pytest.raises(UsageError, match="--flavor 'vllm'"):
        plan_devices(m, [MiB], flavor="vllm")
    with pytest.raises(UsageError, match="--device-prefix 'CUDA0'"):
        plan_devices(m, [MiB], prefix="CUDA0")
    with pytest.raises(UsageError, match="17 budgets"):
        plan_devices(m, [MiB] * 17)
    p = plan_devices(m, [10 * MiB, 10 * MiB], prefix="Vulkan", ctx=64, compute=MiB)
    assert [d.name for d in p.devices] == ["Vulkan0", "Vulkan1"] and "=Vulkan0" in p.flags()["override_tensor"]


def test_plan_file_round_trips(tmp_path, capsys):
    g = fixture.GGUF
    args = ("plan", "offload", g, "--vram", "3MiB,3MiB", "--ctx", "256", "--compute-buffer", "1MiB")
    code, out, err = run(capsys, *args, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["format"] == "moescope.offload-plan" and doc["version"] == 1
    plan = doc["plan"]
    assert [d["name"] for d in plan["devices"]] == ["CUDA0", "CUDA1"] and plan["forms_agree"]
    names = {t.name for t in inspect_gguf(g).tensors}
    listed = [t for d in plan["devices"] for t in d["tensors"]] + plan["cpu"]["tensors"]
    assert sorted(listed) == sorted(names)  # every loaded tensor on exactly one device
    assert "baseline" in doc and "projection" in doc
    path = tmp_path / "plan.json"
    path.write_text(out)
    code, again, err = run(capsys, "plan", "offload", "--from", path, "--json")
    assert code == 0 and json.loads(again) == doc, err
    code, text, _ = run(capsys, *args)
    code2, text2, _ = run(capsys, "plan", "offload", "--from", path)
    assert code == code2 == 0 and text == text2 and "-ts 3,2" in text
    # with a trace the plan file carries the cache projection, and --from prints it as the plan did
    traced = ("plan", "offload", g, "--vram", "4.2MiB", "--ctx", "1024", "--compute-buffer", "1MiB")
    traced += ("--trace", fixture.FIXTURE_DIR / fixture.TRACE)
    code, out, err = run(capsys, *traced, "--json")
    assert code == 0 and json.loads(out)["cache"]["slots"] > 0, err
    path.write_text(out)
    code, text, _ = run(capsys, *traced)
    code2, text2, _ = run(capsys, "plan", "offload", "--from", path)
    assert code == code2 == 0 and text == text2 and "a per-expert cache in the same VRAM" in text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[]", "format"),
        ('{"format": "moescope.offload-plan", "version": 2, "plan": {}}', "version 2"),
        ('{"format": "moescope.offload-plan", "version": 1}', "no 'plan'"),
        ('{"format": "moescope.offload-plan", "version": 1, "plan": {"flags": {"a": 1}}}', "plan.flags"),
        (
            '{"format": "moescope.offload-plan", "version": 1, "plan": {"flags": {"a": "-ngl 1"}, "devices": [{}]}}',
            "devices",
        ),
        ("not json", "not valid JSON"),
        (
            '{"format": "moescope.offload-plan", "version": 1, "plan": {"flags": {"a": "-ngl 1"}, "devices": [{"name":'
            ' "CUDA0", "budget": 1, "blocks": [], "expert_blocks": [], "bytes": {"weights": 0, "kv_cache": 0, '
            '"compute": 0, "experts": 0, "used": 0}}]}, "cache": {"slots": 3, "tokens_per_second": "fast"}}',
            "cache.tokens_per_second",
        ),
    ],
)
def test_bad_plan_files(tmp_path, capsys, content, message):
    path = tmp_path / "plan.json"
    path.write_text(content)
    code, _, err = run(capsys, "plan", "offload", "--from", path)
    assert code == 2 and message in err, err
    code, _, err = run(capsys, "plan", "offload", fixture.GGUF, "--vram", "3MiB", "--from", path)
    assert code == 2 and "--from prints a saved plan" in err


@pytest.mark.parametrize("flavor", list(FLAVORS))
@pytest.mark.parametrize("vram", ["5MiB", "3MiB,3MiB", "2MiB,2MiB,3MiB"])
def test_verified_in_llama_cpp(capsys, flavor, vram):
    """Every printed form, applied through llama.cpp's own override hook (GPU buffers emulated), puts
    exactly the planned tensors on each named buffer; a plan whose rule is broken is caught."""
    pytest.importorskip("llama_cpp")
    import dataclasses

    from moescope.gguf.verify import verify_devices

    m = inspect_gguf(fixture.GGUF)
    budgets = [int(float(v[:-3]) * MiB) for v in vram.split(",")]
    p = plan_devices(m, budgets, flavor=flavor, ctx=256, compute=MiB)
    v = verify_devices(m, p)
    assert v["ok"], v
    assert set(v["forms"]) == (
        {"override_tensor"} if flavor == "ik_llama.cpp" and len(budgets) > 1 else {"override_tensor", "n_cpu_moe"}
    )
    if len(budgets) > 1:
        assert v["forms"]["override_tensor"]["buffers"][-1] == f"CUDA{len(budgets) - 1}"
        broken = dataclasses.replace(p, rules=p.rules[:-1])  # the last GPU's pin dropped
        bad = verify_devices(m, broken)["forms"]["override_tensor"]
        assert not bad["ok"] and bad["missing"]
    code, out, err = run(
        capsys,
        "plan",
        "offload",
        fixture.GGUF,
        "--vram",
        vram,
        "--ctx",
        256,
        "--compute-buffer",
        "1MiB",
        "--flavor",
        flavor,
        "--verify",
        "--json",
    )
    assert code == 0, err
    assert json.loads(out)["verified"]["ok"]


def test_fit_target_reads_like_llama_cpp(capsys):
    """--fit-target is MiB when bare (as llama.cpp's), 0 allowed; a size with a unit is taken as written."""
    base = ("plan", "offload", fixture.GGUF, "--vram", "6MiB", "--ctx", "256", "--compute-buffer", "1MiB", "--json")
    margins = {}
    for value in ("0", "1", "1MiB", "2048KiB"):
        code, out, err = run(capsys, *base, "--fit-target", value)
        assert code == 0, err
        margins[value] = json.loads(out)["baseline"]["margin"]
    assert margins == {"0": 0, "1": MiB, "1MiB": MiB, "2048KiB": 2 * MiB}
    code, _, err = run(capsys, *base, "--fit-target", "lots")
    assert code == 2 and "--fit-target 'lots'" in err
