"""Evaluate a fitted model on a labelled test split: metrics.json, scores.csv, report.html.

The test images are scored in a stream (:func:`padim_ooc.score.score_images`).
Memory stays bounded whatever the test set: one float per image (the
scores), the pixel metrics' fixed-size state (:class:`padim_ooc.metrics.PixelMetrics`),
and the anomaly maps of the few images the report shows.
"""
from __future__ import annotations

import csv
import heapq
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_curve

from ..data import display_path
from ..errors import PadimError
from .layouts import GOOD, Layout, find_layout, load_mask, load_view
from .metrics import DEFAULT_MAX_EXACT_PIXELS, DEFAULT_N_BINS, PixelMetrics, image_auroc
from ..progress import bar
from .report import Example, write_report
from ..options import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_SIGMA, ScoreOptions
from ..score import Model, score_images

log = logging.getLogger("padim_ooc")

# (key, heading, explanation, which images, how many)
REPORT_OUTPUTS = ("report.html", "metrics.json", "scores.csv", "colorbar.png", "*-[0-9][0-9].png")
"""What :meth:`Evaluation.write` writes (shell patterns): the report, its data, its images."""

SECTIONS = (
    ("top", "Highest scores", "The test images the model finds most anomalous.", "all", "high"),
    ("bottom", "Lowest scores", "The test images the model finds most normal.", "all", "low"),
    ("false-alarm", "Good images with the highest scores",
     "Normal images that look most unusual to the model: possible false alarms.", "good", "high"),
    ("miss", "Defective images with the lowest scores",
     "Defective images that look most normal to the model: possible misses.", "defect", "low"),
)


class _Keeper:
    """The ``k`` items with the largest keys seen so far (a heap; ties: first seen wins).

    ``offer(key, make)`` calls ``make()`` only when the item is kept.
    """

    def __init__(self, k: int):
        self.k, self.heap, self.count = k, [], 0

    def offer(self, key: float, make) -> None:
        self.count += 1
        rank = (key, -self.count)
        if len(self.heap) < self.k:
            heapq.heappush(self.heap, (*rank, make()))
        elif self.k and rank > self.heap[0][:2]:
            heapq.heapreplace(self.heap, (*rank, make()))

    def items(self) -> list:
        return [e[2] for e in sorted(self.heap, key=lambda e: e[:2], reverse=True)]


