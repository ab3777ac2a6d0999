"""`moescope simulate`: the strategy table, the VRAM sweep and the prefill estimate from the command line;
sizes from flags or a GGUF; every bad input a one-line error with exit code 2."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import random_trace, run
from moescope import fixture
from moescope.imports import write_output


def _starts():
    return random_trace(n_tokens=600, n_layers=4, n_experts=16, k=2, n_seq=4, seed=3).seq_starts[1:].tolist()


@pytest.fixture
def npz(tmp_path):
    path = tmp_path / "la.npz"
    write_output(random_trace(n_tokens=600, n_layers=4, n_experts=16, k=2, n_seq=4, seed=3, lookahead=2), path)
    return path


def test_json_has_every_budget_strategy_and_the_prefill(capsys, npz):
    code, out, err = run(capsys, "simulate", npz, "--expert-bytes", "2MB", "--dense-bytes", "40MB", "--slots",
                         "16,32,48", "--json", "-q")  # fmt: skip
    assert code == 0, err
    d = json.loads(out)
    assert [b["slots"] for b in d["budgets"]] == [16, 32, 48]
    names = {r["name"] for r in d["budgets"][1]["results"]}
    assert {"cpu-moe", "static-layers", "static-experts", "cache:lru", "cache:belady", "prefetch:lookahead",
            "prefetch:cross-layer", "prefetch:oracle", "bound"} <= names  # fmt: skip
    assert d["tokens"] == sum(b - a - (b - a) // 2 for a, b in zip([0, *_starts()], [*_starts(), 600], strict=True))
    for b in d["budgets"]:
        tps = {r["name"]: r["tokens_per_second"] for r in b["results"]}
        assert tps["static-layers"] >= tps["cpu-moe"]
        assert "beat" in b["verdict"]
    lru = [{r["name"]: r for r in b["results"]}["cache:lru"]["tokens_per_second"] for b in d["budgets"]]
    assert lru == sorted(lru)  # more VRAM never slows a cache down
    assert {r["name"] for r in d["prefill"]["rows"]} == {"cpu-moe", "static-layers", "cache:lru"}
    assert d["assumptions"] and d["machine"]["name"] == "consumer-pcie4"


def test_table_sweep_and_flags_override_the_machine(capsys, npz):
    flags = ("--machine", "datacenter-pcie5", "--pcie-gbps", "10", "--predictor", "oracle", "--policy", "lru,belady")
    code, out, err = run(capsys, "simulate", npz, "--expert-bytes", "2MB", "--slots", "16,32", *flags)
    assert code == 0, err
    assert "PCIe 10 GB/s" in out and "(edited)" in out
    assert "tokens/s vs VRAM" in out and "prefetch:oracle" in out and "cache:fifo" not in out
    assert "Verdict at" in out and "assumes:" in out


def test_sizes_from_the_fixture_gguf(capsys, tmp_path):
    code, out, err = run(capsys, "simulate", fixture.TRACE, "--gguf", fixture.GGUF, "--slots", "32", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert len(d["expert_bytes"]) == 4 and min(d["expert_bytes"]) > 0 and d["dense_bytes"] > 0
    assert any(r["name"] == "prefetch:lookahead" for r in d["budgets"][0]["results"])  # the fixture has lookahead


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ((), "needs expert sizes"),
        (("--expert-bytes", "2MB", "--machine", "mars"), "--machine 'mars'"),
        (("--expert-bytes", "2MB", "--pcie-gbps", "0"), "--pcie-gbps is 0"),
        (("--expert-bytes", "2MB", "--latency-us", "-1"), "--latency-us is -1"),
        (("--expert-bytes", "2MB", "--vram", "1GiB", "--slots", "4"), "not both"),
        (("--expert-bytes", "2MB", "--predictor", "psychic"), "--predictor psychic"),
        (("--expert-bytes", "2MB", "--policy", "mru"), "mru"),
        (("--expert-bytes", "2MB", "--split", "half"), "--split 'half'"),
        (("--expert-bytes", "lots"), "--expert-bytes"),
        (("--expert-bytes", "2MB", "--slots", "4", "--policy", "mru"), "--policy mru"),  # checked before any budget
        (("--expert-bytes", "2MB", "--distance", "4"), "--distance 4"),
        (("--expert-bytes", "2MB", "--predictor", "lookahead", "--distance", "3"), "--lookahead 3 or more"),
    ],
)
def test_bad_input_is_a_one_line_error(capsys, npz, args, needle):
    code, _, err = run(capsys, "simulate", npz, *args)
    assert code == 2 and needle in err and "Traceback" not in err


def test_lookahead_asked_of_a_trace_without_it(capsys, tmp_path):
    path = tmp_path / "plain.npz"
    write_output(random_trace(n_tokens=200, n_layers=3, n_experts=8, k=2, seed=1), path)
    code, _, err = run(capsys, "simulate", path, "--expert-bytes", "1MB", "--predictor", "lookahead")
    assert code == 2 and "--lookahead" in err
    code, out, err = run(capsys, "simulate", path, "--expert-bytes", "1MB", "--slots", "8", "--json")
    assert code == 0, err  # by default the predictors the trace allows
    assert not any(r["name"] == "prefetch:lookahead" for r in json.loads(out)["budgets"][0]["results"])


def test_default_predictors_skip_a_lookahead_shorter_than_the_distance(capsys, npz):
    code, out, err = run(capsys, "simulate", npz, "--expert-bytes", "1MB", "--slots", "16", "--distance", "3", "--json")
    assert code == 0, err  # captured to depth 2: the id-only predictors run at distance 3
    names = {r["name"] for r in json.loads(out)["budgets"][0]["results"]}
    assert "prefetch:lookahead" not in names and "prefetch:cross-layer" in names


def test_a_budget_below_top_k_per_layer_leaves_the_static_strategies(capsys, npz):
    code, out, err = run(capsys, "simulate", npz, "--expert-bytes", "1MB", "--slots", "4", "--json")
    assert code == 0, err
    b = json.loads(out)["budgets"][0]
    assert {r["name"] for r in b["results"]} == {"cpu-moe", "static-layers"}
    assert "no per-expert cache fits" in b["verdict"]
    assert np.isfinite(b["results"][0]["tokens_per_second"])
