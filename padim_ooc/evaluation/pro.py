"""PRO, the per-region overlap (see PAPER.md, Metrics): exact by sorting, or binned.

PRO(t) is the mean, over all connected ground-truth regions of all images,
of the fraction of a region's pixels with score >= t; FPR(t) is the fraction
of normal pixels (mask 0, all images) with score >= t. The metric is the
area under PRO(FPR) from FPR 0 to ``fpr_limit`` (0.3), divided by it.

* :func:`exact_pro_curve` takes every distinct score as a threshold: one sort
  of all pixels, one curve point after each group of tied scores.
* :class:`ProAccumulator` takes the edges of fixed bins as thresholds, in
  memory that does not grow with the images (see :mod:`padim_ooc.binned`).
"""

import numpy as np
from scipy import ndimage

from .binned import (DEFAULT_FPR_LIMIT, DEFAULT_MAX_EXACT_PIXELS, DEFAULT_N_BINS, DEFAULT_TAIL,
                     _BinnedAccumulator, bin_layout, check_finite_maps, check_pair, chunks)


def region_weights(masks, connectivity=8):
    """Weight 1 / (size of its region) for each defect pixel, 0 for a normal one.

    Parameters
    ----------
    masks : ndarray of shape (N, H, W), bool
        Ground truth; regions are the connected components of each image
        (never across images).
    connectivity : {8, 4}
        8: diagonal neighbours join (as in the MVTec AD evaluation code).

    Returns
    -------
    weights : ndarray of shape (N, H, W), float64
        Summed over a region, 1; summed over everything, ``n_regions``.
    n_regions : int
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8; got {connectivity}")
    structure = np.zeros((3, 3, 3), dtype=bool)  # no links across images
    structure[1] = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    labels, n_regions = ndimage.label(masks, structure=structure)
    sizes = np.bincount(labels.ravel()).astype(np.float64)
    sizes[0] = np.inf  # label 0 (normal) weighs 0
    return 1.0 / sizes[labels], int(n_regions)


def exact_pro_curve(masks, maps, *, connectivity=8):
    """The PRO curve with every distinct score as a threshold.

    All pixels are sorted by decreasing score once; after each group of
    equal scores the cumulative count of normal pixels (divided by their
    number) gives the FPR, the cumulative region weight (divided by the
    number of regions) the PRO. Memory: about 30 bytes a pixel.

    Parameters
    ----------
    masks, maps : ndarray of shape (N, H, W)
        Ground truth (nonzero = defect) and anomaly maps.

    Returns
    -------
    fpr, pro : ndarray of shape (n_distinct_scores + 1,)
        From (0, 0) (threshold above every score) to (1, 1), FPR non-decreasing.
    """
    masks, maps = check_pair(masks, maps)
    check_finite_maps(maps)
    weights, n_regions = region_weights(masks, connectivity)
    n_normal = masks.size - int(np.count_nonzero(weights))
    if n_regions == 0 or n_normal == 0:
        raise ValueError("the PRO curve needs defect regions and normal pixels; "
                         f"got {n_regions} regions and {n_normal} normal pixels")
    scores = maps.ravel()
    order = np.argsort(scores, kind="stable")[::-1]  # decreasing score
    ordered = scores[order]
    ends = np.flatnonzero(ordered[1:] != ordered[:-1])  # last pixel of each tie group
    ends = np.append(ends, ordered.size - 1)
    w = weights.ravel()[order]
    normal = np.cumsum(w == 0)[ends]
    region = np.cumsum(w)[ends]
    fpr = np.append(0.0, normal / normal[-1])
    pro = np.append(0.0, region / region[-1])  # region[-1] = n_regions up to rounding
    return fpr, pro


def partial_area(x, y, limit):
    """Trapezoid area under y(x) from x=0 to ``limit``, divided by ``limit``.

    ``x`` is non-decreasing from 0 and reaches at least ``limit``; the point at
    exactly ``limit`` is linearly interpolated.
    """
    i = np.searchsorted(x, limit, side="right")  # x[:i] <= limit
    if i < x.size:
        x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
        x = np.append(x[:i], limit)
        y = np.append(y[:i], y0 + (y1 - y0) * (limit - x0) / (x1 - x0))
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) * 0.5) / limit)


class ProAccumulator(_BinnedAccumulator):
    """Streaming PRO (per-region overlap) curve and its normalised area.

    Every connected ground-truth region (:func:`region_weights`) gives each
    of its pixels the weight 1 / region size, so that the weighted count of region pixels above a threshold,
    divided by the number of regions, is the mean per-region overlap PRO(t).
    One weighted histogram holds this for every threshold; memory is
    O(n_thresholds), whatever the number of images or regions.

    Parameters
    ----------
    lo, hi : float
        Score range; the thresholds are the n_thresholds + 1 edges of
        equal-width bins from lo to hi (on the ``core`` scale). Scores
        outside count in the end bins.
    core : (float, float), optional
        Linear core of the bin scale (:func:`padim_ooc.binned.log_tails`);
        None: equal width in score units. Take ``lo, hi, core`` from
        :func:`padim_ooc.binned.bin_layout`.
    n_thresholds : int, default=DEFAULT_N_BINS
        Number of bins between consecutive thresholds.
    connectivity : {8, 4}, default=8
        Pixel connectivity of a region: 8 (diagonal neighbours join, as in
        the MVTec AD evaluation code) or 4.

    Attributes
    ----------
    region_hist_ : ndarray of shape (n_thresholds,)
        Sum of 1 / region size over the region pixels in each bin.
    neg_hist_ : ndarray of shape (n_thresholds,)
        Count of normal pixels (mask 0) in each bin.
    n_regions_ : int
        Number of regions seen.
    """

    def __init__(self, lo, hi, *, n_thresholds=DEFAULT_N_BINS, core=None, connectivity=8):
        super().__init__(lo, hi, n_thresholds, core)
        if connectivity not in (4, 8):
            raise ValueError(f"connectivity must be 4 or 8; got {connectivity}")
        self.connectivity = connectivity
        self.region_hist_ = np.zeros(self.n_bins, dtype=np.float64)
        self.n_regions_ = 0

    def update(self, masks, maps):
        """Add a batch: masks and maps of shape (batch, H, W); returns self."""
        masks, maps = check_pair(masks, maps)
        weights, n_regions = region_weights(masks, self.connectivity)
        idx = self._bin(maps)
        in_region = weights > 0
        self.region_hist_ += np.bincount(idx[in_region], weights=weights[in_region],
                                         minlength=self.n_bins)
        self.neg_hist_ += np.bincount(idx[~in_region], minlength=self.n_bins)
        self.n_regions_ += n_regions
        return self

    def curve(self):
        """FPR and PRO at every threshold, by increasing FPR.

        Returns
        -------
        fpr, pro : ndarray of shape (n_thresholds + 1,)
            From (0, 0) (threshold above every bin) to (1, 1) (threshold lo).
        """
        if self.n_regions_ == 0 or self.neg_hist_.sum() == 0:
            raise ValueError("the PRO curve needs defect regions and normal "
                             f"pixels; seen {self.n_regions_} regions and "
                             f"{int(self.neg_hist_.sum())} normal pixels")
        # count above edge k = sum of bins >= k, listed from k = n_bins down to
        # 0; divided by the total so rounding cannot take PRO above 1.
        above = lambda h: np.append(0.0, np.cumsum(h[::-1]))
        fpr, pro = above(self.neg_hist_), above(self.region_hist_)
        return fpr / fpr[-1], pro / pro[-1]

    def score(self, fpr_limit=DEFAULT_FPR_LIMIT):
        """Area under PRO(FPR) from FPR 0 to ``fpr_limit``, divided by it.

        Returns nan when no defect region has been seen.
        """
        if not 0 < fpr_limit <= 1:
            raise ValueError(f"fpr_limit must be in (0, 1]; got {fpr_limit}")
        if self.n_regions_ == 0:
            return float("nan")
        return partial_area(*self.curve(), fpr_limit)


def pro_score(masks, maps, *, fpr_limit=DEFAULT_FPR_LIMIT,
              max_exact_pixels=DEFAULT_MAX_EXACT_PIXELS, n_thresholds=DEFAULT_N_BINS,
              tail=DEFAULT_TAIL, connectivity=8):
    """Normalised area under the PRO curve up to ``fpr_limit``.

    Up to ``max_exact_pixels`` pixels (default 2**22) the curve is exact
    (:func:`exact_pro_curve`: every distinct score a threshold). Above, its
    thresholds are the ``n_thresholds + 1`` edges of equal-width bins over
    the score scale of :func:`padim_ooc.binned.bin_layout` (linear between
    the ``tail`` and ``1 - tail`` quantiles, logarithmic beyond), in
    O(n_thresholds) memory plus one chunk of 2**22 pixels. Either way the curve is cut at FPR =
    ``fpr_limit`` (point interpolated), integrated with the trapezoid rule
    and divided by ``fpr_limit``. Images without defects contribute only
    normal pixels. The binned error, measured by
    ``scripts/measure_metric_error.py``, is in README.md ("How exact are the
    pixel metrics").

    Parameters
    ----------
    masks : array-like of shape (N, H, W)
        Ground truth; nonzero marks a defect pixel.
    maps : array-like of shape (N, H, W)
        Anomaly maps; higher means more anomalous.
    fpr_limit : float, default=0.3
        Upper end of the FPR integration range, in (0, 1].
    max_exact_pixels : int, default=DEFAULT_MAX_EXACT_PIXELS
        Largest N * H * W computed exactly.
    n_thresholds : int, default=DEFAULT_N_BINS
        Threshold steps of the binned computation.
    tail : float, default=DEFAULT_TAIL
        Share of pixels at each end outside the linear core of the bin scale
        (0: plain equal-width bins between the min and max).
    connectivity : {8, 4}, default=8
        Pixel connectivity of a ground-truth region.

    Returns
    -------
    float
        PRO score in [0, 1]; nan if the masks contain no defect region.
    """
    masks, maps = check_pair(masks, maps)
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1]; got {fpr_limit}")
    if masks.size <= max_exact_pixels:
        check_finite_maps(maps)
        if region_weights(masks, connectivity)[1] == 0:
            return float("nan")
        return partial_area(*exact_pro_curve(masks, maps, connectivity=connectivity), fpr_limit)
    lo, hi, core = bin_layout(maps, tail)
    acc = ProAccumulator(lo, hi, n_thresholds=n_thresholds, core=core, connectivity=connectivity)
    for part in chunks(masks.shape[0], masks[0].size):
        acc.update(masks[part], maps[part])
    return acc.score(fpr_limit)
