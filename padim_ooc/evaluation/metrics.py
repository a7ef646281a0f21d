"""Evaluation metrics: image AUROC, pixel AUROC and PRO (see PAPER.md, Metrics).

Functions are pure and return plain floats. The pixel metrics are exact up to
``DEFAULT_MAX_EXACT_PIXELS`` pixels and binned beyond (fixed memory; see
:mod:`padim_ooc.binned` for the bins, :mod:`padim_ooc.pro` for PRO);
:class:`PixelMetrics` does both for a stream of batches. The binned error is
measured by ``scripts/measure_metric_error.py`` (numbers in README.md).
"""

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from .binned import (DEFAULT_FPR_LIMIT, DEFAULT_MAX_EXACT_PIXELS, DEFAULT_N_BINS, DEFAULT_TAIL,
                     PixelRocAccumulator, bin_layout, check_finite_maps, check_pair, chunks, log_tails)
from .pro import ProAccumulator, exact_pro_curve, partial_area, pro_score, region_weights

__all__ = ["DEFAULT_FPR_LIMIT", "DEFAULT_MAX_EXACT_PIXELS", "DEFAULT_N_BINS", "DEFAULT_TAIL",
           "PixelMetrics", "PixelRocAccumulator", "ProAccumulator", "exact_pro_curve",
           "bin_layout", "image_auroc", "log_tails", "pixel_auroc", "pro_score"]


def image_auroc(labels, scores):
    """ROC AUC of image-level anomaly scores.

    Parameters
    ----------
    labels : array-like of shape (n_images,)
        0 (or False) for a good image, 1 (or True) for a defective one.
    scores : array-like of shape (n_images,)
        Image anomaly scores; higher means more anomalous.

    Returns
    -------
    float
        Area under the ROC curve, in [0, 1]; ties count as half.
    """
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    if labels.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(f"labels and scores must be 1-D of equal length; "
                         f"got shapes {labels.shape} and {scores.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (good) or 1 (defect); got values "
                         f"{np.unique(labels)[:5].tolist()}")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values")
    if np.unique(labels).size < 2:
        raise ValueError("image AUROC needs both good (0) and defective (1) "
                         f"images; only label {int(labels.flat[0])} is present")
    return float(roc_auc_score(labels.astype(bool), scores))


def pixel_auroc(masks, maps, *, max_exact_pixels=DEFAULT_MAX_EXACT_PIXELS,
                n_bins=DEFAULT_N_BINS, tail=DEFAULT_TAIL):
    """ROC AUC over all pixels of all images.

    Up to ``max_exact_pixels`` pixels (default 2**22) the AUC is exact
    (``sklearn.metrics.roc_auc_score``). Above, scores go into ``n_bins``
    (default 2**16) equal-width bins over the score scale of
    :func:`padim_ooc.binned.bin_layout` (linear between the ``tail`` and
    ``1 - tail`` quantiles, logarithmic beyond), and the AUC is the trapezoid
    area of the ROC through the bin edges (pixels in one bin count as tied,
    i.e. half); O(n_bins) memory plus one chunk of 2**22 pixels. The error,
    measured by ``scripts/measure_metric_error.py``, is in README.md.

    Parameters
    ----------
    masks : array-like of shape (N, H, W)
        Ground truth; nonzero marks a defect pixel.
    maps : array-like of shape (N, H, W)
        Anomaly maps; higher means more anomalous.
    max_exact_pixels : int, default=DEFAULT_MAX_EXACT_PIXELS
        Largest N * H * W computed exactly.
    n_bins : int, default=DEFAULT_N_BINS
        Number of bins of the binned computation.
    tail : float, default=DEFAULT_TAIL
        Share of pixels at each end outside the linear core of the bin scale
        (0: plain equal-width bins between the min and max).

    Returns
    -------
    float
        Pixel AUROC in [0, 1].
    """
    masks, maps = check_pair(masks, maps)
    if masks.size <= max_exact_pixels:
        check_finite_maps(maps)
        if masks.all() or not masks.any():
            raise ValueError("pixel AUROC needs both defect and normal pixels; "
                             f"all {masks.size} pixels are "
                             + ("defect" if masks.all() else "normal"))
        return float(roc_auc_score(masks.ravel(), maps.ravel()))
    lo, hi, core = bin_layout(maps, tail)
    acc = PixelRocAccumulator(lo, hi, n_bins=n_bins, core=core)
    for part in chunks(masks.shape[0], masks[0].size):
        acc.update(masks[part], maps[part])
    return acc.auroc()


