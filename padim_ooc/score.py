"""Scoring: Mahalanobis distance per position, upsampled and blurred into anomaly maps.

``Model`` is an opened store: its statistics, its extractor, and ``score``.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .data import ImageFiles, display_path, loader, read_image
from .sources import as_item
from .errors import PadimError
from .extractor import Extractor, float32_precision
from .memory import tune_allocator
from .options import DEFAULT_SIGMA, ScoreOptions
from .store import ModelStore, read_array


def mahalanobis(features: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Mahalanobis distance of every patch to its position's Gaussian.

    Parameters
    ----------
    features : Tensor of shape (B, d, h, w)
    mean : Tensor of shape (P, d), P = h * w
    precision : Tensor of shape (P, d, d)

    Returns
    -------
    Tensor of shape (B, h, w): ``sqrt((x - mu)^T precision (x - mu))``, one
    batched matrix product over all positions.
    """
    b, d, h, w = features.shape
    patches = features.reshape(b, d, h * w).permute(2, 0, 1)  # (P, B, d): free for embed()'s output
    return mahalanobis_patches(patches, mean, precision).T.reshape(b, h, w)


# on the CPU, Mahalanobis distances go by blocks of positions whose temporaries fit in the caches
MAHALANOBIS_BLOCK_BYTES = 4 * 2**20


