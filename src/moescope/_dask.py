"""Dask clusters for moescope's scale-out (chunked analyses, cache replays, placement fits), in one place.

`dask_client` opens a ``distributed.Client`` for ``--scheduler local:N`` (a LocalCluster) or a scheduler
address. Dask is an optional backend (extra ``[dask]``), imported only here, when a scheduler is asked for.

    >>> with dask_client("local:2") as client:
    ...     client.submit(...)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from moescope.errors import MissingDependencyError, UsageError


@contextlib.contextmanager
def dask_client(scheduler: str) -> Iterator[Any]:
    """A `distributed.Client` for ``"local:N"`` (a LocalCluster of N single-threaded worker processes, each
    giving numba its share of the cores, closed on exit) or a scheduler address."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise MissingDependencyError(
            "--scheduler needs Dask: pip install 'moescope[dask]' (dask[distributed])"
        ) from None
    cluster = None
    if scheduler.startswith("local:"):
        try:
            n = int(scheduler.split(":", 1)[1])
        except ValueError:
            raise UsageError(f"--scheduler {scheduler!r}: expected local:N with N workers, e.g. local:2") from None
        if n < 1:
            raise UsageError(f"--scheduler {scheduler!r}: expected local:N with N >= 1 workers, e.g. local:2")
        # numba kernels run parallel loops inside each worker: share the cores instead of oversubscribing
        threads = str(max(1, (os.cpu_count() or 1) // n))
        cluster = LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            env={"NUMBA_NUM_THREADS": threads},
        )
    client = Client(cluster if cluster is not None else scheduler)
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
