"""The model store: a Zarr v3 group whose root attributes point at the live state.

Layout::

    M.zarr/zarr.json            root attributes {"padim_ooc": {...}}: config, counts, pointers
    M.zarr/state-000007/mean    (P, d) float64   running mean
    M.zarr/state-000007/m2      (P, d, d) float64 sum of outer products of deviations
    M.zarr/ledger/000003        (k, 16) uint8    digests of the images folded in, per checkpoint
    M.zarr/final-000007/precision  (P, d, d) float32  after finalize
    M.zarr/final-000007/mean       (P, d) float32

A checkpoint writes a *new* state group (and a new ledger segment), then
rewrites the root attributes in one write (Zarr's local store writes a
temporary file and renames it, so the switch is atomic), then deletes the
old state. Whenever the process dies, the root points at a complete state.
Groups that the root does not point at are leftovers and are removed the next
time the store is opened for writing.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
import warnings
import weakref
from contextlib import contextmanager
from typing import Any, Iterable

import numpy as np
import torch
import zarr

from . import __version__
from . import lock
from .errors import PadimError
from .welford import Moments

SCHEMA_VERSION = 1
ATTR_KEY = "padim_ooc"
CHUNK_TARGET_BYTES = 32 * 2**20
# array attribute: every chunk of this array is stored (write_empty_chunks), so a missing one is damage
COMPLETE_KEY = "padim_ooc_all_chunks"
# test hook: "point:n[,point:n]" pauses the n-th time a write reaches ``point`` (see pause_point)
PAUSE_ENV = "PADIM_OOC_PAUSE_AT"
_pause_counts: dict[str, int] = {}
# the writer's lock file sits in the store folder; zarr warns about any file that is no Zarr node
warnings.filterwarnings("ignore", message=r"Object at \.padim_ooc\.lock is not recognized")


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


def positions_per_chunk(dims: int, target: int = CHUNK_TARGET_BYTES) -> int:
    """Positions per chunk so that one float64 (d, d) chunk is about ``target`` bytes."""
    return max(1, target // (dims * dims * 8))


def _is_url(path: str) -> bool:
    return "://" in path


def _zarr_options(path: str) -> dict:
    """Extra arguments zarr needs to write at ``path``: file:// URLs must create their folders."""
    return {"storage_options": {"auto_mkdir": True}} if path.startswith("file://") else {}


def shared_path(path: str | os.PathLike) -> str:
    """``path`` as other processes can open it: URLs as given, local paths made absolute."""
    text = os.fspath(path)
    return text if _is_url(text) else os.path.abspath(text)


def store_exists(path: str | os.PathLike) -> bool:
    """Whether a padim_ooc store is at ``path``."""
    path = os.fspath(path)
    try:
        group = zarr.open_group(path, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError, KeyError):
        return False
    return ATTR_KEY in group.attrs


def _wait_for_zarr_writes(timeout: float = 30.0) -> None:
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


