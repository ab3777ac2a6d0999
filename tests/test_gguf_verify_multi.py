"""Multi-GPU ``-ot`` rules checked in a CPU build of llama.cpp, their device buffers emulated: llama.cpp's own
matching must put exactly the tensors a naive first-match-wins ``re.search`` predicts on each named buffer."""

from __future__ import annotations

import functools
import re

import pytest

from moescope import fixture
from moescope.errors import UsageError
from moescope.gguf import inspect_gguf
from moescope.gguf.runtime import llama_cpp
from moescope.gguf.verify import (
    MAX_EMULATED,
    host_buffer_types,
    llama_overrides,
    llama_placement,
    parse_override_value,
)

pytest.importorskip("llama_cpp")

SPLIT = r"blk\.0\.ffn_(up|down|gate)_exps=CPU,blk\.(0|1)\.={a},blk\.(2|3)\.={b}"


@functools.cache
def names() -> list[str]:
    return [t.name for t in inspect_gguf(fixture.GGUF).tensors]


def naive_placement(tensors: list[str], rules: list[tuple[str, str]]) -> dict[str, str]:
    """The oracle: for each tensor, the buffer of the first rule whose pattern `re.search` finds in its name."""
    out = {}
    for name in tensors:
        for pattern, buft in rules:
            if re.search(pattern, name):
                out[name] = buft
                break
    return out


def assert_matches(got: dict[str, str], want: dict[str, str]) -> None:
    """Same tensors; a tensor sent to ``CPU`` may sit in any of the CPU's buffer types (``CPU_REPACK``)."""
    assert set(got) == set(want), (sorted(set(got) - set(want)), sorted(set(want) - set(got)))
    host = host_buffer_types(llama_cpp())
    wrong = {t: (got[t], b) for t, b in want.items() if (got[t] not in host if b == "CPU" else got[t] != b)}
    assert not wrong


@pytest.mark.parametrize("devices", [("CUDA0", "CUDA1"), ("Vulkan0", "Vulkan1"), ("ROCm0", "SYCL0")])
def test_two_devices_and_cpu_experts(devices):
    """Block 0's experts on the host, the rest of blocks 0-1 on the first device, blocks 2-3 on the second."""
    a, b = devices
    rules = parse_override_value(SPLIT.format(a=a, b=b))
    got = llama_placement(fixture.GGUF, rules, emulate=devices)
    assert_matches(got, naive_placement(names(), rules))
    host = host_buffer_types(llama_cpp())
    blocks = {n: int(n.split(".")[1]) for n in names() if n.startswith("blk.")}
    experts0 = {n for n, blk in blocks.items() if blk == 0 and "_exps." in n}
    assert len(experts0) == 3 and all(got[n] in host for n in experts0)
    assert {n for n, v in got.items() if v == a} == {n for n, blk in blocks.items() if blk in (0, 1)} - experts0
    assert {n for n, v in got.items() if v == b} == {n for n, blk in blocks.items() if blk in (2, 3)}
    assert set(got) == set(blocks)  # token_embd, output_norm ...: no rule, not overridden


def test_first_matching_rule_wins():
    """Reordered, the block rule shadows the CPU rule: block 0's experts stay on CUDA0; an expert rule put
    before a catch-all sends every expert to CUDA1 and only the rest to CUDA0."""
    emulate = ["CUDA0", "CUDA1"]
    shadowed = parse_override_value(r"blk\.(0|1)\.=CUDA0,blk\.0\.ffn_(up|down|gate)_exps=CPU,blk\.(2|3)\.=CUDA1")
    got = llama_placement(fixture.GGUF, shadowed, emulate=emulate)
    assert_matches(got, naive_placement(names(), shadowed))
    assert got["blk.0.ffn_up_exps.weight"] == "CUDA0" and "CPU" not in got.values()
    experts_first = parse_override_value(r"_exps\.=CUDA1,blk\.=CUDA0")
    got = llama_placement(fixture.GGUF, experts_first, emulate=emulate)
    assert_matches(got, naive_placement(names(), experts_first))
    assert {n for n, v in got.items() if v == "CUDA1"} == {n for n in names() if "_exps." in n}
    assert got["blk.3.attn_q.weight"] == "CUDA0"


def test_unknown_buffer_refused():
    rules = parse_override_value(SPLIT.format(a="CUDA0", b="CUDA2"))
    with pytest.raises(UsageError, match=r"\['CUDA2'\].*'CPU'.*emulated \['CUDA0', 'CUDA1'\]"):
        llama_placement(fixture.GGUF, rules, emulate=["CUDA0", "CUDA1"])
    with pytest.raises(UsageError, match="CUDA0"):
        llama_placement(fixture.GGUF, parse_override_value(r"blk\.0\.=CUDA0"))


@pytest.mark.parametrize(
    ("emulate", "match"),
    [
        (["cuda-0"], "not device buffer names"),
        (["0CUDA"], "not device buffer names"),
        (["CUDA0x"], "not device buffer names"),
        ([""], "not device buffer names"),
        (["CUDA0", "CUDA0"], "more than once"),
        (["CPU"], "real buffer types"),
        (["CPU_REPACK"], "real buffer types"),
        ([f"CUDA{i}" for i in range(MAX_EMULATED + 1)], "at most 16"),
        ("CUDA0", "one string"),
    ],
)
def test_bad_emulated_names_refused(emulate, match):
    with pytest.raises(UsageError, match=match):
        llama_placement(fixture.GGUF, parse_override_value(r"blk\.0\.=CPU"), emulate=emulate)


def test_sixteen_devices():
    """The most emulated names at once; each block on its own device, the last four of the sixteen."""
    emulate = [f"CUDA{i}" for i in range(MAX_EMULATED)]
    rules = [(rf"blk\.{b}\.", emulate[-1 - b]) for b in range(4)]
    got = llama_placement(fixture.GGUF, rules, emulate=emulate)
    assert_matches(got, naive_placement(names(), rules))
    assert sorted(set(got.values())) == sorted(emulate[-4:])


def test_cpu_only_rules_unchanged():
    """With no emulation, or with emulated devices that no rule names, CPU rules move what they did."""
    rules = parse_override_value(r"blk\.(1|3)\.ffn_.*_exps=CPU,attn_q\.=CPU")
    old = llama_overrides(fixture.GGUF, rules)
    assert old == llama_placement(fixture.GGUF, rules) == llama_placement(fixture.GGUF, rules, emulate=["CUDA0"])
    assert_matches(old, naive_placement(names(), rules))
    assert len(old) == 6 + 4
