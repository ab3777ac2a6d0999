"""Scale-out: count-based analyses as a map-reduce over chunks of a trace store, in this process or on Dask."""

from moescope.scale.mapreduce import (
    ANALYSES,
    Analysis,
    ChunkedRun,
    add_partials,
    finished_tokens,
    run_chunked,
    sequence_chunks,
)

__all__ = ["ANALYSES", "Analysis", "ChunkedRun", "add_partials", "finished_tokens", "run_chunked", "sequence_chunks"]
