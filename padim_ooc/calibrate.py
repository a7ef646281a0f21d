"""Calibrating a model: score calibration images with it, store the decision rule beside the statistics.

The maths is :mod:`padim_ooc.calibration`; this module reads images, scores them through the score
pipeline (:func:`padim_ooc.api.run_score`: in this process or on a Dask cluster) and writes the
result into the model's root attribute ``calibration`` (never into the statistics).

Three sources of calibration images:

- **the fit's hold-out** (``fit --holdout F``): images chosen by content hash
  (:func:`padim_ooc.calibration.holdout_selected`) were not folded in; their paths and digests are
  kept in the root attribute ``holdout`` (``{"fraction", "images": [[path, digest hex], ...],
  "in_use"}``), so that a later fit, merge or finalize can calibrate again on them
  (:func:`calibrate_after_fit`, ``padim-ooc calibrate MODEL``). A held-out file that is gone or whose
  bytes changed is left out (counted); an image the statistics hold by now (a later fit without
  ``--holdout``, a merge) is left out too. Where no held-out image is left, the calibration is only
  marked stale.
- **normal image files** (``calibrate MODEL DATA...``): images the statistics hold (same content)
  are left out with a warning: their scores would be optimistic.
- **a labelled class folder** (``calibrate MODEL CLASS_DIR --labelled``), by a rule.

Every state switch of the statistics (a checkpoint, a merge, a finalization with another eps) marks a
stored calibration stale in the same attribute write (:meth:`padim_ooc.store.ModelStore.commit_state`).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .calibration import CONFORMAL, Calibration, calibrate_labelled, calibrate_normal
from .data import digest, display_path, read_bytes
from .errors import PadimError
from .options import DEFAULT_FPR, Cluster, FitOptions, ScoreOptions
from .outputs import ArraySink
from .store import ModelStore

log = logging.getLogger("padim_ooc")


def _abspath(path: str | os.PathLike) -> str:
    path = os.fsdecode(path)
    return path if "://" in path else os.path.abspath(path)


def score_paths(store: ModelStore, paths: Sequence[Path], options: ScoreOptions, *, weights: str | None = None,
                extractor=None) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Image scores of ``paths`` (NaN where unreadable, in input order) and the skipped images."""
    from .api import run_score

    sink = ArraySink(len(paths), store.attrs["crop"])
    bad = run_score(store, paths, options, sink, weights=weights, extractor=extractor)
    return sink.scores, bad


