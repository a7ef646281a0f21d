"""Sharded fit and scoring on a Dask cluster: shards of the input list go to workers.

Fit: the images are hashed on the workers first (the ledger's identity), so
that images the model already holds and repeated files are dropped exactly as
the one-process fit drops them. Each shard is then fitted into a partial
store by one task (:func:`padim_ooc.fit.fit_part`), and the partial stores
are merged into the model by a tree of Chan merges, chunk by chunk
(:func:`padim_ooc.merge.merge_stores`). Shards start at multiples of the batch
size, so the batches (and therefore the CNN features) are the ones the
one-process fit would form.

Score: each shard is one task that opens the model once and scores its
images; results come back as the tasks finish and are placed by input index.

If a worker dies, Dask runs its tasks again on another worker: a shard's
result is delivered once, and a partial fit resumes from its last checkpoint.
"""
from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .data import digest, list_images
from .errors import PadimError
from .extractor import Extractor
from .fit import FitSummary, check_compatible, check_options, fit_part, memory_plan
from .memory import MEMORY_MARGIN
from .merge import merge_stores
from .progress import bar
from .score import DEFAULT_SIGMA, Model, score_paths
from .store import ModelStore, shared_path, store_exists


def shard_ranges(count: int, batch_size: int, shards: int) -> list[tuple[int, int]]:
    """Split ``range(count)`` into at most ``shards`` (start, stop) ranges.

    Every range but the last holds a multiple of ``batch_size`` items, so a
    shard's batches are the batches of the whole list.
    """
    if count == 0:
        return []
    per = -(-count // max(1, shards))
    per = -(-per // batch_size) * batch_size
    return [(a, min(a + per, count)) for a in range(0, count, per)]


def _workers(client) -> int:
    return max(1, len(client.scheduler_info(n_workers=-1).get("workers", {})))


def _check_shareable(*paths: str) -> None:
    for path in paths:
        if path.startswith("memory://"):
            raise PadimError(f"{path} lives in this process's memory; Dask workers cannot reach it "
                             "(run without workers, or use a path or URL the workers share)")


def _hash_files(paths: Sequence[str]) -> list[bytes | None]:
    """The ledger digest of every file (None for a file that cannot be read)."""
    out: list[bytes | None] = []
    for p in paths:
        try:
            out.append(digest(Path(p).read_bytes()))
        except (OSError, ValueError):
            out.append(None)
    return out


def _results(client, futures: dict, what: str):
    """Yield (tag, result) as the tasks finish; on an error cancel the rest and raise it."""
    from distributed import as_completed
    from distributed.scheduler import KilledWorker

    try:
        for future in as_completed(list(futures)):
            tag = futures[future]
            result = future.result()
            future.release()
            yield tag, result
    except KilledWorker as err:
        client.cancel(list(futures))
        raise PadimError(f"{what}: a task was lost with its worker too many times ({err}); "
                         "the workers may be running out of memory") from None
    except BaseException:
        client.cancel(list(futures))
        raise


def _remove_tree(path: str) -> None:
    import fsspec

    fs, inner = fsspec.core.url_to_fs(path)
    if fs.exists(inner):
        fs.rm(inner, recursive=True)


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
    _check_shareable(model, parts)
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
    ranges = shard_ranges(len(paths), batch_size, shards or _workers(client))
    summary = FitSummary(model=model)
    limits = [w.get("memory_limit") or 0 for w in client.scheduler_info(n_workers=-1)["workers"].values()]
    budget = max_memory or int(min(limits) * MEMORY_MARGIN) if limits and min(limits) else max_memory
    if budget:  # fails early if the budget cannot hold one batch
        plan = memory_plan(config, batch_size, budget).describe()
        if progress:
            print(f"{plan} on each worker (its own budget decides)" if max_memory is None else plan,
                  file=sys.stderr, flush=True)

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
    _remove_tree(parts)  # partial stores of an interrupted run: their shards may differ
    token = uuid.uuid4().hex[:8]
    futures = {}
    for k, keep in enumerate(kept):
        if keep:
            fut = client.submit(fit_part, keep, f"{parts}/part-{k:05d}.zarr", config, device=device,
                                weights=weights, batch_size=batch_size, checkpoint_every=checkpoint_every,
                                on_error=on_error, max_memory=max_memory, key=f"padim-ooc-fit-{token}-{k}")
            futures[fut] = (k, ranges[k][1] - ranges[k][0])
    done: list[str] = []
    try:
        with bar(f"fit {Path(model).name} ({len(futures)} shards)", len(paths), enabled=progress) as advance:
            advance(len(paths) - sum(size for _, size in futures.values()))
            for (k, size), part in _results(client, futures, "fit"):
                summary.added += part.n_images
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
    finally:
        _remove_tree(parts)
    summary.n_images = store.n_images
    return summary


def score_part(model: str, paths: Sequence[str], first: int, *, batch_size: int = 32,
               sigma: float = DEFAULT_SIGMA, maps: bool = False, on_error: str = "skip",
               device: str = "auto", weights: str | None = None):
    """Score one shard (a task): opens the model once, scores ``paths`` in batches.

    Returns
    -------
    indices : ndarray of shape (k,), int64
        Input indices (``first`` + position in ``paths``) of the images scored.
    scores : ndarray of shape (k,), float32
    maps : ndarray of shape (k, crop, crop), float16, or None
    bad : list of (index, error)
    """
    m = Model(ModelStore.open(model), device=device, weights=weights)
    idx, scores, out_maps = [], [], []

    def on_batch(indices, batch_scores, batch_maps):
        idx.extend(indices)
        scores.append(batch_scores)
        if maps:
            out_maps.append(batch_maps.astype(np.float16))

    bad = score_paths(m, [Path(p) for p in paths], batch_size=batch_size, sigma=sigma,
                      loader_workers=0, on_error=on_error, on_batch=on_batch)
    crop = m.attrs["crop"]
    return (first + np.asarray(idx, dtype=np.int64),
            np.concatenate(scores) if scores else np.zeros(0, np.float32),
            (np.concatenate(out_maps) if out_maps else np.zeros((0, crop, crop), np.float16)) if maps else None,
            [(first + i, err) for i, err in bad])


def score_sharded(model: str | os.PathLike, paths: Sequence[str | os.PathLike], client, *,
                  batch_size: int = 32, sigma: float = DEFAULT_SIGMA, maps: bool = False,
                  on_error: str = "skip", device: str = "auto", weights: str | None = None,
                  shards: int | None = None,
                  on_result: Callable[[np.ndarray, np.ndarray, np.ndarray | None], None] | None = None):
    """Score image files on a Dask cluster, one task per shard of the list.

    ``on_result(indices, scores, maps)`` is called once per shard as it
    finishes (indices into ``paths``; maps float16 or None). A shard whose
    worker dies is run again elsewhere, and its result is still delivered once,
    so every image is scored exactly once. Returns the ``(index, error)`` of
    images that could not be read. Shards start at multiples of
    ``batch_size``: the batches, and so the scores, are those of the
    one-process :func:`padim_ooc.score.score_paths`. Default: two shards per worker.
    """
    model = shared_path(model)
    _check_shareable(model)
    ModelStore.open(model).final_arrays()  # a clear error before any task runs
    paths = [shared_path(p) for p in paths]
    ranges = shard_ranges(len(paths), batch_size, shards or 2 * _workers(client))
    token = uuid.uuid4().hex[:8]
    futures = {client.submit(score_part, model, paths[a:b], a, batch_size=batch_size, sigma=sigma,
                             maps=maps, on_error=on_error, device=device, weights=weights,
                             key=f"padim-ooc-score-{token}-{k}"): k
               for k, (a, b) in enumerate(ranges)}
    bad: list[tuple[int, str]] = []
    for _, (indices, scores, shard_maps, shard_bad) in _results(client, futures, "score"):
        bad.extend(shard_bad)
        if on_result is not None:
            on_result(indices, scores, shard_maps)
    return sorted(bad)


__all__ = ["fit_sharded", "score_sharded", "score_part", "shard_ranges"]
