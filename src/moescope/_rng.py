"""The project's one counter-based random number generator (splitmix64), as numba kernels and numpy.

Every random draw in moescope (synthetic traces, co-activation nulls and clustering restarts, placement
kicks, the within-sequence shuffle of locality) is a hash of its coordinates: (seed, stream, index) ->
uint64, so a draw depends only on what it is for, never on how much was drawn before or in which order
chunks, layers or workers ran. splitmix64's finaliser is a bijection of uint64 that scrambles every bit
(Steele, Lea & Flood, OOPSLA 2014). Not cryptographic; not for anything but reproducible simulation.

    >>> uniform(state, 7)           # in a kernel: the 8th uniform of stream `state`, in (0, 1)
    >>> token_keys(seed, 0, 1000)   # numpy: one uint64 key per token index
"""

from __future__ import annotations

import numpy as np

from moescope._jit import njit

GAMMA = np.uint64(0x9E3779B97F4A7C15)  # the golden-ratio increment
M1 = np.uint64(0xBF58476D1CE4E5B9)
M2 = np.uint64(0x94D049BB133111EB)
SEED_MIX = np.uint64(0xD1B54A32D192ED03)  # spreads the seed of `token_keys` away from the index increments
_S11, _S27, _S30, _S31 = np.uint64(11), np.uint64(27), np.uint64(30), np.uint64(31)


@njit
def mix(z):
    """splitmix64's finaliser: a bijection of uint64 that scrambles every bit."""
    z = (z ^ (z >> _S30)) * M1
    z = (z ^ (z >> _S27)) * M2
    return z ^ (z >> _S31)


@njit
def uniform(state, j):
    """The j-th uniform in (0, 1) of the stream `state` (53 random bits, never 0 or 1)."""
    return (np.float64(np.int64(mix(state + np.uint64(j + 1) * GAMMA) >> _S11)) + 0.5) * 2.0**-53


@njit
def hash2(seed, i):
    """A uint64 that depends only on (seed, i)."""
    return mix(np.uint64(seed) * GAMMA + np.uint64(i + 1) * M2)


def token_keys(seed: int, offset: int, n: int) -> np.ndarray:
    """[n] uint64 hashes of (seed, index) for indices ``offset .. offset + n - 1`` (numpy, no kernel)."""
    with np.errstate(over="ignore"):
        z = (np.arange(offset, offset + n, dtype=np.uint64) + np.uint64(1)) * GAMMA
        z += np.full(n, seed, dtype=np.uint64) * SEED_MIX
        z = (z ^ (z >> _S30)) * M1
        z = (z ^ (z >> _S27)) * M2
    return z ^ (z >> _S31)
