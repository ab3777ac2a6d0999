"""Offload plans at real size: a sparse GGUF with Qwen3-30B-A3B's layout (48 blocks, 128 experts, Q4_K_M-like
mixed quant types, a 151,936-token vocabulary; `sparse_gguf`), planned on two GPUs and checked in llama.cpp
(metadata only: the weights, a hole in the file, are never read)."""

from __future__ import annotations

import pytest

from moescope.gguf import inspect_gguf
from moescope.gguf.fit import fit_baseline
from moescope.gguf.offload import block_bytes, forms_agree, plan_devices
from sparse_gguf import QWEN3_30B_A3B, sparse_qwen3_moe

pytestmark = pytest.mark.slow
GiB = 2**30


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return inspect_gguf(sparse_qwen3_moe(tmp_path_factory.mktemp("realshape") / "qwen3-30b-a3b.gguf"))


def test_layout(qwen3):
    m = qwen3
    assert (m.n_blocks, m.n_experts, m.top_k) == (48, 128, 8) and m.layer_ids == tuple(range(48))
    sizes = {m.expert_bytes[b] for b in m.layer_ids}
    assert len(sizes) == 2  # Q6_K down projections in every other block: layers differ in bytes
    assert 16 * GiB < m.routed_expert_bytes < 17 * GiB
    bb = block_bytes(m, 32768, "q8_0")
    # 4 KV heads x 128 dims x (K + V) x 48 layers x 32768 tokens x 34/32 bytes (q8_0)
    assert int(bb.kv.sum()) == int(32768 * 48 * 4 * 256 * 34 / 32)
    assert bb.output > 0 and QWEN3_30B_A3B["vocab"] == 151936


@pytest.mark.parametrize("flavor", ["llama.cpp", "ik_llama.cpp"])
def test_two_gpu_plan_at_real_size(qwen3, flavor):
    m = qwen3
    budgets = [8 * GiB, 6 * GiB]
    p = plan_devices(m, budgets, flavor=flavor, ctx=32768, kv_type="q8_0")
    assert all(d.used <= d.budget for d in p.devices) and forms_agree(p, m)
    assert 0 < len(p.cpu_blocks) < 48 and all(d.blocks for d in p.devices)
    fit = fit_baseline(m, budgets, ctx=32768, kv_type="q8_0")
    assert fit is not None and fit.experts_in_vram < p.experts_in_vram  # the 1 GiB margins cost layers
    pytest.importorskip("llama_cpp")
    from moescope.gguf.verify import verify_devices

    v = verify_devices(m, p)
    assert v["ok"], v
    assert v["forms"]["override_tensor"]["planned"]["CUDA1"] > 0
