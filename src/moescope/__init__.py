"""moescope: measure how a Mixture-of-Experts model routes tokens, and decide deployment with numbers.

Pipeline (one direction): capture or import -> **trace** -> analyses and simulations -> plans -> output.

Glossary
--------
token
    One position processed by the model (a prompt token in prefill, a generated token in decode).
layer
    A MoE layer; ``layer_ids`` give its index among all the model's decoder layers (dense layers absent).
expert
    One routed expert of a layer, id ``0 .. n_experts-1`` (logical id; shared experts are not routed).
top-k slot
    Position ``0 .. k-1`` among the k experts a token was routed to at a layer, in the model's order.
trace
    `RoutingTrace`: ``experts [tokens, layers, k]`` (+ optional gate ``weights``) with sequence bounds,
    labels and provenance; stored as a chunked Zarr v3 folder (`moescope.store`).
sequence
    A request or document; tokens inside one are in processing order. ``seq_starts [sequences]``.
counts
    `ExpertCounts`: ``[layers, experts]`` selections (or gate mass, or shares), no token order.
train / test split
    First half of every sequence / second half (as in the OLMoE routing study); fit on one, score on the other.
device, replica, capacity, demand miss, prefetch load
    Used by the placement and cache-simulation modules: a device holds a set of experts; a replica is an
    extra copy of an expert; capacity is how many experts a cache holds per layer; a demand miss is a load
    the token waits for; a prefetch load is issued ahead of need.

Quick use
---------
>>> import moescope
>>> trace = moescope.read("trace.npz")                 # any supported format
>>> moescope.save_trace(trace, "run.zarr")
>>> trace.counts().shares()                            # [layers, experts]
>>> train, test = moescope.split_halves(trace)
"""

from moescope.errors import FormatError, MoescopeError, TraceError, UsageError
from moescope.imports import ImportOptions, read_input, write_output
from moescope.slicing import select_labels, select_layers, select_sequences, select_tokens, split_halves
from moescope.store import TraceStore, TraceWriter, load_trace, save_trace
from moescope.trace import ExpertCounts, RoutingTrace, TraceMeta

__version__ = "0.1.0"

read = read_input
write = write_output

__all__ = [
    "ExpertCounts",
    "FormatError",
    "ImportOptions",
    "MoescopeError",
    "RoutingTrace",
    "TraceError",
    "TraceMeta",
    "TraceStore",
    "TraceWriter",
    "UsageError",
    "__version__",
    "load_trace",
    "read",
    "read_input",
    "save_trace",
    "select_labels",
    "select_layers",
    "select_sequences",
    "select_tokens",
    "split_halves",
    "write",
    "write_output",
]
