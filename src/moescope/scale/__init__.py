"""Scale-out: count-based analyses as a map-reduce over chunks of a trace store, in this process or on Dask."""

from moescope.scale.mapreduce import ANALYSES, Analysis, add_partials, run_chunked, sequence_chunks

__all__ = ["ANALYSES", "Analysis", "add_partials", "run_chunked", "sequence_chunks"]
