"""Decisions from scores: split-conformal thresholds, conformal p-values (DESIGN.md, Decisions).

Pure functions on image scores (numpy only; no I/O). An image is *anomalous* when its score is
strictly greater than the threshold (``score > threshold``), everywhere in this module: with the
conformal threshold this is what bounds the false-alarm rate by ``alpha`` (see
:func:`conformal_threshold`). See docs/calibration.md for what is and is not guaranteed.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from .errors import PadimError

__all__ = ["conformal_threshold", "p_values"]


def _exact(value: float) -> Fraction:
    """The shortest decimal that reads back as ``value``, as an exact fraction (0.1 is 1/10).

    Rank arithmetic on ``(n + 1) * (1 - alpha)`` in floating point can land on the wrong side of
    an integer; the decimal a user typed is what they meant.
    """
    return Fraction(repr(float(value)))


def _check_alpha(alpha) -> Fraction:
    """``alpha`` as an exact fraction, or a one-line PadimError unless it is a real in (0, 1)."""
    if isinstance(alpha, (bool, np.bool_)) or not isinstance(alpha, (int, float, np.integer,
                                                                      np.floating)):
        raise PadimError(f"alpha must be a number between 0 and 1 (exclusive), e.g. 0.05; "
                         f"got {alpha!r} ({type(alpha).__name__})")
    if not (math.isfinite(alpha) and 0 < alpha < 1):
        raise PadimError(f"alpha must be between 0 and 1 (exclusive), e.g. 0.05; got {alpha!r}")
    return _exact(alpha)


def _check_scores(scores, what: str = "calibration scores") -> np.ndarray:
    """Finite 1-D float64 scores, at least one, or a one-line PadimError."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise PadimError(f"{what} must be one score per image (1-D); got shape {scores.shape}")
    if scores.size == 0:
        raise PadimError(f"no {what}: calibration needs at least one image")
    bad = int(np.count_nonzero(~np.isfinite(scores)))
    if bad:
        raise PadimError(f"{bad} of the {scores.size} {what} are NaN or infinite; "
                         f"leave those images out of the calibration")
    return scores


def _conformal_rank(n: int, alpha: Fraction) -> int:
    """ceil((n + 1)(1 - alpha)), the 1-based rank of the threshold among n scores."""
    k = math.ceil((n + 1) * (1 - alpha))
    if k > n:
        needed = math.ceil(1 / alpha) - 1
        raise PadimError(f"alpha={float(alpha):g} needs at least {needed} calibration images; "
                         f"{n} allow alpha >= 1/(n+1) = {1 / (n + 1):.4g}: add images or "
                         f"raise alpha")
    return k


def conformal_threshold(scores, alpha) -> float:
    """Split-conformal threshold: the ceil((n + 1)(1 - alpha))-th smallest of n scores.

    If the n calibration scores and the score S of a new normal image are exchangeable (normal
    images of the same process, none of them seen by the statistics), then
    ``P(S > threshold) <= alpha``: the rank of S among the n + 1 scores is uniform, and S exceeds
    the k-th smallest calibration score only when at most n - k of them are >= S, which has
    probability <= (n + 1 - k) / (n + 1) <= alpha (ties only lower it). The bound is marginal,
    over the draw of the calibration set and the new image; for continuous scores the rate is
    exactly (n + 1 - k) / (n + 1), i.e. between alpha - 1/(n + 1) and alpha.

    ``alpha`` is read as the decimal it prints as (0.1 is exactly 1/10), so the rank has no
    rounding error.

    Parameters
    ----------
    scores : array-like of shape (n,)
        Image scores of normal calibration images; finite.
    alpha : float
        Allowed false-alarm rate, in (0, 1).

    Returns
    -------
    float
        The threshold; an image is anomalous when its score is ``> threshold``.

    Raises
    ------
    PadimError
        alpha outside (0, 1) or not a number; scores not finite; or too few scores for alpha
        (n + 1 < 1 / alpha): the message says the smallest alpha n images allow, 1 / (n + 1),
        and the number of images alpha needs, ceil(1 / alpha) - 1.
    """
    a = _check_alpha(alpha)
    scores = _check_scores(scores)
    k = _conformal_rank(scores.size, a)
    return float(np.partition(scores, k - 1)[k - 1])


def _p_values_sorted(ordered: np.ndarray, scores) -> np.ndarray:
    """p-values against already sorted calibration scores (see :func:`p_values`)."""
    scores = np.asarray(scores, dtype=np.float64)
    bad = int(np.count_nonzero(np.isnan(scores)))
    if bad:
        raise PadimError(f"{bad} of the {scores.size} scores are NaN; an image that could not "
                         f"be scored has no p-value")
    n = ordered.size
    at_least = n - np.searchsorted(ordered, scores, side="left")  # #{calibration >= s}
    return (1.0 + at_least) / (n + 1.0)


def p_values(calibration_scores, scores) -> np.ndarray:
    """Conformal p-values: (1 + #{calibration scores >= s}) / (n + 1) for each score s.

    For a new normal image exchangeable with the calibration images, ``P(p <= a) <= a`` for
    every a in [0, 1] (super-uniform; exactly floor(a (n + 1)) / (n + 1) for continuous scores).
    Ties count as ">=", which keeps that bound. A score above every calibration score gets the
    smallest p-value, 1 / (n + 1); ``score > conformal_threshold(calibration_scores, alpha)``
    implies ``p <= alpha``.

    Parameters
    ----------
    calibration_scores : array-like of shape (n,)
        Scores of the normal calibration images; finite.
    scores : array-like of shape (m,)
        Scores of the images to test; ``+inf`` and ``-inf`` are allowed, NaN is not. Any shape
        is accepted and kept.

    Returns
    -------
    ndarray of shape (m,), float64
        p-values in [1 / (n + 1), 1].
    """
    ordered = np.sort(_check_scores(calibration_scores))
    return _p_values_sorted(ordered, scores)
