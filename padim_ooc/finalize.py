"""Covariance + eps I, Cholesky, precision: per position chunk, mapped with Dask."""
from __future__ import annotations

import dask.array as da
import numpy as np
import torch

from .errors import PadimError
from .options import DEFAULT_EPS
from .parallel.tasks import compute
from .store import ModelStore, check_shareable



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
    if not np.isfinite(m2).all():
        raise PadimError(f"the model's statistics hold {int((~np.isfinite(m2)).sum())} non-finite values "
                         "(NaN or inf) in m2: the model is damaged; fit it again")
    cov = torch.from_numpy(np.ascontiguousarray(m2, dtype=np.float64)) / (n - 1)
    cov.diagonal(dim1=-2, dim2=-1).add_(eps)
    chol, info = torch.linalg.cholesky_ex(cov)
    if bool((info > 0).any()):
        raise PadimError(f"a covariance is not positive definite (eps={eps}); use a larger --eps")
    precision = torch.cholesky_inverse(chol).to(torch.float32).numpy()
    if not np.isfinite(precision).all():  # float32 overflow of a near-singular covariance
        raise PadimError(f"a precision matrix overflows float32 (eps={eps}); use a larger --eps")
    return precision


def mean_block(mean: np.ndarray) -> np.ndarray:
    """The float32 mean of one chunk of positions; non-finite values are an error."""
    if not np.isfinite(mean).all():
        raise PadimError(f"the model's statistics hold {int((~np.isfinite(mean)).sum())} non-finite values "
                         "(NaN or inf) in the mean: the model is damaged; fit it again")
    out = mean.astype(np.float32)
    if not np.isfinite(out).all():
        raise PadimError("the model's mean overflows float32: the model is damaged; fit it again")
    return out


def finalize(store: ModelStore, *, eps: float = DEFAULT_EPS, scheduler: str | None = "threads",
             client=None) -> None:
    """Write the precision matrices and a float32 mean, chunk by chunk, then switch to them.

    A Dask array over the ``m2`` chunks (chunked along positions only) is
    mapped with :func:`precision_block` and stored into the new arrays chunk by
    chunk, so memory stays at a few chunks of ``m2`` whatever P x d x d is.

    Parameters
    ----------
    store : ModelStore
        Opened writable, with statistics of at least 2 images.
    eps : float
        Added to the diagonal of every covariance.
    scheduler : str or None
        A Dask scheduler name (``threads``, ``synchronous``), or ``None`` to
        use the active ``dask.distributed`` client. Ignored if ``client`` is given.
    client : distributed.Client, optional
        Run the chunks on this cluster; its workers must reach the store's path.

    Raises
    ------
    PadimError
        If a write fails (full disk, I/O error): one line naming the store; what
        was written is removed and the model stays as it was (also its previous
        finalization, if any).
    """
    n = store.n_images
    if n < 2:
        raise PadimError(f"finalize needs at least 2 images, the model has {n}")
    if not eps >= 0:
        raise PadimError(f"eps must be >= 0, got {eps}")
    if client is not None:
        check_shareable(store.path, action="finalize it")
    m2_z, mean_z = store.m2_array(), store.mean_array()
    m2 = da.from_zarr(m2_z, chunks=m2_z.chunks)  # one task per stored chunk: memory stays at a few chunks
    mean = da.from_zarr(mean_z, chunks=mean_z.chunks)
    name, mean32, prec = store.begin_final(eps)
    precision = m2.map_blocks(precision_block, n, eps, dtype=np.float32)
    # da.store writes each block into its own region (blocks = stored chunks: no rechunk, no lock);
    # da.to_zarr would rechunk to ~128 MiB blocks first and multiply the memory per task
    mean32_blocks = mean.map_blocks(mean_block, dtype=np.float32)
    stores = [da.store([precision, mean32_blocks], [prec, mean32], lock=False, compute=False)]
    with store.switching(name):  # a failed chunk write: one line naming the store, the new arrays removed
        compute(stores, client=client, scheduler=scheduler)
    store.commit_final(name, eps)
