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

Every worker gets a plugin (:mod:`.devices`) that limits torch to one intra-op
thread, so N worker processes on N cores do not oversubscribe the CPU, and that
gives each worker of a host its own GPU, round-robin over the visible ones. While a client is
open, Dask's own INFO messages (cluster start, workers registering, ...) are
held back: only warnings and errors reach stderr.

On an existing scheduler the client waits for at least one worker: a
scheduler with none is a clear error after ``PADIM_OOC_WORKER_TIMEOUT``
seconds (default 60), and an address where nothing answers after
``PADIM_OOC_CONNECT_TIMEOUT`` seconds (default 10).
"""
from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from ..errors import PadimError
from ..options import DEFAULT_DASHBOARD, Cluster
from . import devices

TORCH_THREADS_PER_WORKER = 1
# seconds to wait for a scheduler to answer, and for it to have a worker (environment overrides)
CONNECT_TIMEOUT, CONNECT_TIMEOUT_ENV = 10.0, "PADIM_OOC_CONNECT_TIMEOUT"
WORKER_TIMEOUT, WORKER_TIMEOUT_ENV = 60.0, "PADIM_OOC_WORKER_TIMEOUT"
# loggers whose INFO lines (one per worker start, connection, close) are held back while a client is open
QUIET_LOGGERS = ("distributed", "bokeh", "tornado")
DASHBOARD_HINT = " (its pages need bokeh: pip install 'padim-ooc[dashboard]')"


def _dashboard_hint() -> str:
    """How to get the dashboard's pages, if bokeh is missing (Dask serves only an error page then)."""
    import importlib.util

    return "" if importlib.util.find_spec("bokeh") else DASHBOARD_HINT


def _seconds(value: float | None, env: str, default: float) -> float:
    """``value``, else the environment variable ``env``, else ``default`` (seconds > 0)."""
    if value is not None:
        return float(value)
    text = os.environ.get(env)
    if not text:
        return default
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise PadimError(f"{env} must be a number of seconds > 0, got {text!r}")
    return seconds


@contextmanager
def quiet_dask_logs(level: int = logging.WARNING, names: tuple[str, ...] = QUIET_LOGGERS) -> Iterator[None]:
    """Raise Dask's (and its web stack's) loggers to ``level`` for the block, then restore them.

    distributed logs at INFO by default; when the root logger prints (the
    command line configures it), that is some thirty lines per cluster run.
    """
    loggers = [logging.getLogger(name) for name in names]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        if lg.getEffectiveLevel() < level:
            lg.setLevel(level)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, old):
            lg.setLevel(lvl)


def _connect(scheduler: str, connect_timeout: float, worker_timeout: float, security=None):
    """A client of the scheduler at ``scheduler`` that has at least one worker."""
    from distributed import Client

    try:
        client = Client(scheduler, timeout=connect_timeout, security=security)
    except (OSError, TimeoutError) as err:
        raise PadimError(f"cannot reach the Dask scheduler at {scheduler} within {connect_timeout:g} s: {err} "
                         f"(is it running? set {CONNECT_TIMEOUT_ENV} to wait longer)") from None
    try:
        client.wait_for_workers(1, timeout=worker_timeout)
    except TimeoutError:
        client.close()
        raise PadimError(f"the Dask scheduler at {scheduler} has no workers (waited {worker_timeout:g} s): "
                         f"start some with `dask worker {scheduler}`, or set {WORKER_TIMEOUT_ENV} to wait longer"
                         ) from None
    except BaseException:
        client.close()
        raise
    return client


@contextmanager
def open_client(workers: int | None = None, scheduler: str | None = None, *,
                dashboard: str = DEFAULT_DASHBOARD, echo: Callable[[str], None] | None = None,
                timeout: float | None = None, worker_timeout: float | None = None,
                security=None) -> Iterator[object | None]:
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
        Dashboard address of a local cluster (default ``127.0.0.1:0``: this
        machine only, a free port; ``":0"`` listens on every interface). The
        local cluster's scheduler and workers listen on 127.0.0.1 too.
    echo : callable, optional
        Called with one line saying where the dashboard is when a local
        cluster starts (default: print it on stderr).
    timeout : float, optional
        Seconds to wait for the scheduler to answer (default:
        ``PADIM_OOC_CONNECT_TIMEOUT`` or 10).
    worker_timeout : float, optional
        Seconds to wait for the scheduler to have a worker (default:
        ``PADIM_OOC_WORKER_TIMEOUT`` or 60); then a :class:`PadimError`.
    security : distributed.Security, optional
        For a ``tls://`` scheduler (see :meth:`padim_ooc.options.Cluster.security`);
        None there: Dask's configuration.
    """
    Cluster(workers, scheduler)  # the rules of the arguments live in the options record
    if not scheduler and (workers is None or workers <= 1):
        yield None
        return
    connect_timeout = _seconds(timeout, CONNECT_TIMEOUT_ENV, CONNECT_TIMEOUT)
    worker_timeout = _seconds(worker_timeout, WORKER_TIMEOUT_ENV, WORKER_TIMEOUT)
    from distributed import Client, LocalCluster

    echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    cluster = None
    with quiet_dask_logs():
        try:
            if scheduler:
                client = _connect(scheduler, connect_timeout, worker_timeout, security)
            else:
                # the workers' own logs: what fails in our tasks comes back to the client as a value
                # (one line); what Dask says while processes are torn down is noise for a user
                worker_logs = logging.WARNING if os.environ.get("PADIM_OOC_DEBUG") else logging.CRITICAL
                cluster = LocalCluster(n_workers=workers, processes=True, threads_per_worker=1, host="127.0.0.1",
                                       dashboard_address=dashboard, silence_logs=worker_logs)
                client = Client(cluster)
                echo(f"dask: local cluster of {workers} worker processes, dashboard at "
                     f"{cluster.dashboard_link}{_dashboard_hint()}")
            try:
                devices.register(client)  # torch threads, and one GPU per worker (round-robin)
                yield client
            finally:
                # closing after a failed run can log broken connections with tracebacks: not news
                with quiet_dask_logs(logging.CRITICAL, QUIET_LOGGERS + ("asyncio",)):
                    client.close()
        finally:
            if cluster is not None:
                # a worker process that imported torch can take over the nanny's 4 s to exit on a
                # busy machine; the nanny then kills it (what closing asks for) and warns: not news
                with quiet_dask_logs(logging.CRITICAL, QUIET_LOGGERS + ("asyncio",)):
                    cluster.close()


__all__ = ["open_client"]
