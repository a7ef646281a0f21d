"""The Python API: ``fit``, ``open_model``, ``merge`` and ``score_files``."""
from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Sequence

import numpy as np

from .extractor import Extractor
from .finalize import DEFAULT_EPS, finalize as _finalize
from .fit import fit_store
from .score import Model
from .store import ModelStore


def open_model(path: str | os.PathLike, *, device: str = "auto", weights: str | None = None) -> Model:
    """Open a fitted model store (read-only).

    ``weights``: where to load the backbone weights from if the model was
    fitted with a local weights file (the stored hash is checked).
    """
    return Model(ModelStore.open(path), device=device, weights=weights)


def fit(sources: Sequence[str | os.PathLike] | str | os.PathLike, model: str | os.PathLike, *,
        extractor: Extractor | None = None, batch_size: int = 32, checkpoint_every: int | None = None,
        finalize: bool = True, eps: float = DEFAULT_EPS, loader_workers: int | None = None,
        on_error: str = "skip", progress: bool = False, device: str = "auto",
        max_memory: int | None = None, workers: int | None = None, scheduler: str | None = None,
        client=None) -> Model:
    """Fit (or extend) the model at ``model`` on the images of ``sources``, streaming.

    Parameters
    ----------
    sources : path or sequence of paths
        Folders (recursive), image files, or text files listing paths.
    model : path or URL
        The Zarr store; created if missing, extended with unseen images if it exists.
    extractor : Extractor, optional
        Required for a new model unless the default (pretrained resnet18, Rd100) is wanted.
    finalize : bool
        Compute the precision matrices at the end (``eps`` on the diagonal).
    max_memory : int, optional
        Memory budget in bytes (default: available memory with a margin); when
        the statistics do not fit, positions are fitted in blocks, one pass each.
    workers, scheduler, client
        Fit on a Dask cluster, one partial store per shard of the images, merged
        at the end: ``workers=N`` starts a local cluster of N processes,
        ``scheduler="tcp://HOST:PORT"`` connects to a running one, ``client``
        uses a ``distributed.Client`` you hold. Default: in this process.

    Returns
    -------
    Model
        The opened model.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    with _client(workers, scheduler, client) as cl:
        if cl is None:
            fit_store(sources, model, extractor=extractor, batch_size=batch_size,
                      checkpoint_every=checkpoint_every, loader_workers=loader_workers,
                      on_error=on_error, progress=progress, device=device, max_memory=max_memory)
        else:
            from .shards import fit_sharded

            fit_sharded(sources, model, cl, extractor=extractor, batch_size=batch_size,
                        checkpoint_every=checkpoint_every, on_error=on_error, progress=progress,
                        device=device, max_memory=max_memory)
        if finalize:
            with ModelStore.open(model, writable=True) as store:
                _finalize(store, eps=eps, client=cl)
    return open_model(model, device=device) if extractor is None else _opened(model, extractor)


def merge(parts: Sequence[str | os.PathLike], model: str | os.PathLike, *, finalize: bool = True,
          eps: float = DEFAULT_EPS, workers: int | None = None, scheduler: str | None = None,
          client=None) -> dict:
    """Merge stores fitted on disjoint image sets (same configuration) into ``model``.

    An existing ``model`` keeps its images and gets the parts' (see
    :func:`padim_ooc.merge.merge_stores`). Returns ``model``, ``parts``,
    ``added`` and ``n_images``.
    """
    from .merge import merge_stores

    with _client(workers, scheduler, client) as cl:
        result = merge_stores(parts, model, client=cl)
        if finalize:
            with ModelStore.open(model, writable=True) as store:
                _finalize(store, eps=eps, client=cl)
    return result


def score_files(model: str | os.PathLike, paths: Sequence[str | os.PathLike], *, batch_size: int = 32,
                maps: bool = False, sigma: float = 4.0, device: str = "auto", weights: str | None = None,
                workers: int | None = None, scheduler: str | None = None, client=None):
    """Score image files, on a Dask cluster when asked (shards of ``paths`` go to the workers).

    Returns
    -------
    scores : ndarray of shape (N,), float64, in input order (NaN for an unreadable image)
    maps : ndarray of shape (N, crop, crop), float16, or None without ``maps``
    """
    from .data import list_images

    paths = list_images(paths)
    crop = ModelStore.open(model).attrs["crop"]
    scores = np.full(len(paths), np.nan)
    out_maps = np.zeros((len(paths), crop, crop), np.float16) if maps else None

    def on_result(indices, batch_scores, batch_maps):
        scores[indices] = batch_scores
        if out_maps is not None:
            out_maps[indices] = batch_maps

    with _client(workers, scheduler, client) as cl:
        if cl is None:
            from .score import score_paths

            m = open_model(model, device=device, weights=weights)
            score_paths(m, paths, batch_size=batch_size, sigma=sigma, loader_workers=0,
                        on_batch=lambda i, s, mp: on_result(np.asarray(i, np.int64), s, mp))
        else:
            from .shards import score_sharded

            score_sharded(model, paths, cl, batch_size=batch_size, sigma=sigma, maps=maps, device=device,
                          weights=weights, on_result=on_result)
    return scores, out_maps


def _client(workers: int | None, scheduler: str | None, client):
    if client is not None:
        return nullcontext(client)
    from .distributed import open_client

    return open_client(workers, scheduler)


def _opened(path, extractor: Extractor) -> Model:
    model = open_model(path, device=str(extractor.device))
    model._extractor = extractor
    return model
