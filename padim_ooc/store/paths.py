"""Store paths as every process sees them: URLs as given, local paths made absolute.

A Dask worker may run in another working directory, and a ``memory://`` store lives
in one process only: these are the checks and conversions that keep a path valid
wherever it is used.
"""
from __future__ import annotations

import os

from ..errors import PadimError


def is_url(path: str) -> bool:
    return "://" in path


def shared_path(path: str | os.PathLike) -> str:
    """``path`` as other processes can open it: URLs as given, local paths made absolute."""
    text = os.fspath(path)
    return text if is_url(text) else os.path.abspath(text)


def check_shareable(*paths: str, action: str = "run") -> None:
    """A one-line error for a path Dask workers cannot reach (``memory://`` lives in this
    process); ``action`` is what the message suggests doing without workers."""
    for path in paths:
        if path.startswith("memory://"):
            raise PadimError(f"{path} lives in this process's memory; Dask workers cannot reach it "
                             f"({action} without workers, or use a path or URL the workers share)")


__all__ = ["is_url", "shared_path", "check_shareable"]
