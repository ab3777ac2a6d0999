"""The one place where numba's jit options are set.

Kernels are private `_name` functions decorated with `njit` (or `njit_parallel`) from here, each
wrapped by a public function that validates inputs, allocates outputs and packages results.
`NUMBA_DISABLE_JIT=1` runs the same code as plain Python (the tests must pass that way too).
"""

from __future__ import annotations

import os

import numba

njit = numba.njit(cache=True, nogil=True)
"""Decorator for serial kernels."""

njit_inline = numba.njit(cache=True, nogil=True, inline="always")
"""Decorator for small helpers of hot loops: inlined into each caller at compile time, so that passing arrays
costs nothing (a plain jitted call that takes arrays costs about as much as a short loop)."""

njit_parallel = numba.njit(cache=True, nogil=True, parallel=True)
"""Decorator for kernels with `numba.prange` loops (parallel across layers or chunks)."""

prange = numba.prange

parallel_chunksize = numba.parallel_chunksize
"""Context manager: iterations a thread takes at a time in the `prange` loops called inside it (1: threads take
one iteration at a time, for loops whose iterations differ in length; the default splits the range evenly up
front)."""


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity where the OS says, else the machine's): the default worker
    or thread count of parallel work outside numba (cache replays in windows, Mt-KaHyPar)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
