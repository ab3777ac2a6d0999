"""GGUF split throughput vs a plain file copy of the same source, in one process (`bench/run.py split_gguf`).

A synthetic ~1 GiB GGUF (8 MoE blocks x 64 experts x 3 tensors of 512 KiB per expert, float16) is split
into 2 groups (contiguous halves): the split reads and writes as many bytes as a copy. Each is run 5 times,
alternating, after one warm-up of each (so the source sits in the page cache for both); throughput is
bytes written per second, the ratio is split / copy (of the best runs, and the median of
the 5 alternating pairs). The file is built in another process, so the peak
RSS reported is the copies' and splits' own: flat, far below the file size.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _make(path: Path, blocks: int = 8, experts: int = 64, rows: int = 256, cols: int = 1024) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), "qwen3moe")
    w.add_block_count(blocks)
    w.add_expert_count(experts)
    w.add_expert_used_count(8)
    shape = (experts, rows, cols)
    n_bytes = int(np.prod(shape)) * 2
    for b in range(blocks):
        w.add_tensor_info(f"blk.{b}.ffn_gate_inp.weight", (experts, cols), np.dtype(np.float32), experts * cols * 4)
        for name in ("gate", "up", "down"):
            w.add_tensor_info(f"blk.{b}.ffn_{name}_exps.weight", shape, np.dtype(np.float16), n_bytes)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    chunk = rng.standard_normal((rows, cols)).astype(np.float16)
    for _ in range(blocks):
        w.write_tensor_data(rng.standard_normal((experts, cols)).astype(np.float32))
        for _ in range(3):
            w.write_tensor_data(np.broadcast_to(chunk, shape).copy())
    w.close()


def measure() -> dict:
    from moescope.gguf import inspect_gguf
    from moescope.gguf.split import plan_groups, split_gguf

    tmp = Path(tempfile.mkdtemp(prefix="moescope-split-"))
    try:
        src = tmp / "model.gguf"
        # built in another process, so this one's peak RSS is the copy and the split only
        code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import split_speed; "
        subprocess.run([sys.executable, "-c", code + f"split_speed._make(split_speed.Path({str(src)!r}))"], check=True)
        size = src.stat().st_size
        groups = plan_groups(inspect_gguf(src), 2, "contiguous")

        def copy() -> float:
            t = time.perf_counter()
            shutil.copyfile(src, tmp / "copy.gguf")
            dt = time.perf_counter() - t
            (tmp / "copy.gguf").unlink()
            return dt

        def split() -> float:
            out = tmp / "out"
            out.mkdir(exist_ok=True)
            t = time.perf_counter()
            res = split_gguf(src, out, groups, overwrite=True)
            dt = time.perf_counter() - t
            written = sum(p.stat().st_size for p in res.paths)
            shutil.rmtree(out)
            split.written = written  # type: ignore[attr-defined]
            return dt

        copy(), split()
        t_copy, t_split = [], []
        for _ in range(5):
            t_copy.append(copy())
            t_split.append(split())
        written = split.written  # type: ignore[attr-defined]
        pair_ratio = statistics.median(c / s * written / size for c, s in zip(t_copy, t_split, strict=True))
        copy_mb_s = size / min(t_copy) / 2**20
        split_mb_s = written / min(t_split) / 2**20
        return {
            "source_mib": round(size / 2**20, 1),
            "split_written_mib": round(written / 2**20, 1),
            "copy_mib_per_s": round(copy_mb_s, 1),
            "split_mib_per_s": round(split_mb_s, 1),
            "ratio_split_to_copy": round(split_mb_s / copy_mb_s, 3),
            "ratio_median_of_pairs": round(pair_ratio, 3),
            "copy_s": [round(x, 3) for x in t_copy],
            "split_s": [round(x, 3) for x in t_split],
            "goal": "ratio >= 0.8 with flat memory",
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
