"""The Python API: ``fit``, ``open_model``, ``finalize_model``, ``merge`` and ``score_files``.

Each function checks its options once, into an options record
(:class:`~padim_ooc.options.FitOptions`, :class:`~padim_ooc.options.ScoreOptions`),
and hands it to the same pipeline the command line runs
(:func:`padim_ooc.fit.run_fit`, :func:`run_score`).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

from . import merge as _merge_module  # noqa: F401  loaded now, so that `padim_ooc.merge` stays the function below
from .config import ModelConfig
from .data import list_images
from .errors import PadimError
from .extractor import Extractor
from .finalize import finalize as _finalize
from .fit import FitSummary, run_fit
from .options import DEFAULT_FOLD, Cluster, FitOptions, ScoreOptions, check_eps, check_shrinkage, eps_for, shrinkage_for
from .outputs import ArraySink
from .progress import bar
from .score import Model, score_images
from .store import ModelStore, lock

log = logging.getLogger("padim_ooc")


def open_model(path: str | os.PathLike, *, device: str = "auto", weights: str | None = None,
               extractor: Extractor | None = None) -> Model:
    """Open a fitted model store (read-only).

    ``weights``: where to load the backbone weights from if the model was
    fitted with a local weights file (the stored hash is checked).
    ``extractor``: one already built for this model (its features are checked
    against the stored configuration), so it is not built again.
    """
    return Model(ModelStore.open(path), device=device, weights=weights, extractor=extractor)


def fit(sources: Sequence[str | os.PathLike] | str | os.PathLike, model: str | os.PathLike, *,
        extractor: Extractor | None = None, weights: str | None = None, embedding: str | None = None,
        batch_size: int = 32,
        checkpoint_every: int | None = None, finalize: bool = True, eps: float | None = None,
        shrinkage: str | None = None, loader_workers: int | None = None, on_error: str = "skip",
        progress: bool = False, device: str = "auto", max_memory: int | None = None, workers: int | None = None,
        scheduler: str | None = None, client=None, holdout: float = 0.0, fpr: float | None = None,
        fold: str = DEFAULT_FOLD) -> Model:
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
    embedding : {'random', 'orthogonal'}, optional
        Without ``extractor``: how a new model's d channels are made of the F
        concatenated ones, a seeded random subset (PaDiM) or a seeded
        semi-orthogonal projection (Kim et al. 2021) [random]; an existing model
        fitted otherwise is refused. With ``extractor``: must be its embedding.
    finalize : bool
        Compute the precision matrices at the end (``eps`` on the diagonal).
    eps : float, optional
        Added to the covariance diagonal (>= 0). Default: the model's current
        eps, or 0.01 for a model never finalized. A finalized model whose
        stored eps differs is finalized again, even if no image is new.
    shrinkage : {'none', 'oas'}, optional
        How the covariances are estimated at finalize (:mod:`padim_ooc.finalize`).
        Default: the model's current one, ``none`` for a model never finalized;
        another one finalizes again.
    max_memory : int, optional
        Memory budget in bytes (default: available memory with a margin); when
        the statistics do not fit, positions are fitted in blocks, one pass each.
    workers, scheduler, client
        Fit on a Dask cluster, one partial store per shard of the images, merged
        at the end: ``workers=N`` starts a local cluster of N processes,
        ``scheduler="tcp://HOST:PORT"`` connects to a running one, ``client``
        uses a ``distributed.Client`` you hold. Default: in this process.
    holdout : float
        Share of the images, in [0, 1), held out of the statistics by content hash; the model is
        calibrated on them after finalizing (split-conformal, false-alarm rate ``fpr``).
    fpr : float, optional
        The calibration's false-alarm rate (default: the model's, else 0.01).
    fold : {'float64', 'float32'}
        How each batch is folded into the float64 statistics: ``float64`` (default,
        exact to ~1e-10 relative), or ``float32`` (the batch's scatter by float32
        products: less of the fold's time on a CPU, see docs/benchmarks.md, ~1e-7
        relative to two-pass float64, below the float32 noise of the features themselves).

    Returns
    -------
    Model
        The opened model.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if extractor is not None and weights is not None:
        raise PadimError("give either an extractor (built with its weights) or weights, not both")
    options = FitOptions(batch_size=batch_size, device=device, loader_workers=loader_workers, on_error=on_error,
                         progress=progress, cluster=Cluster(workers, scheduler, client),
                         checkpoint_every=checkpoint_every, max_memory=max_memory, finalize=finalize, eps=eps,
                         shrinkage=shrinkage, holdout=holdout, fpr=fpr, fold=fold)
    config = ModelConfig(weights=weights, embedding=embedding) if weights or embedding else None
    if extractor is not None and embedding is not None and extractor.embedding != config.embedding:
        raise PadimError(f"embedding={embedding!r} was given with an extractor whose embedding is "
                         f"{extractor.embedding!r}: give one of them")
    run_fit(sources, model, options, config=config, extractor=extractor)
    return open_model(model, device=device if extractor is None else str(extractor.device), weights=weights,
                      extractor=extractor)


def finalize_model(path: str | os.PathLike, *, eps: float | None = None, shrinkage: str | None = None,
                   workers: int | None = None, scheduler: str | None = None, client=None,
                   cluster: Cluster | None = None) -> Model:
    """Compute the precision matrices of a fitted model: ``inv(m2 / (n - 1) + eps I)``
    (or of the OAS-shrunk covariance, ``shrinkage="oas"``).

    Finalizes again if the model already is (e.g. with another ``eps`` or shrinkage:
    no image is read).
    Named ``finalize_model`` because ``padim_ooc.finalize`` is the module that
    does the work (:func:`padim_ooc.finalize.finalize`, on an opened store).

    Parameters
    ----------
    path : path or URL
        The model store (statistics of at least 2 images).
    eps : float, optional
        Added to the diagonal of every covariance (>= 0). Default: the
        model's current eps, or 0.01 for a model never finalized.
    shrinkage : {'none', 'oas'}, optional
        Default: the model's current one, ``none`` for a model never finalized.
    workers, scheduler, client
        Run the position chunks on a Dask cluster, as in :func:`fit`.
    cluster : Cluster, optional
        The whole record instead (e.g. with TLS certificates); replaces the three above.

    Returns
    -------
    Model
        The opened, finalized model.
    """
    if eps is not None:
        check_eps(eps)
    if shrinkage is not None:
        check_shrinkage(shrinkage)
    cluster = cluster or Cluster(workers, scheduler, client)
    with ModelStore.open(path, writable=True) as store, cluster.open(store.path) as cl:
        _finalize(store, eps=eps_for(store.attrs, eps), shrinkage=shrinkage_for(store.attrs, shrinkage), client=cl)
        recalibrate(store, cl)
    return open_model(path)


def recalibrate(store: ModelStore, client=None) -> dict | None:
    """After a finalize or a merge changed the statistics a calibration was made against: when the
    model is calibrated on its own hold-out (``fit --holdout``), calibrate it again on those images
    (:func:`padim_ooc.calibrate.calibrate_holdout`: files gone or changed are left out, and with none
    left the calibration stays stale and a warning says so). A calibration made otherwise stays
    stale (``info`` and ``score`` say so). Returns what was done, or None."""
    record, cal = store.attrs.get("holdout"), store.calibration()
    if not (record and record.get("in_use", True) and cal is not None and cal.stale and store.attrs["finalized"]):
        return None
    from .calibrate import calibrate_holdout

    try:
        return calibrate_holdout(store, None, ScoreOptions(cluster=Cluster(client=client)))
    except PadimError as err:  # e.g. a model fitted with a weights file that is not given here
        log.warning("the calibration of %s stays stale: %s", store.path, err)
        return {"status": "stale"}


def merge(parts: Sequence[str | os.PathLike], model: str | os.PathLike, *, finalize: bool = True,
          eps: float | None = None, shrinkage: str | None = None, workers: int | None = None,
          scheduler: str | None = None, client=None, cluster: Cluster | None = None) -> dict:
    """Merge stores fitted on disjoint image sets (same configuration) into ``model``.

    An existing ``model`` keeps its images and gets the parts' (see
    :func:`padim_ooc.merge.merge_stores`). Returns ``model``, ``parts``,
    ``added``, ``n_images`` and ``finalized`` (the store's state afterwards).
    ``finalize`` finalizes the merged model with ``eps`` (default: the model's
    current eps, or 0.01 for a new model or one never finalized) and ``shrinkage``
    (default: the model's, ``none`` for a new one). ``cluster``: the whole
    :class:`~padim_ooc.options.Cluster` record instead of ``workers``, ``scheduler``, ``client``.
    """
    from .merge import merge_stores

    if eps is not None:
        check_eps(eps)
    if shrinkage is not None:
        check_shrinkage(shrinkage)
    cluster = cluster or Cluster(workers, scheduler, client)
    # the lock first: a refused writer starts no cluster
    with lock.store_lock(model, lock.default_command()), cluster.open(model, *parts) as cl:
        result = merge_stores(parts, model, client=cl)
        with ModelStore.open(model, writable=True) as store:
            if finalize:
                _finalize(store, eps=eps_for(store.attrs, eps), shrinkage=shrinkage_for(store.attrs, shrinkage),
                          client=cl)
                recalibrate(store, cl)
            return result | {"finalized": bool(store.attrs["finalized"])}


def score_files(model: str | os.PathLike, paths: Sequence[str | os.PathLike], *, batch_size: int = 32,
                maps: bool = False, sigma: float = 4.0, device: str = "auto", weights: str | None = None,
                loader_workers: int | None = None, on_error: str = "skip", workers: int | None = None,
                scheduler: str | None = None, client=None):
    """Score image files, on a Dask cluster when asked (shards of ``paths`` go to the workers).

    Returns
    -------
    scores : ndarray of shape (N,), float64, in input order (NaN for an unreadable image)
    maps : ndarray of shape (N, crop, crop), float16, or None without ``maps``
    """
    options = ScoreOptions(batch_size=batch_size, device=device, loader_workers=loader_workers, on_error=on_error,
                           cluster=Cluster(workers, scheduler, client), sigma=sigma, maps=maps)
    paths = list_images(paths)
    store = ModelStore.open(model)
    sink = ArraySink(len(paths), store.attrs["crop"], maps=maps)
    run_score(store, paths, options, sink, weights=weights)
    return sink.scores, sink.maps


def calibrate_model(path: str | os.PathLike, data: Sequence[str | os.PathLike] | str | os.PathLike | None = None, *,
                    fpr: float | None = None, labelled: bool = False, rule: str = "f1", batch_size: int = 32,
                    device: str = "auto", weights: str | None = None, loader_workers: int | None = None,
                    progress: bool = False, workers: int | None = None, scheduler: str | None = None,
                    client=None) -> dict:
    """Calibrate the finalized model at ``path``: the threshold and p-values ``score`` decides with,
    stored in the model (root attribute ``calibration``; see docs/calibration.md).

    Parameters
    ----------
    data : path or sequence of paths, optional
        Normal images the fit did not see (split-conformal, false-alarm rate ``fpr``, default
        0.01); with ``labelled`` one class folder (MVTec AD or good/ + defect/) and ``rule``
        (``"f1"``, ``"youden"``, ``"recall:R"``); None: the model's held-out images
        (``fit(..., holdout=F)``), with ``fpr`` or the stored alpha.
    workers, scheduler, client
        Score on a Dask cluster, as :func:`score_files`.

    Returns
    -------
    dict
        The calibration's rule, alpha, n, threshold(s) and counts (skipped, left out).
    """
    from .calibrate import calibrate_files, calibrate_holdout, calibrate_layout
    from .calibration import _parse_rule
    from .options import DEFAULT_FPR, check_fpr

    if isinstance(data, (str, os.PathLike)):
        data = [data]
    options = ScoreOptions(batch_size=batch_size, device=device, loader_workers=loader_workers, progress=progress,
                           cluster=Cluster(workers, scheduler, client))
    if labelled:
        from .evaluation.layouts import find_layout

        _parse_rule(rule)
        if not data or len(data) != 1:
            raise PadimError(f"a labelled calibration takes one class folder (MVTec AD layout or good/ + defect/), "
                             f"got {len(data or [])}: e.g. `padim-ooc calibrate {path} data/bottle --labelled`")
        layout = find_layout(data[0])
        with ModelStore.open(path, writable=True) as store:
            return calibrate_layout(store, layout, rule, options, weights=weights)
    if fpr is not None:
        check_fpr(fpr)
    with ModelStore.open(path, writable=True) as store:
        if data:
            return calibrate_files(store, list_images(data), DEFAULT_FPR if fpr is None else fpr, options,
                                   weights=weights)
        return calibrate_holdout(store, fpr, options, weights=weights)


def run_score(store: ModelStore, paths: Sequence[Path], options: ScoreOptions, sink, *,
              weights: str | None = None, extractor: Extractor | None = None) -> list[tuple[int, str]]:
    """What ``padim-ooc score`` and :func:`score_files` do: score ``paths`` with the finalized
    model of ``store``, in this process or on the cluster of ``options.cluster`` (the one place
    that chooses), handing every batch's results to ``sink.add(indices, scores, maps)``.

    ``extractor``: one already built for this model, used in this process (a cluster's workers
    build their own). Maps go to the sink where ``options.wants_maps`` (asked, or needed for masks
    and overlays). Returns the ``(index, reason)`` of the images that could not be read (skipped).
    """
    store.final_arrays()  # a clear error before any image is read
    with options.cluster.open(store.path) as client, \
            bar(f"score {Path(store.path).name}", len(paths), enabled=options.progress) as advance:
        def on_batch(indices, scores, batch_maps):
            sink.add(indices, scores, batch_maps if options.wants_maps else None)
            advance(len(indices))

        if client is None:
            model = Model(store, device=options.device, weights=weights, extractor=extractor)
            return score_images(model, paths, options, on_batch)
        from .parallel.score_shards import score_sharded

        return score_sharded(store, paths, client, options, weights=weights, on_result=on_batch)


__all__ = ["fit", "open_model", "finalize_model", "merge", "score_files", "calibrate_model", "run_score", "run_fit", "FitSummary"]
