"""Chunk-level I/O of the model store, and the checks that a chunk read is real.

Zarr reads a chunk that is not stored as its fill value (0), without a word.
In a padim_ooc store every chunk of an array marked ``COMPLETE_KEY`` is
written (every array padim_ooc writes is), so a missing chunk means damage, or
a writer that replaced the state while it was being read and deleted the old
one. Three checks catch it (:func:`open_checked` is where the rule lives):

- :func:`check_chunks`, when a marked array is opened: every expected chunk key
  is stored, and (local, uncompressed) has its exact size;
- :class:`CheckedStore`, under every read of a marked array (also the reads
  that Dask tasks do on workers, from pickled arrays): a chunk that is not there
  raises instead of reading as zeros. An array without the marker may lack
  all-zero chunks (written without ``write_empty_chunks``): they read as zeros;
- :func:`read_array`, after reading: the root still points at the array's group
  (any array opened by :func:`open_checked`).

Also here, because they are part of writing chunks safely: chunk-wise writes,
flushing to the disk, removing leftovers from a local store folder, and the test
hook :func:`pause_point` (named moments inside a write). Paths and URLs:
:mod:`padim_ooc.store.paths`.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import time
from typing import Any

import numpy as np
import zarr
from zarr.storage import WrapperStore

from ..errors import PadimError

ATTR_KEY = "padim_ooc"
# array attribute: every chunk of this array is stored (write_empty_chunks), so a missing one is damage
COMPLETE_KEY = "padim_ooc_all_chunks"
# test hook: "point:n[,point:n]" pauses the n-th time a write reaches ``point`` (see pause_point)
PAUSE_ENV = "PADIM_OOC_PAUSE_AT"
_pause_counts: dict[str, int] = {}


def pause_point(name: str) -> None:
    """A named moment inside a store write, where tests can stop the process.

    With ``PADIM_OOC_PAUSE_AT=checkpoint-written:3`` the third time a write
    reaches ``checkpoint-written`` the process writes ``name`` to the file
    named by ``PADIM_OOC_PAUSE_FILE`` (if set) and sleeps (``PADIM_OOC_PAUSE_SECONDS``,
    default 600), so that a test can kill it there. Points: ``chunk`` (after
    each chunk written), ``checkpoint-written`` (new state and ledger segment
    on disk, not switched to), ``checkpoint-switched`` (switched, old state
    not yet removed), ``final-written`` (precision written, not switched to).
    Without the variable this does nothing.
    """
    spec = os.environ.get(PAUSE_ENV)
    if not spec:
        return
    _pause_counts[name] = _pause_counts.get(name, 0) + 1
    for item in spec.split(","):
        point, _, nth = item.strip().partition(":")
        if point == name and _pause_counts[name] == int(nth or 1):
            marker = os.environ.get("PADIM_OOC_PAUSE_FILE")
            if marker:
                with open(marker, "w") as f:
                    f.write(f"{name}:{_pause_counts[name]} pid={os.getpid()}\n")
            time.sleep(float(os.environ.get("PADIM_OOC_PAUSE_SECONDS", "600")))


def live_names(root_attrs: dict[str, Any]) -> set[str]:
    """The groups and ledger arrays the root attributes point at (``state-...``, ``ledger/...``)."""
    return ({root_attrs.get("state"), root_attrs.get("final")} - {None}) | {
        f"ledger/{k}" for k in root_attrs.get("ledger") or []}


def _is_live(array_path: str, live: set[str]) -> bool:
    return array_path in live or array_path.split("/")[0] in live


def _is_chunk_key(key: str) -> bool:
    return "/c/" in key or key.endswith("/c")


class CheckedStore(WrapperStore):
    """A zarr store (wrapped) that knows which model it reads, for the liveness checks.

    With ``complete=True`` (an array all of whose chunks are stored) a read of
    a missing chunk raises instead of giving zeros. It pickles with the store
    it wraps, so arrays handed to Dask workers keep the check. ``model`` is the
    store's path, for the messages.
    """

    def __init__(self, store, model: str, complete: bool = True):
        super().__init__(store)
        self.model = model
        self.complete = complete

    def _with_store(self, store) -> "CheckedStore":
        return type(self)(store, self.model, self.complete)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CheckedStore) and self._store == other._store

    async def get(self, key: str, prototype, byte_range=None):
        buf = await self._store.get(key, prototype, byte_range)
        if buf is None and self.complete and _is_chunk_key(key):
            array, _, chunk = key.partition("/c/") if "/c/" in key else (key[:-2], "", "c")
            if not await self._still_live(array, prototype=prototype):
                raise self.changed()
            raise PadimError(f"the model {self.model} is damaged: chunk c/{chunk} of {array} is missing")
        return buf

    def changed(self) -> PadimError:
        return PadimError(f"the model {self.model} changed while it was being read (a writer "
                          "replaced its state): run the command again")

    async def _still_live(self, *array_paths: str, prototype=None) -> bool:
        """Whether the root attributes still point at the groups of all ``array_paths``
        (one read of the root metadata, however many paths)."""
        from zarr.core.buffer import default_buffer_prototype

        try:
            raw = await self._store.get("zarr.json", prototype or default_buffer_prototype())
            live = live_names(json.loads(raw.to_bytes())["attributes"][ATTR_KEY])
        except Exception:  # the root itself is unreadable: not the state that was opened
            return False
        return all(_is_live(path, live) for path in array_paths)

    def still_live(self, *array_paths: str) -> bool:
        return zarr.core.sync.sync(self._still_live(*array_paths))


def open_checked(group: zarr.Group, path: str, model: str) -> zarr.Array:
    """The array ``path`` of ``group``, read through a :class:`CheckedStore`.

    The one place that decides what is checked: an array marked
    ``COMPLETE_KEY`` must have every chunk stored, now (:func:`check_chunks`)
    and at every later read (a missing chunk raises); an unmarked one reads a
    chunk that is not stored as zeros. Both get the liveness check of
    :func:`read_array`.
    """
    store = CheckedStore(group.store, model, complete=False)
    arr = zarr.open_array(store, path=path, mode="r")
    if arr.attrs.get(COMPLETE_KEY):
        check_chunks(arr, model)
        store.complete = True  # this wrapper is the array's own: from now on, reads refuse a missing chunk
    return arr


def check_chunks(arr: zarr.Array, model: str) -> None:
    """Every chunk of ``arr`` is stored (a missing one was deleted: zarr would read it as
    zeros) and, in a local uncompressed store, has its exact size (a short one was cut).

    Compares the chunk keys the array must have with those stored (a stray
    file does not stand in for a missing chunk).
    """
    expected = [arr.metadata.encode_chunk_key(c) for c in itertools.product(*map(range, arr.cdata_shape))]
    inner = arr.store._store if isinstance(arr.store, CheckedStore) else arr.store
    local = isinstance(inner, zarr.storage.LocalStore)
    if local:
        folder = os.path.join(str(inner.root), arr.path)
        size = int(np.prod(arr.chunks)) * arr.dtype.itemsize if not arr.compressors and not arr.filters else None
        missing = 0
        for key in expected:
            try:
                stored = os.stat(os.path.join(folder, key)).st_size
            except FileNotFoundError:
                missing += 1
                continue
            if size is not None and stored != size:
                raise PadimError(f"the model {model} is damaged: chunk {key} of {arr.path} "
                                 f"has {stored} bytes instead of {size}")
    else:
        async def listing() -> set[str]:
            return {k async for k in inner.list_prefix(arr.path + "/")}

        try:
            keys = zarr.core.sync.sync(listing())
        except Exception as err:  # pragma: no cover - unreadable listing
            raise PadimError(f"the model {model} is damaged: cannot list {arr.path} "
                             f"({type(err).__name__}: {err})") from None
        missing = sum(f"{arr.path}/{k}" not in keys for k in expected)
    if missing:
        raise PadimError(f"the model {model} is damaged: {missing} of {len(expected)} "
                         f"chunks of {arr.path} are missing")


def read_array(arr: zarr.Array, rows: slice = slice(None), *, check_live: bool = True) -> np.ndarray:
    """Read an array (or ``rows`` of its first axis), with a clear error if a chunk is damaged.

    An array opened by the model store (:func:`open_checked`) refuses a missing
    chunk while it reads (if marked complete), and after the read checks that
    the root still points at it: data of a state a writer replaced meanwhile is
    never returned. ``check_live=False`` skips that check (one read of the root
    metadata), for a caller that reads many arrays and checks them all at once
    afterwards with ``CheckedStore.still_live(*paths)``.
    """
    try:
        out = arr[rows] if arr.ndim else arr[...]
    except PadimError:
        raise
    except Exception as err:
        raise PadimError(f"the model store is damaged: cannot read {arr.path} "
                         f"({type(err).__name__}: {err})") from None
    if check_live and isinstance(arr.store, CheckedStore) and not arr.store.still_live(arr.path):
        raise arr.store.changed()
    expected = (len(range(*rows.indices(arr.shape[0]))),) + arr.shape[1:] if arr.ndim else ()
    if arr.shape and arr.shape[0] and out.shape != expected:  # pragma: no cover - defensive
        raise PadimError(f"the model store is damaged: {arr.path} has the wrong shape")
    return out


def write_array(arr: zarr.Array, data: np.ndarray) -> None:
    """Write a whole array, one chunk of rows (first axis) at a time.

    An ``OSError`` (full disk, I/O error) propagates: the caller's
    ``ModelStore.switching`` turns it into a clear error.
    """
    rows = arr.chunks[0] if arr.ndim else 1
    if arr.ndim == 0 or arr.shape[0] == 0:
        arr[...] = data
        return
    for start in range(0, arr.shape[0], rows):
        arr[start:start + rows] = data[start:start + rows]
        pause_point("chunk")


def wait_for_zarr_writes(timeout: float = 30.0) -> None:
    """Wait until the writes zarr still has in flight have ended.

    Zarr writes an array's metadata and its parent groups' metadata concurrently;
    when one write fails, the others go on after the error reached us, and could
    recreate a folder just removed.
    """
    async def drain() -> None:
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if others:
            await asyncio.wait(others, timeout=timeout)

    zarr.core.sync.sync(drain())


def fsync(path: str) -> None:
    """Flush the file or folder ``path`` to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(top: str) -> None:
    """Flush every file and folder under ``top`` (if it exists), and its parent folder."""
    for folder, _dirs, files in os.walk(top):
        for f in files:
            fsync(os.path.join(folder, f))
        fsync(folder)
    if os.path.isdir(top):
        fsync(os.path.dirname(top))


