"""The model store: a Zarr v3 group whose root attributes point at the live state.

Layout::

    M.zarr/zarr.json            root attributes {"padim_ooc": {...}}: config, counts, pointers
    M.zarr/state-000007/mean    (P, d) float64   running mean
    M.zarr/state-000007/m2      (P, d, d) float64 sum of outer products of deviations
    M.zarr/ledger/000003        (k, 16) uint8    digests of the images folded in, per checkpoint
    M.zarr/final-000007-2/precision  (P, d, d) float32  after finalize (of state 7; the 2nd finalization)
    M.zarr/final-000007-2/mean       (P, d) float32
    M.zarr/embedding/projection      (F, d) float64  an orthogonal embedding's projection (written once)

A *scorer* (root attribute ``kind: "scorer"``, written by :mod:`padim_ooc.compact`)
holds only the root attributes, ``embedding/`` and one ``final-*`` group (its
precision float32 or float16, attribute ``precision_dtype``): no state, no
ledger. It is scored, evaluated and calibrated like a model; fit, merge and
finalize refuse it (:meth:`ModelStore.refuse_scorer`).

A checkpoint writes a *new* state group (and a new ledger segment), then
rewrites the root attributes in one write (Zarr's local store writes a
temporary file and renames it, so the switch is atomic), then deletes the
old state. Whenever the process dies, the root points at a complete state.
Groups that the root does not point at are leftovers and are removed the next
time the store is opened for writing.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
import weakref
from contextlib import contextmanager
from typing import Any, Iterable

import numpy as np
import torch
import zarr

from .. import __version__
from . import lock
from .chunks import (ATTR_KEY, COMPLETE_KEY, empty_folder, fsync, live_names, open_checked, pause_point, read_array,
                     remove_leftovers, sync_tree, wait_for_zarr_writes, write_array)
from .paths import is_url as _is_url, shared_path
from .schema import check_array, check_attrs, check_no_links
from ..config import ModelConfig
from ..errors import PadimError
from ..extractor import projection_digest
from ..welford import Moments

SCHEMA_VERSION = 1
PROJECTION = "embedding/projection"  # the (F, d) float64 projection of an orthogonal embedding
CHUNK_TARGET_BYTES = 32 * 2**20
# the writer's lock file sits in the store folder; zarr warns about any file that is no Zarr node
warnings.filterwarnings("ignore", message=r"Object at \.padim_ooc\.lock is not recognized")


def positions_per_chunk(dims: int, target: int = CHUNK_TARGET_BYTES) -> int:
    """Positions per chunk so that one float64 (d, d) chunk is about ``target`` bytes."""
    return max(1, target // (dims * dims * 8))


def _checked_projection(config: ModelConfig, projection: np.ndarray | None) -> np.ndarray | None:
    """``projection`` as float64, if ``config`` is orthogonal and it is the one ``config`` records."""
    if config.embedding != "orthogonal":
        if projection is not None:
            raise PadimError("a projection was given for a model whose embedding is not orthogonal")
        return None
    if projection is None:
        raise PadimError("an orthogonal model needs its projection (the extractor's) to be created")
    projection = np.ascontiguousarray(projection, dtype=np.float64)
    if projection_digest(projection) != config.projection_digest:
        raise PadimError("the projection is not the one the configuration records (projection_digest)")
    return projection


def new_array(group: zarr.Group, name: str, shape, dtype, chunk_positions: int, *,
              data: np.ndarray | None = None) -> zarr.Array:
    """A new array ``group/name`` (overwriting a leftover of that name), chunked by
    ``chunk_positions`` positions, every chunk stored even if all zero.

    Write it through the returned object (or a pickled copy of it): it carries
    ``write_empty_chunks``, so that a chunk missing later is damage.
    """
    chunks = (min(chunk_positions, max(1, shape[0])),) + tuple(shape[1:])
    arr = group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, compressors=None, fill_value=0,
                             overwrite=True, config={"write_empty_chunks": True}, attributes={COMPLETE_KEY: True})
    if data is not None:
        write_array(arr, data)
    return arr


def write_projection(path: str, projection: np.ndarray) -> None:
    """Write the (F, d) float64 ``projection`` of an orthogonal embedding as ``path/embedding/projection``
    (one chunk), before the store's root exists: the root is what makes the store, so a store is never
    seen without its projection."""
    group = zarr.create_group(f"{path.rstrip('/')}/{PROJECTION.split('/')[0]}", overwrite=True,
                              **zarr_options(path))
    new_array(group, PROJECTION.split("/")[1], projection.shape, "float64", projection.shape[0], data=projection)


def zarr_options(path: str) -> dict:
    """Extra arguments zarr needs to write at ``path``: file:// URLs must create their folders."""
    return {"storage_options": {"auto_mkdir": True}} if path.startswith("file://") else {}


