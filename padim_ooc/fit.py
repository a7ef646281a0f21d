"""The streaming fit: batches of features folded into float64 statistics, checkpointed."""
from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .data import ImageFiles, display_path, list_images, loader
from .errors import PadimError
from .extractor import Extractor
from .store.lock import default_command, store_lock
from .memory import MemoryPlan, default_budget, plan_memory, tune_allocator
from .progress import bar
from .store import ModelStore, store_exists
from .welford import Folder

log = logging.getLogger("padim_ooc")

# features buffered before they are folded into the statistics (see welford.Folder)
FOLD_BYTES = 512 * 2**20
FOLD_MAX_IMAGES = 256

# automatic checkpoints: every 1000 images, at most 1/50 of the time spent writing them
AUTO_CHECKPOINT_IMAGES = 1000
CHECKPOINT_SPACING = 50.0

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
    blocks: int = 1  # passes over the images (position blocks of the memory plan)

    def as_dict(self) -> dict:
        return {"model": self.model, "added": self.added, "already_seen": self.already_seen,
                "duplicates": self.duplicates, "skipped": len(self.skipped),
                "n_images": self.n_images, "checkpoints": self.checkpoints, "blocks": self.blocks}


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
              checkpoint_every: int | None = None, loader_workers: int | None = None,
              on_error: str = "skip", progress: bool = True, device: str = "auto",
              weights: str | None = None, max_memory: int | None = None) -> FitSummary:
    """Fold the images of ``sources`` into the statistics of the store at ``model``.

    A new store is created with ``extractor``'s configuration; an existing one
    gets only the images its ledger has not seen (incremental fit), and must
    match ``extractor`` if one is given (otherwise it is rebuilt from the
    store). Checkpoints every ``checkpoint_every`` images and at the end;
    ``None`` (auto): every 1000 images, but spaced so that writing the
    checkpoints takes at most 1/50 of the time (a WR50-Rd550 state is 7.6 GB).
    Does not finalize (see :func:`padim_ooc.finalize.finalize`).
    ``max_memory`` (bytes; default: available memory, with a margin) is the
    budget of :func:`plan_memory`: if the float64 accumulator does not fit,
    the positions are split into blocks, one pass over the images each.
    """
    check_options(batch_size, checkpoint_every, on_error)
    tune_allocator()  # no page faults per batch, flat peak memory (see memory.tune_allocator)
    paths = list_images(sources)
    model = os.fspath(model)
    with store_lock(model, default_command()):  # one writer at a time (a clear error names the other)
        created = not store_exists(model)
        if not created:
            store = ModelStore.open(model, writable=True)
            if extractor is None:
                extractor = Extractor.from_config(store.config, device=device, weights=weights)
            else:
                check_compatible(store.attrs, extractor, model)
        else:
            extractor = extractor or Extractor(device=device)
            store = ModelStore.create(model, extractor.config())
        summary = FitSummary(model=model)
        try:
            _accumulate(store, extractor, paths, summary, batch_size=batch_size,
                        checkpoint_every=checkpoint_every, loader_workers=loader_workers,
                        on_error=on_error, progress=progress, max_memory=max_memory)
        except BaseException:
            if created:  # a first fit that failed before its first checkpoint leaves no model behind
                store.remove_if_empty()
            store.close()
            raise
        summary.n_images = store.n_images
        store.close()
    return summary


class CheckpointClock:
    """When to checkpoint: every ``every`` images, or (``every=None``) every
    AUTO_CHECKPOINT_IMAGES images once at least CHECKPOINT_SPACING times the
    last write's duration has passed since it ended."""

    def __init__(self, every: int | None):
        self.auto = every is None
        self.every = AUTO_CHECKPOINT_IMAGES if every is None else every
        self.ended = time.monotonic()
        self.cost = 0.0

    def __call__(self, pending: int) -> bool:
        if pending < self.every:
            return False
        return not self.auto or time.monotonic() - self.ended >= CHECKPOINT_SPACING * self.cost

    @contextmanager
    def timing(self):
        start = time.monotonic()
        yield
        self.ended = time.monotonic()
        self.cost = self.ended - start


