"""The llama.cpp offload planner: VRAM accounting by hand, both flag forms agree, leading dense blocks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run
from moescope import fixture
from moescope.errors import UsageError
from moescope.gguf import inspect_gguf
from moescope.gguf.inspect import open_gguf
from moescope.gguf.plan import block_regex, cpu_tensors, kv_cache_bytes, ot_rule, plan_offload

MiB = 2**20


def dense_first_gguf(path, n_blocks=4, n_experts=4, embd=32, ff=16):
    """Block 0 dense (no router), blocks 1.. MoE with float32 experts; 2 KV heads of 8 dims."""
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
    w.add_tensor("token_embd.weight", np.zeros((100, embd), dtype=np.float32))
    w.add_tensor("blk.0.ffn_up.weight", np.zeros((ff, embd), dtype=np.float32))
    for b in range(1, n_blocks):
        w.add_tensor(f"blk.{b}.ffn_gate_inp.weight", np.zeros((n_experts, embd), dtype=np.float32))
        for name in ("gate", "up", "down"):
            w.add_tensor(f"blk.{b}.ffn_{name}_exps.weight", np.zeros((n_experts, ff, embd), dtype=np.float32))
    w.add_tensor("output.weight", np.zeros((100, embd), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_accounting_and_flags(tmp_path):
    m = inspect_gguf(dense_first_gguf(tmp_path / "m.gguf"))
    layer = 4 * 3 * 16 * 32 * 4  # experts x (gate, up, down) x ff x embd x 4 bytes
    weights = 16 * 32 * 4 + 3 * 4 * 32 * 4 + 100 * 32 * 4  # dense ffn + routers + output (embedding excluded)
    kv = 64 * 4 * 2 * (8 + 8) * 2  # ctx x blocks x heads_kv x (k + v) x f16
    assert kv_cache_bytes(m, open_gguf(m.path), 64, "f16") == kv
    p = plan_offload(m, weights + kv + 1000 + layer + 10, ctx=64, compute=1000)
    assert (p.weights, p.kv_cache, p.compute) == (weights, kv, 1000)
    assert p.gpu_blocks == (3,) and p.cpu_blocks == (1, 2) and p.n_cpu_moe == 3  # blk.0 (dense) counted
    assert p.forms_agree and p.ot == r"blk\.(1|2)\.ffn_(up|down|gate|gate_up)_(ch|)exps=CPU"
    assert any("leading dense" in n for n in p.notes)
    everything = plan_offload(m, weights + kv + 1000 + 3 * layer, ctx=64, compute=1000)
    assert everything.n_cpu_moe == 0 and everything.ot is None and everything.cpu_blocks == ()
    q8 = plan_offload(m, weights + kv + 1000 + layer + 10, ctx=64, compute=1000, kv_type="q8_0")
    assert q8.kv_cache == int(64 * 4 * 2 * 16 * 34 / 32)
    with pytest.raises(UsageError, match="does not hold even the non-expert weights"):
        plan_offload(m, weights, ctx=64, compute=1000)
    with pytest.raises(UsageError, match="--kv-type 'q3'"):
        plan_offload(m, 10 * MiB, kv_type="q3")


def test_regex_semantics():
    names = [
        "blk.1.ffn_up_exps.weight",
        "blk.11.ffn_up_exps.weight",
        "blk.1.ffn_gate_up_exps.weight",
        "blk.1.ffn_up_shexp.weight",
        "blk.1.ffn_down_chexps.weight",
        "blk.2.attn_q.weight",
    ]
    assert cpu_tensors(names, [block_regex(1) + "=CPU"]) == {names[0], names[2], names[4]}
    assert cpu_tensors(names, [ot_rule([1, 11])]) == {names[0], names[1], names[2], names[4]}
    # first matching rule wins: an earlier rule keeping blk.1 on CUDA0 shadows the CPU rule
    assert cpu_tensors(names, [r"blk\.1\.=CUDA0", ot_rule([1, 11])]) == {names[1]}


def test_cli_plan_offload(capsys):
    gguf_path = fixture.FIXTURE_DIR / fixture.GGUF
    code, out, err = run(
        capsys,
        "plan",
        "offload",
        gguf_path,
        "--vram",
        "4.2MiB",
        "--compute-buffer",
        "1MiB",
        "--ctx",
        "1024",
        "--trace",
        fixture.FIXTURE_DIR / fixture.TRACE,
        "--ubatch",
        "64",
        "--json",
    )
    assert code == 0, err
    d = json.loads(out)
    plan = d["plan"]
    assert plan["forms_agree"] and len(plan["cpu_blocks"]) == 3
    # the trace ranks the layers by experts per ubatch: the GPU keeps the one prefill would stream most
    from moescope.gguf.plan import experts_per_window_by_layer
    from moescope.imports import read_input

    use = experts_per_window_by_layer(read_input(fixture.FIXTURE_DIR / fixture.TRACE), 64)
    assert plan["gpu_blocks"] == [max(use, key=use.get)]
    assert (plan["n_cpu_moe"] is None) == ("n_cpu_moe" not in plan["flags"])
    assert d["projection"]["prefill_pcie_bound_tokens_per_s"] > 0
    assert d["projection"]["experts_streamed_per_ubatch_per_layer"] <= 16
    assert d["cache"]["slots"] > 0 and 0 < d["cache"]["miss_rate"] < 1
    code, out, _ = run(
        capsys, "plan", "offload", gguf_path, "--vram", "4.2MiB", "--compute-buffer", "1MiB", "--ctx", "1024"
    )
    assert code == 0 and "--n-cpu-moe" in out and "every tensor where planned: yes" in out
    code, _, err = run(capsys, "plan", "offload", gguf_path, "--vram", "1MiB")
    assert code == 2 and "not hold even the non-expert" in err


def test_verify_in_llama_cpp(capsys):
    """Both printed forms, applied through llama.cpp's own tensor-override hook, move exactly the planned
    expert tensors; a rule that misses a block is caught, and an unknown buffer name is refused."""
    import dataclasses

    pytest.importorskip("llama_cpp")
    from moescope.gguf.verify import llama_overrides, parse_override_value, verify_plan

    m = inspect_gguf(fixture.GGUF)
    p = plan_offload(m, 5 << 20, ctx=256, compute=2 << 20)
    assert p.cpu_blocks and p.gpu_blocks
    v = verify_plan(m, p)
    assert v["ok"] and v["planned"] == 3 * len(p.cpu_blocks)
    wrong = dataclasses.replace(p, ot=ot_rule(list(p.cpu_blocks[:-1])))
    bad = verify_plan(m, wrong)["forms"]["override_tensor"]
    assert not bad["ok"] and bad["missing"] and all(f"blk.{p.cpu_blocks[-1]}." in t for t in bad["missing"])
    with pytest.raises(UsageError, match="CUDA0"):
        llama_overrides(fixture.GGUF, parse_override_value(r"blk\.0\.=CUDA0"))
    assert parse_override_value("a=CPU,b=CUDA0") == [("a", "CPU"), ("b", "CUDA0")]
    code, out, err = run(
        capsys,
        "plan",
        "offload",
        fixture.GGUF,
        "--vram",
        "4MiB",
        "--ctx",
        "256",
        "--compute-buffer",
        "2MiB",
        "--verify",
        "--json",
    )
    assert code == 0, err
    assert json.loads(out)["verified"]["ok"]
