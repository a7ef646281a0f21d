"""Sharded scoring on a Dask cluster: shards of the input list go to workers.

Score: each shard is one task that scores its images with the worker's copy
of the model (opened once per worker and run, see :func:`worker_model`);
results come back as the tasks finish and are placed by input index. Shards
hold at most :data:`SCORE_SHARD_IMAGES` images (fewer when maps of large crops
would pass :data:`SCORE_SHARD_MAP_BYTES`), and at most two shards per worker
are in flight, so the memory of a task, of the results waiting on the
workers and of the client does not grow with the number of images.

If a worker dies, Dask runs its tasks again on another worker: a shard's
result is delivered once, so every image is scored exactly once.
"""
from __future__ import annotations

import dataclasses
import json
import os
import threading
import uuid
from typing import Callable, Sequence

import numpy as np

from ..options import Cluster, ScoreOptions
from ..sources import as_item
from ..score import Model, score_images
from ..store import ModelStore, shared_path
from .tasks import results, shard_ranges, user_errors_as_values, worker_count

# images per scoring shard at most, and bytes of float16 maps one shard returns at most
SCORE_SHARD_IMAGES = 256
SCORE_SHARD_MAP_BYTES = 64 * 2**20
# scoring shards in flight per worker (submitted, running or waiting to be fetched)
SCORE_SHARDS_PER_WORKER = 2


def score_shard_size(crop: int, maps: bool) -> int:
    """Images per scoring shard at most: :data:`SCORE_SHARD_IMAGES`, and with maps
    no more than :data:`SCORE_SHARD_MAP_BYTES` of float16 (crop, crop) maps."""
    if not maps:
        return SCORE_SHARD_IMAGES
    return max(1, min(SCORE_SHARD_IMAGES, SCORE_SHARD_MAP_BYTES // (2 * crop * crop)))


_models: dict[tuple, Model] = {}
_models_lock = threading.Lock()


def worker_model(model: str, *, device: str = "auto", weights: str | None = None) -> Model:
    """The model at ``model``, opened once per process and state: the shards of a run
    that land on the same worker share its statistics (read once) and its extractor.

    The key holds the store's attributes, so a refitted or re-finalized model
    is opened again; :func:`forget_models` drops the copy (the end of a run).
    """
    store = ModelStore.open(model)
    key = (model, json.dumps(store.attrs, sort_keys=True, default=str), device, weights)
    with _models_lock:
        if key not in _models:
            _models.clear()  # one model per process
            _models[key] = Model(store, device=device, weights=weights)
        return _models[key]


def forget_models() -> None:
    """Drop the model kept by :func:`worker_model` (its memory goes back)."""
    with _models_lock:
        _models.clear()


def score_part(model: str, paths: Sequence[str], first: int, options: ScoreOptions, weights: str | None = None):
    """Score one shard (a task): :func:`score_part_of`; a :class:`PadimError` or ``OSError``
    comes back as a :class:`padim_ooc.parallel.tasks.TaskFailure` (no traceback in the worker's log)."""
    return user_errors_as_values(score_part_of, model, paths, first, options, weights)


def score_part_of(model: str, paths: Sequence[str], first: int, options: ScoreOptions, weights: str | None = None):
    """Score one shard with the worker's copy of the model, in batches
    (:func:`padim_ooc.score.score_images`, decoding in the task).

    Returns
    -------
    indices : ndarray of shape (k,), int64
        Input indices (``first`` + position in ``paths``) of the images scored.
    scores : ndarray of shape (k,), float32
    maps : ndarray of shape (k, crop, crop), float16, or None
    bad : list of (index, error)
    """
    m = worker_model(model, device=options.device, weights=weights)
    idx, scores, out_maps = [], [], []

    def on_batch(indices, batch_scores, batch_maps):
        idx.extend(indices)
        scores.append(batch_scores)
        if options.wants_maps:  # float32 for masks and overlays: decided on the maps the scores come from
            out_maps.append(batch_maps.astype(np.float32 if options.masks or options.overlays else np.float16))

    bad = score_images(m, [as_item(p) for p in paths], options, on_batch)
    crop = m.attrs["crop"]
    return (first + np.asarray(idx, dtype=np.int64),
            np.concatenate(scores) if scores else np.zeros(0, np.float32),
            (np.concatenate(out_maps) if out_maps else np.zeros((0, crop, crop), np.float16)) if options.wants_maps
            else None,
            [(first + i, err) for i, err in bad])


def score_sharded(store: ModelStore, paths: Sequence[str | os.PathLike], client, options: ScoreOptions, *,
                  weights: str | None = None, shards: int | None = None, max_shard_images: int | None = None,
                  on_result: Callable[[np.ndarray, np.ndarray, np.ndarray | None], None] | None = None):
    """Score image files with the finalized model of ``store`` on a Dask cluster, one task per
    shard of the list.

    ``on_result(indices, scores, maps)`` is called once per shard as it
    finishes (indices into ``paths``; maps float16 or None). A shard whose
    worker dies is run again elsewhere, and its result is still delivered once,
    so every image is scored exactly once. Returns the ``(index, error)`` of
    images that could not be read. Shards start at multiples of the batch
    size: the batches are those of the one-process
    :func:`padim_ooc.score.score_images` (the scores agree with its scores to
    float32 rounding: other processes, other thread counts).

    Shards: ``shards`` of them (default two per worker), or more so that none
    holds more than ``max_shard_images`` images (default
    :func:`score_shard_size`: 256, fewer for maps of large crops). At most
    two shards per worker are submitted at a time; the next one goes when a
    result has been handed to ``on_result``, so memory stays bounded whatever
    the number of images.
    """
    from distributed import as_completed

    model = store.path
    task_options = dataclasses.replace(options, progress=False, loader_workers=0, cluster=Cluster())
    paths = [shared_path(p) for p in paths]
    workers = worker_count(client)
    cap = max_shard_images or score_shard_size(store.attrs["crop"], options.wants_maps)
    if max_shard_images is None and (options.masks or options.overlays):  # float32 maps: half as many
        cap = max(1, cap // 2)
    ranges = shard_ranges(len(paths), options.batch_size, shards or SCORE_SHARDS_PER_WORKER * workers, max_size=cap)
    token = uuid.uuid4().hex[:8]
    todo = iter(enumerate(ranges))
    futures: dict = {}
    running = as_completed()

    def submit_next() -> None:
        k, (a, b) = next(todo, (None, (0, 0)))
        if k is not None:
            fut = client.submit(score_part, model, paths[a:b], a, task_options, weights,
                                key=f"padim-ooc-score-{token}-{k}")
            futures[fut] = k
            running.add(fut)

    bad: list[tuple[int, str]] = []
    try:
        for _ in range(SCORE_SHARDS_PER_WORKER * workers):
            submit_next()
        for tag, (indices, scores, shard_maps, shard_bad) in results(client, futures, "score", running):
            del futures[tag]
            bad.extend(shard_bad)
            if on_result is not None:
                on_result(indices, scores, shard_maps)
            submit_next()
    finally:
        client.cancel(list(futures))
        try:
            client.run(forget_models)
        except Exception:  # noqa: BLE001 - a worker that went away has nothing to forget
            pass
    return sorted(bad)


__all__ = ["score_sharded", "score_part", "score_shard_size", "worker_model", "forget_models"]
