"""Decisions from scores: split-conformal thresholds, conformal p-values (DESIGN.md, Decisions).

Pure functions on image scores (numpy; sklearn's curves for the labelled rules; no I/O). An
image is *anomalous* when its score is strictly greater than the threshold (``score >
threshold``), everywhere in this module: with the conformal threshold this is what bounds the
false-alarm rate by ``alpha`` (see :func:`conformal_threshold`). docs/calibration.md says what
is and is not guaranteed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from fractions import Fraction
from functools import cached_property

import numpy as np
from sklearn.metrics import precision_recall_curve, roc_curve

from .errors import PadimError

__all__ = ["Calibration", "calibrate_labelled", "calibrate_normal", "conformal_threshold",
           "holdout_selected", "p_values"]

ANOMALOUS, NORMAL = "anomalous", "normal"
CONFORMAL = "conformal"


def _exact(value: float) -> Fraction:
    """The shortest decimal that reads back as ``value``, as an exact fraction (0.1 is 1/10).

    Rank arithmetic on ``(n + 1) * (1 - alpha)`` in floating point can land on the wrong side of
    an integer; the decimal a user typed is what they meant.
    """
    return Fraction(repr(float(value)))


def _is_real(value) -> bool:
    """A Python or numpy int or float, not a bool (True is no alpha)."""
    return isinstance(value, (int, float, np.integer, np.floating)) \
        and not isinstance(value, (bool, np.bool_))


def _check_alpha(alpha) -> Fraction:
    """``alpha`` as an exact fraction, or a one-line PadimError unless it is a real in (0, 1)."""
    if not _is_real(alpha):
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


LABELLED_RULES = "'f1', 'youden' or 'recall:R' with R in (0, 1], e.g. recall:1.0"


def _parse_rule(rule, prefix: str = "") -> tuple[str, Fraction | None]:
    """A labelled rule's canonical name and, for ``recall:R``, R as an exact fraction."""
    text = rule.strip().lower() if isinstance(rule, str) else None
    if text in ("f1", "youden"):
        return text, None
    if text is not None and text.startswith("recall:"):
        try:
            floor = float(text[len("recall:"):])
        except ValueError:
            floor = math.nan
        if math.isfinite(floor) and 0 < floor <= 1:
            return f"recall:{floor!r}", _exact(floor)
        raise PadimError(f"{prefix}the recall floor of rule {rule!r} must be a number in (0, 1], "
                         f"e.g. recall:1.0 (miss no defect) or recall:0.95")
    raise PadimError(f"{prefix}unknown calibration rule {rule!r}; expected {LABELLED_RULES}")


def _check_new_scores(scores) -> np.ndarray:
    """Scores of images to decide on, as float64 (any shape); NaN is a one-line PadimError."""
    scores = np.asarray(scores, dtype=np.float64)
    bad = int(np.count_nonzero(np.isnan(scores)))
    if bad:
        raise PadimError(f"{bad} of the {scores.size} scores are NaN; an image that could not "
                         f"be scored has no decision")
    return scores


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _bad(name: str, expected: str, value, got: str | None = None) -> PadimError:
    """The one-line error for a calibration field: what it must be, what it is, what to do."""
    if got is None:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        got = f"{shown} ({type(value).__name__})"
    return PadimError(f"bad calibration: {name} must be {expected}; got {got}; "
                      f"calibrate the model again")


def _number(name: str, value, *, optional: bool = False) -> float | None:
    """``value`` as a finite float (Python or numpy real, not a bool), or None if optional."""
    if value is None and optional:
        return None
    if not _is_real(value):
        raise _bad(name, "a number" + (" or null" if optional else ""), value)
    if not math.isfinite(value):
        raise _bad(name, "finite", value)
    return float(value)


