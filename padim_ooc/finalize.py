"""Covariance (optionally shrunk) + eps I, Cholesky, precision: per position chunk, mapped with Dask.

Shrinkage: ``none`` is PaDiM's sample covariance ``m2 / (n - 1)``; ``oas`` is the Oracle
Approximating Shrinkage of Chen, Wiesel, Eldar and Hero (2010) as
``sklearn.covariance.oas`` computes it, from the scatter matrix, n and d alone (so a
model is finalized again with another shrinkage without reading an image):
``S = m2 / n``, ``mu = tr(S) / d``, ``a = mean(S**2)``,
``rho = min((a + mu**2) / ((n + 1) (a - mu**2 / d)), 1)`` (1 where the denominator is 0),
covariance ``(1 - rho) S + rho mu I``. ``eps I`` is added after either.
"""
from __future__ import annotations

import dask.array as da
import numpy as np
import torch

from .errors import PadimError
from .options import DEFAULT_EPS, DEFAULT_SHRINKAGE
from .parallel.tasks import compute
from .store import ModelStore, check_shareable



def covariance_block(m2: np.ndarray, n: int, shrinkage: str = DEFAULT_SHRINKAGE) -> tuple[torch.Tensor, torch.Tensor]:
    """The covariances of one chunk of positions before ``eps``, and the shrinkage of each.

    Parameters
    ----------
    m2 : ndarray of shape (p, d, d), float64
        Sums of outer products of deviations.
    n : int
        Number of images (>= 2).
    shrinkage : {'none', 'oas'}

    Returns
    -------
    cov : Tensor of shape (p, d, d), float64
        ``m2 / (n - 1)``, or the OAS estimate (module docstring).
    rho : Tensor of shape (p,), float64
        The shrinkage of each position (0 for ``none``).
    """
    m2 = torch.from_numpy(np.ascontiguousarray(m2, dtype=np.float64))
    if shrinkage == "none":
        return m2 / (n - 1), torch.zeros(m2.shape[0], dtype=torch.float64)
    d = m2.shape[-1]
    s = m2 / n
    mu = s.diagonal(dim1=-2, dim2=-1).sum(-1) / d  # (p,)
    alpha = s.square().mean(dim=(-2, -1))
    den = (n + 1) * (alpha - mu.square() / d)
    rho = torch.where(den == 0, torch.ones_like(den), ((alpha + mu.square()) / den).clamp(max=1.0))
    cov = s.mul_((1 - rho)[:, None, None])
    cov.diagonal(dim1=-2, dim2=-1).add_((rho * mu)[:, None])
    return cov, rho


def precision_block(m2: np.ndarray, n: int, eps: float, shrinkage: str = DEFAULT_SHRINKAGE) -> np.ndarray:
    """Precision matrices of one chunk of positions.

    Parameters
    ----------
    m2 : ndarray of shape (p, d, d), float64
        Sums of outer products of deviations.
    n : int
        Number of images.
    eps : float
        Regularisation added to the diagonal of the covariance.
    shrinkage : {'none', 'oas'}
        How the covariance is estimated (:func:`covariance_block`).

    Returns
    -------
    ndarray of shape (p, d, d), float32: ``inv(cov + eps I)`` (``cov = m2 / (n - 1)``
    without shrinkage), computed with a Cholesky factorisation in float64
    (LU-based batched inverses fail for d > ~148 with several threads on this stack).
    """
    if not np.isfinite(m2).all():
        raise PadimError(f"the model's statistics hold {int((~np.isfinite(m2)).sum())} non-finite values "
                         "(NaN or inf) in m2: the model is damaged; fit it again")
    cov, _ = covariance_block(m2, n, shrinkage)
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


def finalize(store: ModelStore, *, eps: float = DEFAULT_EPS, shrinkage: str = DEFAULT_SHRINKAGE,
             scheduler: str | None = "threads", client=None) -> None:
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
    shrinkage : {'none', 'oas'}
        How each covariance is estimated from ``m2`` (module docstring); stored with
        the finalization (attribute ``shrinkage``).
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
    store.refuse_scorer("finalize")
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
    precision = m2.map_blocks(precision_block, n, eps, shrinkage, dtype=np.float32)
    # da.store writes each block into its own region (blocks = stored chunks: no rechunk, no lock);
    # da.to_zarr would rechunk to ~128 MiB blocks first and multiply the memory per task
    mean32_blocks = mean.map_blocks(mean_block, dtype=np.float32)
    stores = [da.store([precision, mean32_blocks], [prec, mean32], lock=False, compute=False)]
    with store.switching(name):  # a failed chunk write: one line naming the store, the new arrays removed
        compute(stores, client=client, scheduler=scheduler)
    store.commit_final(name, eps, shrinkage)
