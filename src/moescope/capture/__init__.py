"""Capture: record real routing by running a model over a corpus (`moescope capture ...`).

- `moescope.capture.common`: the checks both engines make before creating a store, and that store;
- `moescope.capture.routers`: find every MoE router of a transformers model and hook it (`RouterRecorder`);
- `moescope.capture.hf`: run the model over the corpus, streaming the routing to a trace store (`capture_hf`);
- `moescope.capture.llama`: the same through llama.cpp's eval callback on a GGUF (`capture_llama`; the model
  runs in `moescope.gguf.runtime`).

The corpus (documents, `read_corpus`) is `moescope.corpus`, re-exported here.

Importing this package does not import torch, transformers or llama_cpp; they are loaded when a capture runs.

    >>> capture_hf("models/OLMoE-1B-7B", None, read_corpus("corpus/"), "olmoe.zarr")
"""

from moescope.capture.hf import capture_hf, load_hf_model
from moescope.capture.llama import capture_llama
from moescope.capture.routers import ROUTER_FORMATS, RouterRecorder, find_routers
from moescope.corpus import Document, read_corpus
from moescope.errors import CaptureError

__all__ = [
    "ROUTER_FORMATS",
    "CaptureError",
    "Document",
    "RouterRecorder",
    "capture_hf",
    "capture_llama",
    "find_routers",
    "load_hf_model",
    "read_corpus",
]
