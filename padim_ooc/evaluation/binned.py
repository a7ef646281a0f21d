"""Fixed-memory (binned) pixel statistics: the score scale, the bins, the ROC histogram.

Past the size kept in memory for exact computation (see
:class:`padim_ooc.metrics.PixelMetrics`) the pixel metrics are histograms:
``n_bins`` equal-width bins over a score scale, thresholds at the bin edges,
scores in one bin counted as tied. Memory does not grow with the images.

The scale (:func:`bin_layout`, :func:`log_tails`). Equal-width bins between
the min and max break on one hot pixel: a normal pixel at 2e4 among scores of
10-20 puts every real score into the lowest 1/1000 of the bins (measured on
3.9e5 synthetic pixels: pixel AUROC off by up to 2.2e-4, PRO by 8.5e-4; at
2e5, 2.5e-2 and 6.3e-2). So the bins are
equal-width in a transformed score: linear inside a *core* range [q_lo, q_hi],
the ``tail`` and ``1 - tail`` quantiles of the scores (default 1e-2), and
logarithmic beyond it (continuous, slope 1 at the core edges, growing like
``w * log(distance / w)`` with w = q_hi - q_lo). Order is kept, so the metrics
are those of the same thresholds in score units; the bins span the
transformed min and max, so nothing is clipped. Any outlier, a pixel or a
large hot blob, can then widen the span to at most about
``w * (1 + ln(1 + |outlier| / w))`` per side (for w = 13: a factor of 8 for
2e4, 11 for 2e5, at most ~180 for any float32 scores), instead of 1,000 to
10,000 for min-max bins: the core keeps at least ~0.5 % of the bins. What remains: the resolution in the core is
w * (that factor) / n_bins, and pixels far outside the core share wider bins
(harmless while they are few or on one side of the defect/normal split).
The error this leaves is measured by ``scripts/measure_metric_error.py``; the figures are in
README.md ("How exact are the pixel metrics").
"""

import numpy as np

DEFAULT_MAX_EXACT_PIXELS = 2**22  # 4,194,304 pixels: ~2 s with sklearn
DEFAULT_N_BINS = 2**16  # histogram bins (ROC) / threshold steps (PRO)
DEFAULT_FPR_LIMIT = 0.3
DEFAULT_TAIL = 1e-2  # share of pixels at each end outside the linear core of the bin scale
_CHUNK_PIXELS = 2**22  # one-shot forms bin at most this many pixels at a time


def check_pair(masks, maps):
    """Masks as bool and maps as given, both checked to be (N, H, W) and non-empty."""
    masks, maps = np.asarray(masks), np.asarray(maps)
    if masks.ndim != 3 or masks.shape != maps.shape:
        raise ValueError("masks and maps must both have shape (N, H, W); "
                         f"got {masks.shape} and {maps.shape}")
    if masks.size == 0:
        raise ValueError(f"masks and maps hold no pixels (shape {masks.shape})")
    return masks != 0, maps


def check_finite_maps(maps) -> None:
    """Raise ValueError if ``maps`` holds NaN or infinite values."""
    if not np.isfinite(maps).all():
        raise ValueError("maps contain NaN or infinite values")


def log_tails(values, core):
    """The bin scale: identity inside ``core``, logarithmic outside.

    Parameters
    ----------
    values : array-like of any shape
        Scores.
    core : (float, float) or None
        (q_lo, q_hi) with q_lo < q_hi; None: the identity.

    Returns
    -------
    ndarray of the shape of ``values``, float64
        ``v`` inside the core, ``q_hi + w * log1p((v - q_hi) / w)`` above and
        ``q_lo - w * log1p((q_lo - v) / w)`` below (w = q_hi - q_lo):
        increasing, so thresholds keep their order.
    """
    v = np.asarray(values, dtype=np.float64)
    if core is None:
        return v
    lo, hi = core
    w = hi - lo
    return (np.clip(v, lo, hi) + w * np.log1p(np.maximum(v - hi, 0.0) / w)
            - w * np.log1p(np.maximum(lo - v, 0.0) / w))


def bin_layout(maps, tail=DEFAULT_TAIL):
    """Where the bins go for ``maps``: their score range and the linear core.

    Parameters
    ----------
    maps : array-like of any shape
        Scores (finite).
    tail : float, default=DEFAULT_TAIL
        Share of the values at each end outside the core, in [0, 0.5).
        0, or fewer than one value per tail, gives no core (plain
        equal-width bins between the min and max).

    Returns
    -------
    lo, hi : float
        Min and max (``lo < hi``: a width of 1 for constant data).
    core : (float, float) or None
        The ``tail`` and ``1 - tail`` quantiles; None when there is no core
        or the quantiles coincide.
    """
    values = np.asarray(maps).ravel()
    check_finite_maps(values)
    if not 0 <= tail < 0.5:
        raise ValueError(f"tail must be in [0, 0.5); got {tail}")
    lo, hi = float(values.min()), float(values.max())
    core = None
    if tail * values.size >= 1:
        q = tuple(float(x) for x in np.quantile(values, [tail, 1.0 - tail]))
        core = q if q[1] > q[0] else None
    return lo, (hi if hi > lo else lo + 1.0), core


