"""Dask clusters for moescope's scale-out (chunked analyses, cache replays, placement fits), in one place.

`dask_client` opens a ``distributed.Client`` for ``--scheduler local:N`` (a LocalCluster) or a scheduler
address. Dask is an optional backend (extra ``[dask]``), imported only here, when a scheduler is asked for.

    >>> with dask_client("local:2") as client:
    ...     client.submit(...)
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from typing import Any

from moescope.errors import MissingDependencyError, UsageError

MAX_LOCAL_WORKERS = 256  # local:N beyond this is a typo, not a machine
CONNECT_TIMEOUT_S = 10  # a scheduler address that does not answer in this long is reported, not waited on
_ADDRESS = re.compile(r"^(?:(?:tcp|tls|ucx|inproc)://[^\s/]+|[A-Za-z0-9.\-]+:\d{1,5})/?$")


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
        if not 1 <= n <= MAX_LOCAL_WORKERS:
            raise UsageError(
                f"--scheduler {scheduler!r}: expected local:N with 1 <= N <= {MAX_LOCAL_WORKERS} workers, e.g. local:2"
            )
        # numba kernels run parallel loops inside each worker: share the cores instead of oversubscribing
        threads = str(max(1, (os.cpu_count() or 1) // n))
        cluster = LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            env={"NUMBA_NUM_THREADS": threads},
        )
    if cluster is None and not _ADDRESS.match(scheduler):
        raise UsageError(
            f"--scheduler {scheduler!r}: expected local:N or a Dask scheduler address like tcp://host:8786"
        )
    try:
        client = Client(cluster if cluster is not None else scheduler, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, ValueError) as exc:
        if cluster is not None:
            cluster.close()
        raise UsageError(
            f"--scheduler {scheduler!r}: cannot connect ({type(exc).__name__}: {exc}); check the address and that "
            "the scheduler runs, or use local:N"
        ) from None
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