@dataclass(frozen=True)
class Calibration:
    """A decision rule learned from calibration images: threshold, p-values, labels.

    An image is anomalous when its score is strictly greater than ``threshold``; a pixel when
    its map value is strictly greater than ``pixel_threshold`` (the image threshold where that
    is None, so a normal-looking image has an empty mask). The strict ``>`` is what the
    conformal guarantee is about: with ``threshold = conformal_threshold(scores, alpha)``,
    ``P(score of a new normal image > threshold) <= alpha``; ``>=`` would flag a new normal
    image tied with the threshold, which has no such bound. The labelled rules' thresholds
    are chosen for the same ``>`` (see :func:`calibrate_labelled`).

    Attributes
    ----------
    rule : str
        ``"conformal"``, ``"f1"``, ``"youden"`` or ``"recall:R"``.
    alpha : float or None
        The false-alarm rate asked of the conformal rule; None for the labelled rules.
    n : int
        Number of calibration images (normal and defective ones for the labelled rules).
    threshold : float
        Image threshold.
    pixel_threshold : float or None
        Pixel threshold of the anomaly maps; None: the image threshold.
    scores : tuple of float, shape (n_normal,)
        The sorted scores of the normal calibration images (all n for the conformal rule);
        p-values are computed against them.
    created : str
        When the calibration was made, ISO 8601.
    stale : bool, default=False
        True once the statistics changed after the calibration (its scores then come from
        another model).
    """

    rule: str
    alpha: float | None
    n: int
    threshold: float
    pixel_threshold: float | None
    scores: tuple = field(repr=False)
    created: str
    stale: bool = False

    def __post_init__(self):
        put = object.__setattr__
        if not isinstance(self.rule, str):
            raise _bad("rule", "a string", self.rule)
        rule = self.rule
        if rule != CONFORMAL:
            rule = _parse_rule(rule, "bad calibration: ")[0]
        put(self, "rule", rule)
        if rule == CONFORMAL:
            if self.alpha is None:
                raise _bad("alpha", "a number in (0, 1) for the conformal rule", self.alpha)
            try:
                _check_alpha(self.alpha)
            except PadimError:
                raise _bad("alpha", "a number in (0, 1)", self.alpha) from None
            put(self, "alpha", float(self.alpha))
        elif self.alpha is not None:
            raise _bad("alpha", f"null for the {rule} rule", self.alpha)
        if isinstance(self.n, (bool, np.bool_)) or not isinstance(self.n, (int, np.integer)) \
                or self.n < 1:
            raise _bad("n", "a positive integer", self.n)
        put(self, "n", int(self.n))
        put(self, "threshold", _number("threshold", self.threshold))
        put(self, "pixel_threshold", _number("pixel_threshold", self.pixel_threshold,
                                             optional=True))
        if isinstance(self.scores, (str, bytes, dict)) or not hasattr(self.scores, "__len__"):
            raise _bad("scores", "a list of numbers", self.scores)
        scores = tuple(_number("scores", s) for s in self.scores)
        if any(b < a for a, b in zip(scores, scores[1:])):
            raise _bad("scores", "sorted in increasing order", None, "unsorted scores")
        low, high = (self.n, self.n) if rule == CONFORMAL else (1, self.n - 1)
        if not low <= len(scores) <= high:
            raise _bad("scores", f"{low} to {high} numbers for n={self.n} and rule {rule}",
                       None, f"{len(scores)}")
        put(self, "scores", scores)
        if not isinstance(self.created, str):
            raise _bad("created", "an ISO 8601 time", self.created)
        try:
            datetime.fromisoformat(self.created)
        except ValueError:
            raise _bad("created", "an ISO 8601 time", self.created) from None
        if not isinstance(self.stale, (bool, np.bool_)):
            raise _bad("stale", "true or false", self.stale)
        put(self, "stale", bool(self.stale))

    def to_attrs(self) -> dict:
        """The calibration as a JSON-serialisable dict (:meth:`from_attrs` reads it back)."""
        return {f.name: list(self.scores) if f.name == "scores" else getattr(self, f.name)
                for f in fields(self)}

    @classmethod
    def from_attrs(cls, attrs) -> "Calibration":
        """The calibration in ``attrs`` (as :meth:`to_attrs` wrote it), with every field checked.

        Raises
        ------
        PadimError
            One line naming the first missing, unknown or mistyped field.
        """
        if not isinstance(attrs, dict):
            raise _bad("the calibration record", "a mapping", attrs)
        names = [f.name for f in fields(cls)]
        missing = [k for k in names if k not in attrs and k != "stale"]
        unknown = sorted(map(str, set(attrs) - set(names)))
        if missing or unknown:
            raise PadimError("bad calibration: " + "; ".join(
                part for part in (missing and f"missing {', '.join(missing)}",
                                  unknown and f"unknown {', '.join(unknown)}") if part)
                + "; calibrate the model again")
        if not isinstance(attrs["scores"], (list, tuple)):
            raise _bad("scores", "a list of numbers", attrs["scores"])
        return cls(**attrs)

    @cached_property
    def _ordered(self) -> np.ndarray:
        return np.asarray(self.scores, dtype=np.float64)

    def p_values(self, scores) -> np.ndarray:
        """Conformal p-values of ``scores`` (any shape) against the normal calibration scores;
        see :func:`p_values`."""
        return _p_values_sorted(self._ordered, scores)

    def labels(self, scores) -> np.ndarray:
        """``"anomalous"`` where score > threshold, else ``"normal"``; same shape as ``scores``.

        NaN scores are a PadimError (an image that could not be scored is neither).
        """
        return np.where(_check_new_scores(scores) > self.threshold, ANOMALOUS, NORMAL)

    def masks(self, maps) -> np.ndarray:
        """Boolean defect masks: map > pixel threshold (the image threshold where it is None)."""
        cut = self.threshold if self.pixel_threshold is None else self.pixel_threshold
        return np.asarray(maps) > cut


