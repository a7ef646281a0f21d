"""The Python API: ``fit``, ``open_model``, ``finalize_model``, ``merge`` and ``score_files``."""
from __future__ import annotations

import math
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Sequence

import numpy as np

from . import merge as _merge_module  # noqa: F401  loaded now, so that `padim_ooc.merge` stays the function below
from .errors import PadimError
from .extractor import Extractor
from .finalize import DEFAULT_EPS, finalize as _finalize
from .fit import FitSummary, fit_store
from .store.lock import default_command, store_lock
from .score import Model
from .store import ModelStore, check_shareable, shared_path, store_exists


def open_model(path: str | os.PathLike, *, device: str = "auto", weights: str | None = None) -> Model:
    """Open a fitted model store (read-only).

    ``weights``: where to load the backbone weights from if the model was
    fitted with a local weights file (the stored hash is checked).
    """
    return Model(ModelStore.open(path), device=device, weights=weights)


def fit(sources: Sequence[str | os.PathLike] | str | os.PathLike, model: str | os.PathLike, *,
        extractor: Extractor | None = None, weights: str | None = None, batch_size: int = 32,
        checkpoint_every: int | None = None, finalize: bool = True, eps: float | None = None,
        loader_workers: int | None = None, on_error: str = "skip", progress: bool = False,
        device: str = "auto", max_memory: int | None = None, workers: int | None = None,
        scheduler: str | None = None, client=None) -> Model:
    """Fit (or extend) the model at ``model`` on the images of ``sources``, streaming.

    Parameters
    ----------
    sources : path or sequence of paths
        Folders (recursive), image files, or text files listing paths.
    model : path or URL
        The Zarr store; created if missing, extended with unseen images if it exists.
    extractor : Extractor, optional
        The configuration of a new model (default: pretrained resnet18, Rd100,
        with ``weights``); for an existing model it must match the stored one.
    weights : str, optional
        Without ``extractor``: ``"default"`` (pretrained), ``"none"`` (random)
        or a state-dict file. A new model is built with them; an existing
        model fitted with a local file needs that file's path (its hash is
        checked), and weights that differ from the stored ones are refused
        before anything is built.
    finalize : bool
        Compute the precision matrices at the end (``eps`` on the diagonal).
    eps : float, optional
        Added to the covariance diagonal (>= 0). Default: the model's current
        eps, or 0.01 for a model never finalized. A finalized model whose
        stored eps differs is finalized again, even if no image is new.
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
    if extractor is not None and weights is not None:
        raise PadimError("give either an extractor (built with its weights) or weights, not both")
    if extractor is None and not store_exists(model):
        extractor = Extractor(weights="default" if weights is None else weights, device=device)
    run_fit(sources, model, extractor=extractor, weights=weights, batch_size=batch_size,
            checkpoint_every=checkpoint_every, finalize=finalize, eps=eps, loader_workers=loader_workers,
            on_error=on_error, progress=progress, device=device, max_memory=max_memory, workers=workers,
            scheduler=scheduler, client=client)
    if extractor is None:
        return open_model(model, device=device, weights=weights)
    return _opened(model, extractor)


def run_fit(sources: Sequence[str | os.PathLike], model: str | os.PathLike, *, extractor: Extractor | None,
            weights: str | None = None, batch_size: int = 32, checkpoint_every: int | None = None,
            finalize: bool = True, eps: float | None = None, loader_workers: int | None = None,
            on_error: str = "skip", progress: bool = False, device: str = "auto",
            max_memory: int | None = None, workers: int | None = None, scheduler: str | None = None,
            client=None) -> tuple[FitSummary, bool]:
    """What :func:`fit` and ``padim-ooc fit`` do: fit, then finalize if asked, under
    one lock (no other writer in between). Returns the fit's summary and whether
    the store is finalized at the end (its real state)."""
    if eps is not None:
        check_eps(eps)
    if weights is not None and store_exists(model):
        check_weights(ModelStore.open(model).attrs, weights, model)
    # the lock first: a refused writer starts no cluster
    with store_lock(model, default_command()), _client(workers, scheduler, client, model) as cl:
        if cl is None:
            summary = fit_store(sources, model, extractor=extractor, batch_size=batch_size,
                                checkpoint_every=checkpoint_every, loader_workers=loader_workers,
                                on_error=on_error, progress=progress, device=device, weights=weights,
                                max_memory=max_memory)
        else:
            from .parallel.fit_shards import fit_sharded

            summary = fit_sharded(sources, model, cl, extractor=extractor, batch_size=batch_size,
                                  checkpoint_every=checkpoint_every, on_error=on_error, progress=progress,
                                  device=device, weights=weights, max_memory=max_memory)
        with ModelStore.open(model, writable=True) as store:
            wanted = eps_for(store.attrs, eps)
            if finalize and (not store.attrs["finalized"] or wanted != store.attrs["eps"]):
                n = store.n_images
                if n < 2:
                    raise PadimError(f"the statistics of {n} image{'s' * (n != 1)} are saved in {model}, but "
                                     "finalize needs at least 2 images: fit more images into it (that fit finalizes it)")
                _finalize(store, eps=wanted, client=cl)
            return summary, bool(store.attrs["finalized"])


def finalize_model(path: str | os.PathLike, *, eps: float | None = None, workers: int | None = None,
                   scheduler: str | None = None, client=None) -> Model:
    """Compute the precision matrices of a fitted model: ``inv(m2 / (n - 1) + eps I)``.

    Finalizes again if the model already is (e.g. with another ``eps``).
    Named ``finalize_model`` because ``padim_ooc.finalize`` is the module that
    does the work (:func:`padim_ooc.finalize.finalize`, on an opened store).

    Parameters
    ----------
    path : path or URL
        The model store (statistics of at least 2 images).
    eps : float, optional
        Added to the diagonal of every covariance (>= 0). Default: the
        model's current eps, or 0.01 for a model never finalized.
    workers, scheduler, client
        Run the position chunks on a Dask cluster, as in :func:`fit`.

    Returns
    -------
    Model
        The opened, finalized model.
    """
    if eps is not None:
        check_eps(eps)
    with ModelStore.open(path, writable=True) as store, _client(workers, scheduler, client, path) as cl:
        _finalize(store, eps=eps_for(store.attrs, eps), client=cl)
    return open_model(path)


def check_eps(eps: float) -> float:
    """``eps`` if it is a finite number >= 0, else a one-line :class:`PadimError`."""
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise PadimError(f"eps must be a finite number >= 0 (e.g. 0.01), got {eps!r}")
    return eps


def eps_for(stored: dict, eps: float | None) -> float:
    """The eps to finalize with: ``eps`` if given, else the model's current eps
    (``stored["eps"]``), else :data:`~padim_ooc.finalize.DEFAULT_EPS` (0.01) for a
    model never finalized. What ``fit``, ``merge`` and ``finalize`` all use."""
    if eps is not None:
        return eps
    return DEFAULT_EPS if stored.get("eps") is None else stored["eps"]


def check_weights(stored: dict, weights: str | None, path) -> None:
    """Refuse ``weights`` that are not those the model was fitted with, before any
    backbone is built (``default`` would download weights first).

    ``stored["weights"]`` is ``random:seed=S``, ``torchvision:<enum>`` or
    ``file:<sha256>``. ``default`` and ``torchvision:...`` are resolved for the
    model's backbone (:func:`padim_ooc.backbones.torchvision_weights`) and must be
    the stored enum member itself (``default`` for EfficientNet-Lite0: the
    installed file, by hash). A file given for a model fitted with another file
    is compared by hash; other files are left to the digest check of the weights.
    """
    if weights is None:
        return
    from .backbones import LITE0, file_hash, torchvision_weights

    wid, backbone = stored["weights"], stored["backbone"]
    names = ""  # what `weights` resolves to, where that is not what it says
    if weights.lower() == "none":
        same = wid.startswith("random:")
    elif backbone == LITE0 and weights == "default":
        from .lite0 import lite0_weights_path

        same = wid.startswith("file:") and file_hash(lite0_weights_path()) == wid[len("file:"):]
    elif weights == "default" or weights.startswith("torchvision:"):
        given = None if backbone == LITE0 else torchvision_weights(backbone, weights)
        same = wid.startswith("torchvision:") and given is torchvision_weights(backbone, wid)
        if given is not None and f"torchvision:{given}" != weights:
            names = f" ({given})"  # `default` is not always the member a model was fitted with
    elif wid.startswith("file:") and Path(weights).is_file():
        same = file_hash(Path(weights)) == wid[len("file:"):]
    else:
        return
    if not same:
        raise PadimError(f"the model {os.fspath(path)} was fitted with the weights {wid}, not {weights!r}{names}; "
                         "leave the weights out (the model's own are used), or use a new model path for other weights")


def merge(parts: Sequence[str | os.PathLike], model: str | os.PathLike, *, finalize: bool = True,
          eps: float | None = None, workers: int | None = None, scheduler: str | None = None,
          client=None) -> dict:
    """Merge stores fitted on disjoint image sets (same configuration) into ``model``.

    An existing ``model`` keeps its images and gets the parts' (see
    :func:`padim_ooc.merge.merge_stores`). Returns ``model``, ``parts``,
    ``added``, ``n_images`` and ``finalized`` (the store's state afterwards).
    ``finalize`` finalizes the merged model with ``eps`` (default: the model's
    current eps, or 0.01 for a new model or one never finalized).
    """
    from .merge import merge_stores

    if eps is not None:
        check_eps(eps)
    # the lock first: a refused writer starts no cluster
    with store_lock(model, default_command()), _client(workers, scheduler, client, model, *parts) as cl:
        result = merge_stores(parts, model, client=cl)
        with ModelStore.open(model, writable=True) as store:
            if finalize:
                _finalize(store, eps=eps_for(store.attrs, eps), client=cl)
            return result | {"finalized": bool(store.attrs["finalized"])}


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

    with _client(workers, scheduler, client, model) as cl:
        if cl is None:
            from .score import score_paths

            m = open_model(model, device=device, weights=weights)
            score_paths(m, paths, batch_size=batch_size, sigma=sigma, loader_workers=0,
                        on_batch=lambda i, s, mp: on_result(np.asarray(i, np.int64), s, mp))
        else:
            from .parallel.score_shards import score_sharded

            score_sharded(model, paths, cl, batch_size=batch_size, sigma=sigma, maps=maps, device=device,
                          weights=weights, on_result=on_result)
    return scores, out_maps


def _client(workers: int | None, scheduler: str | None, client, *paths):
    """The Dask client to run on (or None); ``paths`` the workers will need are
    checked first (a ``memory://`` store is refused before a cluster starts)."""
    if workers or scheduler or client is not None:
        check_shareable(*(shared_path(p) for p in paths))
    if client is not None:
        return nullcontext(client)
    from .parallel.client import open_client

    return open_client(workers, scheduler)


def _opened(path, extractor: Extractor) -> Model:
    model = open_model(path, device=str(extractor.device))
    model._extractor = extractor
    return model
