"""The fuzz suite's fast tier (the long tier: ``make fuzz``, tools/fuzz.py): seeded mutations of every
readable format and hostile arguments, through the CLI in forked children with a memory cap and a time
limit (tests/fuzz_harness.py). Every run must be accepted (exit 0) or a clean one-line error (exit 2)."""

from __future__ import annotations

import sys

import pytest

import fuzz_harness as fh

FAST_CASES = 300  # a few hundred: every format about 22 times, plus hostile arguments


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the fork server reads /proc and forks")
def test_fuzz_fast_tier(tmp_path):
    outcomes = fh.run_cases(fh.make_cases(FAST_CASES, seed=0), tmp_path, jobs=2, timeout=60)
    assert len(outcomes) == FAST_CASES
    bad = [o for o in outcomes if o.outcome in fh.BAD]
    report = "\n".join(f"{o.outcome}: {o.case.label()}\n    {o.stderr_tail[-400:]}" for o in bad[:20])
    assert not bad, f"{len(bad)} of {FAST_CASES} runs failed the contract:\n{report}"
    counts = {r["format"]: r for r in fh.table(outcomes)}
    assert set(counts) == {*fh.FORMATS, "cli", "all"}  # every format was fuzzed


def test_mutators_are_seeded_and_change_their_input():
    import random

    data = bytes(range(256)) * 8
    for name, mut in fh.BYTE_MUTATORS.items():
        a, b = mut(random.Random(3), data), mut(random.Random(3), data)
        assert a == b, name  # a case reproduces from its seed
    assert fh.mutate_json(random.Random(1), b'{"a": [1, 2], "b": {"c": "x"}}') != b'{"a": [1, 2], "b": {"c": "x"}}'
    cases = fh.make_cases(60, seed=5)
    assert cases == fh.make_cases(60, seed=5) and {c.fmt for c in cases} == {*fh.FORMATS, "cli"}


@pytest.mark.parametrize(
    ("rc", "stderr", "timed_out", "over", "want"),
    [
        (0, "", False, False, "accepted"),
        (2, "error: x is not a GGUF; re-convert it\n", False, False, "clean"),
        (2, "Usage: moescope place [OPTIONS] SRC\nTry 'moescope place -h' for help.\n", False, False, "clean"),
        (1, "Traceback (most recent call last):\n  File ...\nKeyError: 'x'\n", False, False, "traceback"),
        (1, "error: internal error (KeyError: 'x'); this is a bug", False, False, "traceback"),
        (2, "error: out of memory; read fewer layers", False, False, "memory"),
        (None, "", True, False, "hang"),
        (-11, "", False, False, "crash"),
        (0, "", False, True, "memory"),
        (2, "something else\n", False, False, "other"),
    ],
)
def test_classify(rc, stderr, timed_out, over, want):
    assert fh.classify(rc, stderr, timed_out, over) == want