def calibrate_normal(scores, alpha) -> Calibration:
    """Split-conformal calibration on normal images the statistics never saw.

    Parameters
    ----------
    scores : array-like of shape (n,)
        Image scores of the calibration images; finite.
    alpha : float
        Allowed false-alarm rate on new normal images, in (0, 1).

    Returns
    -------
    Calibration
        Rule ``"conformal"``, threshold :func:`conformal_threshold` of the scores, the sorted
        scores for p-values, no pixel threshold (masks use the image threshold).
    """
    threshold = conformal_threshold(scores, alpha)
    ordered = np.sort(_check_scores(scores))
    return Calibration(rule=CONFORMAL, alpha=float(alpha), n=int(ordered.size),
                       threshold=threshold, pixel_threshold=None,
                       scores=tuple(ordered.tolist()), created=_now())


def _check_labelled(labels, scores, what: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """Labels as bool (True: defective) and finite float64 scores of the same length."""
    labels, scores = np.ravel(labels), np.ravel(np.asarray(scores, dtype=np.float64))
    if labels.shape != scores.shape:
        raise PadimError(f"{what} labels and scores must be as many; got {labels.size} labels "
                         f"and {scores.size} scores")
    if labels.dtype != bool:
        if not np.isin(labels, (0, 1)).all():
            raise PadimError(f"{what} labels must be 0 (normal) or 1 (defective); got values "
                             f"{np.unique(labels)[:5].tolist()}")
        labels = labels.astype(bool)
    bad = int(np.count_nonzero(~np.isfinite(scores)))
    if bad:
        raise PadimError(f"{bad} of the {scores.size} {what} scores are NaN or infinite; "
                         f"leave those out of the calibration")
    if labels.all() or not labels.any():
        raise PadimError(f"labelled calibration needs both normal and defective {what}s; "
                         f"all {labels.size} are " + ("defective" if labels.any() else "normal"))
    return labels, scores


def _below(scores: np.ndarray, cut: float) -> float:
    """The threshold for ``>`` that flags exactly the scores ``>= cut``: the largest score
    below ``cut`` (the largest score left normal), or the float just below ``cut`` if none."""
    lower = scores[scores < cut]
    return float(lower.max()) if lower.size else float(np.nextafter(cut, -np.inf))


def _f1_cut(labels: np.ndarray, scores: np.ndarray) -> float:
    """The score at which ``>=`` gives the largest F1 (precision_recall_curve's thresholds)."""
    precision, recall, cuts = precision_recall_curve(labels, scores)
    precision, recall = precision[:-1], recall[:-1]  # the last point (recall 0) has no cut
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(total), where=total > 0)
    return float(cuts[f1.size - 1 - np.argmax(f1[::-1])])  # cuts increase: ties to the highest


def _youden_cut(labels: np.ndarray, scores: np.ndarray) -> float:
    """The finite score at which ``>=`` gives the largest tpr - fpr (roc_curve's thresholds)."""
    fpr, tpr, cuts = roc_curve(labels, scores, drop_intermediate=False)
    youden = np.where(np.isfinite(cuts), tpr - fpr, -np.inf)  # roc_curve starts at +inf
    return float(cuts[np.argmax(youden)])  # cuts decrease: ties to the highest