def fold_samples(positions: int, dims: int, batch_size: int) -> int:
    """Images whose float32 features are buffered before a fold (about FOLD_BYTES, at least a batch)."""
    return min(FOLD_MAX_IMAGES, max(batch_size, FOLD_BYTES // (positions * dims * 4)))


def check_options(batch_size: int, checkpoint_every: int | None, on_error: str) -> None:
    """One-line errors for fit options out of range."""
    if batch_size < 1:
        raise PadimError(f"batch size must be at least 1, got {batch_size}")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise PadimError(f"checkpoint interval must be at least 1 image, got {checkpoint_every}")
    if on_error not in ("skip", "fail"):
        raise PadimError(f"on_error must be 'skip' or 'fail', got {on_error!r}")


def _accumulate(store: ModelStore, extractor: Extractor, paths: list[Path], summary: FitSummary, *,
                batch_size: int, checkpoint_every: int | None, loader_workers: int | None,
                on_error: str, progress: bool, max_memory: int | None = None) -> None:
    plan = memory_plan(store.attrs, batch_size, max_memory, device=extractor.device)
    _say(plan.describe(), progress)
    summary.blocks = plan.blocks
    if plan.blocks > 1:
        return _accumulate_blocked(store, extractor, paths, summary, plan, batch_size=batch_size,
                                   checkpoint_every=checkpoint_every, loader_workers=loader_workers,
                                   on_error=on_error, progress=progress)
    device = extractor.device
    acc = store.load_moments(device=device)
    seen = store.ledger()
    dataset = ImageFiles(paths, extractor.preprocess, skip=frozenset(seen))
    folder = Folder(acc, max_samples=fold_samples(extractor.positions, extractor.dims, batch_size))
    pending: list[bytes] = []
    due = CheckpointClock(checkpoint_every)
    with bar(f"fit {Path(store.path).name}", len(paths), enabled=progress) as advance_bar:
        batches = loader(dataset, batch_size, workers=loader_workers, device=device.type)
        for indices, digests, batch, ok, errors in batches:
            kept: dict[int, bytes] = {}
            rows = _first_pass_rows(paths, indices, digests, ok, errors, seen, kept, on_error, summary)
            if rows:
                if len(rows) < batch.shape[0]:
                    batch = batch[rows]
                # (P, b, d), written straight into the fold buffer; kept only if finite
                x = extractor.embed_patches(batch, out=folder.reserve(len(rows)))
                check_finite(x, [paths[i] for i in kept])
                folder.commit(len(rows))
                pending.extend(kept.values())
                summary.added += len(rows)
            if due(len(pending)):
                folder.flush()
                with due.timing():
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


def check_finite(patches: torch.Tensor, paths: Sequence[Path]) -> None:
    """Refuse a batch whose features hold NaN or infinity (they would poison every statistic).

    Parameters
    ----------
    patches : Tensor of shape (P, b, d)
        The batch's features (``Extractor.embed_patches``), image ``i`` of
        the batch being ``paths[i]``.
    """
    if bool(torch.isfinite(patches.sum())):  # NaN and infinity propagate through a sum
        return
    finite = torch.isfinite(patches).all(dim=2).all(dim=0)  # which images (or only an overflowing sum)
    if bool(finite.all()):
        return
    bad = [p for p, f in zip(paths, finite.tolist()) if not f]
    raise PadimError(f"the backbone gave non-finite features (NaN or infinity) for {len(bad)} of "
                     f"{len(paths)} images of a batch, first {display_path(bad[0])}; the weights are "
                     "probably broken (check --weights): nothing of this batch was added, the model "
                     "keeps its last checkpoint")


def _bad_image(path: Path, err: str, on_error: str, summary: FitSummary) -> None:
    name = display_path(path)
    if on_error == "fail":
        raise PadimError(f"bad image {name}: {err}")
    log.warning("skipped %s: %s", name, err)
    summary.skipped.append((name, err))


def memory_plan(config: dict, batch_size: int, budget: int | None = None, device=None) -> MemoryPlan:
    """The plan a fit makes for ``budget`` bytes.

    ``config``: a model's attributes or ``Extractor.config()`` (``grid``,
    ``dims`` and ``crop`` are used). ``budget`` None: available memory with a
    margin (see :func:`padim_ooc.memory.default_budget`).
    """
    positions, dims = config["grid"][0] * config["grid"][1], config["dims"]
    return plan_memory(positions, dims, batch_size=batch_size, crop=config["crop"],
                       budget=budget or default_budget(device),
                       fold_samples=fold_samples(positions, dims, batch_size))


def _say(line: str, progress: bool) -> None:
    log.info(line)
    if progress:
        print(line, file=sys.stderr, flush=True)


def _accumulate_blocked(store: ModelStore, extractor: Extractor, paths: list[Path], summary: FitSummary,
                        plan: MemoryPlan, *, batch_size: int, checkpoint_every: int | None,
                        loader_workers: int | None, on_error: str, progress: bool) -> None:
    """The fit with positions split into blocks: one pass over the images per block.

    The images go in segments of about ``checkpoint_every`` (whole batches, so
    batches are composed as in the one-pass fit and the features are the
    same). For each segment, every block loads its slice of the live state,
    folds the segment in and writes the slice into the next state; the switch
    to that state (with the segment's ledger) is the checkpoint.
    """
    device = extractor.device
    seen = store.ledger()
    before = frozenset(seen)  # skipped without decoding; repeats within the run count as duplicates
    segment = -(-max(checkpoint_every or AUTO_CHECKPOINT_IMAGES, batch_size) // batch_size) * batch_size
    ranges = plan.ranges()
    fold = fold_samples(extractor.positions, extractor.dims, batch_size)
    title = f"fit {Path(store.path).name} ({len(ranges)} passes)"
    with bar(title, len(paths) * len(ranges), enabled=progress) as advance_bar:
        for first in range(0, len(paths), segment):
            part = paths[first:first + segment]
            dataset = ImageFiles(part, extractor.preprocess, skip=before)
            kept: dict[int, bytes] = {}  # index into paths -> digest, decided in the first pass
            n0, target = store.n_images, None
            for b, (start, stop) in enumerate(ranges):
                if b and not kept:
                    advance_bar(len(part) * (len(ranges) - b))
                    break
                acc = store.load_moments(device=device, start=start, stop=stop)
                folder = Folder(acc, max_samples=fold)
                for indices, digests, batch, ok, errors in loader(dataset, batch_size, workers=loader_workers,
                                                                   device=device.type):
                    indices = [first + i for i in indices]
                    if b == 0:
                        rows = _first_pass_rows(paths, indices, digests, ok, errors, seen, kept,
                                                on_error, summary)
                    else:
                        rows = _later_pass_rows(paths, indices, digests, ok, kept)
                    if rows:
                        if len(rows) < batch.shape[0]:
                            batch = batch[rows]
                        x = extractor.embed_patches(batch)  # (P, b, d)
                        if b == 0:
                            check_finite(x, [paths[i] for i in indices if i in kept])
                        folder.add(x[start:stop])
                    advance_bar(len(indices))
                folder.flush()
                if not kept:
                    continue
                if target is None:
                    target = store.begin_state()[0]
                store.write_block(target, start, acc)
            if kept:
                digests = np.frombuffer(b"".join(kept.values()), dtype=np.uint8).reshape(-1, 16)
                store.commit_state(target, n0 + len(kept), digests)
                summary.added += len(kept)
                summary.checkpoints += 1
    if store.n_images == 0:
        raise PadimError("no image could be read: the model has no statistics")


def _first_pass_rows(paths, indices, digests, ok, errors, seen, kept, on_error, summary) -> list[int]:
    """Rows of the batch to fold in; records the new images in ``kept`` (index -> digest).

    Unreadable images are skipped (or fail), already-accumulated ones were not
    decoded, and a repeat of an image seen earlier in the run is decoded but
    not folded in (counted as a duplicate).
    """
    rows, row = [], 0
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
            kept[i] = key
            rows.append(row)
            row += 1
    return rows


def _later_pass_rows(paths, indices, digests, ok, kept) -> list[int]:
    """Rows of the images the first pass kept; an error if one of them changed since."""
    rows, row = [], 0
    for i, key, good in zip(indices, digests, ok):
        if i in kept:
            if not good or key != kept[i]:
                raise PadimError(f"{display_path(paths[i])} changed or became unreadable during the fit; run the fit again "
                                 "(the model keeps its last checkpoint)")
            rows.append(row)
        if good:
            row += 1
    return rows


def fit_part(paths: Sequence[str | os.PathLike], part: str, config: dict, *, device: str = "auto",
             weights: str | None = None, batch_size: int = 32, checkpoint_every: int | None = None,
             on_error: str = "skip", max_memory: int | None = None) -> FitSummary:
    """Fit the partial store ``part`` on one shard of images (a task of the sharded fit).

    The extractor is rebuilt from ``config`` (weights checked by digest). An
    existing ``part`` is resumed, so a shard restarted after its worker was
    lost neither loses nor double-counts an image. A shard whose images are all
    unreadable gives an empty part instead of an error (``on_error='skip'``).
    """
    extractor = Extractor.from_config(config, device=device, weights=weights)
    if store_exists(part):
        store = ModelStore.open(part, writable=True)
    else:
        store = ModelStore.create(part, extractor.config())
    summary = FitSummary(model=part)
    paths = [Path(os.fsdecode(p)) for p in paths]
    try:
        _accumulate(store, extractor, paths, summary, batch_size=batch_size,
                    checkpoint_every=checkpoint_every, loader_workers=0, on_error=on_error,
                    progress=False, max_memory=max_memory)
    except PadimError:
        accounted = len(summary.skipped) + summary.already_seen + summary.duplicates
        if summary.added or store.n_images or accounted < len(paths):  # not "every image was unreadable"
            raise
    finally:
        store.close()
    summary.n_images = store.n_images
    return summary
