"""What ``score`` hands an inspection line from a calibrated model: p-values, labels, PNG masks, overlays.

:class:`Decisions` is given every scored batch by :class:`padim_ooc.outputs.ScoreWriter` (in input
order or not: on a cluster the shards come back as they finish) and writes, as they arrive:

- ``OUT/masks/<row>_<name>.png`` (``masks=True``): for each *anomalous* image, the binary mask
  ``map > pixel threshold`` (the image threshold where the calibration has none), 0 or 255, the
  size of the map (the model's crop). A normal image (score <= threshold) has an empty mask by
  construction, so none is written for it.
- ``OUT/overlays/<row>_<name>.png`` (``overlays='all'`` or ``'anomalous'``): the image as the model
  saw it, the heatmap over it, and the mask's contour (cyan). The colours are on one scale fixed by
  the calibration, not by the image: from the lowest calibration score (transparent) to twice the
  threshold's distance above it, the threshold at mid-scale; so a normal image does not light up.

``<row>`` is the image's index in the input list (6 digits) and ``<name>`` its file stem (other
characters than letters, digits, ``.``, ``_`` and ``-`` become ``_``): unique and stable names for
the same input list. The masks are computed from the float32 maps the scores come from (also on a
cluster), not from the float16 copy in ``maps.zarr``.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .calibration import ANOMALOUS, Calibration
from .errors import PadimError

MASKS, OVERLAYS = "masks", "overlays"
CONTOUR = (0, 255, 255)
OVERLAY_OPACITY = 0.75


def file_name(index: int, path: str | Path) -> str:
    """The PNG name of the image at input row ``index``: ``000012_<stem>.png``."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", Path(path).stem)[:80] or "image"
    return f"{index:06d}_{stem}.png"


def outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` (H, W) bool that touch a pixel outside it (4-neighbours)."""
    m = np.pad(mask, 1)
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask & ~inner


def colour_scale(calibration: Calibration) -> tuple[float, float]:
    """(low, high) of the overlay colours: the lowest calibration score, and the threshold as far
    above the cut as that is below it (the mask's cut at mid-scale)."""
    cut = calibration.threshold if calibration.pixel_threshold is None else calibration.pixel_threshold
    low = calibration.scores[0] if calibration.scores else cut / 2
    if not low < cut:
        low = cut / 2 if cut > 0 else cut - 1.0
    return float(low), float(2 * cut - low)


def overlay(view: np.ndarray, amap: np.ndarray, mask: np.ndarray, low: float, high: float) -> Image.Image:
    """The heatmap of ``amap`` (H, W) over ``view`` (H, W, 3) uint8, with ``mask``'s contour."""
    from .evaluation.report import colormap

    scaled = np.clip((np.asarray(amap, np.float64) - low) / max(high - low, 1e-12), 0.0, 1.0)
    alpha = (scaled * OVERLAY_OPACITY)[..., None]
    gray = np.repeat(view.astype(np.float64).mean(axis=2, keepdims=True), 3, axis=2)
    out = (gray * (1 - alpha) + colormap(scaled) * alpha).round().astype(np.uint8)
    out[outline(mask)] = CONTOUR
    return Image.fromarray(out)


class Decisions:
    """p-values and labels of every image, and its mask and overlay files (see the module).

    Parameters
    ----------
    calibration : Calibration
    fs, root : the output folder (an fsspec filesystem and its path)
    paths : sequence of paths
        The input list (row indices refer to it).
    resize, crop : int
        The model's preprocessing (the overlay's view of the image).
    masks : bool
    overlays : {None, 'all', 'anomalous'}
    """

    def __init__(self, calibration: Calibration, fs, root: str, paths: Sequence[Path], *, resize: int, crop: int,
                 masks: bool = False, overlays: str | None = None):
        self.calibration, self.fs, self.root, self.paths = calibration, fs, root, list(paths)
        self.resize, self.crop = resize, crop
        self.masks, self.overlays = masks, overlays
        self.files: dict[str, dict[int, str]] = {MASKS: {}, OVERLAYS: {}}
        self.scale = colour_scale(calibration)
        for folder, wanted in ((MASKS, masks), (OVERLAYS, overlays)):
            if wanted:
                fs.makedirs(f"{root}/{folder}", exist_ok=True)

    @property
    def columns(self) -> list[str]:
        """The columns of scores.csv after ``path,score``."""
        return ["p_value", "label"] + (["mask"] if self.masks else []) + (["overlay"] if self.overlays else [])

    def rows(self, indices: np.ndarray, scores: np.ndarray) -> list[list[str]]:
        """The values of :attr:`columns` for the input rows ``indices`` with these scores."""
        p = self.calibration.p_values(np.asarray(scores, np.float64))
        labels = self.calibration.labels(np.asarray(scores, np.float64))
        out = []
        for i, pv, label in zip(indices, p, labels):
            cells = [repr(float(pv)), str(label)]
            if self.masks:
                cells.append(self.files[MASKS].get(int(i), ""))
            if self.overlays:
                cells.append(self.files[OVERLAYS].get(int(i), ""))
            out.append(cells)
        return out

    def count(self, scores: np.ndarray) -> int:
        """How many of ``scores`` are anomalous."""
        return int(np.count_nonzero(np.asarray(scores, np.float64) > self.calibration.threshold))

    def add(self, indices: Sequence[int], scores: np.ndarray, maps: np.ndarray | None) -> None:
        """Write the mask and overlay files of one batch (maps (k, crop, crop), float32)."""
        if not (self.masks or self.overlays):
            return
        if maps is None:  # pragma: no cover - the score pipeline hands maps on when these are asked
            raise PadimError("internal error: masks or overlays asked, but no maps were computed")
        labels = self.calibration.labels(np.asarray(scores, np.float64))
        for row, i in enumerate(indices):
            i = int(i)
            anomalous = labels[row] == ANOMALOUS
            mask = self.calibration.masks(maps[row])
            name = file_name(i, self.paths[i])
            if self.masks and anomalous:
                self._save(Image.fromarray(mask.astype(np.uint8) * 255, mode="L"), MASKS, name)
                self.files[MASKS][i] = f"{MASKS}/{name}"
            if self.overlays == "all" or (self.overlays == "anomalous" and anomalous):
                self._save(overlay(self._view(self.paths[i]), maps[row], mask, *self.scale), OVERLAYS, name)
                self.files[OVERLAYS][i] = f"{OVERLAYS}/{name}"

    def _view(self, path: Path) -> np.ndarray:
        from .evaluation.layouts import load_view

        try:
            return load_view(path, self.resize, self.crop)
        except Exception:  # noqa: BLE001 - gone or changed since it was scored: the heatmap alone
            return np.zeros((self.crop, self.crop, 3), np.uint8)

    def _save(self, image: Image.Image, folder: str, name: str) -> None:
        with self.fs.open(f"{self.root}/{folder}/{name}", "wb") as f:
            image.save(f, format="PNG")


__all__ = ["Decisions", "file_name", "overlay", "colour_scale", "outline"]