def store_exists(path: str | os.PathLike) -> bool:
    """Whether a padim_ooc store is at ``path``.

    Also True where the root metadata is there but unreadable (a damaged
    model): opening it then says so, instead of taking it for a free path.
    """
    path = os.fspath(path)
    if not _is_url(path) and not os.path.exists(os.path.join(path, "zarr.json")):
        return False
    try:
        group = zarr.open_group(path, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return False
    except Exception:  # there, but damaged: ModelStore.open gives the clear error
        return True
    return ATTR_KEY in group.attrs


def _clear_url(path: str) -> None:
    """Remove what a failed creation left at the URL ``path``, but the writer's lock object."""
    import fsspec

    fs, inner = fsspec.core.url_to_fs(path)
    try:
        fs.invalidate_cache()
        keys = [k for k in fs.find(inner) if not k.endswith("/" + lock.LOCK_NAME)]
    except FileNotFoundError:
        return
    if keys:
        fs.rm(keys)


class ModelStore:
    """A padim_ooc model store on disk (or at any fsspec URL zarr accepts)."""

    def __init__(self, group: zarr.Group, path: str, writable: bool):
        self.group = group
        self.path = path
        self.writable = writable
        self.attrs = self._read_attrs()
        self._unlock = None
        self._final: tuple[str, tuple[zarr.Array, zarr.Array]] | None = None

    def _hold_lock(self) -> "ModelStore":
        # the writer's lock (taken before opening) is given back by close() or when this object goes
        if lock.held(self.path):
            self._unlock = weakref.finalize(self, lock.release, self.path)
        return self

    def close(self) -> None:
        """Give back the writer's lock (writable stores); reading attributes still works."""
        if self._unlock is not None:
            self._unlock()

    def __enter__(self) -> "ModelStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- opening -------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, config: ModelConfig | dict[str, Any],
               projection: np.ndarray | None = None) -> "ModelStore":
        """A new, empty store for a fitted record ``config`` (an extractor's); fails if one exists.

        ``projection``: the (F, d) float64 projection of an orthogonal embedding
        (``Extractor.projection``, or another store's :meth:`projection`), required
        for one and written as ``embedding/projection`` before the root attributes:
        a store is never seen without it.

        Takes the writer's lock (see :mod:`padim_ooc.lock`) for as long as the
        returned object lives (or until :meth:`close`).
        """
        path = shared_path(path)  # absolute: arrays pickled to workers must not depend on their cwd
        locked = lock.acquire(path, lock.default_command())
        try:
            store = cls._create(path, config, projection)
            return store._hold_lock() if locked else store
        except BaseException:
            if locked:
                lock.release(path)
            raise

    @classmethod
    def _create(cls, path: str, config: ModelConfig | dict[str, Any],
                projection: np.ndarray | None = None) -> "ModelStore":
        if not _is_url(path) and os.path.exists(path):
            names = set(os.listdir(path)) - {lock.LOCK_NAME}
            # a creation that was killed: temporary files, a projection without the root
            partial = {n for n in names if n.endswith(".partial")
                       or (n == "embedding" and "zarr.json" not in names)}
            if names - partial:
                raise PadimError(f"{path} exists and is not a padim_ooc model; choose another --model path")
            for name in partial:
                full = os.path.join(path, name)
                shutil.rmtree(full) if os.path.isdir(full) and not os.path.islink(full) else os.unlink(full)
        config = ModelConfig.of(config)
        projection = _checked_projection(config, projection)
        attrs = {
            "schema_version": SCHEMA_VERSION,
            "library_version": __version__,
            **config.to_attrs(),
            "n_images": 0,
            "seq": 0,
            "state": None,
            "ledger": [],
            "finalized": False,
            "final": None,
            "finals": 0,
            "eps": None,
            "chunk_positions": positions_per_chunk(config.dims),
        }
        if _is_url(path):
            _clear_url(path)
        try:  # group and attributes in one write: a store is never seen without its attributes
            if projection is not None:  # before the root, which is the switch
                write_projection(path, projection)
                if not _is_url(path):
                    sync_tree(os.path.join(path, PROJECTION.split("/")[0]))
            group = zarr.create_group(path, overwrite=False, attributes={ATTR_KEY: attrs},
                                      **zarr_options(path))
        except OSError as err:
            raise PadimError(f"cannot create the model store {path}: {err.strerror or err}") from None
        return cls(group, path, writable=True)

    @classmethod
    def open(cls, path: str | os.PathLike, *, writable: bool = False) -> "ModelStore":
        """Open an existing store; a clear error if it is missing, foreign or too new.

        ``writable=True`` takes the writer's lock (see :mod:`padim_ooc.lock`)
        for as long as the returned object lives (or until :meth:`close`), and
        removes what an interrupted write left behind.
        """
        path = shared_path(path)  # absolute: arrays pickled to workers must not depend on their cwd
        if not _is_url(path) and not os.path.exists(path):
            raise PadimError(f"model not found: {path}")
        if not _is_url(path):
            check_no_links(path)  # before anything is read or written through a link
        locked = writable and lock.acquire(path, lock.default_command())
        try:
            try:
                group = zarr.open_group(path, mode="r+" if writable else "r", **zarr_options(path))
            except Exception as err:
                raise PadimError(f"cannot open the model {path}: {type(err).__name__}: {err}") from None
            store = cls(group, path, writable)
            if writable:
                store.collect_garbage()
        except BaseException:
            if locked:
                lock.release(path)
            raise
        return store._hold_lock() if locked else store

    def _read_attrs(self) -> dict[str, Any]:
        """The root attributes, checked whole (:func:`padim_ooc.store.schema.check_attrs`)."""
        return check_attrs(self.group.attrs.asdict().get(ATTR_KEY), self.path, SCHEMA_VERSION)

    def _write_attrs(self, **changes: Any) -> None:
        if not self.writable:
            raise PadimError(f"{self.path} is open read-only")
        attrs = {**self.attrs, **changes}
        json.dumps(attrs)  # fail before writing if something is not JSON
        self.group.attrs[ATTR_KEY] = attrs
        self.attrs = attrs

    # ---- reading -------------------------------------------------------
    @property
    def n_images(self) -> int:
        return int(self.attrs["n_images"])

    @property
    def positions(self) -> int:
        """P = h * w, the positions of the feature grid."""
        return self.attrs["grid"][0] * self.attrs["grid"][1]

    @property
    def is_scorer(self) -> bool:
        """Whether this is a scoring-only store (``padim-ooc compact``): final arrays, no statistics."""
        return self.attrs.get("kind") == "scorer"

    def refuse_scorer(self, action: str) -> None:
        """One line if this is a scorer: ``action`` (e.g. "extend") needs the running statistics
        (mean, m2, ledger), which a scorer does not keep."""
        if self.is_scorer:
            raise PadimError(f"{self.path} is a scoring-only model (padim-ooc compact): it holds no statistics "
                             f"to {action}; {action} the source model it was compacted from")

    @property
    def config(self) -> ModelConfig:
        """The record of the configuration the model was fitted with."""
        return ModelConfig.from_attrs(self.attrs)

    def projection(self) -> np.ndarray | None:
        """ndarray of shape (F, d), float64: the projection of an orthogonal embedding
        (``embedding/projection``, checked against the stored digest); None for a random one."""
        if self.config.embedding != "orthogonal":
            return None
        group, name = PROJECTION.split("/")
        w = read_array(self._array(group, name), check_live=False)
        if projection_digest(w) != self.attrs["projection_digest"]:
            raise PadimError(f"the model {self.path} is damaged: {PROJECTION} does not match its "
                             f"digest {self.attrs['projection_digest']}")
        return w

    def _array(self, group: str | None, name: str) -> zarr.Array:
        """The live array ``group/name``, checked (:func:`padim_ooc.chunks.open_checked`):
        its chunks are all there, and reading it raises (not zeros) for a chunk deleted since."""
        if group is None:
            self.refuse_scorer("read")
            raise PadimError(f"the model {self.path} has no statistics yet: fit it first")
        try:
            arr = open_checked(self.group, f"{group}/{name}", self.path)
        except (KeyError, FileNotFoundError):
            raise PadimError(f"the model {self.path} is damaged: {group}/{name} is missing") from None
        except Exception as err:  # damaged metadata (cut short, not JSON, not an array)
            raise PadimError(f"the model {self.path} is damaged: cannot read {group}/{name} "
                             f"({type(err).__name__}: {err})") from None
        check_array(arr, self.attrs, group, name, self.path)
        return arr

    def mean_array(self) -> zarr.Array:
        return self._array(self.attrs["state"], "mean")

    def m2_array(self) -> zarr.Array:
        return self._array(self.attrs["state"], "m2")

    def final_arrays(self) -> tuple[zarr.Array, zarr.Array]:
        """(mean float32 (P, d), precision (P, d, d)) of a finalized model: the precision is
        float32, or float16 in a scorer compacted with ``--float16`` (cast when read: :class:`Model`)."""
        if not self.attrs["finalized"]:
            raise PadimError(f"the model {self.path} is not finalized: run `padim-ooc finalize {self.path}` first")
        name = self.attrs["final"]
        if self._final is None or self._final[0] != name:  # opened and checked once per finalization
            self._final = (name, (self._array(name, "mean"), self._array(name, "precision")))
        return self._final[1]

    def load_moments(self, *, device: str | torch.device = "cpu", start: int = 0,
                     stop: int | None = None) -> Moments:
        """The running statistics of positions ``start:stop`` (default all) in memory
        (float64), or an empty state."""
        positions, dims = self.positions, self.attrs["dims"]
        rows = slice(start, positions if stop is None else min(stop, positions))
        if self.attrs["state"] is None:
            return Moments.zeros(rows.stop - rows.start, dims, device=device)
        mean = torch.from_numpy(read_array(self.mean_array(), rows))
        m2 = torch.from_numpy(read_array(self.m2_array(), rows))
        return Moments(self.n_images, mean.to(device), m2.to(device))

    def _ledger_parts(self) -> list[np.ndarray]:
        """The ledger segments, each (k, 16) uint8. The root is read once after all of
        them (not once per segment): still pointing at every segment, or an error."""
        arrays = [self._array("ledger", name) for name in self.attrs["ledger"]]
        parts = [read_array(arr, check_live=False) for arr in arrays]
        if arrays and not arrays[0].store.still_live(*(arr.path for arr in arrays)):
            raise arrays[0].store.changed()
        return parts

    def ledger(self) -> set[bytes]:
        """Digests of every image accumulated so far."""
        return {bytes(r) for rows in self._ledger_parts() for r in rows}

    def identities(self) -> tuple[np.ndarray, np.ndarray]:
        """The cache of cheap identities (:func:`padim_ooc.sources.identity`) of images read
        before: (identities sorted, as an ndarray of shape (k,) of 16-byte void, and their
        content digests, ndarray of shape (k, 16) uint8). Empty for a store written before
        the cache existed (root attribute ``seen`` absent)."""
        rows = self.identity_records()
        ids = np.ascontiguousarray(rows[:, :16]).view("V16").ravel()
        order = np.argsort(ids, kind="stable")
        return ids[order], rows[order, 16:]

    def identity_records(self) -> np.ndarray:
        """ndarray of shape (k, 32), uint8: the cache of identities as stored (identity, digest)."""
        names = self.attrs.get("seen") or []
        parts = [read_array(self._array("seen", name), check_live=False) for name in names]
        return np.concatenate(parts) if parts else np.zeros((0, 32), np.uint8)

    def ledger_digests(self) -> np.ndarray:
        """ndarray of shape (n_digests, 16), uint8: every ledger digest, segment after segment."""
        parts = self._ledger_parts()
        return np.concatenate(parts) if parts else np.zeros((0, 16), np.uint8)

    def calibration(self):
        """The stored :class:`padim_ooc.calibration.Calibration` (root attribute ``calibration``,
        beside the statistics), or None for a model never calibrated."""
        record = self.attrs.get("calibration")
        if record is None:
            return None
        from ..calibration import Calibration

        return Calibration.from_attrs(record)

    def write_calibration(self, calibration, **changes: Any) -> None:
        """Store ``calibration`` (a Calibration, or None to remove it) in one attribute write,
        with other root attributes ``changes`` (e.g. the hold-out record, ``holdout``)."""
        self._write_attrs(calibration=None if calibration is None else calibration.to_attrs(), **changes)

    def _stale_calibration(self) -> dict:
        """The attribute change that marks a stored calibration stale (the statistics it was
        computed against are being replaced), or nothing without a calibration."""
        record = self.attrs.get("calibration")
        if not record or record.get("stale"):
            return {}
        return {"calibration": {**record, "stale": True}}

    # ---- writing -------------------------------------------------------
    def _new_array(self, name: str, data: np.ndarray | None, shape, dtype, chunk_positions: int):
        """A new array of this store (:func:`new_array`)."""
        return new_array(self.group, name, shape, dtype, chunk_positions, data=data)

    @contextmanager
    def switching(self, *new: str):
        """Around writing ``new`` groups and switching to them: an I/O error (full disk,
        quota, ...) becomes one clear line naming the store. On any error what was
        written is removed (best effort) unless the store already points at it; the
        previous state stays the live one."""
        try:
            yield
        except OSError as err:
            self._discard(new)
            what = f"{self.n_images} images" if self.attrs["state"] else "no statistics yet"
            raise PadimError(f"cannot write the model store {self.path}: {err.strerror or err}; "
                             f"the previous checkpoint ({what}) is intact") from None
        except Exception:
            self._discard(new)
            raise

    def _discard(self, names: Iterable[str]) -> None:
        try:
            wait_for_zarr_writes()
            keep = live_names(zarr.open_group(self.path, mode="r").attrs.asdict()[ATTR_KEY])
            for name in names:
                if not name or name in keep:
                    continue
                if not _is_url(self.path):  # also a folder whose group zarr.json was never written
                    shutil.rmtree(os.path.join(self.path, name), ignore_errors=True)
                elif name in self.group:
                    del self.group[name]
        except Exception:  # leftovers are removed when the store is next opened for writing
            pass

    def _sync(self, *names: str) -> None:
        """Flush the files of ``names`` (groups or arrays) and the root to the disk (local stores).

        Called before the switch, so that after a power loss the attributes
        never point at data that did not reach the disk.
        """
        if _is_url(self.path):
            return
        for name in names:
            sync_tree(os.path.join(self.path, name))

    def _sync_root(self) -> None:
        if _is_url(self.path):
            return
        try:
            fsync(os.path.join(self.path, "zarr.json"))
            fsync(self.path)
        except OSError as err:
            raise PadimError(f"the model store {self.path} was written but flushing it to the disk "
                             f"failed: {err.strerror or err}") from None

    def checkpoint(self, moments: Moments, new_digests: Iterable[bytes], seen: Iterable[bytes] = ()) -> None:
        """Write ``moments`` and the new digests as the new state, then switch to it.

        Crash-safe: the state and ledger segment are written under new names and
        flushed to the disk, then one atomic write of the root attributes
        switches to them. Killed at any moment, the store holds either the
        previous checkpoint or this one. ``seen``: 32-byte records (identity,
        content digest) for the cache of identities (see :meth:`identities`).

        Raises
        ------
        PadimError
            If a write fails (full disk, I/O error): the previous checkpoint
            stays the live one.
        """
        state = f"state-{self.attrs['seq'] + 1:06d}"
        cp = self.attrs["chunk_positions"]
        mean = moments.mean.detach().to("cpu", torch.float64).numpy()
        m2 = moments.m2.detach().to("cpu", torch.float64).numpy()
        digests = np.frombuffer(b"".join(new_digests), dtype=np.uint8).reshape(-1, 16)
        with self.switching(state):
            self._new_array(f"{state}/mean", mean, mean.shape, "float64", cp)
            self._new_array(f"{state}/m2", m2, m2.shape, "float64", cp)
        self.commit_state(state, int(moments.n), digests, seen)

    def begin_state(self) -> tuple[str, zarr.Array, zarr.Array]:
        """Create the empty arrays of the next state, to be filled chunk by chunk.

        Returns (name, mean (P, d) float64, m2 (P, d, d) float64). Nothing
        points at them until :meth:`commit_state`.
        """
        name = f"state-{self.attrs['seq'] + 1:06d}"
        positions, dims = self.positions, self.attrs["dims"]
        cp = self.attrs["chunk_positions"]
        with self.switching(name):
            mean = self._new_array(f"{name}/mean", None, (positions, dims), "float64", cp)
            m2 = self._new_array(f"{name}/m2", None, (positions, dims, dims), "float64", cp)
        return name, mean, m2

    def write_block(self, name: str, start: int, moments: Moments) -> None:
        """Write ``moments`` as positions ``start:start + p`` of the state ``name`` (from
        :meth:`begin_state`); a failed write is one clear error and removes that state."""
        stop = start + moments.mean.shape[0]
        with self.switching(name):
            self.group[f"{name}/mean"][start:stop] = moments.mean.detach().to("cpu", torch.float64).numpy()
            self.group[f"{name}/m2"][start:stop] = moments.m2.detach().to("cpu", torch.float64).numpy()

    def commit_state(self, name: str, n_images: int, new_digests: np.ndarray, seen: Iterable[bytes] = ()) -> None:
        """Switch to the state written under ``name`` (from :meth:`begin_state`).

        ``new_digests`` (k, 16) uint8 are the images it holds beyond the
        current state; they become a new ledger segment in the same switch.
        ``seen`` (32-byte records: identity, digest) extend the cache of
        identities (``seen/<segment>``, root attribute ``seen``) in the same switch.
        """
        seq = int(name.split("-")[1])
        ledger = list(self.attrs["ledger"])
        digests = np.ascontiguousarray(new_digests, dtype=np.uint8).reshape(-1, 16)
        segment = f"{seq:06d}"
        records = (np.ascontiguousarray(seen, dtype=np.uint8) if isinstance(seen, np.ndarray)
                   else np.frombuffer(b"".join(seen), dtype=np.uint8)).reshape(-1, 32)
        cache = list(self.attrs.get("seen") or [])
        old = [self.attrs["state"], self.attrs["final"]]
        with self.switching(name, f"ledger/{segment}", f"seen/{segment}"):
            if len(digests):
                self._new_array(f"ledger/{segment}", digests, digests.shape, "uint8", 1 << 20)
                ledger.append(segment)
            if len(records):
                self._new_array(f"seen/{segment}", records, records.shape, "uint8", 1 << 20)
                cache.append(segment)
            self._sync(name, f"ledger/{segment}", *([f"seen/{segment}"] if len(records) else []))
            pause_point("checkpoint-written")
            self._write_attrs(seq=seq, state=name, ledger=ledger, n_images=int(n_images),
                              finalized=False, final=None, **({"seen": cache} if cache else {}),
                              **self._stale_calibration())
        self._sync_root()
        pause_point("checkpoint-switched")
        self._remove(old)

    def add_identities(self, seen: Iterable[bytes]) -> None:
        """Extend the cache of identities (32-byte records: identity, digest) without a new
        state: a fit that read images the model held but folded nothing in writes only these."""
        records = np.frombuffer(b"".join(seen), dtype=np.uint8).reshape(-1, 32)
        if not len(records):
            return
        cache = list(self.attrs.get("seen") or [])
        name = f"{self.attrs['seq']:06d}-{len(cache)}"
        with self.switching(f"seen/{name}"):
            self._new_array(f"seen/{name}", records, records.shape, "uint8", 1 << 20)
            self._sync(f"seen/{name}")
            self._write_attrs(seen=[*cache, name])
        self._sync_root()

    def begin_final(self, eps: float) -> tuple[str, zarr.Array, zarr.Array]:
        """Create the (empty) arrays of a finalized model; returns (name, mean32, precision).

        The name is ``final-<state seq>-<k>``, ``k`` counting the finalizations the
        store ever switched to (root attribute ``finals``): a name that was live is
        never used again, so a reader that opened an older finalization always
        finds it gone instead of reading chunks of a later one. A failed write is
        one clear error and removes what was written (see :meth:`switching`).
        """
        name = f"final-{self.attrs['state'].split('-')[1]}-{int(self.attrs.get('finals') or 0) + 1}"
        positions, dims = self.positions, self.attrs["dims"]
        cp = self.attrs["chunk_positions"]
        with self.switching(name):
            mean = self._new_array(f"{name}/mean", None, (positions, dims), "float32", cp)
            prec = self._new_array(f"{name}/precision", None, (positions, dims, dims), "float32", cp)
        return name, mean, prec

    def commit_final(self, name: str, eps: float, shrinkage: str = "none") -> None:
        """Point the model at the finalized arrays written under ``name`` (from :meth:`begin_final`),
        recording how they were computed (``eps``, ``shrinkage``)."""
        old = self.attrs["final"]
        # the same statistics finalized the same way give the same precision: the calibration holds
        same = (old is not None and old.split("-")[1] == name.split("-")[1] and self.attrs["eps"] == float(eps)
                and self.attrs.get("shrinkage", "none") == shrinkage)
        with self.switching(name):
            self._sync(name)
            pause_point("final-written")
            self._write_attrs(final=name, finalized=True, eps=float(eps), shrinkage=shrinkage,
                              finals=int(name.rsplit("-", 1)[1]), **({} if same else self._stale_calibration()))
        self._sync_root()
        if old != name:
            self._remove([old])

    def remove_if_empty(self) -> None:
        """Delete this store if it holds no statistics yet (a first fit that failed).

        Only local stores; the folder itself and the writer's lock stay (the
        lock removes the folder if it created it).
        """
        if _is_url(self.path) or self.attrs["state"] is not None or self.n_images:
            return
        empty_folder(self.path, keep={lock.LOCK_NAME})

    def _remove(self, names: Iterable[str | None]) -> None:
        """Delete the groups ``names`` that are no longer live, best effort: a damaged
        ``zarr.json`` of an old state must not turn a successful switch into an error.
        Local stores: the folder by name (never through a link), without parsing it."""
        for name in names:
            if not name:
                continue
            try:
                if not _is_url(self.path):
                    full = os.path.join(self.path, name)
                    if os.path.isdir(full) and not os.path.islink(full):
                        shutil.rmtree(full, ignore_errors=True)
                elif name in self.group:
                    del self.group[name]
            except Exception:  # not needed any more; removed when the store is next opened for writing
                pass

    def collect_garbage(self) -> None:
        """Remove what an interrupted write left: groups and ledger segments the
        attributes do not point at, half-deleted folders, temporary files."""
        live = {self.attrs["state"], self.attrs["final"]}
        keep = set(self.attrs["ledger"])
        cache = set(self.attrs.get("seen") or [])
        if not _is_url(self.path):  # by listing the folders: also catches half-deleted groups
            remove_leftovers(self.path, live, keep)
            seen_dir = os.path.join(self.path, "seen")
            for key in os.listdir(seen_dir) if os.path.isdir(seen_dir) else []:
                if key not in cache and key != "zarr.json":
                    shutil.rmtree(os.path.join(seen_dir, key), ignore_errors=True)
            return
        with warnings.catch_warnings():  # zarr warns about files that are no Zarr node
            warnings.filterwarnings("ignore", message="Object at .* is not recognized")
            for key in list(self.group.group_keys()):
                if key not in live and (key.startswith("state-") or key.startswith("final-")):
                    del self.group[key]
            for name, wanted in (("ledger", keep), ("seen", cache)):
                if name in self.group:
                    group = self.group[name]
                    for key in list(group.array_keys()):
                        if key not in wanted:
                            del group[key]


__all__ = ["ModelStore", "store_exists", "zarr_options", "positions_per_chunk", "SCHEMA_VERSION", "CHUNK_TARGET_BYTES"]
