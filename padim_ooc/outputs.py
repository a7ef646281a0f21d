"""Writers for score results: scores.csv in input order, maps.zarr."""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Sequence

import fsspec
import numpy as np
import zarr

from .data import display_path
from .errors import PadimError
from .owned import claim_outputs
from .store import zarr_options

SCORE_OUTPUTS = ("scores.csv", "maps.zarr", "masks", "overlays")
"""What ``score`` writes into OUT: refused if an earlier run left one (unless ``overwrite``)."""

# bytes of maps read and written at once when maps.zarr is compacted
COPY_BYTES = 64 * 2**20


def runs(indices: np.ndarray) -> list[tuple[int, int, int]]:
    """Runs of consecutive values in ``indices`` (int, shape (k,)).

    Returns a list of ``(position, first, length)``: ``indices[position:position + length]``
    equals ``first, first + 1, ..., first + length - 1``.
    """
    if not len(indices):
        return []
    starts = np.flatnonzero(np.diff(indices) != 1) + 1
    bounds = np.concatenate([[0], starts, [len(indices)]])
    return [(int(a), int(indices[a]), int(b - a)) for a, b in zip(bounds[:-1], bounds[1:])]


class ArraySink:
    """Collects (index, score, map) batches into arrays in input order (what the API returns).

    ``scores`` (N,) float64, NaN where an image could not be read; ``maps``
    (N, crop, crop) float16 with ``maps=True``, else None.
    """

    def __init__(self, count: int, crop: int, *, maps: bool = False):
        self.scores = np.full(count, np.nan)
        self.maps = np.zeros((count, crop, crop), np.float16) if maps else None

    def add(self, indices: Sequence[int], scores: np.ndarray, maps: np.ndarray | None) -> None:
        idx = np.asarray(indices, dtype=np.int64)
        self.scores[idx] = scores
        if self.maps is not None and maps is not None:
            self.maps[idx] = maps


class ScoreWriter:
    """Collects (index, score, map) batches and writes them in input order.

    Scores are kept in memory (9 bytes an image) and written at the end;
    maps go to ``out/maps.zarr`` as they arrive, at their input index, and the
    array is compacted (skipped images removed) when it closes. Closing with
    no image scored is an error, and a run that fails (an exception inside
    the ``with`` block, or nothing scored) removes what it wrote: the output
    folder if it created it, else its ``maps.zarr``. Outputs of an earlier run
    (:data:`SCORE_OUTPUTS`) are refused unless ``overwrite``, then removed
    first, so that the new ones replace them whole (see :mod:`padim_ooc.owned`).
    """

    def __init__(self, out: str | os.PathLike, paths: Sequence[Path], *, crop: int, maps: bool = False,
                 calibration=None, resize: int | None = None, masks: bool = False, overlays: str | None = None,
                 overwrite: bool = False):
        self.out = os.fspath(out).rstrip("/")  # a folder, or any fsspec URL (memory://, s3://, ...)
        self.decisions = None  # with a calibration: p-values, labels, masks, overlays (padim_ooc.decisions)
        self.paths = list(paths)
        self.scores = np.full(len(self.paths), np.nan)
        self.done = np.zeros(len(self.paths), bool)
        self.maps = None
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.out)
            self.created = not self.fs.exists(self.root)
            if not self.created:
                local = isinstance(self.fs, fsspec.implementations.local.LocalFileSystem)
                claim_outputs(self.root, SCORE_OUTPUTS, overwrite=overwrite, fs=None if local else self.fs,
                              what="scores")
            self.fs.makedirs(self.root, exist_ok=True)
        except (OSError, ValueError, ImportError) as err:
            raise PadimError(f"cannot create the output folder {self.out}: {getattr(err, 'strerror', None) or err}") from None
        if calibration is not None:
            from .decisions import Decisions

            try:
                self.decisions = Decisions(calibration, self.fs, self.root, self.paths, resize=resize or crop,
                                           crop=crop, masks=masks, overlays=overlays)
            except BaseException:
                self.discard()
                raise
        if maps:
            try:
                self.maps = zarr.create_array(self.out + "/maps.zarr", shape=(len(self.paths), crop, crop),
                                              chunks=(1, crop, crop), dtype="float16", overwrite=True,
                                              **zarr_options(self.out))
            except BaseException:
                self.discard()
                raise

    def name(self, i: int) -> str:
        return display_path(self.paths[i])

    @property
    def count(self) -> int:
        return int(self.done.sum())

    def add(self, indices: Sequence[int], scores: np.ndarray, maps: np.ndarray | None) -> None:
        idx = np.asarray(indices, dtype=np.int64)
        self.scores[idx] = scores
        self.done[idx] = True
        if self.maps is not None and maps is not None:
            for row, first, length in runs(idx):  # one write per run of consecutive indices
                self.maps[first:first + length] = maps[row:row + length].astype(np.float16)
        if self.decisions is not None:
            self.decisions.add(idx, scores, maps)

    @property
    def anomalous(self) -> int | None:
        """Images labelled anomalous so far (None without a calibration)."""
        return None if self.decisions is None else self.decisions.count(self.scores[self.done])

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.discard()
        return False

    def discard(self) -> None:
        """Remove what this writer wrote: the output folder if it made it, else maps.zarr (and the
        masks/ and overlays/ folders)."""
        targets = [self.root] if self.created else [self.root + "/maps.zarr"] if self.maps is not None else []
        if not self.created and self.decisions is not None:
            targets += [f"{self.root}/{name}" for name, wanted in (("masks", self.decisions.masks),
                                                                     ("overlays", self.decisions.overlays)) if wanted]
        try:
            for target in targets:
                if self.fs.exists(target):
                    self.fs.rm(target, recursive=True)
        except OSError:
            pass  # the run's own error is the one to report

    def close(self) -> None:
        """Write scores.csv (and compact maps.zarr); an error if no image was scored."""
        if self.paths and not self.done.any():
            self.discard()
            raise PadimError(f"no image could be read: nothing was scored ({len(self.paths)} given)")
        with self.fs.open(self.root + "/scores.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            kept = np.flatnonzero(self.done)
            if self.decisions is None:
                w.writerow(["path", "score"])
                for i in kept:
                    w.writerow([self.name(i), repr(float(self.scores[i]))])
            else:  # a calibrated model: path,score,p_value,label[,mask][,overlay]
                w.writerow(["path", "score", *self.decisions.columns])
                for i, cells in zip(kept, self.decisions.rows(kept, self.scores[kept])):
                    w.writerow([self.name(i), repr(float(self.scores[i])), *cells])
        if self.maps is not None:
            kept = np.flatnonzero(self.done)
            if len(kept) != len(self.paths):
                self._compact(kept)
            self.maps.attrs["paths"] = [self.name(i) for i in kept]

    def _compact(self, kept: np.ndarray) -> None:
        """Move the maps of the images ``kept`` (sorted indices) to rows 0, 1, ..., then cut
        the array to ``len(kept)`` rows: runs of consecutive images move as slices of at
        most :data:`COPY_BYTES`, in increasing order (a slice is read whole before it is
        written to lower rows, so no row is overwritten before it moved)."""
        step = max(1, COPY_BYTES // (int(np.prod(self.maps.shape[1:])) * self.maps.dtype.itemsize))
        for new, old, length in runs(kept):
            if new == old:  # before the first skipped image: already in place
                continue
            for k in range(0, length, step):
                n = min(step, length - k)
                self.maps[new + k:new + k + n] = self.maps[old + k:old + k + n]
        self.maps.resize((len(kept),) + self.maps.shape[1:])
