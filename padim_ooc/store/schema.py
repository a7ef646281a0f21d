"""The model store's schema, checked: a store is untrusted input.

Models travel between sites (fitted at one plant, scored at another, downloaded
from a bucket), so nothing in a store is trusted before it is checked:

- :func:`check_attrs`, once when a store is opened: every root attribute's
  type and range, and how they agree with each other (channels within the
  layers' channels, an ``embedding`` of ``random`` (or none: a store written
  before it was a choice) with its ``channels``, or ``orthogonal`` with its
  ``projection_digest`` and no channels, the pointers of the state, the finalization and the
  ledger well-formed names, ``schema_version`` from 1 to what this version
  writes). ``kind`` is ``model`` (or absent: every store written before
  scorers existed) or ``scorer``: a scoring-only store (``padim-ooc compact``)
  holds no state, no ledger and no cache of identities, is always finalized,
  and its ``final`` names the source's finalization (numbered at most ``seq``);
  its ``precision_dtype`` is ``float32`` or ``float16`` (a model's is absent
  or ``float32``). The optional ``calibration`` attribute is None or a record
  :meth:`padim_ooc.calibration.Calibration.from_attrs` accepts. Keys this
  version does not know are tolerated and never used (a later minor version
  may add one without a new schema version; ``info`` prints them as JSON).
- :func:`check_array`, whenever an array of the store is opened: its shape and
  dtype against the configuration (``P = grid[0] * grid[1]`` positions,
  ``dims`` channels; ``embedding/projection`` (F, d) float64; a final
  precision in the ``precision_dtype`` the attributes record), so that a final array with more positions than the grid
  is an error instead of being cut.
- :func:`check_no_links`, once when a local store is opened: no symbolic
  link anywhere inside it (a link would make a checkpoint or the removal of
  leftovers write or delete outside the store); the store's own path may be a link.

Each failure is one :class:`PadimError` line naming the field.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any

from ..config import EMBEDDINGS
from ..errors import PadimError

_STATE = re.compile(r"state-([0-9]{6,10})")
# final-<seq>-<k>; stores written before the counter: final-<seq> or final-<seq>b, and no 'finals'
_FINAL = re.compile(r"final-([0-9]{6,10})(?:b|-([0-9]{1,10}))?")
_SEGMENT = re.compile(r"[0-9]{6,10}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
MAX_COUNT = 10**9  # checkpoints, finalizations: names stay within the patterns above
MAX_IMAGES = 2**53  # counts stay exact in float64
# the most positions x channels a store may claim: a (P, d, d) float32 array of this is 400 GB
MAX_ELEMENTS = 10**11
KINDS = ("model", "scorer")  # a full model store; a scoring-only one (padim-ooc compact)
PRECISION_DTYPES = ("float32", "float16")  # of a final precision: float16 only in a scorer


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Checker:
    def __init__(self, attrs: dict, path: str):
        self.attrs, self.path = attrs, path

    def fail(self, key: str, expected: str) -> None:
        shown = _show(self.attrs[key]) if key in self.attrs else "missing"
        raise PadimError(f"the model {self.path} is damaged or not a padim_ooc model: attribute "
                         f"{key!r} is {shown}, expected {expected}")

    def get(self, key: str, ok, expected: str, *, optional: bool = False):
        if key not in self.attrs:
            if optional:
                return None
            self.fail(key, expected)
        value = self.attrs[key]
        if optional and value is None:
            return None
        if not ok(value):
            self.fail(key, expected)
        return value

    def int_(self, key, lo=None, hi=None, *, optional=False):
        rng = (f" >= {lo}" if lo is not None else "") + (f" and <= {hi}" if hi is not None else "")
        return self.get(key, lambda v: _is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi),
                        f"an integer{rng}" + (" or null" if optional else ""), optional=optional)

    def str_(self, key, pattern: re.Pattern | None = None, *, optional=False, what="a non-empty string"):
        return self.get(key, lambda v: isinstance(v, str) and bool(v) and len(v) <= 4096
                        and (pattern is None or pattern.fullmatch(v) is not None),
                        what + (" or null" if optional else ""), optional=optional)

    def list_(self, key, item, what: str, *, length=None, min_length=1):
        return self.get(key, lambda v: isinstance(v, list) and len(v) >= min_length
                        and (length is None or len(v) == length) and all(item(x) for x in v), what)


def check_attrs(attrs: Any, path: str, supported: int) -> dict:
    """``attrs`` (a store's root ``padim_ooc`` attributes) if they are a valid model's.

    Parameters
    ----------
    attrs : object
        What the root attributes hold under the ``padim_ooc`` key.
    path : str
        The store, for the messages.
    supported : int
        The newest schema version this padim_ooc reads.

    Raises
    ------
    PadimError
        One line naming the first attribute that is missing, of the wrong type,
        out of range, or inconsistent with the others.
    """
    if not isinstance(attrs, dict):
        raise PadimError(f"{path} is a Zarr group but not a padim_ooc model (no 'padim_ooc' attributes)")
    c = _Checker(attrs, path)
    version = attrs.get("schema_version")
    if _is_int(version) and version > supported:
        from .. import __version__

        raise PadimError(f"model schema version {version} is newer than this padim_ooc "
                         f"{__version__} supports (up to {supported}); upgrade padim_ooc")
    c.int_("schema_version", 1, supported)
    c.get("library_version", lambda v: isinstance(v, str) and len(v) <= 200, "a string")
    # the configuration
    c.str_("backbone", re.compile(r"[A-Za-z0-9_.]{1,100}"), what="a model name (letters, digits, _ and .)")
    layers = c.list_("layers", lambda x: isinstance(x, str) and 0 < len(x) <= 200, "a non-empty list of layer names")
    c.list_("layer_channels", lambda x: _is_int(x) and 1 <= x <= 100_000,
            f"a list of {len(layers)} channel counts (one per layer)", length=len(layers))
    total = sum(attrs["layer_channels"])
    dims = c.int_("dims", 1, total)
    # stores written before the embedding was a choice have none: random
    embedding = c.get("embedding", lambda v: v in EMBEDDINGS, " or ".join(map(repr, EMBEDDINGS)) + " or null",
                      optional=True)
    if embedding == "orthogonal":
        c.get("channels", lambda v: v is None, "null (an orthogonal embedding keeps no channel subset)",
              optional=True)
        c.str_("projection_digest", _DIGEST, what="a digest like 'sha256:<64 hex digits>'")
    else:
        channels = c.list_("channels", lambda x: _is_int(x) and 0 <= x < total,
                           f"a list of {dims} distinct channel indices from 0 to {total - 1}", length=dims)
        if len(set(channels)) != len(channels):
            c.fail("channels", f"a list of {dims} distinct channel indices from 0 to {total - 1}")
        c.get("projection_digest", lambda v: v is None, "null (a random embedding has no projection)",
              optional=True)
    c.get("seed", _is_int, "an integer", optional=True)
    c.str_("weights")
    c.str_("weights_digest")
    resize = c.int_("resize", 1, 100_000)
    c.int_("crop", 1, resize)
    # pixels are scaled to [0, 1] before the normalisation: anything far outside is no model's
    c.list_("normalize_mean", lambda x: _is_real(x) and -1e3 <= x <= 1e3, "a list of 3 numbers from -1000 to 1000",
            length=3)
    c.list_("normalize_std", lambda x: _is_real(x) and 1e-6 <= x <= 1e3, "a list of 3 numbers from 1e-06 to 1000",
            length=3)
    grid = c.list_("grid", lambda x: _is_int(x) and 1 <= x <= 100_000, "a list [h, w] of 2 positive integers", length=2)
    if grid[0] * grid[1] * dims * dims > MAX_ELEMENTS:
        c.fail("grid", f"a grid whose positions x dims^2 is at most {MAX_ELEMENTS:.0e}")
    c.int_("chunk_positions", 1, 2**31)
    # counts and pointers
    n = c.int_("n_images", 0, MAX_IMAGES)
    seq = c.int_("seq", 0, MAX_COUNT)
    kind = c.get("kind", lambda v: v in KINDS, "'model' or 'scorer' or null", optional=True) or "model"
    scorer = kind == "scorer"
    state = c.str_("state", _STATE, optional=True, what="a state name like 'state-000001'")
    if scorer and state is not None:
        c.fail("state", "null (a scoring-only model holds no running statistics)")
    if state is None and n and not scorer:
        c.fail("state", f"a state name (the model holds {n} images)")
    if state is not None and int(_STATE.fullmatch(state)[1]) > seq:
        c.fail("state", f"a state numbered at most seq={seq}")
    c.get("ledger", lambda v: isinstance(v, list) and all(
        isinstance(x, str) and _SEGMENT.fullmatch(x) for x in v) and len(set(v)) == len(v),
        "a list of distinct segment names like '000001'")
    if scorer:
        c.get("ledger", lambda v: v == [], "[] (a scoring-only model keeps no ledger)")
        c.get("seen", lambda v: not v, "null or [] (a scoring-only model keeps no cache of identities)",
              optional=True)
    c.get("precision_dtype", lambda v: v in (PRECISION_DTYPES if scorer else ("float32",)),
          "'float32' or 'float16' or null" if scorer else "'float32' or null (float16: scoring-only models)",
          optional=True)
    finalized = c.get("finalized", lambda v: isinstance(v, bool), "true or false")
    finals = c.int_("finals", 0, MAX_COUNT, optional=True)
    final = c.str_("final", _FINAL, optional=True, what="a final name like 'final-000001-1'")
    if finalized != (final is not None):
        c.fail("final", "a final name exactly when 'finalized' is true")
    if scorer and final is None:
        c.fail("final", "a final name like 'final-000001-1' (a scoring-only model is finalized)")
    if final is not None:
        if scorer:  # the source's finalization; the state it was computed from is not kept
            if int(_FINAL.fullmatch(final)[1]) > seq:
                c.fail("final", f"a finalization of a state numbered at most seq={seq}")
        elif state is None or int(_FINAL.fullmatch(final)[1]) != int(_STATE.fullmatch(state)[1]):
            c.fail("final", f"the finalization of the live state {state}")
        k = _FINAL.fullmatch(final)[2]
        if k is not None and int(k) > (finals or 0):
            c.fail("final", f"a finalization numbered at most finals={finals}")
    c.get("eps", lambda v: _is_real(v) and v >= 0, "a finite number >= 0 or null", optional=True)
    if finalized and attrs.get("eps") is None:
        c.fail("eps", "a finite number >= 0 (the model is finalized)")
    if attrs.get("calibration") is not None:
        from ..calibration import Calibration

        try:
            Calibration.from_attrs(attrs["calibration"])
        except PadimError as err:
            raise PadimError(f"the model {path} is damaged: attribute 'calibration': {err}") from None
        except Exception as err:  # a record that does not even build
            raise PadimError(f"the model {path} is damaged: attribute 'calibration' is not a calibration "
                             f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    return attrs


# records of a segment array: a ledger segment holds 16-byte digests; a segment of the cache of
# identities (padim_ooc.sources) 32-byte records (identity, digest)
SEGMENT_WIDTH = {"ledger": 16, "seen": 32}


def expected_array(attrs: dict, group: str, name: str) -> tuple[tuple[int, ...] | int, str]:
    """(shape, dtype) that the array ``group/name`` of a store with ``attrs`` must have;
    for a segment (``ledger/``, ``seen/``) the shape is its record width: ``(k, width)``
    with any k >= 1."""
    p, d = attrs["grid"][0] * attrs["grid"][1], attrs["dims"]
    if group in SEGMENT_WIDTH:
        return SEGMENT_WIDTH[group], "uint8"
    if group == "embedding":  # the projection of an orthogonal embedding: (F, d)
        return (sum(attrs["layer_channels"]), d), "float64"
    dtype = "float32" if group.startswith("final-") else "float64"
    if group.startswith("final-") and name == "precision":  # a scorer may hold it in float16
        dtype = attrs.get("precision_dtype") or "float32"
    shape = (p, d) if name == "mean" else (p, d, d)
    return shape, dtype


def check_array(arr, attrs: dict, group: str, name: str, path: str) -> None:
    """One line naming ``group/name`` if its shape or dtype is not what ``attrs`` say."""
    shape, dtype = expected_array(attrs, group, name)
    got = tuple(arr.shape)
    if isinstance(shape, int):
        ok_shape = len(got) == 2 and got[0] >= 1 and got[1] == shape
        want = f"(k, {shape}) with k >= 1"
    else:
        ok_shape = got == shape
        want = str(shape)
    if not ok_shape:
        raise PadimError(f"the model {path} is damaged: array {group}/{name} has shape {got}, expected {want} "
                         f"(grid {attrs['grid']}, dims {attrs['dims']})")
    if str(arr.dtype) != dtype:
        raise PadimError(f"the model {path} is damaged: array {group}/{name} has dtype {arr.dtype}, expected {dtype}")


def check_no_links(root: str) -> None:
    """Refuse a local store that holds a symbolic link anywhere below ``root`` (never followed)."""
    for folder, dirs, files in os.walk(root, followlinks=False):
        for entry in dirs + files:
            full = os.path.join(folder, entry)
            if os.path.islink(full):
                rel = os.path.relpath(full, root)
                raise PadimError(f"the model {root} holds a symbolic link ({rel}): links inside a store are "
                                 "refused, never followed; copy the model without links (e.g. cp -rL)")


__all__ = ["check_attrs", "check_array", "check_no_links", "expected_array", "MAX_ELEMENTS", "SEGMENT_WIDTH", "KINDS",
           "PRECISION_DTYPES"]