def _recall_cut(labels: np.ndarray, scores: np.ndarray, floor: Fraction) -> float:
    """The largest score at which ``>=`` keeps recall >= floor: the k-th largest defect score,
    k = ceil(floor * n_defective)."""
    defects = np.sort(scores[labels])[::-1]
    k = math.ceil(floor * defects.size)
    return float(defects[k - 1])


def calibrate_labelled(labels, scores, rule, pixel=None) -> Calibration:
    """Calibration on labelled images (normal and defective) by a rule of choice.

    Each rule picks a cut c among the scores, for the comparison ``score >= c`` that sklearn's
    curves use; the stored threshold is then the largest calibration score below c (the float
    just below c when c is the smallest score), so that ``score > threshold``, the comparison of
    :meth:`Calibration.labels`, flags exactly the same calibration images: the F1, tpr - fpr or
    recall claimed below is what ``labels`` gives on them.

    - ``"f1"``: the cut with the largest F1 on ``precision_recall_curve`` (anomalib's
      F1-adaptive threshold).
    - ``"youden"``: the finite cut with the largest tpr - fpr on ``roc_curve`` (Youden's J).
    - ``"recall:R"``, R in (0, 1]: the largest threshold (among the calibration scores) that
      flags at least a share R of the defective images; ``recall:1.0`` misses none of them.

    Ties between cuts of equal F1 or J go to the higher cut (fewer images flagged).

    Parameters
    ----------
    labels : array-like of shape (n,)
        0 or False for a normal image, 1 or True for a defective one; both must occur.
    scores : array-like of shape (n,)
        Image scores; finite.
    rule : str
        ``"f1"``, ``"youden"`` or ``"recall:R"``.
    pixel : tuple (masks, maps) or None
        Defect masks (bool or 0/1) and anomaly maps of the same size, any shape (flattened);
        when given, the pixel threshold is the one with the largest pixel F1 (as ``"f1"``).

    Returns
    -------
    Calibration
        ``alpha`` None, ``n`` the number of images, ``scores`` the sorted scores of the normal
        ones (for p-values).
    """
    name, floor = _parse_rule(rule)
    labels, scores = _check_labelled(labels, scores)
    if name == "f1":
        cut = _f1_cut(labels, scores)
    elif name == "youden":
        cut = _youden_cut(labels, scores)
    else:
        cut = _recall_cut(labels, scores, floor)
    pixel_threshold = None
    if pixel is not None:
        if not isinstance(pixel, (tuple, list)) or len(pixel) != 2:
            raise PadimError("pixel must be a pair (masks, maps) of defect masks and anomaly maps")
        masks, maps = _check_labelled(*pixel, what="pixel")
        pixel_threshold = _below(maps, _f1_cut(masks, maps))
    return Calibration(rule=name, alpha=None, n=int(scores.size), threshold=_below(scores, cut),
                       pixel_threshold=pixel_threshold,
                       scores=tuple(np.sort(scores[~labels]).tolist()), created=_now())


def holdout_selected(digest: bytes, fraction: float) -> bool:
    """Whether the image with this content digest is held out for calibration.

    The first 8 bytes of the digest (the 16-byte BLAKE2b of :mod:`padim_ooc.data`'s ledger),
    read as a big-endian integer u, select the image when ``u < fraction * 2**64``. The choice
    depends on the image's bytes only, so a resumed, incremental or sharded fit makes the same
    one, in any order; a larger fraction keeps every image a smaller one selected. Over
    distinct images the selected share is ``fraction`` (binomially).

    Parameters
    ----------
    digest : bytes
        The image's content digest, at least 8 bytes.
    fraction : float
        Share of images to hold out, in [0, 1) (0: none).

    Returns
    -------
    bool
    """
    if not isinstance(digest, (bytes, bytearray)) or len(digest) < 8:
        got = f"{len(digest)} bytes" if isinstance(digest, (bytes, bytearray)) \
            else type(digest).__name__
        raise PadimError(f"a hold-out choice needs the image's content digest (bytes, at least "
                         f"8); got {got}")
    if not (_is_real(fraction) and math.isfinite(fraction) and 0 <= fraction < 1):
        raise PadimError(f"the hold-out fraction must be a number in [0, 1), e.g. 0.1; got "
                         f"{fraction!r}")
    return int.from_bytes(bytes(digest[:8]), "big") < float(fraction) * 2.0 ** 64