class ModelStore:
    """A padim_ooc model store on disk (or at any fsspec URL zarr accepts)."""

    def __init__(self, group: zarr.Group, path: str, writable: bool):
        self.group = group
        self.path = path
        self.writable = writable
        self.attrs = self._read_attrs()
        self._unlock = None

    def _hold_lock(self) -> "ModelStore":
        # the writer's lock (taken before opening) is given back by close() or when this object goes
        if lock.held(self.path) and not _is_url(self.path):
            self._unlock = weakref.finalize(self, lock.release, os.path.abspath(self.path))
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
    def create(cls, path: str | os.PathLike, config: dict[str, Any]) -> "ModelStore":
        """A new, empty store for the extractor ``config``; fails if one exists.

        Takes the writer's lock (see :mod:`padim_ooc.lock`) for as long as the
        returned object lives (or until :meth:`close`).
        """
        path = os.fspath(path)
        locked = lock.acquire(path, lock.default_command())
        try:
            return cls._create(path, config)._hold_lock() if locked else cls._create(path, config)
        except BaseException:
            if locked:
                lock.release(path)
            raise

    @classmethod
    def _create(cls, path: str, config: dict[str, Any]) -> "ModelStore":
        if not _is_url(path) and os.path.exists(path):
            names = set(os.listdir(path)) - {lock.LOCK_NAME}
            partial = {n for n in names if n.endswith(".partial")}  # a creation that was killed
            if names - partial:
                raise PadimError(f"{path} exists and is not a padim_ooc model; choose another --model path")
            for name in partial:
                os.unlink(os.path.join(path, name))
        attrs = {
            "schema_version": SCHEMA_VERSION,
            "library_version": __version__,
            **config,
            "n_images": 0,
            "seq": 0,
            "state": None,
            "ledger": [],
            "finalized": False,
            "final": None,
            "eps": None,
            "chunk_positions": positions_per_chunk(config["dims"]),
        }
        try:  # group and attributes in one write: a store is never seen without its attributes
            group = zarr.create_group(path, overwrite=_is_url(path), attributes={ATTR_KEY: attrs},
                                      **_zarr_options(path))
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
        path = os.fspath(path)
        if not _is_url(path) and not os.path.exists(path):
            raise PadimError(f"model not found: {path}")
        locked = writable and lock.acquire(path, lock.default_command())
        try:
            try:
                group = zarr.open_group(path, mode="r+" if writable else "r", **_zarr_options(path))
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
        attrs = self.group.attrs.asdict().get(ATTR_KEY)
        if not isinstance(attrs, dict):
            raise PadimError(f"{self.path} is a Zarr group but not a padim_ooc model (no '{ATTR_KEY}' attributes)")
        version = attrs.get("schema_version")
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise PadimError(f"model schema version {version} is newer than this padim_ooc "
                             f"{__version__} supports (up to {SCHEMA_VERSION}); upgrade padim_ooc")
        return attrs

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
    def config(self) -> dict[str, Any]:
        """The extractor configuration the model was fitted with."""
        keys = ("backbone", "layers", "layer_channels", "channels", "dims", "seed", "weights",
                "weights_digest", "resize", "crop", "normalize_mean", "normalize_std", "grid")
        return {k: self.attrs[k] for k in keys}

    def _array(self, group: str | None, name: str) -> zarr.Array:
        if group is None:
            raise PadimError(f"the model {self.path} has no statistics yet: fit it first")
        try:
            arr = self.group[f"{group}/{name}"]
        except KeyError:
            raise PadimError(f"the model {self.path} is damaged: {group}/{name} is missing") from None
        if arr.attrs.get(COMPLETE_KEY):
            self._check_chunks(arr)
        return arr

    def _check_chunks(self, arr: zarr.Array) -> None:
        """Every chunk of ``arr`` is stored (a missing one was deleted: zarr would read it as
        zeros) and, in a local uncompressed store, has its exact size (a short one was cut)."""
        total = arr.nchunks
        folder = os.path.join(self.path, arr.path, "c")
        if not _is_url(self.path) and not arr.compressors and not arr.filters and os.path.isdir(folder):
            expected = int(np.prod(arr.chunks)) * arr.dtype.itemsize
            stored = 0
            for root, _dirs, files in os.walk(folder):
                for name in files:
                    if name.endswith(".partial"):
                        continue
                    stored += 1
                    size = os.path.getsize(os.path.join(root, name))
                    if size != expected:
                        chunk = os.path.relpath(os.path.join(root, name), os.path.join(self.path, arr.path))
                        raise PadimError(f"the model {self.path} is damaged: chunk {chunk} of {arr.path} "
                                         f"has {size} bytes instead of {expected}")
        else:
            try:
                stored = arr.nchunks_initialized
            except Exception as err:  # pragma: no cover - unreadable listing
                raise PadimError(f"the model {self.path} is damaged: cannot list {arr.path} "
                                 f"({type(err).__name__}: {err})") from None
        if stored < total:
            raise PadimError(f"the model {self.path} is damaged: {total - stored} of {total} "
                             f"chunks of {arr.path} are missing")

    def mean_array(self) -> zarr.Array:
        return self._array(self.attrs["state"], "mean")

    def m2_array(self) -> zarr.Array:
        return self._array(self.attrs["state"], "m2")

    def final_arrays(self) -> tuple[zarr.Array, zarr.Array]:
        """(mean float32 (P, d), precision float32 (P, d, d)) of a finalized model."""
        if not self.attrs["finalized"]:
            raise PadimError(f"the model {self.path} is not finalized: run `padim-ooc finalize {self.path}` first")
        return self._array(self.attrs["final"], "mean"), self._array(self.attrs["final"], "precision")

    def load_moments(self, *, device: str | torch.device = "cpu", start: int = 0,
                     stop: int | None = None) -> Moments:
        """The running statistics of positions ``start:stop`` (default all) in memory
        (float64), or an empty state."""
        positions, dims = self.attrs["grid"][0] * self.attrs["grid"][1], self.attrs["dims"]
        rows = slice(start, positions if stop is None else min(stop, positions))
        if self.attrs["state"] is None:
            return Moments.zeros(rows.stop - rows.start, dims, device=device)
        mean = torch.from_numpy(read_array(self.mean_array(), rows))
        m2 = torch.from_numpy(read_array(self.m2_array(), rows))
        return Moments(self.n_images, mean.to(device), m2.to(device))

    def ledger(self) -> set[bytes]:
        """Digests of every image accumulated so far."""
        out: set[bytes] = set()
        for name in self.attrs["ledger"]:
            rows = read_array(self._array("ledger", name))
            out.update(bytes(r) for r in rows)
        return out

    def ledger_digests(self) -> np.ndarray:
        """ndarray of shape (n_digests, 16), uint8: every ledger digest, segment after segment."""
        parts = [read_array(self._array("ledger", name)) for name in self.attrs["ledger"]]
        return np.concatenate(parts) if parts else np.zeros((0, 16), np.uint8)

    # ---- writing -------------------------------------------------------
    def _new_array(self, name: str, data: np.ndarray | None, shape, dtype, chunk_positions: int):
        """A new array (overwriting a leftover of that name), every chunk stored even if all zero.

        Write it through the returned object (or a pickled copy of it): it
        carries ``write_empty_chunks``, so that a chunk missing later is damage.
        """
        chunks = (min(chunk_positions, max(1, shape[0])),) + tuple(shape[1:])
        arr = self.group.create_array(name, shape=shape, chunks=chunks, dtype=dtype,
                                      compressors=None, fill_value=0, overwrite=True,
                                      config={"write_empty_chunks": True},
                                      attributes={COMPLETE_KEY: True})
        if data is not None:
            write_array(arr, data)
        return arr

    @contextmanager
    def _switching(self, *new: str):
        """Around writing ``new`` groups and switching to them: an I/O error (full disk,
        quota, ...) becomes one clear line; what was written is removed (best effort)
        unless the store already points at it; the previous state stays the live one."""
        try:
            yield
        except OSError as err:
            self._discard(new)
            what = f"{self.n_images} images" if self.attrs["state"] else "no statistics yet"
            raise PadimError(f"cannot write the model store {self.path}: {err.strerror or err}; "
                             f"the previous checkpoint ({what}) is intact") from None

    def _discard(self, names: Iterable[str]) -> None:
        try:
            _wait_for_zarr_writes()
            live = zarr.open_group(self.path, mode="r").attrs.asdict()[ATTR_KEY]
            keep = {live.get("state"), live.get("final")} | {f"ledger/{k}" for k in live.get("ledger", [])}
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
            top = os.path.join(self.path, name)
            for folder, _dirs, files in os.walk(top):
                for f in files:
                    _fsync(os.path.join(folder, f))
                _fsync(folder)
            if os.path.isdir(top):
                _fsync(os.path.dirname(top))

    def _sync_root(self) -> None:
        if _is_url(self.path):
            return
        try:
            _fsync(os.path.join(self.path, "zarr.json"))
            _fsync(self.path)
        except OSError as err:
            raise PadimError(f"the model store {self.path} was written but flushing it to the disk "
                             f"failed: {err.strerror or err}") from None

    def checkpoint(self, moments: Moments, new_digests: Iterable[bytes]) -> None:
        """Write ``moments`` and the new digests as the new state, then switch to it.

        Crash-safe: the state and ledger segment are written under new names and
        flushed to the disk, then one atomic write of the root attributes
        switches to them. Killed at any moment, the store holds either the
        previous checkpoint or this one.

        Raises
        ------
        PadimError
            If a write fails (full disk, I/O error): the previous checkpoint
            stays the live one.
        """
        seq = self.attrs["seq"] + 1
        state = f"state-{seq:06d}"
        segment = f"{seq:06d}"
        cp = self.attrs["chunk_positions"]
        mean = moments.mean.detach().to("cpu", torch.float64).numpy()
        m2 = moments.m2.detach().to("cpu", torch.float64).numpy()
        ledger = list(self.attrs["ledger"])
        digests = np.frombuffer(b"".join(new_digests), dtype=np.uint8).reshape(-1, 16)
        old = [self.attrs["state"], self.attrs["final"]]
        with self._switching(state, f"ledger/{segment}"):
            self._new_array(f"{state}/mean", mean, mean.shape, "float64", cp)
            self._new_array(f"{state}/m2", m2, m2.shape, "float64", cp)
            if len(digests):
                self._new_array(f"ledger/{segment}", digests, digests.shape, "uint8", 1 << 20)
                ledger.append(segment)
            self._sync(state, f"ledger/{segment}")
            pause_point("checkpoint-written")
            self._write_attrs(seq=seq, state=state, ledger=ledger, n_images=int(moments.n),
                              finalized=False, final=None)
        self._sync_root()
        pause_point("checkpoint-switched")
        self._remove(old)

    def begin_state(self) -> tuple[str, zarr.Array, zarr.Array]:
        """Create the empty arrays of the next state, to be filled chunk by chunk.

        Returns (name, mean (P, d) float64, m2 (P, d, d) float64). Nothing
        points at them until :meth:`commit_state`.
        """
        name = f"state-{self.attrs['seq'] + 1:06d}"
        positions, dims = self.attrs["grid"][0] * self.attrs["grid"][1], self.attrs["dims"]
        cp = self.attrs["chunk_positions"]
        mean = self._new_array(f"{name}/mean", None, (positions, dims), "float64", cp)
        m2 = self._new_array(f"{name}/m2", None, (positions, dims, dims), "float64", cp)
        return name, mean, m2

    def write_block(self, name: str, start: int, moments: Moments) -> None:
        """Write ``moments`` as positions ``start:start + p`` of the state ``name`` (from
        :meth:`begin_state`); a failed write is one clear error and removes that state."""
        stop = start + moments.mean.shape[0]
        with self._switching(name):
            self.group[f"{name}/mean"][start:stop] = moments.mean.detach().to("cpu", torch.float64).numpy()
            self.group[f"{name}/m2"][start:stop] = moments.m2.detach().to("cpu", torch.float64).numpy()

    def commit_state(self, name: str, n_images: int, new_digests: np.ndarray) -> None:
        """Switch to the state written under ``name`` (from :meth:`begin_state`).

        ``new_digests`` (k, 16) uint8 are the images it holds beyond the
        current state; they become a new ledger segment in the same switch.
        """
        seq = int(name.split("-")[1])
        ledger = list(self.attrs["ledger"])
        digests = np.ascontiguousarray(new_digests, dtype=np.uint8).reshape(-1, 16)
        segment = f"{seq:06d}"
        old = [self.attrs["state"], self.attrs["final"]]
        with self._switching(name, f"ledger/{segment}"):
            if len(digests):
                self._new_array(f"ledger/{segment}", digests, digests.shape, "uint8", 1 << 20)
                ledger.append(segment)
            self._sync(name, f"ledger/{segment}")
            pause_point("checkpoint-written")
            self._write_attrs(seq=seq, state=name, ledger=ledger, n_images=int(n_images),
                              finalized=False, final=None)
        self._sync_root()
        pause_point("checkpoint-switched")
        self._remove(old)

    def begin_final(self, eps: float) -> tuple[str, zarr.Array, zarr.Array]:
        """Create the (empty) arrays of a finalized model; returns (name, mean32, precision)."""
        name = "final-" + self.attrs["state"].split("-")[1]
        if name == self.attrs["final"]:  # re-finalizing: never overwrite the live arrays
            name += "b"
        positions, dims = self.attrs["grid"][0] * self.attrs["grid"][1], self.attrs["dims"]
        cp = self.attrs["chunk_positions"]
        mean = self._new_array(f"{name}/mean", None, (positions, dims), "float32", cp)
        prec = self._new_array(f"{name}/precision", None, (positions, dims, dims), "float32", cp)
        return name, mean, prec

    def commit_final(self, name: str, eps: float) -> None:
        """Point the model at the finalized arrays written under ``name``."""
        old = self.attrs["final"]
        with self._switching(name):
            self._sync(name)
            pause_point("final-written")
            self._write_attrs(final=name, finalized=True, eps=float(eps))
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
        for key in os.listdir(self.path):
            full = os.path.join(self.path, key)
            if key == lock.LOCK_NAME:
                continue
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full, ignore_errors=True)
            else:
                try:
                    os.unlink(full)
                except OSError:
                    pass

    def _remove(self, names: Iterable[str | None]) -> None:
        try:
            for name in names:
                if name and name in self.group:
                    del self.group[name]
        except OSError:  # not needed any more; removed when the store is next opened for writing
            pass

    def collect_garbage(self) -> None:
        """Remove what an interrupted write left: groups and ledger segments the
        attributes do not point at, half-deleted folders, temporary files."""
        live = {self.attrs["state"], self.attrs["final"]}
        keep = set(self.attrs["ledger"])
        if not _is_url(self.path):  # by listing the folders: also catches half-deleted groups
            root = self.path
            for key in os.listdir(root):
                full = os.path.join(root, key)
                if key.endswith(".partial") and os.path.isfile(full):
                    os.unlink(full)
                elif key.startswith(("state-", "final-")) and key not in live and os.path.isdir(full):
                    shutil.rmtree(full, ignore_errors=True)
            ledger_dir = os.path.join(root, "ledger")
            if os.path.isdir(ledger_dir):
                for key in os.listdir(ledger_dir):
                    full = os.path.join(ledger_dir, key)
                    if key.endswith(".partial") and os.path.isfile(full):
                        os.unlink(full)
                    elif key != "zarr.json" and key not in keep and os.path.isdir(full):
                        shutil.rmtree(full, ignore_errors=True)
            return
        with warnings.catch_warnings():  # zarr warns about files that are no Zarr node
            warnings.filterwarnings("ignore", message="Object at .* is not recognized")
            for key in list(self.group.group_keys()):
                if key not in live and (key.startswith("state-") or key.startswith("final-")):
                    del self.group[key]
            if "ledger" in self.group:
                ledger = self.group["ledger"]
                for key in list(ledger.array_keys()):
                    if key not in keep:
                        del ledger[key]


def read_array(arr: zarr.Array, rows: slice = slice(None)) -> np.ndarray:
    """Read an array (or ``rows`` of its first axis), with a clear error if a chunk is damaged."""
    try:
        out = arr[rows] if arr.ndim else arr[...]
    except Exception as err:
        raise PadimError(f"the model store is damaged: cannot read {arr.path} "
                         f"({type(err).__name__}: {err})") from None
    expected = (len(range(*rows.indices(arr.shape[0]))),) + arr.shape[1:] if arr.ndim else ()
    if arr.shape and arr.shape[0] and out.shape != expected:  # pragma: no cover - defensive
        raise PadimError(f"the model store is damaged: {arr.path} has the wrong shape")
    return out


def write_array(arr: zarr.Array, data: np.ndarray) -> None:
    """Write a whole array, one chunk of rows (first axis) at a time.

    An ``OSError`` (full disk, I/O error) propagates: the caller's
    ``ModelStore._switching`` turns it into a clear error.
    """
    rows = arr.chunks[0] if arr.ndim else 1
    if arr.ndim == 0 or arr.shape[0] == 0:
        arr[...] = data
        return
    for start in range(0, arr.shape[0], rows):
        arr[start:start + rows] = data[start:start + rows]
        pause_point("chunk")


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
