"""Readers and writers of routing data, registered by format name (see `registry`).

Importing this package registers every built-in format. Use `read_input` / `write_output`.
"""

from moescope.imports import counts_json, esft, imatrix, npz, sglang, vllm, zarr_store  # noqa: F401  (registration)
from moescope.imports.registry import (
    READERS,
    WRITERS,
    ImportOptions,
    as_counts,
    as_trace,
    detect_format,
    read_input,
    write_output,
    writer_for,
)

__all__ = [
    "READERS",
    "WRITERS",
    "ImportOptions",
    "as_counts",
    "as_trace",
    "detect_format",
    "read_input",
    "write_output",
    "writer_for",
]
