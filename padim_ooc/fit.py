"""The fit: one pipeline from image files to a model's statistics.

:func:`run_fit` is what ``padim-ooc fit`` and :func:`padim_ooc.fit` do:

1. the preamble (:meth:`FitTarget.open`), once: the model path is locked (one
   writer), an existing store is opened and the asked configuration and weights
   are checked against it before any backbone is built, or the extractor is built
   and a new store created;
2. the fold: :func:`fold_images` in this process, or on a Dask cluster one
   :func:`fold_images` per shard (:mod:`padim_ooc.parallel.fit_shards`), whose
   partial stores are then merged;
3. finalize, if asked, on the same store (still locked) and the same cluster.

:func:`fold_images` is the one loop: batches of features folded into float64
statistics (:class:`padim_ooc.welford.Folder`, with the fold mode ``options.fold``), one pass over the images per
block of positions of the memory plan (one block: one pass), checkpointed as it
goes; which images are folded in is decided by :class:`RunLedger`, the same rule
for a one-process fit and for every shard of a sharded one.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .config import CHOSEN_FIELDS, ModelConfig
from .data import ImageFiles, display_path, list_images, loader
from .errors import PadimError
from .extractor import Extractor
from .memory import MemoryPlan, default_budget, plan_memory, tune_allocator
from .options import FitOptions, eps_for, shrinkage_for
from .progress import bar
from .store import ModelStore, lock, store_exists
from .welford import DEFAULT_FOLD, Folder

log = logging.getLogger("padim_ooc")

# features buffered before they are folded into the statistics (see welford.Folder)
FOLD_BYTES = 512 * 2**20
FOLD_MAX_IMAGES = 256

# automatic checkpoints: every 1000 images, at most 1/50 of the time spent writing them
AUTO_CHECKPOINT_IMAGES = 1000
CHECKPOINT_SPACING = 50.0


@dataclass
class FitSummary:
    """What one fit call did (counts of images), as the command line prints it."""

    model: str
    added: int = 0
    already_seen: int = 0
    duplicates: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    n_images: int = 0
    checkpoints: int = 0
    blocks: int = 1  # passes over the images (position blocks of the memory plan)
    # images held out of the statistics for calibration (``FitOptions.holdout``): (path, digest)
    held_out: list[tuple[str, bytes]] = field(default_factory=list)
    calibration: dict | None = None  # what the calibration after the fit did (padim_ooc.calibrate)

    def as_dict(self) -> dict:
        out = {"model": self.model, "added": self.added, "already_seen": self.already_seen,
               "duplicates": self.duplicates, "skipped": len(self.skipped),
               "n_images": self.n_images, "checkpoints": self.checkpoints, "blocks": self.blocks}
        if self.held_out or self.calibration is not None:
            out["held_out"] = len(self.held_out)
        if self.calibration is not None:
            out["calibration"] = self.calibration
        return out


# ---- the preamble --------------------------------------------------------------------------
@dataclass
class FitTarget:
    """The model a fit writes: its store (opened writable: the writer's lock is held), its
    fitted configuration, and whether this fit created it.

    ``extractor`` is built on first use (:meth:`get_extractor`): a sharded fit of an
    existing model needs none in this process.
    """

    path: str
    store: ModelStore
    created: bool
    weights: str | None = None
    device: str = "auto"
    extractor: Extractor | None = None

    @property
    def config(self) -> ModelConfig:
        return self.store.config

    def get_extractor(self) -> Extractor:
        if self.extractor is None:
            self.extractor = Extractor.from_config(self.config, device=self.device, weights=self.weights,
                                                   projection=self.store.projection())
        return self.extractor

    @classmethod
    @contextmanager
    def open(cls, model: str | os.PathLike, options: FitOptions, *, config: ModelConfig | None = None,
             extractor: Extractor | None = None) -> Iterator["FitTarget"]:
        """Lock ``model``, then open it (checking ``config``'s given fields and ``extractor``'s
        features against the stored record) or create it (with ``extractor``, else one built
        from ``config``); close and unlock it at the end of the block.

        ``config`` holds what was asked (None fields: not asked); its ``weights``, if
        given, are also where the backbone is loaded from. Nothing is built before
        the checks: a refused run downloads no weights and starts no cluster.
        """
        path = os.fspath(model)
        weights = config.weights if config is not None else None
        lock.acquire(path, lock.default_command())  # one writer; a refused one stops here
        try:
            if store_exists(path):
                store = ModelStore.open(path, writable=True)
                try:
                    store.refuse_scorer("extend")
                    if config is not None:
                        store.config.check_extends(config, path, keys=CHOSEN_FIELDS)
                    if extractor is not None:
                        store.config.check_extends(extractor.config(), path)
                except BaseException:
                    store.close()
                    raise
                target = cls(path, store, created=False, weights=weights, device=options.device,
                             extractor=extractor)
            else:
                extractor = extractor or Extractor(config=config or ModelConfig(), device=options.device)
                target = cls(path, ModelStore.create(path, extractor.config(), extractor.projection), created=True,
                             weights=weights, device=options.device, extractor=extractor)
        finally:
            lock.release(path)  # the store holds the lock now (or nobody, after an error)
        try:
            yield target
        except BaseException:
            if target.created:  # a first fit that failed before its first checkpoint leaves no model behind
                target.store.remove_if_empty()
            raise
        finally:
            target.store.close()


def run_fit(sources: Sequence[str | os.PathLike], model: str | os.PathLike, options: FitOptions, *,
            config: ModelConfig | None = None, extractor: Extractor | None = None) -> tuple[FitSummary, bool]:
    """Fit (or extend) the model at ``model`` on the images of ``sources``, then finalize it
    if ``options.finalize``, under one lock (no other writer in between).

    Parameters
    ----------
    sources : sequence of paths
        Folders (recursive), image files, or text files listing paths.
    model : path or URL
        The Zarr store; created if missing, extended with unseen images if it exists.
    options : FitOptions
        How the fit runs (checked already).
    config : ModelConfig, optional
        What was asked: the configuration of a new model (defaults for what is not
        given), checked field by field against an existing one.
    extractor : Extractor, optional
        A built extractor: the configuration of a new model, or one that must match
        the existing model's features.

    Returns
    -------
    (FitSummary, bool)
        What the fit did, and whether the store is finalized at the end (its real state).
    """
    tune_allocator()  # no page faults per batch, flat peak memory (see docs/design.md)
    paths = list_images(sources)
    with FitTarget.open(model, options, config=config, extractor=extractor) as target:
        store = target.store
        if options.max_memory:  # fails early if the budget cannot hold one batch
            memory_plan(target.config, options.batch_size, options.max_memory, options.fold)
        paths, identities, cached = recognised(paths, store)  # unchanged images held: not read again
        with options.cluster.open(store.path) as client:
            if client is None:
                summary = fit_here(target, paths, options, identities)
            else:
                from .parallel.fit_shards import fit_sharded

                summary = fit_sharded(target, paths, client, options)
            summary.already_seen += cached
            if store.n_images == 0:
                raise PadimError("no image could be read: the model has no statistics")
            summary.model = os.fspath(model)
            summary.n_images = store.n_images
            finalized = finish(store, options, client)
            if options.holdout or store.attrs.get("holdout"):
                from .calibrate import calibrate_after_fit

                summary.calibration = calibrate_after_fit(store, summary.held_out, options, client=client,
                                                          weights=target.weights, extractor=target.extractor)
            return summary, finalized


def finish(store: ModelStore, options: FitOptions, client=None) -> bool:
    """Finalize ``store`` after a fit if asked (``options.finalize``) and needed (not finalized,
    or finalized with another eps or shrinkage); returns whether it is finalized."""
    from .finalize import finalize

    eps, shrinkage = eps_for(store.attrs, options.eps), shrinkage_for(store.attrs, options.shrinkage)
    stale = eps != store.attrs["eps"] or shrinkage != shrinkage_for(store.attrs, None)
    if options.finalize and (not store.attrs["finalized"] or stale):
        n = store.n_images
        if n < 2:
            raise PadimError(f"the statistics of {n} image{'s' * (n != 1)} are saved in {store.path}, but "
                             "finalize needs at least 2 images: fit more images into it (that fit finalizes it)")
        finalize(store, eps=eps, shrinkage=shrinkage, client=client)
    return bool(store.attrs["finalized"])


def recognised(paths: Sequence, store: ModelStore) -> tuple[list, list[bytes | None], int]:
    """Leave out the images the model holds that are recognised without reading them.

    An image whose cheap identity (:func:`padim_ooc.sources.identity`: path, size,
    mtime and inode of a file; URL, size and ETag of an object) is in the store's
    cache of identities, with a content digest that the ledger holds, is unchanged
    since it was folded in. Returns (the other paths, their identities taken now,
    before they are read (None where there is none), how many were left out).
    """
    from .sources import identity

    ids = [identity(p) for p in paths]
    table, digests = store.identities()
    if not len(table):
        return list(paths), ids, 0
    known = store.ledger()
    have = [k for k, i in enumerate(ids) if i is not None]
    query = np.frombuffer(b"".join(ids[k] for k in have), np.uint8).reshape(-1, 16).view("V16").ravel()
    at = np.minimum(np.searchsorted(table, query), len(table) - 1)
    hit = table[at] == query
    drop = {k for k, a, h in zip(have, at, hit) if h and bytes(digests[a]) in known}
    rest = [k for k in range(len(paths)) if k not in drop]
    return [paths[k] for k in rest], [ids[k] for k in rest], len(drop)


def fit_here(target: FitTarget, paths: list[Path], options: FitOptions,
             identities: Sequence[bytes | None] | None = None) -> FitSummary:
    """The fold of a one-process fit: the memory plan for this process, said once, then
    :func:`fold_images` over every image (``identities``: see :func:`fold_images`)."""
    extractor = target.get_extractor()
    budget = options.max_memory or default_budget(extractor.device)
    plan = memory_plan(target.config, options.batch_size, budget, options.fold)
    log.info(plan.describe())
    if options.progress:
        print(plan.describe(), file=sys.stderr, flush=True)
    summary = FitSummary(model=target.path)
    fold_images(target.store, extractor, paths, options, plan, summary, identities=identities)
    return summary


# ---- the loop -------------------------------------------------------------------------------
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


def memory_plan(config: ModelConfig | dict, batch_size: int, budget: int, fold: str = DEFAULT_FOLD) -> MemoryPlan:
    """The plan a fit of ``config``'s model (``grid``, ``dims`` and ``crop`` are used)
    with the ``fold`` mode (:data:`padim_ooc.welford.FOLDS`) makes for a memory ``budget`` in bytes."""
    config = ModelConfig.of(config)
    positions, dims = config.grid[0] * config.grid[1], config.dims
    return plan_memory(positions, dims, batch_size=batch_size, crop=config.crop, budget=budget,
                       fold_samples=fold_samples(positions, dims, batch_size), fold=fold)


class RunLedger:
    """Which images of a run are folded in: the one rule of every fit, one-process or sharded.

    An image is folded in once: not if the statistics hold it already (``known``: the
    model's ledger, counted ``already_seen``; ``own``: what a resumed partial store
    holds, counted nowhere again), not if an earlier shard keeps it (``claimed``,
    counted as a duplicate), not if the same content came earlier in this run (a
    duplicate). Unreadable images are skipped with a warning (or stop the run with
    ``on_error='fail'``). Those images are hashed but not decoded (``skip``).

    With a ``holdout`` fraction, a new image whose content digest
    :func:`padim_ooc.calibration.holdout_selected` picks is not folded in but
    recorded in ``summary.held_out`` (for calibration): the choice depends on the
    bytes only, so a resumed, incremental or sharded fit makes the same one.
    """

    def __init__(self, own: set[bytes], known: set[bytes] | None, claimed: frozenset, summary: FitSummary,
                 on_error: str, holdout: float = 0.0):
        self.known = own if known is None else known
        self.claimed = claimed
        self.seen = set(own) | set(self.known) | set(claimed)
        self.skip = frozenset(self.seen)
        self.summary, self.on_error = summary, on_error
        self.holdout = holdout

    def held_out(self, key: bytes) -> bool:
        from .calibration import holdout_selected

        return bool(self.holdout) and holdout_selected(key, self.holdout)

    def first_pass(self, paths, indices, digests, ok, errors, kept: dict) -> list[int]:
        """Rows of the batch to fold in; records the new images in ``kept`` (index -> digest)."""
        rows, row = [], 0
        for i, key, good, err in zip(indices, digests, ok, errors):
            if err is not None:
                self._bad_image(paths[i], err)
            elif not good:  # not decoded: held already, or an earlier shard keeps it
                if key in self.known:
                    self.summary.already_seen += 1
                elif key in self.claimed:
                    self.summary.duplicates += 1
            elif key in self.seen:
                self.summary.duplicates += 1
                row += 1
            elif self.held_out(key):  # kept for calibration, never folded in
                self.seen.add(key)
                self.summary.held_out.append((os.fsdecode(paths[i]), key))
                row += 1
            else:
                self.seen.add(key)
                kept[i] = key
                rows.append(row)
                row += 1
        return rows

    @staticmethod
    def later_pass(paths, indices, digests, ok, kept: dict) -> list[int]:
        """Rows of the images the first pass kept; an error if one of them changed since."""
        rows, row = [], 0
        for i, key, good in zip(indices, digests, ok):
            if i in kept:
                if not good or key != kept[i]:
                    raise PadimError(f"{display_path(paths[i])} changed or became unreadable during the fit; "
                                     "run the fit again (the model keeps its last checkpoint)")
                rows.append(row)
            if good:
                row += 1
        return rows

    def _bad_image(self, path: Path, err: str) -> None:
        name = display_path(path)
        if self.on_error == "fail":
            raise PadimError(f"bad image {name}: {err}")
        log.warning("skipped %s: %s", name, err)
        self.summary.skipped.append((name, err))


def fold_images(store: ModelStore, extractor: Extractor, paths: Sequence[Path], options: FitOptions,
                plan: MemoryPlan, summary: FitSummary, *, known: set[bytes] | None = None,
                claimed: frozenset = frozenset(), identities: Sequence[bytes | None] | None = None) -> None:
    """Fold the images of ``paths`` that the statistics do not hold into ``store``, checkpointing.

    One pass over the images per position block of ``plan``. With one block the
    whole state is in memory and a checkpoint is written every
    ``options.checkpoint_every`` images (:class:`CheckpointClock`). With several,
    the images go in segments of about that many (whole batches, so batches are
    composed as in one pass and the features are the same): every block loads its
    slice of the live state, folds the segment in and writes the slice into the
    next state; the switch to that state (with the segment's ledger) is the
    checkpoint. Counts go to ``summary``; ``known`` and ``claimed`` as in
    :class:`RunLedger` (default: the store's own ledger is what is known).
    ``identities`` (one per path, or None): the images' cheap identities, taken
    before they were read; each image read whole goes into the store's cache of
    identities with its digest in the next checkpoint (:func:`recognised`).
    Raises nothing for a run where no image could be read (the caller decides).
    """
    batch, device = options.batch_size, extractor.device
    ranges = plan.ranges()
    single = len(ranges) == 1
    summary.blocks = plan.blocks
    ledger = RunLedger(store.ledger(), known, claimed, summary, options.on_error, options.holdout)
    segment = max(1, len(paths)) if single else \
        -(-max(options.checkpoint_every or AUTO_CHECKPOINT_IMAGES, batch) // batch) * batch
    fold = fold_samples(extractor.positions, extractor.dims, batch)
    due = CheckpointClock(options.checkpoint_every)
    acc = store.load_moments(device=device) if single else None
    title = f"fit {Path(store.path).name}" + ("" if single else f" ({len(ranges)} passes)")
    with bar(title, len(paths) * len(ranges), enabled=options.progress) as advance:
        for first in range(0, len(paths), segment):
            part = paths[first:first + segment]
            dataset = ImageFiles(part, extractor.preprocess, skip=ledger.skip, max_bytes=options.max_image_bytes)
            kept: dict[int, bytes] = {}  # index into paths -> digest, decided in the first pass
            pending: list[bytes] = []  # one block: digests folded in since the last checkpoint
            seen: list[bytes] = []  # (identity, digest) records since the last checkpoint
            n0, target = store.n_images, None
            for b, (start, stop) in enumerate(ranges):
                if b and not kept:
                    advance(len(part) * (len(ranges) - b))
                    break
                if not single:
                    acc = store.load_moments(device=device, start=start, stop=stop)
                folder = Folder(acc, max_samples=fold, fold=options.fold)
                for indices, digests, images, ok, errors in loader(dataset, batch, workers=options.loader_workers,
                                                                    device=device.type):
                    indices = [first + i for i in indices]
                    if b == 0:
                        new: dict[int, bytes] = {}
                        rows = ledger.first_pass(paths, indices, digests, ok, errors, new)
                        kept.update(new)
                        if identities is not None:
                            seen.extend(identities[i] + key for i, key, err in zip(indices, digests, errors)
                                        if err is None and key is not None and identities[i] is not None)
                    else:
                        rows = ledger.later_pass(paths, indices, digests, ok, kept)
                    if rows:
                        if len(rows) < images.shape[0]:
                            images = images[rows]
                        # (P, b, d): one block, straight into the fold buffer; kept only if finite
                        x = extractor.embed_patches(images, out=folder.reserve(len(rows)) if single else None)
                        if b == 0:
                            check_finite_features(x, [paths[i] for i in new])
                        if single:
                            folder.commit(len(rows))
                            pending.extend(new.values())
                        else:
                            folder.add(x[start:stop])
                    if single and due(len(pending)):
                        folder.flush()
                        with due.timing():
                            store.checkpoint(acc, pending, seen)
                        summary.checkpoints += 1
                        pending, seen = [], []
                    advance(len(indices))
                folder.flush()
                if not single and kept:
                    if target is None:
                        target = store.begin_state()[0]
                    store.write_block(target, start, acc)
            summary.added += len(kept)
            if single and (pending or store.attrs["state"] is None and acc.n):
                store.checkpoint(acc, pending, seen)
                summary.checkpoints += 1
            elif not single and kept:
                digests = np.frombuffer(b"".join(kept.values()), dtype=np.uint8).reshape(-1, 16)
                store.commit_state(target, n0 + len(kept), digests, seen)
                summary.checkpoints += 1
            elif seen and store.attrs["state"] is not None:  # held images read again: only their identities
                store.add_identities(seen)


def check_finite_features(patches: torch.Tensor, paths: Sequence[Path]) -> None:
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


def shard_options(options: FitOptions) -> FitOptions:
    """The options a shard task runs with: no progress bar, decoding in the task, no cluster."""
    from .options import Cluster

    return dataclasses.replace(options, progress=False, loader_workers=0, cluster=Cluster())


__all__ = ["run_fit", "fold_images", "FitTarget", "FitSummary", "RunLedger", "memory_plan", "finish",
           "CheckpointClock", "shard_options"]