class PixelMetrics:
    """Pixel AUROC and PRO of a stream of (masks, maps) batches, in bounded memory.

    While the pixels seen add up to at most ``max_exact_pixels`` they are kept
    (5 bytes a pixel) and both metrics are exact: the pixel AUROC with
    sklearn, PRO with :func:`padim_ooc.pro.exact_pro_curve` (every distinct
    score a threshold). Past that size the kept pixels go into a
    :class:`PixelRocAccumulator` and a :class:`ProAccumulator` whose bins
    are laid out by :func:`bin_layout` over them (a score scale linear
    between their ``tail`` quantiles and logarithmic beyond, so that hot
    pixels cannot take the resolution away); a later batch first widens the
    range to its min and max if needed (:meth:`PixelRocAccumulator.cover`,
    exact pair-merging of bins, each widening halving the resolution).
    Memory is then O(n_bins) whatever the number of images. The core and
    its scale come from the first ``max_exact_pixels`` pixels only: later
    batches on another scale share coarser bins. Errors measured with
    ``scripts/measure_metric_error.py`` are in README.md.

    Parameters
    ----------
    max_exact_pixels : int, default=DEFAULT_MAX_EXACT_PIXELS
    n_bins : int, default=DEFAULT_N_BINS
        Bins of the ROC histogram and threshold steps of the PRO curve (even).
    fpr_limit : float, default=0.3
        Upper FPR of the PRO integration.
    tail : float, default=DEFAULT_TAIL
        Share of pixels at each end outside the linear core of the bin scale.
    """

    def __init__(self, *, max_exact_pixels=DEFAULT_MAX_EXACT_PIXELS, n_bins=DEFAULT_N_BINS,
                 fpr_limit=DEFAULT_FPR_LIMIT, tail=DEFAULT_TAIL):
        self.max_exact_pixels = int(max_exact_pixels)
        self.n_bins = int(n_bins)
        self.fpr_limit = float(fpr_limit)
        self.tail = float(tail)
        self._kept: list[tuple[np.ndarray, np.ndarray]] | None = []
        self._n_kept = 0
        self._roc: PixelRocAccumulator | None = None
        self._pro: ProAccumulator | None = None
        self.n_pixels = 0
        self.n_defect_pixels = 0

    @property
    def exact(self) -> bool:
        """Whether every pixel is still kept (the results will be exact)."""
        return self._kept is not None

    def update(self, masks, maps):
        """Add a batch: masks and maps of shape (batch, H, W); returns self."""
        masks, maps = check_pair(masks, maps)
        maps = np.asarray(maps, dtype=np.float32)
        check_finite_maps(maps)
        self.n_pixels += masks.size
        self.n_defect_pixels += int(masks.sum())
        if self._kept is not None:
            self._kept.append((masks, maps))
            self._n_kept += masks.size
            if self._n_kept > self.max_exact_pixels:
                self._to_bins()
        else:
            lo, hi = float(maps.min()), float(maps.max())
            self._roc.cover(lo, hi).update(masks, maps)
            self._pro.cover(lo, hi).update(masks, maps)
        return self

    def _joined(self):
        masks = np.concatenate([m for m, _ in self._kept])
        maps = np.concatenate([v for _, v in self._kept])
        return masks, maps

    def _to_bins(self):
        masks, maps = self._joined()
        lo, hi, core = bin_layout(maps, self.tail)
        self._roc = PixelRocAccumulator(lo, hi, n_bins=self.n_bins, core=core)
        self._pro = ProAccumulator(lo, hi, n_thresholds=self.n_bins, core=core)
        self._kept = None
        for part in chunks(masks.shape[0], masks[0].size):
            self._roc.update(masks[part], maps[part])
            self._pro.update(masks[part], maps[part])

    def result(self) -> dict:
        """``pixel_auroc``, ``pro`` (None when not computable), how they were computed, the ROC curve.

        Returns
        -------
        dict
            ``pixel_auroc`` and ``pro`` (float or None); ``method`` ('exact':
            both over every pixel, every distinct score a threshold; 'binned':
            both from ``n_bins`` bins); ``detail`` (that, as a sentence);
            ``n_pixels``, ``n_defect_pixels``, ``n_regions``, ``n_bins``,
            ``core`` ([q_lo, q_hi], the linear core of the bin scale; None
            when exact or without a core);
            ``roc`` (fpr, tpr arrays for plotting; None if not computable).
        """
        out = {"pixel_auroc": None, "pro": None, "n_pixels": self.n_pixels,
               "n_defect_pixels": self.n_defect_pixels, "n_regions": 0, "roc": None,
               "method": "exact" if self.exact else "binned", "n_bins": self.n_bins,
               "core": None}
        both = 0 < self.n_defect_pixels < self.n_pixels
        if self._kept is not None:
            out["detail"] = (f"exact over all {self.n_pixels:,} pixels (every distinct score a "
                             "threshold, for both pixel AUROC and PRO)")
            if self.n_pixels == 0:
                return out
            masks, maps = self._joined()
            out["n_regions"] = region_weights(masks)[1]
            if both:
                out["pixel_auroc"] = pixel_auroc(masks, maps, max_exact_pixels=masks.size)
                fpr, tpr, _ = roc_curve(masks.ravel(), maps.ravel())
                out["roc"] = (fpr, tpr)
            if out["n_regions"] and both:
                out["pro"] = partial_area(*exact_pro_curve(masks, maps), self.fpr_limit)
            return out
        roc, pro = self._roc, self._pro
        out["core"] = None if roc.core is None else list(roc.core)
        scale = ("in score units" if roc.core is None else
                 f"on a score scale linear from {roc.core[0]:.4g} to {roc.core[1]:.4g}, logarithmic beyond")
        out["detail"] = (f"binned: {self.n_pixels:,} pixels, more than the {self.max_exact_pixels:,} "
                         f"computed exactly; pixel AUROC and PRO from {self.n_bins:,} equal-width "
                         f"score bins ({scale})")
        out["n_regions"] = pro.n_regions_
        if both:
            out["pixel_auroc"] = roc.auroc()
            out["roc"] = roc.curve()
        if pro.n_regions_ and pro.neg_hist_.sum():
            out["pro"] = pro.score(self.fpr_limit)
        return out
