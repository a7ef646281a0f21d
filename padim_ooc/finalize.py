"""Covariance + eps I, Cholesky, precision: per position chunk, mapped with Dask."""
from __future__ import annotations

from contextlib import nullcontext

import dask
import dask.array as da
import numpy as np
import torch

from .errors import PadimError
from .store import ModelStore

DEFAULT_EPS = 0.01


def precision_block(m2: np.ndarray, n: int, eps: float) -> np.ndarray:
    """Precision matrices of one chunk of positions.

    Parameters
    ----------
    m2 : ndarray of shape (p, d, d), float64
        Sums of outer products of deviations.
    n : int
        Number of images.
    eps : float
        Regularisation added to the diagonal of the covariance.

    Returns
    -------
    ndarray of shape (p, d, d), float32: ``inv(m2 / (n - 1) + eps I)``,
    computed with a Cholesky factorisation in float64 (LU-based batched
    inverses fail for d > ~148 with several threads on this stack).
    """
    cov = torch.from_numpy(np.ascontiguousarray(m2, dtype=np.float64)) / (n - 1)
    cov.diagonal(dim1=-2, dim2=-1).add_(eps)
    chol, info = torch.linalg.cholesky_ex(cov)
    if bool((info > 0).any()):
        raise PadimError(f"a covariance is not positive definite (eps={eps}); use a larger --eps")
    return torch.cholesky_inverse(chol).to(torch.float32).numpy()


def finalize(store: ModelStore, *, eps: float = DEFAULT_EPS, scheduler: str | None = "threads") -> None:
    """Write the precision matrices and a float32 mean, chunk by chunk, then switch to them.

    Memory stays at a few chunks of ``m2`` whatever P x d x d is. ``scheduler``
    is a Dask scheduler name (``threads``, ``synchronous``) or ``None`` to use
    the active ``dask.distributed`` client.
    """
    n = store.n_images
    if n < 2:
        raise PadimError(f"finalize needs at least 2 images, the model has {n}")
    if not eps >= 0:
        raise PadimError(f"eps must be >= 0, got {eps}")
    m2 = da.from_zarr(store.m2_array())
    mean = da.from_zarr(store.mean_array())
    name, mean32, prec = store.begin_final(eps)
    precision = m2.map_blocks(precision_block, n, eps, dtype=np.float32)
    stores = [da.to_zarr(precision, prec, compute=False), da.to_zarr(mean.astype(np.float32), mean32, compute=False)]
    with dask.config.set(scheduler=scheduler) if scheduler else nullcontext():
        dask.compute(*stores)
    store.commit_final(name, eps)