def mahalanobis_patches(patches: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Mahalanobis distances of patches in (P, B, d) layout; returns (P, B).

    On the CPU the positions go in cache-sized blocks (two reused temporaries
    instead of three full-size ones; see docs/design.md).
    """
    p, b, d = patches.shape
    dtype, device = precision.dtype, precision.device
    block = p if device.type != "cpu" else max(1, MAHALANOBIS_BLOCK_BYTES // (b * d * 4))
    out = torch.empty(p, b, dtype=dtype, device=device)
    diff = torch.empty(min(block, p), b, d, dtype=dtype, device=device)
    prod = torch.empty_like(diff)
    for start in range(0, p, block):
        stop = min(p, start + block)
        dv, pv = diff[:stop - start], prod[:stop - start]
        torch.sub(patches[start:stop], mean[start:stop].unsqueeze(1), out=dv)
        torch.bmm(dv, precision[start:stop], out=pv)  # precision is symmetric
        torch.sum(pv.mul_(dv), dim=2, out=out[start:stop])
    return out.clamp_min_(0).sqrt_()


def anomaly_maps(distances: torch.Tensor, size: int, sigma: float = DEFAULT_SIGMA) -> torch.Tensor:
    """Upsample (bilinear) a (B, h, w) distance grid to (B, size, size) and blur it.

    The blur is Gaussian with standard deviation ``sigma`` pixels and a kernel
    of radius ``round(4 sigma)``, reflect edges; ``sigma=0`` turns it off.
    Both steps are linear and separable, so they run as two small matrix
    products per map, ``A_h D A_w^T`` (:func:`map_operator`): the same maps as
    ``F.interpolate`` then :func:`gaussian_blur`, at a tenth of the time.
    """
    _, h, w = distances.shape
    rows = map_operator(h, size, sigma, distances.dtype, str(distances.device))
    cols = map_operator(w, size, sigma, distances.dtype, str(distances.device))  # cached: rows when w == h
    return torch.matmul(torch.matmul(rows, distances), cols.T)


@functools.lru_cache(maxsize=16)
def map_operator(n: int, size: int, sigma: float, dtype: torch.dtype, device: str) -> torch.Tensor:
    """The (size, n) matrix of bilinear upsampling (align_corners=False) from ``n`` to
    ``size`` samples followed by the 1-D Gaussian blur of :func:`gaussian_blur`.

    Taken from torch's own operations applied to unit vectors, so it is their
    mapping to the last rounding of the weights; built in full float32
    (:func:`~padim_ooc.extractor.float32_precision`: on CUDA, cuDNN would
    otherwise run the blur's convolution in TF32, 10-bit mantissas, and every
    map of the process would carry that error).
    """
    with torch.inference_mode(False), float32_precision():  # no TF32 convolution in the cached operator
        units = torch.eye(n, dtype=dtype, device=device).view(n, 1, n, 1)
        up = F.interpolate(units, size=(size, 1), mode="bilinear", align_corners=False)
        if sigma > 0:
            up = _blur_along(up, sigma, dim=2)
        return up.reshape(n, size).T.contiguous()


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of (B, 1, H, W) maps: two 1-D passes, reflect padding, radius round(4 sigma).

    The same result as ``torchvision``'s ``gaussian_blur`` (its 2-D kernel is the
    outer product of this 1-D one), at 2 x 33 instead of 33 x 33 multiply-adds
    a pixel for sigma = 4.
    """
    return _blur_along(_blur_along(images, sigma, dim=3), sigma, dim=2)


def _blur_along(images: torch.Tensor, sigma: float, dim: int) -> torch.Tensor:
    """The 1-D Gaussian blur of (B, 1, H, W) maps along H (``dim=2``) or W (``dim=3``)."""
    radius = int(4 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel /= kernel.sum()
    if dim == 3:
        return F.conv2d(F.pad(images, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(images, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))


class Model:
    """A fitted PaDiM model, opened from its store.

    Use :func:`padim_ooc.open_model` to get one. ``extractor``: one built for this
    model already (its features must be the stored configuration's), else it is
    rebuilt from the store on first use, with ``device`` and ``weights``.
    """

    def __init__(self, store: ModelStore, *, device: str = "auto", weights: str | None = None,
                 extractor: Extractor | None = None):
        if extractor is not None:
            store.config.check_extends(extractor.config(), store.path)
        self.store = store
        self._device = device
        self._weights = weights
        self._extractor = extractor
        self._final: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def attrs(self) -> dict:
        """The store's attributes (configuration, counts, state)."""
        return dict(self.store.attrs)

    @property
    def n_images(self) -> int:
        return self.store.n_images

    @property
    def calibration(self):
        """The stored :class:`padim_ooc.calibration.Calibration` (``labels``, ``p_values``,
        ``masks`` of scores and maps), or None for a model never calibrated."""
        return self.store.calibration()

    @property
    def finalized(self) -> bool:
        return bool(self.store.attrs["finalized"])

    @property
    def mean(self) -> np.ndarray:
        """ndarray of shape (P, d), float64: the exact mean of every position's embeddings."""
        return read_array(self.store.mean_array())

    def covariance(self) -> np.ndarray:
        """ndarray of shape (P, d, d), float64: the exact sample covariance ``m2 / (n - 1)``.

        eps * I is *not* included (finalize adds it before inverting).
        """
        n = self.store.n_images
        if n < 2:
            raise PadimError(f"a covariance needs at least 2 images, the model has {n}")
        return read_array(self.store.m2_array()) / (n - 1)

    @property
    def extractor(self) -> Extractor:
        """The extractor rebuilt from the stored configuration (weights checked by digest)."""
        if self._extractor is None:
            self._extractor = Extractor.from_config(self.store.config, device=self._device,
                                                    weights=self._weights, projection=self.store.projection())
        return self._extractor

    def _statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._final is None:
            mean, prec = self.store.final_arrays()
            device = self.extractor.device
            # a scorer's float16 precision is scored in float32 like any other (the products stay float32)
            final = (torch.from_numpy(read_array(mean)), torch.from_numpy(read_array(prec).astype(np.float32, copy=False)))
            for name, t in zip(("mean", "precision"), final):
                check_finite(t, f"{self.store.attrs['final']}/{name}", self.store.path)
            self._final = tuple(t.to(device) for t in final)
        return self._final

    def score_batch(self, batch: torch.Tensor, *, sigma: float = DEFAULT_SIGMA):
        """Image scores (B,) and anomaly maps (B, crop, crop) of a preprocessed batch (tensors).

        Every product of the score (the Mahalanobis ``bmm``, the map products)
        runs in full float32 whatever the calling process set (``allow_tf32``,
        ``set_float32_matmul_precision("high")``): TF32 would change scores on a
        GPU by about 1e-3 relative, past what the features carry.
        """
        mean, prec = self._statistics()
        patches = self.extractor.embed_patches(batch)
        with torch.inference_mode(), float32_precision():
            dist = mahalanobis_patches(patches, mean, prec).T.reshape(batch.shape[0], *self.extractor.grid)
            maps = anomaly_maps(dist, self.extractor.preprocess.crop, sigma)
            scores = maps.amax(dim=(1, 2))
            if not bool(torch.isfinite(scores).all()):  # never scored silently
                raise PadimError(f"the model {self.store.path} gave non-finite scores (overflow in the "
                                 "Mahalanobis distance): its statistics are unusable; fit it again")
            return scores, maps

    def score(self, images, *, batch_size: int = 32, sigma: float = DEFAULT_SIGMA):
        """Score images.

        Parameters
        ----------
        images : Tensor of shape (N, 3, crop, crop), or a sequence of paths or PIL images
            A tensor is taken as already preprocessed.

        Returns
        -------
        scores : ndarray of shape (N,), float32
        maps : ndarray of shape (N, crop, crop), float32
        """
        if isinstance(images, torch.Tensor):
            chunks = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
        else:
            pre = self.extractor.preprocess
            items = [im if isinstance(im, Image.Image) else _open_image(as_item(im)) for im in images]
            chunks = [torch.stack([pre(im) for im in items[i:i + batch_size]])
                      for i in range(0, len(items), batch_size)]
        scores, maps = [], []
        for chunk in chunks:
            s, m = self.score_batch(chunk, sigma=sigma)
            scores.append(s.float().cpu().numpy())
            maps.append(m.float().cpu().numpy())
        crop = self.extractor.preprocess.crop
        if not scores:
            return np.zeros(0, np.float32), np.zeros((0, crop, crop), np.float32)
        return np.concatenate(scores), np.concatenate(maps)


def check_finite(values, name: str, model: str) -> None:
    """One line naming the array ``name`` of the model ``model`` if ``values`` (a tensor or
    ndarray) hold NaN or inf: damaged statistics are never scored."""
    bad = int((~torch.isfinite(torch.as_tensor(values))).sum())
    if bad:
        raise PadimError(f"the model {model} is damaged: {name} holds {bad} non-finite values (NaN or inf); "
                         "fit it again")


def score_images(model: Model, paths: Sequence[Path], options: ScoreOptions, on_batch) -> list[tuple[int, str]]:
    """Score image files in input order, streaming, in this process.

    Calls ``on_batch(indices, scores, maps)`` for every batch (indices into
    ``paths``; scores (k,) and maps (k, crop, crop) float32 numpy arrays);
    returns a list of ``(index, error)`` for images that could not be read
    (``options.on_error='fail'`` raises at the first instead).
    """
    tune_allocator()  # no page faults per batch (see docs/design.md)
    ex = model.extractor
    model._statistics()  # fail early if not finalized
    dataset = ImageFiles(paths, ex.preprocess, max_bytes=options.max_image_bytes)
    bad: list[tuple[int, str]] = []
    for indices, _digests, batch, ok, errors in loader(dataset, options.batch_size, workers=options.loader_workers,
                                                       device=ex.device.type):
        for i, err in zip(indices, errors):
            if err is not None:
                if options.on_error == "fail":
                    raise PadimError(f"bad image {display_path(paths[i])}: {err}")
                bad.append((i, err))
        if batch is None:
            continue
        scores, maps = model.score_batch(batch, sigma=options.sigma)
        kept = [i for i, good in zip(indices, ok) if good]
        on_batch(kept, scores.float().cpu().numpy(), maps.float().cpu().numpy())
    return bad


def _open_image(path: Path) -> Image.Image:
    image, reason = read_image(path)
    if reason:
        raise PadimError(f"bad image {display_path(path)}: {reason}")
    return image


__all__ = ["Model", "mahalanobis", "anomaly_maps", "score_images", "DEFAULT_SIGMA"]
