"""We delete only what we made: output files named by us, folders marked by us.

Two rules, used by every command that writes into a folder a user names:

- :func:`claim_outputs`: the files a command writes (``scores.csv``,
  ``maps.zarr``, ``report.html``, ...) are refused if an earlier run left them,
  unless ``--overwrite`` is given; then exactly those names are removed first
  (never through a link, nothing else in the folder), so the new outputs
  replace the old ones whole (no stale example image next to a new report).
- :func:`mark` / :func:`marked`: a folder that a run creates and may remove
  or refill later (the demo's model, a sharded fit's ``<model>.parts``) gets a
  marker file; a folder without our marker is never removed.
"""
from __future__ import annotations

import fnmatch
import json
import os
from typing import Iterable

from .errors import PadimError

MARKER = ".padim_ooc-made"


def mark(folder: str, what: str, fs=None) -> None:
    """Write our marker into ``folder`` (created if needed): ``what`` made it."""
    if fs is None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, MARKER), "w", encoding="utf-8") as f:
            json.dump({"made_by": what}, f)
        return
    fs.makedirs(folder, exist_ok=True)
    with fs.open(f"{folder}/{MARKER}", "w") as f:
        f.write(json.dumps({"made_by": what}))


def marked(folder: str, what: str | None = None, fs=None) -> bool:
    """Whether ``folder`` holds our marker (written by ``what``, if given) as a regular file."""
    try:
        if fs is None:
            path = os.path.join(folder, MARKER)
            if os.path.islink(path) or not os.path.isfile(path):
                return False
            with open(path, encoding="utf-8") as f:
                info = json.load(f)
        else:
            with fs.open(f"{folder}/{MARKER}", "r") as f:
                info = json.loads(f.read())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and (what is None or info.get("made_by") == what)


def _entries(fs, root: str) -> list[str]:
    if fs is None:
        return os.listdir(root) if os.path.isdir(root) else []
    if not fs.isdir(root):
        return []
    return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]


def existing_outputs(root: str, patterns: Iterable[str], fs=None) -> list[str]:
    """The names in the folder ``root`` that match ``patterns`` (shell patterns), sorted."""
    patterns = list(patterns)
    return sorted(n for n in _entries(fs, root) if any(fnmatch.fnmatchcase(n, p) for p in patterns))


def claim_outputs(root: str, patterns: Iterable[str], *, overwrite: bool, fs=None, what: str = "outputs") -> None:
    """Make room for a command's outputs (names matching ``patterns``) in the folder ``root``.

    Raises
    ------
    PadimError
        If outputs of an earlier run are there and ``overwrite`` is false (one
        line naming them and ``--overwrite``). With ``overwrite`` they are removed
        (a link is removed itself, never what it points at); nothing else is touched.
    """
    found = existing_outputs(root, patterns, fs)
    if not found:
        return
    if not overwrite:
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        raise PadimError(f"{root} already holds {what} of an earlier run ({shown}); pass --overwrite to "
                         "replace them, or choose another --out")
    for name in found:
        full = os.path.join(root, name) if fs is None else f"{root}/{name}"
        try:
            if fs is None:
                if os.path.isdir(full) and not os.path.islink(full):
                    import shutil

                    shutil.rmtree(full)
                else:
                    os.unlink(full)
            else:
                fs.rm(full, recursive=True)
        except OSError as err:
            raise PadimError(f"cannot replace {full}: {err.strerror or err}") from None


__all__ = ["MARKER", "mark", "marked", "claim_outputs", "existing_outputs"]
