"""Merging model stores fitted on disjoint image sets, chunk by chunk.

Each part holds ``(n, mean, m2)`` for every position; the merged statistics
are Chan's formula applied along a binary tree of the parts (pairs, then pairs
of pairs, ...), one position chunk at a time. A chunk task reads that chunk of
the parts one after the other and keeps at most one partial result per tree
level, so memory is a few chunks whatever the number of parts and P x d x d.
Chunk tasks are independent: they run on Dask threads or on a cluster.

The result is written as a new state of the output store and switched to in
one write, with the union of the parts' ledgers: a merge never leaves a
half-written model, and refuses parts that share an image (Chan's merge would
count it twice) or were fitted with different configurations.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import dask
import numpy as np
import torch
import zarr

from .config import short
from .errors import PadimError
from .parallel.tasks import compute
from .store import ModelStore, check_shareable, read_array, shared_path, store_exists
from .welford import Moments, merge_

@dataclass(frozen=True)
class Source:
    """One input of a merge: a store's live statistics (zarr arrays) and its count."""

    path: str
    n: int
    mean: zarr.Array
    m2: zarr.Array


def check_same_config(stores: Sequence[ModelStore]) -> None:
    """A clear error naming the first field where a store's features differ from the first one's
    (:meth:`padim_ooc.config.ModelConfig.diff`)."""
    ref = stores[0]
    for other in stores[1:]:
        differ = ref.config.diff(other.config)
        if differ:
            key = differ[0]
            raise PadimError(f"cannot merge {other.path} with {ref.path}: their {key} differs "
                             f"({short(getattr(other.config, key))} vs {short(getattr(ref.config, key))}); "
                             "only stores fitted with the same configuration can be merged")


def check_disjoint(stores: Sequence[ModelStore]) -> list[np.ndarray]:
    """Each store's ledger digests, (k, 16) uint8; an error if two stores share an image."""
    digests = [s.ledger_digests() for s in stores]
    sizes = [len(d) for d in digests]
    if sum(sizes) < 2:
        return digests
    allg = np.ascontiguousarray(np.concatenate(digests)).view(np.uint64)  # (N, 2)
    owner = np.repeat(np.arange(len(stores)), sizes)
    order = np.lexsort((allg[:, 1], allg[:, 0]))
    same = np.flatnonzero((allg[order[1:]] == allg[order[:-1]]).all(axis=1))
    if len(same):
        a, b = owner[order[same[0]]], owner[order[same[0] + 1]]
        first, second = (a, b) if a <= b else (b, a)
        pair = np.sort(np.stack([owner[order[same]], owner[order[same + 1]]]), axis=0)
        count = int(((pair[0] == first) & (pair[1] == second)).sum())
        where = (f"{stores[first].path} and {stores[second].path} both hold" if first != second
                 else f"{stores[first].path} holds twice")
        raise PadimError(f"cannot merge: {where} {count} of the same images (same file content); "
                         "merging would count them twice: fit the parts on disjoint image sets")
    return digests


def tree_merge(loaders) -> Moments:
    """Chan-merge the states that ``loaders`` (callables) return, along a binary tree.

    States are loaded one at a time; at most one partial result per tree level
    is kept (like a binary counter), so memory is O(log k) states for k inputs.
    The left operand always holds the earlier inputs.
    """
    stack: list[tuple[int, Moments]] = []
    for load in loaders:
        level, item = 0, load()
        while stack and stack[-1][0] == level:
            _, left = stack.pop()
            item = merge_(left, item)
            level += 1
        stack.append((level, item))
    if not stack:
        raise ValueError("nothing to merge")
    _, result = stack.pop()
    while stack:
        _, left = stack.pop()
        result = merge_(left, result)
    return result


def merge_chunk(sources: Sequence[Source], start: int, stop: int,
                mean_out: zarr.Array, m2_out: zarr.Array) -> int:
    """Merge positions ``start:stop`` of every source and write them; returns the count.

    Reads go through :func:`read_array`: a chunk of a part deleted meanwhile is
    an error, never zeros (also on a worker).
    """
    rows = slice(start, stop)

    def loader(src: Source):
        return lambda: Moments(src.n, torch.from_numpy(np.asarray(read_array(src.mean, rows), np.float64)),
                               torch.from_numpy(np.asarray(read_array(src.m2, rows), np.float64)))

    merged = tree_merge(loader(s) for s in sources)
    mean_out[start:stop] = merged.mean.numpy()
    m2_out[start:stop] = merged.m2.numpy()
    return merged.n


