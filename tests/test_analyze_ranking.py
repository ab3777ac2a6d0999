"""Per-layer rankings (CSV) and group mass, against the naive references."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

import reference
from conftest import random_trace
from moescope import fixture
from moescope.analyze import group_mass, rank_experts, write_ranking_csv
from moescope.errors import UsageError
from moescope.imports import read_input
from moescope.trace import ExpertCounts


@pytest.mark.parametrize("seed", range(3))
def test_ranking_matches_reference(seed):
    tr = random_trace(n_tokens=200, n_layers=3, n_experts=8, k=2, seed=seed)
    r = rank_experts(tr)
    for i in range(3):
        assert r.order[i].tolist() == reference.ranking(tr.experts, 8, i)
    g = rank_experts(tr, by="gate")
    gate = tr.counts("gate").values
    assert all(np.all(np.diff(gate[i, g.order[i]]) <= 0) for i in range(3))


def test_rank_counts_input_and_refusals():
    c = ExpertCounts([[1, 5, 5, 0]], layer_ids=[7])
    r = rank_experts(c)
    assert r.order.tolist() == [[1, 2, 0, 3]] and r.top(7, 2) == [1, 2] and r.gate_mass is None
    with pytest.raises(UsageError, match="needs gate weights"):
        rank_experts(c, by="gate")
    with pytest.raises(UsageError, match="holds shares"):
        rank_experts(c.normalize())
    with pytest.raises(UsageError, match="layer 3 is not ranked"):
        r.top(3, 1)


def test_csv_roundtrip(tmp_path):
    tr = random_trace(n_layers=2, n_experts=8)
    r = rank_experts(tr)
    write_ranking_csv(r, tmp_path / "r.csv")
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert len(rows) == 2 * 8 and list(rows[0]) == ["layer", "expert", "rank", "count", "gate_mass", "share"]
    layer1 = [row for row in rows if row["layer"] == "1"]
    assert [int(row["expert"]) for row in layer1] == r.order[0].tolist()
    assert [int(row["rank"]) for row in layer1] == list(range(1, 9))
    assert sum(float(row["share"]) for row in layer1) == pytest.approx(1.0)
    counts = tr.counts().values
    assert all(int(row["count"]) == counts[0, int(row["expert"])] for row in layer1)


@pytest.mark.parametrize("size", [1, 3, 8])
def test_group_mass_matches_reference(size):
    tr = random_trace(n_tokens=120, n_layers=2, n_experts=8, k=2, seed=size)
    r = rank_experts(tr)
    groups = {lid: r.top(lid, size) for lid in tr.layer_ids.tolist()}
    got = group_mass(tr, groups)
    for i, lid in enumerate(tr.layer_ids.tolist()):
        mass, full = reference.group_mass(tr.experts, i, set(groups[lid]))
        assert got.mass_share[i] == pytest.approx(mass) and got.full_token_share[i] == pytest.approx(full)
    if size == 8:
        assert got.mass_share == (1.0, 1.0) and got.full_token_share == (1.0, 1.0)
    with pytest.raises(UsageError, match="no expert group given"):
        group_mass(tr, {1: [0]})


def test_cli_rank(capsys, tmp_path):
    from conftest import run

    code, _, err = run(capsys, "rank", fixture.TRACE, "--by", "gate", "-o", tmp_path / "r.csv")
    assert code == 0 and (tmp_path / "r.csv").is_file()
    code, out, _ = run(capsys, "rank", fixture.TRACE, "--json")
    assert code == 0 and len(json.loads(out)["rows"]) == 4 * 16
    tr = read_input(fixture.TRACE)
    assert json.loads(out)["rows"][0]["count"] == int(tr.counts().values[0].max())
    code, _, err = run(capsys, "rank", fixture.TRACE, "--by", "bytes")
    assert code == 2 and "rank by 'bytes'" in err


def test_cli_group_mass(capsys, tmp_path):
    from conftest import run

    trace = fixture.FIXTURE_DIR / fixture.TRACE
    code, out, err = run(capsys, "rank", trace, "--group-top", "4", "--json")
    assert code == 0, err
    d = json.loads(out)
    tr = read_input(trace)
    r = rank_experts(tr)
    want = group_mass(tr, {lid: r.top(lid, 4) for lid in tr.layer_ids.tolist()})
    assert d["group_mass"] == [
        want.to_dict()
        | {
            "layer_ids": list(want.layer_ids),
            "group_size": [4] * 4,
            "mass_share": list(want.mass_share),
            "full_token_share": list(want.full_token_share),
        }
    ]
    groups = tmp_path / "g.json"
    groups.write_text(json.dumps({"groups": [{str(lid): [0, 1] for lid in tr.layer_ids.tolist()}]}))
    code, out, _ = run(capsys, "rank", trace, "--groups-file", groups)
    assert code == 0 and "group mass of group 1" in out
    groups.write_text("{}")
    code, _, err = run(capsys, "rank", trace, "--groups-file", groups)
    assert code == 2 and "--groups-file" in err
    code, _, err = run(capsys, "rank", fixture.FIXTURE_DIR / fixture.TRACE, "--group-top", "2", "--groups-file", groups)
    assert code == 2 and "not both" in err
