"""Sharded fit on a Dask cluster: shards of the input list go to workers, one partial store each.

Each shard is one task (:func:`fit_shard`) that runs the fit's own loop,
:func:`padim_ooc.fit.fold_images`, into a partial store: its images are read and
hashed once, there, and the rule of which images are folded in is the
one-process fit's (:class:`padim_ooc.fit.RunLedger`: not those the model holds,
not a repeat). The partial stores are then merged into the model by a tree of
Chan merges, chunk by chunk (:func:`padim_ooc.merge.merge_stores`). Shards start
at multiples of the batch size, so the batches are the ones the one-process fit
forms; the features agree with its features to float32 rounding (another process
and thread count), and so do the statistics.

The same content in two shards (a copied file) is found when the shards are
done, from their ledgers: the later shard is fitted again without it (its files
are read a second time; only then). If a worker dies, Dask runs its task again on
another worker, which resumes the partial store from its last checkpoint.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import threading
import uuid
from pathlib import Path
from typing import Sequence

from ..config import ModelConfig
from ..errors import PadimError
from ..sources import as_item, identity
from ..extractor import Extractor
from ..fit import FitSummary, FitTarget, fold_images, memory_plan, shard_options
from ..memory import default_budget
from ..merge import merge_stores
from ..options import FitOptions
from ..owned import MARKER, mark, marked
from ..progress import bar
from ..store import ModelStore, check_shareable, shared_path, store_exists
from .tasks import TaskFailure, remove_tree, results, shard_ranges, wait_stopped, worker_count

log = logging.getLogger(__name__)

# the Dask event topic on which fit shards announce their memory plan
PLAN_TOPIC = "padim-ooc-memory-plan"


def fit_sharded(target: FitTarget, paths: Sequence[Path], client, options: FitOptions, *,
                parts: str | None = None) -> FitSummary:
    """Fold ``paths`` into the model of ``target`` on a Dask cluster, one partial store per shard.

    Parameters
    ----------
    target : FitTarget
        The model (opened writable by :func:`padim_ooc.fit.run_fit`); the workers must reach it.
    paths : sequence of paths
        The images; the workers must reach the files.
    client : distributed.Client
    options : FitOptions
        ``max_memory`` is each worker's budget (default: what the worker has).
        ``options.cluster.shards``: the number of shards (default: one per worker);
        each partial store is as large as the model's accumulator on disk.
    parts : path or URL, optional
        Where the partial stores go (default: ``<model>.parts``); removed at the end.
        Must not exist, or be what an earlier sharded fit left (our marker and
        ``part-NNNNN.zarr`` folders only): anything else is left alone, an error.

    Returns
    -------
    FitSummary
        Counts over all shards; ``blocks`` is the largest number of passes a shard made.
    """
    store = target.store
    model, config = store.path, target.config
    parts = shared_path(parts) if parts else model.rstrip("/") + ".parts"
    check_shareable(parts)
    paths = [shared_path(p) for p in paths]
    ranges = shard_ranges(len(paths), options.batch_size, options.cluster.shards or worker_count(client))
    plans = _PlanEcho(options.progress)
    task_options = shard_options(options)  # no client in what goes to the workers
    token = uuid.uuid4().hex[:8]
    remove_parts(parts)  # partial stores of an interrupted run: their shards may differ
    mark_parts(parts)
    futures: dict = {}
    failed = True

    def submit(k: int, claimed: frozenset = frozenset()) -> None:
        a, b = ranges[k]
        fut = client.submit(fit_shard, paths[a:b], f"{parts}/part-{k:05d}.zarr", config, model=model,
                            options=task_options, weights=target.weights, claimed=claimed, fresh=bool(claimed),
                            key=f"padim-ooc-fit-{token}-{k}-{len(claimed)}")
        futures[fut] = k

    client.subscribe_topic(PLAN_TOPIC, lambda event: plans(event[1]["plan"], event[1]["blocks"], event[1]["worker"]))
    try:
        done: dict[int, tuple[FitSummary, list[bytes]]] = {}
        with bar(f"fit {Path(model).name} ({len(ranges)} shards)", len(paths), enabled=options.progress) as advance:
            for k in range(len(ranges)):
                submit(k)
            for k, (part, plan, worker, digests) in results(client, dict(futures), "fit"):
                plans(plan, part.blocks, worker)  # in case its event was late
                done[k] = (part, digests)
                advance(ranges[k][1] - ranges[k][0])
        # the same content in two shards: the later shard again, without what earlier ones keep
        again = _claims(done)
        if again:
            futures.clear()
            for k, claimed in again.items():
                submit(k, claimed)
            for k, (part, plan, worker, digests) in results(client, dict(futures), "fit"):
                done[k] = (part, digests)
        summary = FitSummary(model=model)
        for k in sorted(done):
            part = done[k][0]
            for name, reason in part.skipped:  # logged here, not on the worker (where no one may see it)
                log.warning("skipped %s: %s", name, reason)
            summary.added += part.n_images
            summary.already_seen += part.already_seen
            summary.duplicates += part.duplicates
            summary.skipped.extend(part.skipped)
            summary.held_out.extend(part.held_out)
            summary.checkpoints += part.checkpoints
            summary.blocks = max(summary.blocks, part.blocks)
        filled = sorted(done[k][0].model for k in done if done[k][0].n_images)
        if filled:  # a tree of Chan merges into the model, chunk by chunk
            merge_stores(filled, store, client=client)
            summary.checkpoints += 1
        failed = False
    finally:
        client.unsubscribe_topic(PLAN_TOPIC)
        if failed:  # a cancelled shard still running would write its store after the removal
            wait_stopped(client, list(futures), f"padim-ooc-fit-{token}-")
        try:
            remove_parts(parts)
        except (PadimError, OSError):
            if not failed:
                raise  # after a failure, the run's own error is the one to report
    return summary


PARTS_MARK = "padim-ooc sharded fit"
_PART = re.compile(r"part-[0-9]{5}\.zarr")


def _fs(parts: str):
    import fsspec

    fs, inner = fsspec.core.url_to_fs(parts)
    local = isinstance(fs, fsspec.implementations.local.LocalFileSystem)
    return (None, parts) if local else (fs, inner)


def mark_parts(parts: str) -> None:
    """Create the folder of the partial stores with our marker in it."""
    fs, inner = _fs(parts)
    mark(inner, PARTS_MARK, fs=fs)


def remove_parts(parts: str) -> None:
    """Remove the folder of a sharded fit's partial stores, only if it is ours: it holds our
    marker and nothing but ``part-NNNNN.zarr`` folders (a link counts as something else).

    Raises
    ------
    PadimError
        If ``parts`` holds anything else (a user's folder given as ``parts``, or one named
        ``<model>.parts`` by chance): it is left alone, one line says so.
    """
    fs, inner = _fs(parts)
    exists = os.path.lexists(inner) if fs is None else fs.exists(inner)
    if not exists:
        return
    if fs is None and (os.path.islink(inner) or not os.path.isdir(inner)):
        foreign = ["(not a folder)"]
    else:
        names = os.listdir(inner) if fs is None else [p.rstrip("/").rsplit("/", 1)[-1]
                                                      for p in fs.ls(inner, detail=False)]
        foreign = [n for n in names if n != MARKER and not (
            _PART.fullmatch(n) and (fs is not None or (os.path.isdir(os.path.join(inner, n))
                                                       and not os.path.islink(os.path.join(inner, n)))))]
        if not foreign and not marked(inner, PARTS_MARK, fs=fs):
            foreign = [f"(no {MARKER} marker)"]
    if foreign:
        raise PadimError(f"{parts} is not a folder of partial stores made by a sharded fit "
                         f"(it holds {', '.join(sorted(foreign)[:3])}); it is left alone: remove it yourself "
                         "or give another parts path")
    if fs is None:
        shutil.rmtree(inner)
    else:
        fs.rm(inner, recursive=True)


def _claims(done: dict[int, tuple[FitSummary, list[bytes]]]) -> dict[int, frozenset]:
    """Shards that hold an image (by content) that an earlier shard holds too, each with the
    digests the shards before it keep (they are not folded in again: duplicates)."""
    kept: set[bytes] = set()
    again: dict[int, frozenset] = {}
    for k in sorted(done):
        digests = done[k][1]
        if kept.intersection(digests):
            again[k] = frozenset(kept)
        kept.update(d for d in digests if d not in again.get(k, ()))
    return again


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


def fit_shard(paths: Sequence[str], part: str, config: ModelConfig, *, model: str, options: FitOptions,
              weights: str | None = None, claimed: frozenset = frozenset(), fresh: bool = False):
    """Fit one shard into the partial store ``part`` (a task of the sharded fit).

    The worker decides its memory budget once (``options.max_memory``, else what
    it has: :func:`padim_ooc.memory.default_budget`, within its Dask memory limit
    and, on CUDA, the GPU's free memory), announces the plan on the
    :data:`PLAN_TOPIC` event topic, and runs :func:`padim_ooc.fit.fold_images`
    with the model's ledger as what is known (read here, from ``model``) and
    ``claimed`` (what earlier shards keep) left out. An existing ``part`` is
    resumed (a task run again after its worker was lost), unless ``fresh``.
    A shard whose images are all unreadable gives an empty part, not an error.
    Skipped images are not logged here: the client logs them (``summary.skipped``).

    Returns
    -------
    (FitSummary, plan description, worker address, the part's ledger digests), or TaskFailure
        A :class:`PadimError` or ``OSError`` comes back as a :class:`TaskFailure`
        (one line; an error writing ``part`` names ``model`` as unchanged).
    """
    from distributed import get_worker

    worker = get_worker()
    quiet = _SkipFilter(threading.get_ident())
    fit_log = logging.getLogger("padim_ooc")  # padim_ooc.fit's logger
    fit_log.addFilter(quiet)
    try:
        plan = memory_plan(config, options.batch_size, options.max_memory or default_budget(options.device),
                           options.fold)
        worker.log_event(PLAN_TOPIC, {"plan": plan.describe(), "blocks": plan.blocks})
        parent = ModelStore.open(model)
        known, projection = parent.ledger(), parent.projection()
        extractor = Extractor.from_config(config, device=options.device, weights=weights, projection=projection)
        if fresh:
            remove_tree(part)
        store = (ModelStore.open(part, writable=True) if store_exists(part)
                 else ModelStore.create(part, config, projection))
        summary = FitSummary(model=part)
        items = [as_item(p) for p in paths]
        try:  # identities taken before the images are read; the merge brings them into the model
            fold_images(store, extractor, items, options, plan, summary, known=known, claimed=claimed,
                        identities=[identity(p) for p in items])
        finally:
            store.close()
        summary.n_images = store.n_images
        digests = [bytes(row) for row in store.ledger_digests()] if store.n_images else []
        return summary, plan.describe(), worker.address, digests
    except PadimError as err:
        cause = err.__context__
        if isinstance(cause, OSError) and str(err).startswith(f"cannot write the model store {part}"):
            return _write_failure(part, model, cause)
        return TaskFailure(str(err))
    except OSError as err:  # the partial store could not be created or locked (full disk, permissions)
        return _write_failure(part, model, err)
    finally:
        fit_log.removeFilter(quiet)


def _write_failure(part: str, model: str, err: OSError) -> TaskFailure:
    return TaskFailure(f"cannot write the partial store {part}: {err.strerror or err}; the model "
                       f"{model} is unchanged (the partial stores are removed)")


class _SkipFilter(logging.Filter):
    """Drops the "skipped" warnings of one thread (a shard's; its client logs them)."""

    def __init__(self, thread: int):
        super().__init__()
        self.thread = thread

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.thread == self.thread and str(record.msg).startswith("skipped "))


__all__ = ["fit_sharded", "fit_shard", "PLAN_TOPIC"]