def chunks(n_images, pixels_per_image):
    """Slices of at most ``_CHUNK_PIXELS`` pixels (at least one image) over the images."""
    step = max(1, _CHUNK_PIXELS // max(1, pixels_per_image))
    return (slice(i, i + step) for i in range(0, n_images, step))


class _BinnedAccumulator:
    """Shared state of the streaming metrics: a score scale, a range on it, bins."""

    def __init__(self, lo, hi, n_bins, core=None):
        lo, hi = float(lo), float(hi)
        if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
            raise ValueError(f"score range must be finite with lo < hi; got "
                             f"lo={lo}, hi={hi}")
        if int(n_bins) != n_bins or n_bins < 1:
            raise ValueError(f"n_bins must be a positive integer; got {n_bins}")
        if core is not None:
            core = (float(core[0]), float(core[1]))
            if not (np.isfinite(core).all() and core[0] < core[1]):
                raise ValueError(f"core must be finite with q_lo < q_hi; got {core}")
        self.core, self.n_bins = core, int(n_bins)
        self.lo, self.hi = (float(x) for x in log_tails([lo, hi], core))
        self.neg_hist_ = np.zeros(self.n_bins, dtype=np.int64)

    def _bin(self, values):
        values = np.asarray(values, dtype=np.float64)
        if not np.isfinite(values).all():
            raise ValueError("maps contain NaN or infinite values")
        scaled = (log_tails(values, self.core) - self.lo) * (self.n_bins / (self.hi - self.lo))
        return np.clip(scaled, 0, self.n_bins - 1).astype(np.intp)

    def _histograms(self):
        return [name for name, v in vars(self).items()
                if name.endswith("_") and isinstance(v, np.ndarray)]

    def cover(self, lo, hi):
        """Widen the score range until it holds [lo, hi]; returns self.

        Each step doubles the range (upwards first, then downwards) and adds
        the counts of neighbouring bin pairs: an exact re-binning onto bins
        twice as wide, so no count moves to a wrong threshold and memory stays
        n_bins. ``lo`` and ``hi`` are scores (the range is widened on the
        :func:`log_tails` scale). Call it before :meth:`update` with the
        batch's min and max.
        """
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError("maps contain NaN or infinite values")
        lo, hi = (float(x) for x in log_tails([lo, hi], self.core))
        if self.n_bins % 2:
            raise ValueError(f"cover needs an even number of bins; got {self.n_bins}")
        half = self.n_bins // 2
        while hi > self.hi or lo < self.lo:
            up = hi > self.hi
            for name in self._histograms():
                hist = getattr(self, name)
                pairs = hist.reshape(half, 2).sum(axis=1)
                new = np.zeros_like(hist)
                if up:
                    new[:half] = pairs
                else:
                    new[half:] = pairs
                setattr(self, name, new)
            width = self.hi - self.lo
            if up:
                self.hi = self.lo + 2 * width
            else:
                self.lo = self.hi - 2 * width
        return self

    def merge(self, other):
        """Add the counts of ``other`` (same class and settings) to ``self``."""
        settings = lambda acc: {k: v for k, v in vars(acc).items() if not k.endswith("_")}
        if type(other) is not type(self) or settings(other) != settings(self):
            raise ValueError("can only merge accumulators of the same class and "
                             f"settings; got {settings(other)} and {settings(self)}")
        for name, value in vars(other).items():
            if name.endswith("_"):
                setattr(self, name, getattr(self, name) + value)
        return self


class PixelRocAccumulator(_BinnedAccumulator):
    """Streaming pixel AUROC from histograms of defect and normal pixel scores.

    Parameters
    ----------
    lo, hi : float
        Score range of the bins (scores outside count in the end bins).
    core : (float, float), optional
        Linear core of the bin scale (:func:`log_tails`); None: bins of
        equal width in score units. Take ``lo, hi, core`` from
        :func:`bin_layout` over the maps (or a first part of them).
    n_bins : int, default=DEFAULT_N_BINS
        Number of equal-width bins. Memory is 2 * n_bins int64.

    Attributes
    ----------
    pos_hist_, neg_hist_ : ndarray of shape (n_bins,)
        Counts of defect and of normal pixels per bin.
    """

    def __init__(self, lo, hi, *, n_bins=DEFAULT_N_BINS, core=None):
        super().__init__(lo, hi, n_bins, core)
        self.pos_hist_ = np.zeros(self.n_bins, dtype=np.int64)

    def update(self, masks, maps):
        """Add a batch: masks and maps of shape (batch, H, W); returns self."""
        masks, maps = check_pair(masks, maps)
        idx = self._bin(maps)
        self.pos_hist_ += np.bincount(idx[masks], minlength=self.n_bins)
        self.neg_hist_ += np.bincount(idx[~masks], minlength=self.n_bins)
        return self

    def auroc(self):
        """Binned ROC AUC over all pixels seen so far (ties within a bin = half)."""
        pos, neg = self.pos_hist_.astype(np.float64), self.neg_hist_.astype(np.float64)
        n_pos, n_neg = pos.sum(), neg.sum()
        if n_pos == 0 or n_neg == 0:
            raise ValueError("pixel AUROC needs both defect and normal pixels; "
                             f"got {int(n_pos)} defect and {int(n_neg)} normal")
        neg_below = np.cumsum(neg) - neg
        return float(np.sum(pos * (neg_below + 0.5 * neg)) / (n_pos * n_neg))

    def curve(self):
        """The binned ROC curve at the bin edges, by increasing FPR.

        Returns
        -------
        fpr, tpr : ndarray of shape (n_bins + 1,)
            From (0, 0) (threshold above every bin) to (1, 1).
        """
        above = lambda h: np.append(0.0, np.cumsum(h[::-1].astype(np.float64)))
        fpr, tpr = above(self.neg_hist_), above(self.pos_hist_)
        if fpr[-1] == 0 or tpr[-1] == 0:
            raise ValueError("a ROC curve needs both defect and normal pixels")
        return fpr / fpr[-1], tpr / tpr[-1]
