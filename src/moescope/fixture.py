"""The project's own tiny MoE model and the routing trace captured from it (the demo's default input).

``data/tiny-moe/`` holds a Qwen3-MoE causal LM trained by ``tools/train_fixture.py`` on offline text
(4 MoE layers x 16 experts, top-2; HF safetensors + tokenizer), its f32 GGUF (made by
``tools/convert_fixture_gguf.py``), its held-out text (``heldout/<domain>/``, never trained on) and
``trace.npz``: the prefill routing of that held-out text, captured with ``moescope capture hf MODEL_DIR HELDOUT_DIR
-o trace.zarr --lookahead 2 --candidates 4`` (so it carries the routers' lookahead and near misses too).
Nothing here is downloaded; the files ship inside the package.

    >>> trace = moescope.read(fixture.TRACE)
"""

from __future__ import annotations

from pathlib import Path

FIXTURE_DIR = Path(__file__).resolve().parent / "data" / "tiny-moe"
MODEL_DIR = FIXTURE_DIR
HELDOUT_DIR = FIXTURE_DIR / "heldout"
TRACE = FIXTURE_DIR / "trace.npz"
GGUF = FIXTURE_DIR / "tiny-moe-f32.gguf"  # tools/convert_fixture_gguf.py
TRAINING_REPORT = FIXTURE_DIR / "training.json"
