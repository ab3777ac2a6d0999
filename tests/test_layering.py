"""The pipeline runs one way: capture -> trace -> analyses and simulations -> plans -> output. A module may
import from its own layer or below, never from above (an import inside a function counts too)."""

from __future__ import annotations

import ast
from pathlib import Path

import moescope

ROOT = Path(moescope.__file__).parent
# lowest first; each name is a top-level module or package of moescope
LAYERS = (
    ("errors", "_atomic", "_store_lock", "_jit", "_units", "_rng", "_dask", "fixture"),
    ("trace",),
    ("store", "slicing", "corpus"),
    ("synth", "imports", "info"),
    ("analyze", "cache"),
    ("place", "scale", "gguf"),
    ("capture",),
    ("report",),
    ("demo", "cli", "__init__", "__main__"),
)
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}


def _imports(path: Path) -> set[str]:
    """Top-level moescope modules `path` imports, anywhere in the file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "moescope":
            parts = node.module.split(".")
            out.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("moescope."))
    return out


def test_no_import_runs_back_up():
    up = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        me = rel.parts[0].removesuffix(".py")
        assert me in LEVEL, f"{rel}: add its module to LAYERS"
        for other in _imports(path) - {me}:
            if other in LEVEL and LEVEL[other] > LEVEL[me]:
                up.append(f"{rel} imports moescope.{other}")
    assert not up, up
