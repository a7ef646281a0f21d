"""Sharded fit on a Dask cluster: shards of the input list go to workers.

Fit: the images are hashed on the workers first (the ledger's identity), so
that images the model already holds and repeated files are dropped exactly as
the one-process fit drops them. Each shard is then fitted into a partial
store by one task (:func:`padim_ooc.fit.fit_part`), and the partial stores
are merged into the model by a tree of Chan merges, chunk by chunk
(:func:`padim_ooc.merge.merge_stores`). Shards start at multiples of the batch
size, so the batches (and therefore the CNN features) are the ones the
one-process fit would form.

Scoring shards: :mod:`padim_ooc.score_shards`.

If a worker dies, Dask runs its tasks again on another worker: a shard's
result is delivered once, and a partial fit resumes from its last checkpoint.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
import uuid
from concurrent.futures import CancelledError
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


from ..data import digest, list_images
from ..errors import PadimError
from ..extractor import Extractor
from ..fit import FitSummary, check_compatible, check_options, fit_part, memory_plan
from ..memory import default_budget
from ..merge import merge_stores
from ..progress import bar
from ..store import ModelStore, check_shareable, shared_path, store_exists
from .tasks import TaskFailure, remove_tree, results, shard_ranges, wait_stopped, worker_count

log = logging.getLogger(__name__)

# the Dask event topic on which fit shards announce their memory plan
PLAN_TOPIC = "padim-ooc-memory-plan"


def _hash_files(paths: Sequence[str]) -> list[bytes | None]:
    """The ledger digest of every file (None for a file that cannot be read)."""
    out: list[bytes | None] = []
    for p in paths:
        try:
            out.append(digest(Path(p).read_bytes()))
        except (OSError, ValueError):
            out.append(None)
    return out


def fit_sharded(sources: Sequence[str | os.PathLike], model: str | os.PathLike, client, *,
                extractor: Extractor | None = None, batch_size: int = 32, checkpoint_every: int | None = None,
                on_error: str = "skip", progress: bool = True, device: str = "auto",
                weights: str | None = None, max_memory: int | None = None, shards: int | None = None,
                parts: str | None = None) -> FitSummary:
    """Fit (or extend) the model at ``model`` on a Dask cluster, one partial store per shard.

    Parameters
    ----------
    sources : sequence of paths
        As for :func:`padim_ooc.fit.fit_store`; the workers must reach the files.
    model : path or URL
        The model store (created or extended); the workers must reach it.
    client : distributed.Client
    shards : int, optional
        Number of shards (default: one per worker). Each partial store is as
        large as the model's accumulator on disk.
    parts : path or URL, optional
        Where the partial stores go (default: ``<model>.parts``); removed at the end.
    max_memory : int, optional
        Memory budget of each worker's fit (default: what the worker has, with a margin).

    Returns
    -------
    FitSummary
        Counts over all shards; ``blocks`` is the largest number of passes a shard made.
    """
    check_options(batch_size, checkpoint_every, on_error)
    if shards is not None and shards < 1:
        raise PadimError(f"shards must be at least 1, got {shards}")
    model = shared_path(model)
    parts = shared_path(parts) if parts else model.rstrip("/") + ".parts"
    check_shareable(model, parts)
    paths = [shared_path(p) for p in list_images(sources)]
    created = not store_exists(model)
    if not created:
        store = ModelStore.open(model, writable=True)
        if extractor is not None:
            check_compatible(store.attrs, extractor, model)
    else:
        extractor = extractor or Extractor(device=device)
        store = ModelStore.create(model, extractor.config())
    try:
        summary = _fit_shards(store, paths, parts, client, batch_size=batch_size,
                              checkpoint_every=checkpoint_every, on_error=on_error, progress=progress,
                              device=device, weights=weights, max_memory=max_memory, shards=shards)
    except BaseException:
        if created:  # a first fit that failed leaves no model behind
            store.remove_if_empty()
        raise
    finally:
        store.close()
    if summary.n_images == 0:
        raise PadimError("no image could be read: the model has no statistics")
    return summary


def _fit_shards(store: ModelStore, paths: list[str], parts: str, client, *, batch_size: int,
                checkpoint_every: int | None, on_error: str, progress: bool, device: str, weights: str | None,
                max_memory: int | None, shards: int | None) -> FitSummary:
    model, config = store.path, store.config
    ranges = shard_ranges(len(paths), batch_size, shards or worker_count(client))
    summary = FitSummary(model=model)
    if max_memory:  # fails early if the budget cannot hold one batch
        memory_plan(config, batch_size, max_memory)
    plans = _PlanEcho(progress)

    # 1. hash every file on the workers; drop what the model holds and repeated files, in input order
    hashed = client.gather(client.map(_hash_files, [paths[a:b] for a, b in ranges], pure=False))
    ledger, fresh = store.ledger(), set()
    kept: list[list[str]] = []
    for (a, b), digests in zip(ranges, hashed):
        keep = []
        for path, key in zip(paths[a:b], digests):
            if key is None:
                keep.append(path)  # unreadable: its shard reports it
            elif key in ledger:
                summary.already_seen += 1
            elif key in fresh:
                summary.duplicates += 1
            else:
                fresh.add(key)
                keep.append(path)
        kept.append(keep)

    # 2. one partial store per shard
    remove_tree(parts)  # partial stores of an interrupted run: their shards may differ
    token = uuid.uuid4().hex[:8]
    futures = {}
    for k, keep in enumerate(kept):
        if keep:
            fut = client.submit(fit_shard, keep, f"{parts}/part-{k:05d}.zarr", config, device=device,
                                weights=weights, batch_size=batch_size, checkpoint_every=checkpoint_every,
                                on_error=on_error, max_memory=max_memory, model=model,
                                key=f"padim-ooc-fit-{token}-{k}")
            futures[fut] = (k, ranges[k][1] - ranges[k][0])
    done: list[str] = []
    client.subscribe_topic(PLAN_TOPIC, lambda event: plans(event[1]["plan"], event[1]["blocks"], event[1]["worker"]))
    failed = True
    try:
        with bar(f"fit {Path(model).name} ({len(futures)} shards)", len(paths), enabled=progress) as advance:
            advance(len(paths) - sum(size for _, size in futures.values()))
            for (k, size), (part, plan, worker) in results(client, futures, "fit"):
                plans(plan, part.blocks, worker)  # in case its event was late
                summary.added += part.n_images
                for name, reason in part.skipped:  # logged here, not on the worker (where no one may see it)
                    log.warning("skipped %s: %s", name, reason)
                summary.skipped.extend(part.skipped)
                summary.checkpoints += part.checkpoints
                summary.blocks = max(summary.blocks, part.blocks)
                if part.n_images:
                    done.append(part.model)
                advance(size)
        # 3. tree of Chan merges into the model, chunk by chunk
        if done:
            merge_stores(sorted(done), store, client=client)
            summary.checkpoints += 1
        failed = False
    finally:
        client.unsubscribe_topic(PLAN_TOPIC)
        if failed:  # a cancelled shard still running would write its store after the removal
            wait_stopped(client, list(futures), f"padim-ooc-fit-{token}-")
        remove_tree(parts)
    summary.n_images = store.n_images
    return summary


class _PlanEcho:
    """Prints (on stderr, with ``progress``) and logs the memory plan of each worker: its first
    one, and any later one that makes a different number of passes."""

    def __init__(self, progress: bool):
        self.progress = progress
        self.seen: set[tuple[str, int]] = set()
        self.lock = threading.Lock()

    def __call__(self, plan: str, blocks: int, worker: str) -> None:
        with self.lock:
            if (worker, blocks) in self.seen:
                return
            self.seen.add((worker, blocks))
        line = f"{plan} [worker {worker}]"
        log.info(line)
        if self.progress:
            print(line, file=sys.stderr, flush=True)


def fit_shard(paths: Sequence[str], part: str, config: dict, *, device: str = "auto", batch_size: int = 32,
              max_memory: int | None = None, model: str | None = None,
              **options) -> tuple[FitSummary, str, str] | TaskFailure:
    """Fit one shard into the partial store ``part`` (a task of the sharded fit).

    The worker decides its memory budget once (``max_memory``, else what it
    has: :func:`padim_ooc.memory.default_budget`, within its Dask memory limit
    and, on CUDA, the GPU's free memory), announces the plan it gives on the
    :data:`PLAN_TOPIC` event topic and fits with that budget
    (:func:`padim_ooc.fit.fit_part`, ``options`` passed on).

    Skipped images are not logged on the worker: the client logs them (``summary.skipped``).

    Returns
    -------
    (FitSummary, plan description, worker address), or TaskFailure
        A :class:`PadimError` or ``OSError`` comes back as a :class:`TaskFailure`
        (one line; an error writing ``part`` names ``model``, default ``part``, as unchanged).
    """
    from distributed import get_worker

    worker = get_worker()
    quiet = _SkipFilter(threading.get_ident())
    fit_log = logging.getLogger("padim_ooc")  # padim_ooc.fit's logger
    fit_log.addFilter(quiet)
    try:
        budget = max_memory or default_budget(device)
        plan = memory_plan(config, batch_size, budget)
        worker.log_event(PLAN_TOPIC, {"plan": plan.describe(), "blocks": plan.blocks})
        summary = fit_part(paths, part, config, device=device, batch_size=batch_size, max_memory=budget, **options)
        return summary, plan.describe(), worker.address
    except PadimError as err:
        cause = err.__context__
        if isinstance(cause, OSError) and str(err).startswith(f"cannot write the model store {part}"):
            return _write_failure(part, model, cause)
        return TaskFailure(str(err))
    except OSError as err:  # the partial store could not be created or locked (full disk, permissions)
        return _write_failure(part, model, err)
    finally:
        fit_log.removeFilter(quiet)


def _write_failure(part: str, model: str | None, err: OSError) -> TaskFailure:
    return TaskFailure(f"cannot write the partial store {part}: {err.strerror or err}; the model "
                       f"{model or part} is unchanged (the partial stores are removed)")


class _SkipFilter(logging.Filter):
    """Drops the "skipped" warnings of one thread (a shard's; its client logs them)."""

    def __init__(self, thread: int):
        super().__init__()
        self.thread = thread

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.thread == self.thread and str(record.msg).startswith("skipped "))


__all__ = ["fit_sharded", "fit_shard", "shard_ranges", "TaskFailure", "user_errors_as_values"]