@dataclass
class Evaluation:
    """What :func:`evaluate` measured.

    Attributes
    ----------
    metrics : dict
        The content of metrics.json.
    scores : ndarray of shape (n_test,)
        Image scores in the layout's test order; NaN for images that could not be read.
    labels : ndarray of shape (n_test,)
        0 good, 1 defective.
    image_roc, pixel_roc : (fpr, tpr) arrays; ``pixel_roc`` None without masks.
    sections : list of (key, heading, explanation, list of Example)
    """

    layout: Layout
    metrics: dict
    scores: np.ndarray
    labels: np.ndarray
    image_roc: tuple
    pixel_roc: tuple | None
    sections: list = field(default_factory=list)

    def write(self, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write metrics.json, scores.csv and report.html (with its PNGs) into ``out_dir``.

        Outputs of an earlier run there (:data:`REPORT_OUTPUTS`) are refused unless
        ``overwrite``; then they are removed first, so that no stale example image
        stays next to the new report. Other files in ``out_dir`` are left alone.
        """
        out = Path(out_dir)
        check_outputs(out, overwrite=overwrite, remove=True)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PadimError(f"cannot create the output folder {out}: {err.strerror}") from None
        ok = np.isfinite(self.scores)
        write_report(out, self.metrics, scores=self.scores[ok], labels=self.labels[ok],
                     image_roc=self.image_roc, pixel_roc=self.pixel_roc, sections=self.sections)
        with open(out / "scores.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["path", "defect_type", "label", "score"])
            for item, s in zip(self.layout.test, self.scores):
                if np.isfinite(s):
                    w.writerow([display_path(item.path), item.defect_type, item.label, repr(float(s))])
        (out / "metrics.json").write_text(json.dumps(self.metrics, indent=2) + "\n", encoding="utf-8")
        return out / "report.html"


def check_outputs(out: str | os.PathLike, *, overwrite: bool, remove: bool = False) -> None:
    """Refuse (unless ``overwrite``) the outputs of an earlier evaluation in ``out``; with
    ``remove`` and ``overwrite``, remove them (see :func:`padim_ooc.owned.claim_outputs`)."""
    from ..owned import claim_outputs, existing_outputs

    if remove:
        claim_outputs(os.fspath(out), REPORT_OUTPUTS, overwrite=overwrite, what="a report")
    elif not overwrite and existing_outputs(os.fspath(out), REPORT_OUTPUTS):
        claim_outputs(os.fspath(out), REPORT_OUTPUTS, overwrite=False, what="a report")


def evaluate(model: Model, data: str | os.PathLike | Layout, *, batch_size: int = 32,
             sigma: float = DEFAULT_SIGMA, loader_workers: int | None = None, examples: int = 4,
             max_exact_pixels: int = DEFAULT_MAX_EXACT_PIXELS, n_bins: int = DEFAULT_N_BINS,
             on_error: str = "skip", progress: bool = False,
             max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> Evaluation:
    """Score the test split of ``data`` and compute its metrics.

    Parameters
    ----------
    model : Model
        A finalized model (:func:`padim_ooc.open_model`).
    data : path or Layout
        A class folder in the MVTec AD layout or the good/defect layout.
    examples : int
        Images kept for each section of the report (highest and lowest
        scores overall, highest-scored good and lowest-scored defective).
    max_exact_pixels, n_bins : int
        Pixel metrics: exact up to this many pixels, then binned
        (see :class:`padim_ooc.metrics.PixelMetrics`).
    on_error : {'skip', 'fail'}
        An image or mask that cannot be used is a counted skip (``n_skipped``),
        or stops the evaluation with its reason.
    max_image_bytes : int
        Largest image or mask file read (checked before reading).

    Returns
    -------
    Evaluation
        ``metrics`` holds ``image_auroc``, ``pixel_auroc`` and ``pro`` (None
        without masks), ``counts`` per defect type, ``per_type`` rows, the
        ``threshold``, the ``model`` summary and ``timings``.
    """
    t0 = time.perf_counter()
    options = ScoreOptions(batch_size=batch_size, loader_workers=loader_workers, on_error=on_error, sigma=sigma,
                           maps=True, max_image_bytes=max_image_bytes)
    layout = data if isinstance(data, Layout) else find_layout(data)
    model.store.final_arrays()  # a clear error before any image is read
    attrs = model.attrs
    resize, crop = int(attrs["resize"]), int(attrs["crop"])
    test = layout.test
    scores = np.full(len(test), np.nan)
    labels = np.array([it.label for it in test], dtype=np.int64)
    pixels = PixelMetrics(max_exact_pixels=max_exact_pixels, n_bins=n_bins) if layout.has_masks else None
    keepers = {key: _Keeper(examples) for key, *_ in SECTIONS}
    mask_bad: list[tuple[int, str]] = []

    with bar(f"evaluate {layout.name}", len(test), enabled=progress) as advance:
        def on_batch(indices, batch_scores, maps):
            masks, rows = None, list(range(len(indices)))
            if pixels is not None:  # a mask that cannot be used: its image is a counted skip (or the error)
                loaded = []
                for row, i in enumerate(indices):
                    try:
                        loaded.append(load_mask(test[i].mask, resize, crop, options.max_image_bytes))
                    except PadimError as err:
                        if on_error == "fail":
                            raise
                        mask_bad.append((i, str(err)))
                        loaded.append(None)
                rows = [row for row, m in enumerate(loaded) if m is not None]
                masks = np.zeros((len(indices), crop, crop), bool)
                for row in rows:
                    masks[row] = loaded[row]
                if rows:
                    pixels.update(masks[rows], maps[rows])
            for row in rows:
                i = indices[row]
                s = float(batch_scores[row])
                if not np.isfinite(s):  # never scored silently, never dropped from the metrics
                    raise PadimError(f"the model {model.store.path} gave a non-finite score ({s}) for "
                                     f"{display_path(test[i].path)}: its statistics are damaged; fit it again")
                scores[i] = s
                make = lambda i=i, row=row, s=s: Example(
                    test[i].path, test[i].defect_type, s, maps[row].copy(),
                    None if masks is None else masks[row].copy())
                for key, _, _, which, order in SECTIONS:
                    if which == "all" or (which == "good") == (labels[i] == 0):
                        keepers[key].offer(s if order == "high" else -s, make)
            advance(len(indices))

        bad = score_images(model, [it.path for it in test], options, on_batch) + mask_bad
    t_score = time.perf_counter() - t0
    for i, err in bad:
        log.warning("skipped %s: %s", display_path(test[i].path), err)

    t1 = time.perf_counter()
    ok = np.isfinite(scores)
    if int((~ok).sum()) != len(bad):  # every image without a score is a counted skip, nothing else
        raise PadimError(f"{int((~ok).sum()) - len(bad)} test images of {layout.root} got no score")
    if not ok[labels == 0].any() or not ok[labels == 1].any():
        raise PadimError(f"no good or no defective test image of {layout.root} could be read")
    auc = image_auroc(labels[ok], scores[ok])
    fpr, tpr, thr = roc_curve(labels[ok], scores[ok])
    best = int(np.argmax(tpr - fpr))
    threshold = float(thr[best]) if np.isfinite(thr[best]) else float(scores[ok].max())
    pix = pixels.result() if pixels is not None else None
    t_metrics = time.perf_counter() - t1

    metrics = {
        "class": layout.name,
        "data": display_path(layout.root),
        "layout": layout.kind,
        "has_masks": layout.has_masks,
        "model": _model_summary(model),
        "n_images": int(ok.sum()),
        "n_skipped": len(bad),
        "image_auroc": auc,
        "pixel_auroc": None if pix is None else pix["pixel_auroc"],
        "pro": None if pix is None else pix["pro"],
        "pixel_metrics": None if pix is None else {k: pix[k] for k in
                                                    ("method", "detail", "n_bins", "core", "n_pixels",
                                                     "n_defect_pixels", "n_regions")},
        "counts": layout.counts(),
        "per_type": _per_type(layout, scores, labels, threshold),
        "threshold": {"value": threshold, "rule": "Youden's J (tpr - fpr) on this test set",
                      "good_flagged": float(fpr[best]), "defects_found": float(tpr[best])},
        "decision": decision_metrics(model.store.calibration(), scores[ok], labels[ok]),
        "sigma": sigma,
        "timings": {"score_s": round(t_score, 3), "metrics_s": round(t_metrics, 3),
                    "images_per_s": round(float(ok.sum()) / max(t_score, 1e-9), 2)},
    }
    sections = []
    for key, heading, text, *_ in SECTIONS:
        chosen = keepers[key].items()
        for ex in chosen:
            ex.view = load_view(ex.path, resize, crop)
        sections.append((key, heading, text, chosen))
    metrics["timings"]["total_s"] = round(time.perf_counter() - t0, 3)
    return Evaluation(layout, metrics, scores, labels, (fpr, tpr),
                      None if pix is None else pix["roc"], sections)


P_VALUE_LEVELS = (0.01, 0.05, 0.1)


def decision_metrics(calibration, scores: np.ndarray, labels: np.ndarray) -> dict | None:
    """What the model's stored threshold does on a labelled test set (None for an uncalibrated model).

    Parameters
    ----------
    calibration : Calibration or None
    scores, labels : ndarray of shape (n,)
        Finite image scores; 0 good, 1 defective.

    Returns
    -------
    dict
        ``threshold``, ``rule``, ``alpha``, ``stale``, the counts ``tp``, ``fp``, ``tn``, ``fn``
        (anomalous = score > threshold), ``precision``, ``recall``, ``f1``, ``false_alarm_rate``
        (good images flagged; None where undefined), and ``p_value_calibration``: the share of good
        test images with p-value <= a, for a in 0.01, 0.05, 0.1 (at most a, up to sampling, when
        they are exchangeable with the calibration images).
    """
    if calibration is None:
        return None
    flagged = np.asarray(scores, np.float64) > calibration.threshold
    bad = np.asarray(labels) == 1
    tp, fp = int((flagged & bad).sum()), int((flagged & ~bad).sum())
    fn, tn = int((~flagged & bad).sum()), int((~flagged & ~bad).sum())
    ratio = lambda a, b: a / b if b else None  # noqa: E731
    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    f1 = ratio(2 * tp, 2 * tp + fp + fn)
    p = calibration.p_values(np.asarray(scores, np.float64)[~bad])
    return {"threshold": calibration.threshold, "rule": calibration.rule, "alpha": calibration.alpha,
            "n_calibration": calibration.n, "stale": calibration.stale,
            "tp": tp, "fp": fp, "tn": tn, "fn": fn, "precision": precision, "recall": recall, "f1": f1,
            "false_alarm_rate": ratio(fp, fp + tn),
            "p_value_calibration": {str(a): float(np.mean(p <= a)) if p.size else None for a in P_VALUE_LEVELS}}


def _per_type(layout: Layout, scores: np.ndarray, labels: np.ndarray, threshold: float) -> list[dict]:
    rows = []
    good = scores[(labels == 0) & np.isfinite(scores)]
    for name in layout.counts():
        sel = np.array([it.defect_type == name for it in layout.test]) & np.isfinite(scores)
        s = scores[sel]
        if s.size == 0:
            continue
        row = {"defect_type": name, "images": int(s.size), "score_median": float(np.median(s)),
               "score_min": float(s.min()), "score_max": float(s.max()),
               "image_auroc": None, "flagged": float(np.mean(s >= threshold))}
        if name != GOOD and good.size:
            row["image_auroc"] = image_auroc(np.r_[np.zeros(good.size), np.ones(s.size)], np.r_[good, s])
        rows.append(row)
    return rows


def _model_summary(model: Model) -> dict:
    a = model.attrs
    return {"path": display_path(Path(model.store.path)), "backbone": a["backbone"], "dims": a["dims"],
            "layers": a["layers"], "n_train_images": a["n_images"], "resize": a["resize"],
            "crop": a["crop"], "weights": a["weights"], "eps": a["eps"]}
