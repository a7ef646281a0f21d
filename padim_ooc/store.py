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

import json
import os
from typing import Any, Iterable

import numpy as np
import torch
import zarr

from . import __version__
from .errors import PadimError
from .welford import Moments

SCHEMA_VERSION = 1
ATTR_KEY = "padim_ooc"
CHUNK_TARGET_BYTES = 32 * 2**20


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


class ModelStore:
    """A padim_ooc model store on disk (or at any fsspec URL zarr accepts)."""

    def __init__(self, group: zarr.Group, path: str, writable: bool):
        self.group = group
        self.path = path
        self.writable = writable
        self.attrs = self._read_attrs()

    # ---- opening -------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, config: dict[str, Any]) -> "ModelStore":
        """A new, empty store for the extractor ``config``; fails if one exists."""
        path = os.fspath(path)
        if not _is_url(path) and os.path.exists(path) and os.listdir(path):
            raise PadimError(f"{path} exists and is not a padim_ooc model; choose another --model path")
        group = zarr.open_group(path, mode="w", **_zarr_options(path))
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
        group.attrs[ATTR_KEY] = attrs
        return cls(group, path, writable=True)

    @classmethod
    def open(cls, path: str | os.PathLike, *, writable: bool = False) -> "ModelStore":
        """Open an existing store; a clear error if it is missing, foreign or too new."""
        path = os.fspath(path)
        if not _is_url(path) and not os.path.exists(path):
            raise PadimError(f"model not found: {path}")
        try:
            group = zarr.open_group(path, mode="r+" if writable else "r", **_zarr_options(path))
        except Exception as err:
            raise PadimError(f"cannot open the model {path}: {type(err).__name__}: {err}") from None
        store = cls(group, path, writable)
        if writable:
            store.collect_garbage()
        return store

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
            return self.group[f"{group}/{name}"]
        except KeyError:
            raise PadimError(f"the model {self.path} is damaged: {group}/{name} is missing") from None

    def mean_array(self) -> zarr.Array:
        return self._array(self.attrs["state"], "mean")

    def m2_array(self) -> zarr.Array:
        return self._array(self.attrs["state"], "m2")

    def final_arrays(self) -> tuple[zarr.Array, zarr.Array]:
        """(mean float32 (P, d), precision float32 (P, d, d)) of a finalized model."""
        if not self.attrs["finalized"]:
            raise PadimError(f"the model {self.path} is not finalized: run `padim-ooc finalize {self.path}` first")
        return self._array(self.attrs["final"], "mean"), self._array(self.attrs["final"], "precision")

    def load_moments(self, *, device: str | torch.device = "cpu") -> Moments:
        """The running statistics in memory (float64), or an empty state."""
        positions, dims = self.attrs["grid"][0] * self.attrs["grid"][1], self.attrs["dims"]
        if self.attrs["state"] is None:
            return Moments.zeros(positions, dims, device=device)
        mean = torch.from_numpy(read_array(self.mean_array()))
        m2 = torch.from_numpy(read_array(self.m2_array()))
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
        chunks = (min(chunk_positions, max(1, shape[0])),) + tuple(shape[1:])
        arr = self.group.create_array(name, shape=shape, chunks=chunks, dtype=dtype,
                                      compressors=None, fill_value=0, overwrite=True)
        if data is not None:
            write_array(arr, data)
        return arr

    def checkpoint(self, moments: Moments, new_digests: Iterable[bytes]) -> None:
        """Write ``moments`` and the new digests as the new state, then switch to it."""
        seq = self.attrs["seq"] + 1
        state = f"state-{seq:06d}"
        cp = self.attrs["chunk_positions"]
        mean = moments.mean.detach().to("cpu", torch.float64).numpy()
        m2 = moments.m2.detach().to("cpu", torch.float64).numpy()
        self._new_array(f"{state}/mean", mean, mean.shape, "float64", cp)
        self._new_array(f"{state}/m2", m2, m2.shape, "float64", cp)
        ledger = list(self.attrs["ledger"])
        digests = np.frombuffer(b"".join(new_digests), dtype=np.uint8).reshape(-1, 16)
        if len(digests):
            segment = f"{seq:06d}"
            self._new_array(f"ledger/{segment}", digests, digests.shape, "uint8", 1 << 20)
            ledger.append(segment)
        old = [self.attrs["state"], self.attrs["final"]]
        self._write_attrs(seq=seq, state=state, ledger=ledger, n_images=int(moments.n),
                          finalized=False, final=None)
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
        self._write_attrs(final=name, finalized=True, eps=float(eps))
        if old != name:
            self._remove([old])

    def _remove(self, names: Iterable[str | None]) -> None:
        for name in names:
            if name and name in self.group:
                del self.group[name]

    def collect_garbage(self) -> None:
        """Remove groups and ledger segments left by an interrupted write."""
        live = {self.attrs["state"], self.attrs["final"], "ledger"}
        for key in list(self.group.group_keys()):
            if key not in live and (key.startswith("state-") or key.startswith("final-")):
                del self.group[key]
        if "ledger" in self.group:
            keep = set(self.attrs["ledger"])
            ledger = self.group["ledger"]
            for key in list(ledger.array_keys()):
                if key not in keep:
                    del ledger[key]


def read_array(arr: zarr.Array) -> np.ndarray:
    """Read a whole array, with a clear error if a chunk is damaged."""
    try:
        out = arr[...]
    except Exception as err:
        raise PadimError(f"the model store is damaged: cannot read {arr.path} "
                         f"({type(err).__name__}: {err})") from None
    if arr.shape and arr.shape[0] and out.shape != arr.shape:  # pragma: no cover - defensive
        raise PadimError(f"the model store is damaged: {arr.path} has the wrong shape")
    return out


def write_array(arr: zarr.Array, data: np.ndarray) -> None:
    """Write a whole array chunk by chunk, with a clear error if the write fails."""
    try:
        arr[...] = data
    except OSError as err:
        raise PadimError(f"cannot write the model store at {arr.path}: {err.strerror or err}; "
                         "the previous checkpoint is intact") from None
