"""The HTML report: verdicts and figures from the fixture trace, offline, and rendered by a real browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from conftest import random_trace, run
from moescope import fixture
from moescope.imports import read_input, write_output
from moescope.report import build_report
from test_compare import perturbed

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


def _browser() -> str | None:
    return next((b for b in map(shutil.which, BROWSERS) if b), None)


@pytest.fixture(scope="module")
def fixture_report(tmp_path_factory):
    trace = read_input(fixture.FIXTURE_DIR / fixture.TRACE)
    other = perturbed(trace, 0.05)  # a second capture of the same tokens whose routing differs at 5%
    calls = []
    rep = build_report(
        trace,
        gguf=fixture.FIXTURE_DIR / fixture.GGUF,
        compare=other,
        compare_label="llama <q4>",
        progress=lambda *a: calls.append(a),
    )
    rep.summary["_progress"] = calls
    path = tmp_path_factory.mktemp("report") / "report.html"
    path.write_text(rep.html, encoding="utf-8")
    return rep, path


def test_report_is_self_contained_with_verdicts(fixture_report):
    rep, _ = fixture_report
    html = rep.html
    for title in ("Is a per-expert cache worth building?", "A cache of C experts per layer", "llama.cpp offload plan"):
        assert title in html
    assert "Routing drift" in html and "llama &lt;q4&gt;" in html and "llama <q4>" not in html
    # the placement card states the largest D asked (not the best-looking one), with every D beside it
    assert re.search(r"devices per token at D=8 \(every D asked: [-+]\d+%, [-+]\d+%, [-+]\d+%\)", html)
    assert 0.9 < rep.summary["drift"]["overall"]["identical"] < 0.99
    # the fixture's five domains: how far their expert loads agree, and that the balance is for this mix
    agree = rep.summary["placement"]["load_agreement"]
    assert [g["a"] for g in agree] == read_input(fixture.FIXTURE_DIR / fixture.TRACE).labels()
    assert "the balance above is for this mix of them" in html and "--balance-loads" in html
    assert "--n-cpu-moe" in html and "Belady" in html
    assert not re.search(r"""<script[^>]+src=|<link[^>]+href=["']https?:""", html)  # nothing fetched to view it
    assert html.count("Plotly.newPlot") == html.count("class='figure'") >= 3
    assert {"concentration", "cache", "curves", "offload", "drift", "timeline"} <= set(rep.summary)
    # what a cache would buy: sizes from the GGUF, every budget decoded, the captured lookahead among the strategies
    assert "What would a cache buy?" in html and "What a cache buys" in html
    tl = rep.summary["timeline"]
    assert tl["sizes_from"] == "the GGUF tiny-moe-f32.gguf" and len(tl["budgets"]) == 4
    assert any(r["name"] == "prefetch:lookahead" for r in tl["budgets"][1]["results"])
    assert "The captured lookahead (layer l+1's router" in html
    # progress: every stage with its position out of a known total (was a bare "0/?"), placement included
    calls = rep.summary["_progress"]
    assert [c[1] for c in calls] == list(range(len(calls))) and {c[2] for c in calls} == {len(calls) - 1}
    assert "placement" in [c[0] for c in calls] and calls[-1][0] == "rendering"


def test_report_renders_in_a_browser(fixture_report, tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("no Chromium on this machine (.ci/run installs Debian's chromium)")
    _, path = fixture_report
    args = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=20000"]
    dom = subprocess.run([*args, "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=180).stdout
    body = re.search(r"<body([^>]*)>", dom)
    assert body, "the browser returned no page"
    attrs = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body.group(1)))
    assert json.loads(attrs["errors"].replace("&quot;", '"')) == []
    assert int(attrs["figures-rendered"]) == int(attrs["figures-expected"]) >= 3
    shot = tmp_path / "report.png"
    subprocess.run(
        [*args, "--window-size=1280,2600", f"--screenshot={shot}", path.as_uri()], capture_output=True, timeout=180
    )
    assert shot.stat().st_size > 50_000
    keep = os.environ.get("MOESCOPE_SCREENSHOT_DIR")
    if keep:
        shutil.copy(shot, keep)


def test_cli_report(capsys, tmp_path):
    out = tmp_path / "r.html"
    code, stdout, err = run(capsys, "report", fixture.FIXTURE_DIR / fixture.TRACE, "-o", out, "--json")
    assert code == 0, err
    assert json.loads(stdout)["report"] == str(out) and out.stat().st_size > 1_000_000
    assert "timeline" not in json.loads(stdout)  # no sizes, no timeline
    sized = ("--expert-bytes", "2.65MB", "--dense-bytes", "58MB", "--machine", "datacenter-pcie5", "--json")
    code, stdout, err = run(capsys, "report", fixture.FIXTURE_DIR / fixture.TRACE, "-o", tmp_path / "s.html", *sized)
    assert code == 0, err
    tl = json.loads(stdout)["timeline"]
    assert tl["machine"]["name"] == "datacenter-pcie5" and tl["expert_bytes"] == [2.65e6] * 4
    # --dense-bytes over the GGUF's expert sizes (it was ignored without --expert-bytes)
    g = ("--gguf", fixture.GGUF, "--dense-bytes", "1GB", "--json")
    code, stdout, err = run(capsys, "report", fixture.FIXTURE_DIR / fixture.TRACE, "-o", tmp_path / "g.html", *g)
    assert code == 0, err
    tl = json.loads(stdout)["timeline"]
    assert tl["dense_bytes"] == 1e9 and tl["sizes_from"] == "the GGUF tiny-moe-f32.gguf, --dense-bytes 1GB"
    code, _, err = run(
        capsys, "report", fixture.FIXTURE_DIR / fixture.TRACE, "-o", tmp_path / "d.html", "--dense-bytes", "1GB"
    )
    assert code == 2 and "--dense-bytes" in err and not (tmp_path / "d.html").exists()
    code, _, err = run(
        capsys, "report", fixture.FIXTURE_DIR / fixture.TRACE, "-o", tmp_path / "m.html", "--machine", "x"
    )
    assert code == 2 and "--machine 'x'" in err and not (tmp_path / "m.html").exists()
    code, _, err = run(capsys, "report", fixture.FIXTURE_DIR / fixture.TRACE, "-o", out)
    assert code == 2 and "already exists" in err
    write_output(random_trace(n_tokens=50), tmp_path / "other.npz")
    args = (
        "report",
        fixture.FIXTURE_DIR / fixture.TRACE,
        "-o",
        tmp_path / "d.html",
        "--compare",
        tmp_path / "other.npz",
    )
    code, _, err = run(capsys, *args)
    assert code == 2 and "and 50 tokens" in err and not (tmp_path / "d.html").exists()