def _open_inputs(paths: list[str], model: str, given: ModelStore | None):
    """(the parts, the output if it exists, the parts' digests), checked: same configuration,
    disjoint ledgers, something to merge. The parts are opened read-only."""
    inputs = [ModelStore.open(p) for p in paths]
    out = given
    if out is None and store_exists(model):
        out = ModelStore.open(model, writable=True)
    try:
        stores = ([out] if out is not None else []) + inputs
        for s in stores:
            s.refuse_scorer("merge")
        check_same_config(stores)
        digests = check_disjoint(stores)
        if not sum(s.n_images for s in inputs):
            raise PadimError("nothing to merge: the parts hold no statistics")
    except BaseException:
        if out is not None and given is None:
            out.close()
        raise
    return inputs, out, digests


def merge_stores(parts: Sequence[str | os.PathLike], model: str | os.PathLike | ModelStore, *,
                 client=None, scheduler: str | None = "threads") -> dict:
    """Merge the statistics of the stores ``parts`` into the store at ``model``.

    If ``model`` exists, its own statistics are one of the inputs (the parts are
    added to it); otherwise it is created with the parts' configuration. The
    merged state replaces the model's in one atomic switch; the model is left
    unfinalized. The inputs are checked before anything is written; a merge
    that fails leaves the output's previous state live (a new output is removed).

    Parameters
    ----------
    parts : sequence of paths or URLs
        Model stores fitted on disjoint image sets with the same configuration.
    model : path or URL, or a ModelStore opened writable
        The output store.
    client : distributed.Client, optional
        Run the chunk tasks on this cluster (its workers must reach every store).
    scheduler : str or None
        Dask scheduler for the chunk tasks when there is no ``client``.

    Returns
    -------
    dict with ``model``, ``parts``, ``added`` (images from the parts) and ``n_images``.
    """
    paths = [shared_path(p) for p in parts]
    given = model if isinstance(model, ModelStore) else None
    model = given.path if given is not None else shared_path(model)
    if not paths:
        raise PadimError("no parts to merge")
    if len(set(paths)) != len(paths):
        raise PadimError("a part is listed twice")
    if model in paths:
        raise PadimError(f"the output {model} is also listed as a part; an existing output already "
                         "takes part in the merge, list only the other stores")
    if client is not None:
        check_shareable(model, *paths, action="merge")
    inputs, out, digests = _open_inputs(paths, model, given)
    stores = ([out] if out is not None else []) + inputs
    created = out is None
    try:
        if created:
            out = ModelStore.create(model, inputs[0].config, inputs[0].projection())
        live = [s for s in stores if s.n_images > 0]
        sources = [Source(s.path, s.n_images, s.mean_array(), s.m2_array()) for s in live]
        name, mean_out, m2_out = out.begin_state()
        positions, chunk = mean_out.shape[0], out.attrs["chunk_positions"]
        tasks = [dask.delayed(merge_chunk, pure=False)(sources, start, min(start + chunk, positions),
                                                       mean_out, m2_out)
                 for start in range(0, positions, chunk)]
        with out.switching(name):  # a failed chunk write: one line naming the store, the new state removed
            counts = compute(tasks, client=client, scheduler=scheduler)
        total = sum(s.n_images for s in live)
        if any(c != total for c in counts):  # pragma: no cover - defensive
            raise PadimError("internal error: the merged chunks disagree on the image count")
        new = [d for s, d in zip(stores, digests) if s is not out]
        seen = [s.identity_records() for s in inputs]  # the parts' caches of identities come along
        out.commit_state(name, total, np.concatenate(new) if new else np.zeros((0, 16), np.uint8),
                         np.concatenate(seen) if seen else np.zeros((0, 32), np.uint8))
        return {"model": model, "parts": len(paths), "added": sum(s.n_images for s in inputs),
                "n_images": out.n_images}
    except BaseException:
        if created and out is not None:  # a new output that got nothing: leave no store behind
            out.remove_if_empty()
        raise
    finally:
        if out is not None and out is not given:
            out.close()  # the writer's lock goes now, not when the traceback is freed
        for s in inputs:
            s.close()


__all__ = ["merge_stores", "tree_merge", "merge_chunk", "check_same_config", "check_disjoint"]
