"""Offload plans on every zoo GGUF, one and two GPUs, both flavours, each printed form applied through
llama.cpp's own tensor-override hook (GPU buffers emulated on the CPU build), and the plan file round trip;
the engine rules the planner mirrors are read from the llama.cpp source in use."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("transformers")

from moescope.errors import UsageError  # noqa: E402
from moescope.gguf import inspect_gguf  # noqa: E402
from moescope.gguf.fit import FIT_EXPS_REGEX, FIT_MARGIN, fit_baseline  # noqa: E402
from moescope.gguf.offload import FLAVORS, block_bytes, plan_devices  # noqa: E402
from moescope.gguf.planfile import plan_document, read_plan, render  # noqa: E402
from moescope.gguf.verify import verify_devices  # noqa: E402
from zoo import QUANTIZED, ZOO, llama_source, zoo_model  # noqa: E402

pytestmark = pytest.mark.slow
ROWS = [(name, "f32") for name in ZOO] + list(QUANTIZED)
COMPUTE = 1 << 20


def _two_gpus(m, flavor, blocks, output):
    """The smallest even-ish pair of budgets whose plan keeps some experts on each side and gives each GPU
    blocks (so the rules name CUDA0, CUDA1 and CPU)."""
    for extra in np.linspace(0, m.routed_expert_bytes, 41)[1:]:
        budgets = [int(blocks / 2 + extra / 2) + COMPUTE, int(blocks / 2 + extra / 2) + output + COMPUTE]
        try:
            p = plan_devices(m, budgets, flavor=flavor, ctx=256, compute=COMPUTE)
        except UsageError:
            continue
        if p.cpu_blocks and p.gpu_blocks and all(d.blocks for d in p.devices):
            return budgets
    raise AssertionError(f"no two-GPU budgets put blocks on both GPUs and experts on both sides for {m.path}")


@pytest.mark.parametrize(("name", "outtype"), ROWS, ids=[f"{n}-{t}" for n, t in ROWS])
def test_plans_place_exactly_the_planned_tensors(name, outtype, tmp_path):
    _, gguf = zoo_model(name, outtype)
    m = inspect_gguf(gguf)
    bb = block_bytes(m, 256, "f16")
    blocks = int((bb.dense + bb.kv).sum())
    rest = blocks + bb.output + COMPUTE  # everything but the experts, on one GPU
    half = m.routed_expert_bytes // 2
    for flavor in FLAVORS:
        for budgets in ([rest + half], _two_gpus(m, flavor, blocks, bb.output)):
            p = plan_devices(m, budgets, flavor=flavor, ctx=256, compute=COMPUTE)
            assert p.cpu_blocks and p.gpu_blocks, (flavor, budgets)
            assert all(d.used <= d.budget for d in p.devices)
            v = verify_devices(m, p)
            assert v["ok"], (flavor, budgets, v)
            if len(budgets) == 2:
                assert {"CUDA0", "CUDA1"} <= set(v["forms"]["override_tensor"]["buffers"])
            doc = plan_document(m, p, projection={"decode_tokens_per_s": 1.0})
            path = tmp_path / f"{flavor}-{len(budgets)}.json"
            path.write_text(json.dumps(doc))
            back = read_plan(path)
            assert back == json.loads(json.dumps(doc)) and back["plan"]["forms_agree"]
            assert render(back) == render(doc)
    fit = fit_baseline(m, [rest + half], ctx=256, compute=COMPUTE, margin=0)
    moe = list(m.layer_ids)
    assert list(fit.cpu_blocks) == moe[len(moe) - len(fit.cpu_blocks) :]


def test_mirrored_rules_match_the_llama_cpp_source():
    """The layer split (`layer_devices`), the output layer on the last GPU, the token embedding on the CPU,
    and --fit's margin and expert pattern, as the llama.cpp source in use writes them."""
    src = llama_source()
    model = (src / "src" / "llama-model.cpp").read_text(encoding="utf-8")
    assert "const int i_gpu_start = std::max(n_layer_all + 1 - n_gpu_layers, 0);" in model
    assert (
        "std::upper_bound(splits.begin(), splits.begin() + n_devices(), float(il - i_gpu_start)/act_gpu_layers)"
        in model
    )
    assert "pimpl->dev_output = get_layer_buft_list(n_layer_all);" in model
    assert "pimpl->dev_input = { cpu_dev, &pimpl->cpu_buft_list };" in model
    common = (src / "common" / "common.h").read_text(encoding="utf-8")
    margin = re.search(r"fit_params_target\s*=\s*std::vector<size_t>\(llama_max_devices\(\),\s*([0-9 *]+)\)", common)
    assert margin and int(np.prod([int(x) for x in margin.group(1).split("*")])) == FIT_MARGIN
    fit = (src / "common" / "fit.cpp").read_text(encoding="utf-8")
    assert FIT_EXPS_REGEX.replace("\\", "\\\\") in fit
