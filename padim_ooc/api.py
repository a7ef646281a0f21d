"""The Python API: ``fit`` and ``open_model``."""
from __future__ import annotations

import os
from typing import Sequence

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
        extractor: Extractor | None = None, batch_size: int = 32, checkpoint_every: int = 1000,
        finalize: bool = True, eps: float = DEFAULT_EPS, loader_workers: int | None = None,
        on_error: str = "skip", progress: bool = False, device: str = "auto") -> Model:
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

    Returns
    -------
    Model
        The opened model.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    fit_store(sources, model, extractor=extractor, batch_size=batch_size,
              checkpoint_every=checkpoint_every, loader_workers=loader_workers,
              on_error=on_error, progress=progress, device=device)
    if finalize:
        _finalize(ModelStore.open(model, writable=True), eps=eps)
    return open_model(model, device=device) if extractor is None else _opened(model, extractor)


def _opened(path, extractor: Extractor) -> Model:
    model = open_model(path, device=str(extractor.device))
    model._extractor = extractor
    return model
