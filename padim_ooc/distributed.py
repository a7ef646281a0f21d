"""Dask client set-up: a local cluster of worker processes, or an existing scheduler.

Everything that runs in parallel (sharded fit, merge, finalize, scoring) takes
a ``distributed.Client``; this module only makes one. ``open_client`` is a
context manager::

    with open_client(workers=4) as client:      # LocalCluster, 4 processes x 1 thread
        ...
    with open_client(scheduler="tcp://host:8786") as client:   # an existing cluster
        ...
    with open_client() as client:               # client is None: run in this process
        ...

Every worker gets a plugin that limits torch to one intra-op thread, so N
worker processes on N cores do not oversubscribe the CPU.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from .errors import PadimError

TORCH_THREADS_PER_WORKER = 1


def _plugin_class():
    from distributed import WorkerPlugin

    class TorchThreads(WorkerPlugin):
        """Sets torch's intra-op threads in every worker (also in restarted ones)."""

        name = "padim-ooc-torch-threads"

        def __init__(self, threads: int = TORCH_THREADS_PER_WORKER):
            self.threads = threads

        def setup(self, worker) -> None:
            import torch

            torch.set_num_threads(self.threads)

    return TorchThreads


def _check_args(workers: int | None, scheduler: str | None) -> None:
    if workers is not None and workers < 1:
        raise PadimError(f"--workers must be at least 1, got {workers}")
    if workers is not None and workers > 1 and scheduler:
        raise PadimError("give either --workers (a local cluster) or --scheduler (an existing one), not both")
    if scheduler and "://" not in scheduler:
        raise PadimError(f"--scheduler expects an address like tcp://HOST:8786, got {scheduler!r}")


@contextmanager
def open_client(workers: int | None = None, scheduler: str | None = None, *,
                dashboard: str = ":0", echo: Callable[[str], None] | None = None,
                timeout: float = 30) -> Iterator[object | None]:
    """A ``distributed.Client`` for the duration of the block, or ``None``.

    Parameters
    ----------
    workers : int, optional
        More than 1: start a ``LocalCluster`` with this many worker processes
        of one thread each (closed at the end of the block). ``None`` or 1:
        no cluster, the work runs in this process.
    scheduler : str, optional
        Address of a running scheduler (``tcp://HOST:8786``): connect to it
        (the cluster is left running at the end).
    dashboard : str
        Dashboard address of a local cluster (``":0"``: a free port).
    echo : callable, optional
        Called with one line saying where the dashboard is when a local
        cluster starts (default: print it on stderr).
    timeout : float
        Seconds to wait for the scheduler to answer.
    """
    _check_args(workers, scheduler)
    if not scheduler and (workers is None or workers <= 1):
        yield None
        return
    from distributed import Client, LocalCluster

    echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    cluster = None
    try:
        if scheduler:
            try:
                client = Client(scheduler, timeout=timeout)
            except OSError as err:
                raise PadimError(f"cannot reach the Dask scheduler at {scheduler}: {err}") from None
        else:
            cluster = LocalCluster(n_workers=workers, processes=True, threads_per_worker=1,
                                   dashboard_address=dashboard)
            client = Client(cluster)
            echo(f"dask: local cluster of {workers} worker processes, dashboard at {cluster.dashboard_link}")
        try:
            client.register_plugin(_plugin_class()())
            yield client
        finally:
            client.close()
    finally:
        if cluster is not None:
            cluster.close()


__all__ = ["open_client"]
