"""Dask task plumbing shared by every cluster run (sharded fit and score, merge, finalize).

- :class:`TaskFailure` / :func:`user_errors_as_values`: a user error of a task comes back as a
  value (one line on the client), not as a traceback in every worker's log;
- :func:`results`: task results as they finish, errors raised once on the client;
- :func:`compute`: Dask objects computed on a client or on local threads, returning only once
  no task runs any more (a failed write is cleaned up after every late write);
- :func:`shard_ranges`: contiguous shards that start on batch boundaries;
- :func:`wait_stopped`, :func:`remove_tree`, :func:`worker_count`.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor
from dataclasses import dataclass

import dask

from ..errors import PadimError, os_message

# seconds a failed run waits at most for its tasks still running before removing what they write
STOP_WAIT_S = 600.0


@dataclass(frozen=True)
class TaskFailure:
    """A user-facing error of a task, returned as its value: a raised one makes every Dask
    worker log "Compute Failed" with a traceback. :func:`results` raises it on the client
    as a :class:`PadimError` with the same one-line ``message``."""

    message: str


def user_errors_as_values(func, *args, **kwargs):
    """``func(*args, **kwargs)``, or a :class:`TaskFailure` for a :class:`PadimError` or an
    ``OSError`` (any other exception is a bug: it is raised, and Dask reports it in full)."""
    try:
        return func(*args, **kwargs)
    except PadimError as err:
        return TaskFailure(str(err))
    except OSError as err:
        return TaskFailure(os_message(err))


def shard_ranges(count: int, batch_size: int, shards: int, max_size: int | None = None) -> list[tuple[int, int]]:
    """Split ``range(count)`` into (start, stop) ranges: ``shards`` of them, or more
    if that would put more than ``max_size`` items in one.

    Every range but the last holds a multiple of ``batch_size`` items, so a
    shard's batches are the batches of the whole list (``max_size`` is
    rounded down to a multiple of ``batch_size``, but not below one batch).
    """
    if count == 0:
        return []
    per = -(-count // max(1, shards))
    per = -(-per // batch_size) * batch_size
    if max_size is not None:
        per = min(per, max(batch_size, max_size // batch_size * batch_size))
    return [(a, min(a + per, count)) for a in range(0, count, per)]


def worker_count(client) -> int:
    """Workers of the cluster behind ``client`` (at least 1)."""
    return max(1, len(client.scheduler_info(n_workers=-1).get("workers", {})))


def results(client, futures: dict, what: str, running=None):
    """Yield (tag, result) as the tasks finish; on an error cancel the rest and raise it.

    ``running``: a ``distributed.as_completed`` the caller adds futures to
    (and ``futures`` with them); default: over ``futures`` as they are now.
    ``tag`` is ``futures[future]``, or the future itself where ``running`` is given.
    """
    from distributed import as_completed
    from distributed.scheduler import KilledWorker

    try:
        for future in running if running is not None else as_completed(list(futures)):
            tag = future if running is not None else futures[future]
            result = future.result()
            future.release()
            if isinstance(result, TaskFailure):
                raise PadimError(result.message)
            yield tag, result
    except KilledWorker as err:
        client.cancel(list(futures))
        raise PadimError(f"{what}: a task was lost with its worker too many times ({err}); "
                         "the workers may be running out of memory") from None
    except BaseException:
        client.cancel(list(futures))
        raise


def remove_tree(path: str) -> None:
    import fsspec

    fs, inner = fsspec.core.url_to_fs(path)
    if fs.exists(inner):
        fs.rm(inner, recursive=True)


def _running_keys(dask_worker) -> list[str]:
    return [str(key) for key in list(dask_worker.active_threads.values())]


def wait_stopped(client, futures: list, prefix: str, timeout: float = STOP_WAIT_S) -> None:
    """Wait (at most ``timeout`` s) until every task of ``futures`` is over: finished, failed,
    or cancelled and no longer running on a worker (a running task cannot be stopped)."""
    from distributed import wait

    deadline = time.monotonic() + timeout
    try:
        try:
            wait(futures, timeout=timeout)
        except CancelledError:  # cancelled (the usual case here): the scheduler forgot them, a worker may not have
            pass
        while time.monotonic() < deadline:
            running = client.run(_running_keys)
            if not any(key.startswith(prefix) for keys in running.values() for key in keys):
                return
            time.sleep(0.1)
    except Exception:  # noqa: BLE001 - a cluster going away runs nothing more; remove what is there
        pass


def compute(tasks, *, client=None, scheduler: str | None = "threads") -> tuple:
    """Compute the Dask objects ``tasks`` on ``client``, else with the Dask ``scheduler``
    (``None``: the active ``dask.distributed`` client); returns their results.

    Returns or raises only once no task is running any more: when one task
    fails (a chunk write on a full disk), the others that had started still
    write their chunks, and the caller removes what was written only after
    that (otherwise a late chunk would re-create a removed folder). Tasks not
    started yet are dropped (threads) or run to their end (a cluster: a task
    running on a worker cannot be stopped, so all of them are waited for).
    """
    if client is None and scheduler is None:
        try:
            from distributed import get_client

            client = get_client()
        except (ImportError, ValueError):  # no client active: threads
            scheduler = "threads"
    if client is not None:
        from distributed import wait

        futures = client.compute(list(tasks))
        try:
            return tuple(client.gather(futures))
        except BaseException:
            wait(futures)
            raise
    if scheduler != "threads":
        with dask.config.set(scheduler=scheduler):
            return dask.compute(*tasks)
    pool = ThreadPoolExecutor(os.cpu_count() or 1)
    try:
        with dask.config.set(scheduler="threads", pool=pool):
            return dask.compute(*tasks)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


__all__ = ["TaskFailure", "user_errors_as_values", "results", "compute", "shard_ranges", "worker_count",
           "wait_stopped", "remove_tree"]