def remove_leftovers(root: str, live: set, ledger_keep: set) -> None:
    """In the local store ``root``, remove what the root attributes do not point at:
    ``state-*``/``final-*`` folders not in ``live``, ledger segments not in
    ``ledger_keep``, temporary ``*.partial`` files (by listing: also half-deleted groups)."""
    for key in os.listdir(root):
        full = os.path.join(root, key)
        if key.endswith(".partial") and os.path.isfile(full):
            os.unlink(full)
        elif key.startswith(("state-", "final-")) and key not in live and os.path.isdir(full) \
                and not os.path.islink(full):
            shutil.rmtree(full, ignore_errors=True)
    ledger_dir = os.path.join(root, "ledger")
    if os.path.isdir(ledger_dir) and not os.path.islink(ledger_dir):  # never through a link
        for key in os.listdir(ledger_dir):
            full = os.path.join(ledger_dir, key)
            if key.endswith(".partial") and os.path.isfile(full):
                os.unlink(full)
            elif key != "zarr.json" and key not in ledger_keep and os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full, ignore_errors=True)


def empty_folder(root: str, keep: set) -> None:
    """Remove everything in the folder ``root`` but the names in ``keep`` (best effort)."""
    for key in os.listdir(root):
        full = os.path.join(root, key)
        if key in keep:
            continue
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full, ignore_errors=True)
        else:
            try:
                os.unlink(full)
            except OSError:
                pass
