"""``padim-ooc compact``: a scoring-only copy of a finalized model (a *scorer*).

A model store keeps what it needs to grow: the running float64 ``m2`` (P, d, d), the
float64 mean, the ledger of image digests and the cache of identities, beside the
final float32 mean (P, d) and precision (P, d, d). Scoring reads only the final
arrays, so a site that only scores can take a store of about a third of the size
(no ``m2``), or a sixth with ``float16=True`` (the precision in float16, cast back
to float32 when it is loaded; the mean stays float32).

The scorer is a store of its own kind (root attribute ``kind: "scorer"``, checked
by :mod:`padim_ooc.store.schema`): the configuration, ``eps``, ``shrinkage``, the
calibration (if any), the source's finalization name and counts, the embedding's
projection (orthogonal models) and one ``final-*`` group. ``score``, ``evaluate``,
``calibrate``, ``export`` and ``info`` open it like any model; ``fit``, ``merge``
and ``finalize`` refuse it (it holds no statistics to change).

Crash-safe: everything is written into a temporary sibling folder of ``out``
(``.<name>.compact-<pid>``), flushed, opened and checked like any store, and
only then renamed to ``out``; killed at any moment, ``out`` is either absent or
complete (a compact killed midway leaves only that hidden folder, safe to delete).
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import zarr

from . import __version__
from .errors import PadimError
from .store import ATTR_KEY, ModelStore, read_array, shared_path
from .store.chunks import fsync, sync_tree
from .store.model import SCHEMA_VERSION, new_array, write_projection
from .store.paths import is_url

FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504: a larger precision entry is no float16
# the root attributes a scorer takes from its source, beside the configuration
KEPT = ("n_images", "seq", "final", "finals", "eps", "shrinkage", "calibration", "chunk_positions")


def _temporary(out: str) -> str:
    """The temporary sibling folder a compact onto ``out`` writes first."""
    parent, name = os.path.split(out)
    return os.path.join(parent, f".{name}.compact-{os.getpid()}")


def _scorer_attrs(source: ModelStore, float16: bool) -> dict:
    """The root attributes of the scorer of ``source``: what scoring reads, and where it came from."""
    attrs = {"schema_version": SCHEMA_VERSION, "library_version": __version__, **source.config.to_attrs(),
             **{k: source.attrs[k] for k in KEPT if k in source.attrs},
             "kind": "scorer", "precision_dtype": "float16" if float16 else "float32",
             "state": None, "ledger": [], "finalized": True}
    return attrs


def _copy_final(source: ModelStore, group: zarr.Group, name: str, float16: bool) -> None:
    """Copy the source's final mean (P, d) float32 and precision (P, d, d) into ``group/name``,
    one chunk of positions at a time (memory: one chunk); the precision cast to float16 if asked,
    refused if an entry overflows it."""
    mean_src, prec_src = source.final_arrays()
    cp = int(source.attrs["chunk_positions"])
    mean = new_array(group, f"{name}/mean", tuple(mean_src.shape), "float32", cp)
    prec = new_array(group, f"{name}/precision", tuple(prec_src.shape), "float16" if float16 else "float32", cp)
    p = mean_src.shape[0]
    for start in range(0, p, cp):
        rows = slice(start, min(p, start + cp))
        mean[rows] = read_array(mean_src, rows)
        block = read_array(prec_src, rows)
        if float16:
            big = float(np.abs(block).max(initial=0.0))
            if big > FLOAT16_MAX:
                raise PadimError(f"a precision entry of {source.path} ({big:.4g}) overflows float16 (largest "
                                 f"{FLOAT16_MAX:g}): compact it without --float16, or finalize it with a larger --eps")
            block = block.astype(np.float16)
        prec[rows] = block


def compact(model: str | os.PathLike, out: str | os.PathLike, float16: bool = False) -> dict:
    """Write a scoring-only copy of the finalized model ``model`` to the new folder ``out``.

    Parameters
    ----------
    model : path or URL
        A finalized model store (not a scorer already).
    out : path
        A local folder that does not exist yet.
    float16 : bool
        Store the precision (P, d, d) in float16 (half its size; scores change by
        about 1e-4 relative, see README). The mean (P, d) stays float32.

    Returns
    -------
    dict with ``model``, ``out``, ``precision_dtype``, and the sizes on disk
    (``model_bytes``, ``out_bytes``; ``model_bytes`` None for a URL).

    Raises
    ------
    PadimError
        One line: ``model`` missing, unfinalized or a scorer; ``out`` exists or is a
        URL; a float16 overflow; a failed write (nothing is left at ``out`` then).
    """
    out = os.fspath(out)
    if is_url(out):
        raise PadimError(f"compact writes a local folder, not the URL {out}: compact locally, then upload it")
    out = shared_path(out)
    if os.path.lexists(out):
        raise PadimError(f"--out {out} exists: give a new path (compact never overwrites)")
    with ModelStore.open(model) as source:
        if source.is_scorer:
            raise PadimError(f"{source.path} is a scoring-only model already (padim-ooc compact)")
        source.final_arrays()  # not finalized: one line naming finalize
        tmp = _temporary(out)
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an earlier process with this pid
        try:
            if source.config.embedding == "orthogonal":  # scoring needs the projection
                write_projection(tmp, source.projection())
            group = zarr.create_group(tmp, attributes={ATTR_KEY: _scorer_attrs(source, float16)})
            _copy_final(source, group, source.attrs["final"], float16)
            sync_tree(tmp)
            with ModelStore.open(tmp) as check:  # the schema's checks, and every chunk there
                check.final_arrays()
                check.projection()
            os.rename(tmp, out)
            fsync(os.path.dirname(out))
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise PadimError(f"cannot write the scorer {out}: {err.strerror or err}") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        src_bytes = None if is_url(source.path) else folder_bytes(source.path)
        return {"model": source.path, "out": out, "precision_dtype": "float16" if float16 else "float32",
                "model_bytes": src_bytes, "out_bytes": folder_bytes(out)}


def folder_bytes(path: str) -> int:
    """Bytes of the files under the folder ``path`` (what it takes on disk, before the file system's blocks)."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


__all__ = ["compact", "folder_bytes"]
