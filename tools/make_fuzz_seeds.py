"""Write the fuzz suite's seed inputs to tests/data/fuzz/: one small valid input per format moescope reads.

Each seed is cut from the committed tiny-moe fixture trace (3 sequences of 24 tokens, 4 MoE layers x 16
experts, top-2, with gate weights, token ids and the captured lookahead) and written by moescope's own
writers, or in the engine's own layout where moescope only reads the format (SGLang, vLLM). The model GGUF
seed is the committed fixture model itself (src/moescope/data/tiny-moe/tiny-moe-f32.gguf, read in place).
Run once after a format changes: ``.venv/bin/python tools/make_fuzz_seeds.py``; the outputs are committed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data" / "fuzz"


def main() -> None:
    from moescope.analyze.ranking import rank_experts, write_ranking_csv
    from moescope.imports import read_input, write_output
    from moescope.slicing import select_sequences, take_ranges
    from moescope.store import save_trace

    src = read_input(ROOT / "src" / "moescope" / "data" / "tiny-moe" / "trace.npz")
    picked = [i for i, lab in enumerate(src.seq_labels) if lab in ("code", "prose")][:3]
    trace = select_sequences(src, picked)
    starts = trace.seq_starts
    trace = take_ranges(trace, starts, starts + 24, np.arange(len(starts)), {"op": "fuzz seed: 24 tokens each"})
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    write_output(trace, OUT / "trace.npz")
    save_trace(trace, OUT / "trace.zarr", chunk_tokens=32)
    write_output(trace, OUT / "esft", "esft")
    write_output(trace, OUT / "counts.json")
    np.save(OUT / "vllm_routed_experts.npy", trace.experts.astype(np.int32))
    _sglang_csv(trace, OUT / "expert_distribution_rank0_timestamp1712.5.csv")
    _sglang_pt(trace, OUT / "expert_distribution_recorder_1712_0.pt")
    shutil.copy(ROOT / "tests" / "data" / "tiny-moe.imatrix.gguf", OUT / "tiny-moe.imatrix.gguf")
    write_ranking_csv(rank_experts(trace), OUT / "ranking.csv")
    (OUT / "groups.json").write_text(
        json.dumps({"groups": [{str(b): list(range(8)) for b in trace.layer_ids.tolist()},
                               {str(b): list(range(8, 16)) for b in trace.layer_ids.tolist()}]}) + "\n"
    )  # fmt: skip
    _plan_json(OUT / "plan.json")
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"wrote {OUT} ({total:,} bytes)")


def _plan_json(path: Path) -> None:
    """A two-GPU offload plan file of the fixture model (what `plan offload --json` prints), with its
    baseline and projections; the model path relative to the checkout."""
    import os

    from moescope.cli import main as cli

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            try:
                cli(["plan", "offload", "src/moescope/data/tiny-moe/tiny-moe-f32.gguf", "--vram", "3MiB,3MiB",
                     "--ctx", "256", "--compute-buffer", "1MiB", "--json"])  # fmt: skip
            except SystemExit as exc:
                assert not exc.code, exc.code
    finally:
        os.chdir(cwd)
    path.write_text(buf.getvalue())


def _sglang_csv(trace, path: Path) -> None:
    from moescope.imports.sglang import CSV_HEADER
    from moescope.trace import expert_mass

    counts = expert_mass(trace.experts, trace.n_experts)
    rows = [
        f"{lid},{e},{int(c)}" for lid, row in zip(trace.layer_ids.tolist(), counts, strict=True)
        for e, c in enumerate(row) if c
    ]  # fmt: skip
    path.write_text("\n".join([CSV_HEADER, *rows]) + "\n", encoding="utf-8")


def _sglang_pt(trace, path: Path) -> None:
    """SGLang's per_token recorder dump: one record per forward pass (one prefill per sequence), topk ids
    ``[layers, tokens, k]`` with a dense layer 0 of -1 and an identity physical-to-logical map."""
    import torch

    records = []
    n_lay = trace.n_layers + 1
    for s, (a, b) in enumerate(zip(trace.seq_starts, trace.seq_ends, strict=True)):
        ids = np.full((n_lay, b - a, trace.top_k), -1, dtype=np.int32)
        ids[1:] = trace.experts[a:b].transpose(1, 0, 2)
        records.append(
            dict(
                forward_pass_id=s,
                rank=0,
                gatherer_key="primary",
                input_ids=list(range(b - a)),
                positions=list(range(b - a)),
                extend_seq_lens=[b - a],
                forward_mode=1,
                topk_ids_of_layer=torch.tensor(ids),
                misc_objects=[],
                global_physical_count=torch.zeros((n_lay, trace.n_experts), dtype=torch.int32),
            )
        )
    phys = np.tile(np.arange(trace.n_experts), (n_lay, 1))
    torch.save({"records": records, "last_physical_to_logical_map": torch.tensor(phys)}, path)


if __name__ == "__main__":
    main()
