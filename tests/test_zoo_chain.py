"""The whole moescope chain on every zoo model, through the command line, as a user runs it.

Per architecture of `zoo.ZOO` (f32) and per quantized row of `zoo.QUANTIZED`: ``capture hf`` on the
fixture's held-out text, ``capture llama --tokens-from`` the transformers trace in exact mode (f32 KV cache,
flash attention off) and with llama.cpp's defaults, ``compare`` of each with the transformers trace,
``gguf inspect``, ``plan offload --verify`` (both printed forms applied through llama.cpp's own
tensor-override hook), ``split`` into 2 groups whose parts llama.cpp loads and generates from, and
``reduce`` at two k. With ``MOESCOPE_ZOO_TABLE=FILE`` each row's figures are appended to FILE as JSON lines
(the table of the closing note). Slow: the first run builds and converts the zoo (`tests/zoo.py`).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
llama_cpp = pytest.importorskip("llama_cpp")

from conftest import run  # noqa: E402
from moescope import fixture  # noqa: E402
from moescope.gguf import inspect_gguf  # noqa: E402
from moescope.gguf.inspect import field, open_gguf  # noqa: E402
from moescope.gguf.runtime import LlamaSession  # noqa: E402
from moescope.store import load_trace  # noqa: E402
from zoo import QUANTIZED, ZOO, zoo_model  # noqa: E402

pytestmark = pytest.mark.slow
SEQ_LEN, MAX_TOKENS = 64, 384
ROWS = [(name, "f32") for name in ZOO] + list(QUANTIZED)


def cli_json(capsys, *args):
    code, out, err = run(capsys, "-q", *args, "--json")
    assert code == 0, f"moescope {' '.join(map(str, args))} exited {code}: {err[-2000:]}"
    return json.loads(out)


def generate(gguf, ids, steps=4):
    """Greedy tokens from llama.cpp after `ids` (the part must load and run)."""
    with LlamaSession(gguf, inspect_gguf(gguf), n_ctx=len(ids) + steps) as session:
        session.run(ids)
        out = []
        for pos in range(len(ids), len(ids) + steps):
            out.append(session.argmax_last())
            session.run([out[-1]], start_pos=pos)
    return out


@pytest.mark.parametrize(("name", "outtype"), ROWS, ids=[f"{n}-{t}" for n, t in ROWS])
def test_chain(name, outtype, tmp_path, capsys):
    spec = ZOO[name]
    hf_dir, gguf = zoo_model(name, outtype)
    row = {"model": name, "type": outtype}
    if outtype != "f32":  # the file type asked for, from the converter (q8_0) or llama.cpp's own quantizer
        reader = open_gguf(gguf)
        assert field(reader, "general.file_type") == getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{outtype.upper()}")
        if outtype == "MXFP4_MOE":
            types = {t.type for t in inspect_gguf(gguf).tensors if t.per_expert and t.name.endswith(".weight")}
            assert types == {"MXFP4"}
    t0 = time.perf_counter()

    # capture: transformers on text, llama.cpp on the same token ids (exact, then llama.cpp's defaults)
    hf = tmp_path / "hf.zarr"
    common = ("--seq-len", SEQ_LEN)
    ahead = ("--lookahead", 2, "--candidates", spec.top_k + 2)
    cap = cli_json(
        capsys, "capture", "hf", hf_dir, fixture.HELDOUT_DIR, "-o", hf, *common, "--max-tokens", MAX_TOKENS, *ahead
    )
    assert cap["tokens"] == MAX_TOKENS and cap["layer_ids"] == spec.moe_layers
    if outtype == "f32":  # the lookahead the routers of the next MoE layers give, scored by locality
        loc = cli_json(capsys, "locality", hf)
        rows = loc["lookahead"]
        assert {r["distance"] for r in rows} == ({1, 2} if len(spec.moe_layers) > 2 else {1})
        chance = spec.top_k / spec.n_experts
        row_d1 = [r["recall"] for r in rows if r["distance"] == 1]
        assert min(row_d1) > chance, row_d1  # far above chance on every layer
        best_ids = [max(r["id_only"].values()) for r in rows if r["distance"] == 1 and r["id_only"]]
        row["lookahead_recall_d1"] = float(np.median(row_d1))
        row["lookahead_recall_d2"] = loc["summary"].get("lookahead_recall_d2", {}).get("median")
        row["best_id_only_d1"] = float(np.median(best_ids)) if best_ids else None
    exact = ("--flash-attn", "off", "--kv-type", "f32")
    agree = {}
    for mode, flags in (("exact", exact), ("default", ())):
        out = tmp_path / f"{mode}.zarr"
        cap = cli_json(capsys, "capture", "llama", gguf, "-o", out, "--tokens-from", hf, *common, *flags)
        assert cap["tokens"] == MAX_TOKENS and cap["layer_ids"] == spec.moe_layers
        cmp = cli_json(capsys, "compare", hf, out)
        assert cmp["aligned_by"] == "token ids"
        agree[mode] = cmp["overall"]
    row |= {
        "identical_exact": agree["exact"]["identical"],
        "identical_default": agree["default"]["identical"],
        "overlap_exact": agree["exact"]["overlap"],
        "near_tie_exact": agree["exact"]["near_tie"],
        "near_tie_default": agree["default"]["near_tie"],
        "median_margin_default": agree["default"]["median_margin"],
        "median_margin_exact": agree["exact"]["median_margin"],
        "caveats": cap["routing_caveats"],
    }
    if outtype == "f32":
        assert row["identical_exact"] >= spec.min_agree, row
    else:  # quantized: the mean share of common experts (random tiny routers have small margins)
        assert row["overlap_exact"] >= QUANTIZED[name, outtype], row
    if name in ("dsv2grouped", "phimoe"):  # llama.cpp's rule is not the reference's: said, and not near-ties
        assert len(cap["routing_caveats"]) == 1 and row["near_tie_exact"] < 0.5, row  # measured 0.066, 0.058
    else:
        assert not cap["routing_caveats"]
    if outtype == "f32" and spec.min_agree == 1.0 and not spec.score_bias and row["near_tie_default"] is not None:
        # llama.cpp's defaults (f16 KV cache) only flip near-ties (measured: every disagreement, margins < 2e-4);
        # where a score-correction bias picks the experts, the gate-score margin does not show the selection's
        assert row["near_tie_default"] >= 0.9, row

    # inspect: routed layers as transformers has them, MTP blocks apart
    info = cli_json(capsys, "gguf", "inspect", gguf)
    assert [int(x) for x in info["layer_ids"]] == spec.moe_layers
    n = spec.config["num_hidden_layers"]
    assert info["mtp_blocks"] == list(range(n, n + spec.mtp)) and (info["mtp_bytes"] > 0) == bool(spec.mtp)

    # plan: room for about half the routed experts; both forms checked in llama.cpp
    m = inspect_gguf(gguf)
    vram = m.dense_bytes_per_token + (1 << 20) + (2 << 20) + m.routed_expert_bytes // 2
    plan = cli_json(
        capsys, "plan", "offload", gguf, "--vram", str(vram), "--ctx", 256, "--compute-buffer", "2MiB", "--verify"
    )
    assert plan["plan"]["cpu_blocks"] and plan["plan"]["gpu_blocks"] and plan["verified"]["ok"], plan["verified"]
    row["plan"] = f"{len(plan['plan']['cpu_blocks'])} of {len(m.layer_ids)} MoE layers on CPU, verified"

    # split into 2 groups: every part loads in llama.cpp and generates
    parts = tmp_path / "parts"
    split = cli_json(capsys, "split", gguf, "-o", parts, "-g", 2)
    manifest = json.loads((parts / "split.json").read_text())
    ids = load_trace(hf).token_ids[:16].tolist()
    for path in split["files"]:
        assert len(generate(path, ids)) == 4
    row["split"] = "; ".join(n for g in manifest["groups"][:1] for n in g["notes"]) or "loads, generates"

    # reduce at two k
    k_low = max(1, spec.top_k // 2)
    red = cli_json(
        capsys,
        "reduce",
        gguf,
        "--corpus",
        fixture.HELDOUT_DIR,
        "--k",
        f"{spec.top_k},{k_low}",
        "--seq-len",
        SEQ_LEN,
        "--max-tokens",
        128,
    )
    scored = {s["label"]: s for s in red["scores"]}
    assert set(scored) == {f"k={spec.top_k}", f"k={k_low}"} and red["recommended_k"] in (spec.top_k, k_low)
    assert scored[f"k={spec.top_k}"]["kl_vs_reference"] == pytest.approx(0, abs=1e-6)
    assert scored[f"k={k_low}"]["kl_vs_reference"] > 1e-9  # the override reached llama.cpp's routing
    row["reduce"] = {k: round(s["perplexity"], 2) for k, s in scored.items()}
    row["seconds"] = round(time.perf_counter() - t0, 1)
    if os.environ.get("MOESCOPE_ZOO_TABLE"):
        with open(os.environ["MOESCOPE_ZOO_TABLE"], "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")


def test_n_cpu_moe_mirror_matches_llama_cpp_source():
    """`--n-cpu-moe N` is expanded by llama.cpp's common library (not libllama), which moescope mirrors in
    `moescope.gguf.plan.block_regex`; the mirror must equal the header of the llama.cpp source in use."""
    import re

    from moescope.gguf.plan import EXPS_REGEX, block_regex
    from zoo import llama_source

    header = (llama_source() / "common" / "common.h").read_text(encoding="utf-8")
    exps = re.search(r'LLM_FFN_EXPS_REGEX\s*=\s*"((?:[^"\\]|\\.)*)"', header)
    fmt = re.search(
        r'llm_ffn_block_regex\(int idx, const char \* ffn_regex\) \{\s*return string_format\("([^"]*)"', header
    )
    assert exps and fmt, "llama.cpp's common.h no longer defines the --n-cpu-moe rule this test reads"
    unescape = lambda c: c.encode().decode("unicode_escape")  # noqa: E731 (C string literal -> text)
    assert unescape(exps.group(1)) == EXPS_REGEX
    assert unescape(fmt.group(1)).replace("%d", "7").replace("%s", EXPS_REGEX) == block_regex(7)
    # blocks 0 .. N-1, each its own rule bound to the CPU buffer type
    body = header[header.index("inline void llm_add_n_cpu_ffn_overrides") :].split("\n}\n", 1)[0]
    assert "for (int i = 0; i < n; ++i)" in body and "llm_ffn_block_regex(i, ffn_regex)" in body
    assert "ggml_backend_cpu_buffer_type()" in body