def check_digests(paths: Sequence[str], digests: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """The paths whose bytes still have their recorded digest (hex), and (path, reason) for the others."""
    good, gone = [], []
    for path, key in zip(paths, digests):
        data, reason = read_bytes(Path(path))
        if reason:
            gone.append((path, reason))
        elif digest(data).hex() != key:
            gone.append((path, "changed since it was held out (other bytes)"))
        else:
            good.append(Path(path))
    return good, gone


def not_in_model(store: ModelStore, paths: Sequence[Path]) -> tuple[list[Path], int]:
    """The paths whose content the statistics do not hold, and how many were left out."""
    known = store.ledger()
    kept = []
    for path in paths:
        data, _ = read_bytes(Path(path))
        if data is None or digest(data) not in known:
            kept.append(path)  # unreadable ones are reported by the scoring
    return kept, len(paths) - len(kept)


def _normal(store: ModelStore, paths: Sequence[Path], alpha: float, options: ScoreOptions, *,
            weights=None, extractor=None) -> tuple[Calibration, int]:
    """Conformal calibration of ``store`` on the normal images ``paths``; (calibration, skipped)."""
    scores, bad = score_paths(store, paths, options, weights=weights, extractor=extractor)
    for i, err in bad:
        log.warning("skipped %s: %s", display_path(paths[i]), err)
    ok = np.isfinite(scores)
    if not ok.any():
        raise PadimError(f"no calibration image could be read ({len(paths)} given)")
    return calibrate_normal(scores[ok], alpha), len(bad)


def _summary(cal: Calibration, **counts) -> dict:
    return {"rule": cal.rule, "alpha": cal.alpha, "n": cal.n, "threshold": cal.threshold,
            "pixel_threshold": cal.pixel_threshold, "stale": cal.stale, **counts}


def calibrate_files(store: ModelStore, paths: Sequence[Path], alpha: float, options: ScoreOptions, *,
                    weights: str | None = None) -> dict:
    """``padim-ooc calibrate MODEL DATA...``: conformal calibration on normal image files; stored.

    Images the statistics hold are left out (``in_model``); unreadable ones are skipped.
    """
    store.final_arrays()  # a clear error before any image is read
    kept, in_model = not_in_model(store, paths)
    if in_model:
        log.warning("left out %d of the %d calibration images: the model was fitted on them (same content), "
                    "their scores would be too low", in_model, len(paths))
    if not kept:
        raise PadimError(f"all {len(paths)} calibration images are in the model's statistics: calibrate on "
                         "normal images the fit did not see (or fit with --holdout)")
    cal, skipped = _normal(store, kept, alpha, options, weights=weights)
    holdout = store.attrs.get("holdout")
    store.write_calibration(cal, **({"holdout": {**holdout, "in_use": False}} if holdout else {}))
    return _summary(cal, skipped=skipped, in_model=in_model)


def calibrate_holdout(store: ModelStore, alpha: float | None, options: ScoreOptions, *,
                      weights: str | None = None, extractor=None, record: dict | None = None) -> dict:
    """Conformal calibration on the model's held-out images (root attribute ``holdout``); stored.

    ``alpha`` None: the stored conformal calibration's alpha, else :data:`DEFAULT_FPR`. Held-out files
    that are gone or changed, and images the statistics hold by now, are left out (``missing``,
    ``in_model``); where none is left the stored calibration is marked stale instead and
    ``status`` says so.
    """
    record = record if record is not None else store.attrs.get("holdout")
    if not record or not record.get("images"):
        raise PadimError(f"the model {store.path} has no held-out images: give calibration images "
                         "(`padim-ooc calibrate MODEL DATA...`) or fit with --holdout")
    store.final_arrays()
    old = store.calibration()
    if alpha is None:
        alpha = old.alpha if old is not None and old.rule == CONFORMAL else DEFAULT_FPR
    known = store.ledger()
    images = [(p, k) for p, k in record["images"] if bytes.fromhex(k) not in known]
    in_model = len(record["images"]) - len(images)
    paths, gone = check_digests([p for p, _ in images], [k for _, k in images])
    for path, reason in gone:
        log.warning("held-out image left out of the calibration: %s: %s", display_path(path), reason)
    if not paths:
        stale = {"calibration": {**old.to_attrs(), "stale": True}} if old is not None else {}
        store._write_attrs(holdout=record, **stale)
        log.warning("no held-out image of %s is left (%d gone or changed, %d in the statistics): the "
                    "calibration is %s; calibrate on new normal images: padim-ooc calibrate %s DATA...",
                    store.path, len(gone), in_model, "stale" if old is not None else "missing", store.path)
        return {"status": "stale" if old is not None else "none", "missing": len(gone), "in_model": in_model}
    cal, skipped = _normal(store, paths, alpha, options, weights=weights, extractor=extractor)
    store.write_calibration(cal, holdout={**record, "in_use": True})
    return {"status": "calibrated"} | _summary(cal, skipped=skipped, missing=len(gone), in_model=in_model)


def calibrate_after_fit(store: ModelStore, held_out: Sequence[tuple[str, bytes]], options: FitOptions, *,
                        client=None, weights: str | None = None, extractor=None) -> dict:
    """After a fit: add the images it held out to the model's hold-out record, and calibrate on
    the record (:func:`calibrate_holdout`) when the model is finalized and its calibration is
    missing, stale, or made before new images were held out.

    A calibration made otherwise (``calibrate MODEL DATA``, ``--labelled``: the record's ``in_use``
    false) is left as it is (stale if the statistics changed). Returns what was done.
    """
    record = dict(store.attrs.get("holdout") or {"fraction": options.holdout, "images": [], "in_use": True})
    images = {k: p for p, k in record["images"]}
    before = set(images)
    for path, key in held_out:
        images[key.hex()] = _abspath(path)
    record["images"] = sorted([p, k] for k, p in images.items())
    if options.holdout:  # asked for this fit: the hold-out is what calibrates the model
        record["fraction"], record["in_use"] = options.holdout, True
    grew = set(images) != before
    old = store.calibration()
    current = old is not None and not old.stale and not grew
    if not store.attrs["finalized"] or not record.get("in_use", True) or current:
        if record != store.attrs.get("holdout"):
            store._write_attrs(holdout=record)
        status = "current" if current else ("stale" if old is not None and old.stale else "none")
        why = "" if store.attrs["finalized"] or current else " (not finalized: run finalize, then calibrate)"
        return {"status": status + why, "held_out_images": len(images)}
    score_options = ScoreOptions(batch_size=options.batch_size, device=options.device,
                                 loader_workers=options.loader_workers, progress=options.progress,
                                 cluster=Cluster(client=client) if client is not None else Cluster())
    try:
        return calibrate_holdout(store, options.fpr, score_options, weights=weights, extractor=extractor,
                                 record=record)
    except PadimError as err:
        store._write_attrs(holdout=record)  # the choice is kept: `padim-ooc calibrate MODEL` uses it
        raise PadimError(f"the model {store.path} is fitted but not calibrated: {err} "
                         f"(then `padim-ooc calibrate {store.path} --fpr ALPHA`)") from None


class _LabelledSink:
    """Scores of a labelled test split in input order, and (with masks) every map and mask pixel."""

    def __init__(self, test, resize: int, crop: int, masks: bool):
        self.test, self.resize, self.crop = test, resize, crop
        self.scores = np.full(len(test), np.nan)
        self.maps: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        self.with_masks = masks

    def add(self, indices, scores, maps) -> None:
        from .evaluation.layouts import load_mask

        self.scores[np.asarray(indices, dtype=np.int64)] = scores
        if self.with_masks:
            for row, i in enumerate(indices):
                self.maps.append(np.asarray(maps[row], np.float32).ravel())
                self.masks.append(load_mask(self.test[i].mask, self.resize, self.crop).ravel())


def calibrate_layout(store: ModelStore, layout, rule: str, options: ScoreOptions, *,
                     weights: str | None = None) -> dict:
    """``padim-ooc calibrate MODEL CLASS_DIR --labelled --rule R``: the test split's images (good and
    defective) calibrate the image threshold by ``rule``; with ground-truth masks also the pixel
    threshold by pixel F1 (maps and masks of the whole split are held in memory: 5 bytes a pixel)."""
    from .api import run_score
    from .calibration import _parse_rule

    _parse_rule(rule)  # a bad rule before any image is read
    store.final_arrays()
    test = layout.test
    options = dataclasses.replace(options, maps=layout.has_masks)
    sink = _LabelledSink(test, int(store.attrs["resize"]), int(store.attrs["crop"]), layout.has_masks)
    bad = run_score(store, [it.path for it in test], options, sink, weights=weights)
    for i, err in bad:
        log.warning("skipped %s: %s", display_path(test[i].path), err)
    ok = np.isfinite(sink.scores)
    labels = np.array([it.label for it in test], dtype=bool)
    pixel = None
    if layout.has_masks and sink.maps:
        pixel = (np.concatenate(sink.masks), np.concatenate(sink.maps))
    cal = calibrate_labelled(labels[ok], sink.scores[ok], rule, pixel=pixel)
    holdout = store.attrs.get("holdout")
    store.write_calibration(cal, **({"holdout": {**holdout, "in_use": False}} if holdout else {}))
    return _summary(cal, skipped=len(bad), n_normal=int((~labels[ok]).sum()), n_defective=int(labels[ok].sum()))


def describe(store: ModelStore) -> dict | None:
    """The stored calibration for ``info``: every field but the scores (their count, range), with
    the hold-out record as counts; None for a model never calibrated."""
    record = store.attrs.get("calibration")
    holdout = store.attrs.get("holdout")
    if record is None and not holdout:
        return None
    out = {}
    if record is not None:
        scores = record.get("scores") or []
        out = {k: v for k, v in record.items() if k != "scores"}
        out["scores"] = {"count": len(scores), "min": min(scores, default=None), "max": max(scores, default=None)}
        out["status"] = ("stale: the statistics changed after the calibration; re-calibrate (padim-ooc "
                         "calibrate)" if record.get("stale") else "current")
    if holdout:
        out["holdout"] = {"fraction": holdout.get("fraction"), "images": len(holdout.get("images", [])),
                          "in_use": holdout.get("in_use", True)}
    return out


__all__ = ["calibrate_files", "calibrate_holdout", "calibrate_after_fit", "calibrate_layout", "describe",
           "score_paths"]
