"""The streaming fit: batches of features folded into float64 statistics, checkpointed."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .data import ImageFiles, list_images, loader
from .errors import PadimError
from .extractor import Extractor
from .progress import bar
from .store import ModelStore, positions_per_chunk, store_exists
from .welford import Folder

log = logging.getLogger("padim_ooc")

# features buffered before they are folded into the statistics (see welford.Folder)
FOLD_BYTES = 512 * 2**20
FOLD_MAX_IMAGES = 256

# fields that must match for images to be added to an existing model
CONFIG_FIELDS = ("backbone", "layers", "channels", "weights_digest", "resize", "crop",
                 "normalize_mean", "normalize_std", "grid")


@dataclass
class FitSummary:
    """What one fit call did."""

    model: str
    added: int = 0
    already_seen: int = 0
    duplicates: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    n_images: int = 0
    checkpoints: int = 0

    def as_dict(self) -> dict:
        return {"model": self.model, "added": self.added, "already_seen": self.already_seen,
                "duplicates": self.duplicates, "skipped": len(self.skipped),
                "n_images": self.n_images, "checkpoints": self.checkpoints}


def check_compatible(stored: dict, extractor: Extractor, path: str) -> None:
    """A clear error naming the first field where the extractor differs from the model."""
    current = extractor.config()
    for key in CONFIG_FIELDS:
        if stored[key] != current[key]:
            raise PadimError(f"the model {path} was fitted with a different configuration: "
                             f"{key} is {_short(stored[key])} in the model, {_short(current[key])} now")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def fit_store(sources: Sequence[str | os.PathLike], model: str | os.PathLike, *,
              extractor: Extractor | None = None, batch_size: int = 32,
              checkpoint_every: int = 1000, loader_workers: int | None = None,
              on_error: str = "skip", progress: bool = True, device: str = "auto",
              weights: str | None = None) -> FitSummary:
    """Fold the images of ``sources`` into the statistics of the store at ``model``.

    A new store is created with ``extractor``'s configuration; an existing one
    gets only the images its ledger has not seen (incremental fit), and must
    match ``extractor`` if one is given (otherwise it is rebuilt from the
    store). Checkpoints every ``checkpoint_every`` images and at the end.
    Does not finalize (see :func:`padim_ooc.finalize.finalize`).
    """
    if batch_size < 1:
        raise PadimError(f"batch size must be at least 1, got {batch_size}")
    if checkpoint_every < 1:
        raise PadimError(f"checkpoint interval must be at least 1 image, got {checkpoint_every}")
    if on_error not in ("skip", "fail"):
        raise PadimError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
    paths = list_images(sources)
    model = os.fspath(model)
    if store_exists(model):
        store = ModelStore.open(model, writable=True)
        if extractor is None:
            extractor = Extractor.from_config(store.config, device=device, weights=weights)
        else:
            check_compatible(store.attrs, extractor, model)
    else:
        extractor = extractor or Extractor(device=device)
        store = ModelStore.create(model, extractor.config())
    summary = FitSummary(model=model)
    _accumulate(store, extractor, paths, summary, batch_size=batch_size,
                checkpoint_every=checkpoint_every, loader_workers=loader_workers,
                on_error=on_error, progress=progress)
    summary.n_images = store.n_images
    return summary


def _accumulate(store: ModelStore, extractor: Extractor, paths: list[Path], summary: FitSummary, *,
                batch_size: int, checkpoint_every: int, loader_workers: int | None,
                on_error: str, progress: bool) -> None:
    device = extractor.device
    acc = store.load_moments(device=device)
    seen = store.ledger()
    dataset = ImageFiles(paths, extractor.preprocess, skip=frozenset(seen))
    per_sample = extractor.positions * extractor.dims * 4  # float32 features of one image
    folder = Folder(acc, block=positions_per_chunk(extractor.dims),
                    max_samples=min(FOLD_MAX_IMAGES, max(batch_size, FOLD_BYTES // per_sample)))
    pending: list[bytes] = []
    with bar(f"fit {Path(store.path).name}", len(paths), enabled=progress) as advance_bar:
        batches = loader(dataset, batch_size, workers=loader_workers, pin_memory=device.type == "cuda")
        for indices, digests, batch, ok, errors in batches:
            keep, fresh = [], []
            row = 0
            for i, key, good, err in zip(indices, digests, ok, errors):
                if err is not None:
                    _bad_image(paths[i], err, on_error, summary)
                elif not good:
                    summary.already_seen += 1
                elif key in seen:
                    summary.duplicates += 1
                    row += 1
                else:
                    seen.add(key)
                    fresh.append(key)
                    keep.append(row)
                    row += 1
            if keep:
                if len(keep) < batch.shape[0]:
                    batch = batch[keep]
                feats = extractor.embed(batch)
                folder.add(feats.flatten(2).permute(2, 0, 1).contiguous())  # (P, b, d)
                pending.extend(fresh)
                summary.added += len(keep)
            if len(pending) >= checkpoint_every:
                folder.flush()
                store.checkpoint(acc, pending)
                summary.checkpoints += 1
                pending = []
            advance_bar(len(indices))
    folder.flush()
    if pending or store.attrs["state"] is None and acc.n:
        store.checkpoint(acc, pending)
        summary.checkpoints += 1
    if store.n_images == 0:
        raise PadimError("no image could be read: the model has no statistics")


def _bad_image(path: Path, err: str, on_error: str, summary: FitSummary) -> None:
    name = os.fsdecode(path).encode("utf-8", "backslashreplace").decode("utf-8")
    if on_error == "fail":
        raise PadimError(f"bad image {name}: {err}")
    log.warning("skipped %s: %s", name, err)
    summary.skipped.append((name, err))
