"""The writer's lock of a store at a URL: a lock object written with a conditional put.

``<store>/.padim_ooc.lock`` is created with "create only if absent" (S3's
``PUT`` with ``If-None-Match: *``, s3fs ``pipe_file(mode="create")``): of two
writers racing, the service lets exactly one create it; the other gets HTTP 412
and is refused, naming the holder (the same JSON as a local lock file, see
:mod:`padim_ooc.store.lock`). The first lock taken in a bucket also checks that
the service honours the condition (a second conditional put of the same key must
be refused): an S3-compatible service that ignores the header is found out and
refused instead of being trusted.

Protocols whose conditional create is known to be atomic: ``s3``/``s3a``
(AWS S3 since 2024; MinIO, Ceph and others as they implement it, checked as
above) and ``memory`` (one process). Any other protocol is refused, since
running unlocked by default would let two writers interleave their checkpoints;
``PADIM_OOC_URL_LOCK=off`` writes such a store (or any URL store) without a lock,
for a user who makes sure only one writer runs.

A lock left by a process that was killed is stale when its holder ran on this
machine and is gone (:func:`padim_ooc.store.lock.is_stale`); it is removed with a
warning, under an ``flock`` on a file in the temporary folder named after the lock
URL (only processes of this machine can prove the holder dead, so that flock is
enough to keep two of them from both breaking it), after reading the lock again.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import tempfile
import threading
import time

from ..errors import PadimError

ENV = "PADIM_OOC_URL_LOCK"
ATOMIC = frozenset({"s3", "s3a", "memory"})
LOCK_NAME = ".padim_ooc.lock"

log = logging.getLogger("padim_ooc")
_guard = threading.RLock()
_held: dict[str, int] = {}  # lock URL -> holds
_checked: set[str] = set()  # buckets whose service honoured the condition


def lock_url(store: str) -> str:
    return store.rstrip("/") + "/" + LOCK_NAME


def _fs(url: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:
        raise PadimError(f"cannot lock {url}: {err}") from None


def _protocols(fs) -> set[str]:
    return {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)


def _read(fs, path: str) -> tuple[dict | None, bytes | None]:
    """(holder record or None if unreadable, raw bytes or None if the lock is gone)."""
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        return None, None
    try:
        info = json.loads(raw)
        return (info if isinstance(info, dict) and isinstance(info.get("pid"), int) else None), raw
    except ValueError:
        return None, raw


def _check_honoured(fs, path: str, data: bytes, store: str) -> None:
    """Refuse a service that ignored the condition (the lock object exists: a second
    conditional put of it must fail)."""
    bucket = path.split("/", 1)[0]
    if bucket in _checked:
        return
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        _checked.add(bucket)
        return
    fs.rm_file(path)
    raise PadimError(f"cannot lock the model {store}: the service ignored a conditional put "
                     f"(If-None-Match: *), so two writers could not be kept apart; run one writer "
                     f"at a time and set {ENV}=off to write it without a lock")


def acquire(store: str, command: str, *, wait: float = 1.0) -> bool:
    """Take the lock of the URL store ``store``; False if locking is switched off (``PADIM_OOC_URL_LOCK=off``).

    Raises
    ------
    PadimError
        If a live writer holds it (naming it), the protocol has no atomic conditional
        create, or the lock object cannot be written (no bucket, access denied).
    """
    from .lock import _holder_info, describe, is_stale, refused

    url = lock_url(store)
    with _guard:
        if url in _held:
            _held[url] += 1
            return True
        if os.environ.get(ENV, "").lower() == "off":
            log.warning("%s is written without a writer's lock (%s=off): run one writer at a time", store, ENV)
            return False
        fs, path = _fs(url)
        if not _protocols(fs) & ATOMIC:
            raise PadimError(f"cannot lock the model {store}: {'/'.join(sorted(_protocols(fs)))} has no "
                             f"conditional create that padim_ooc trusts (it locks s3:// and memory:// "
                             f"stores); run one writer at a time and set {ENV}=off to write it without a lock")
        data = json.dumps(_holder_info(command)).encode()
        deadline = time.monotonic() + wait
        while True:
            try:
                fs.pipe_file(path, data, mode="create")
                try:
                    _check_honoured(fs, path, data, store)
                except BaseException:
                    _try_remove(fs, path, data)
                    raise
                _held[url] = 1
                return True
            except FileExistsError:
                pass
            except PadimError:
                raise
            except Exception as err:
                raise PadimError(f"cannot write the lock {url}: {_reason(err)}") from None
            other, raw = _read(fs, path)
            if raw is None:
                continue  # released meanwhile
            if is_stale(other, _age(fs, path)):
                if _break_stale(fs, path, raw):
                    log.warning("removed a stale lock on %s left by %s, which is no longer running",
                                store, describe(other))
                continue
            if time.monotonic() >= deadline:
                raise refused(store, other, url)
            time.sleep(0.1)


def _reason(err: Exception) -> str:
    if isinstance(err, FileNotFoundError):
        return "the bucket does not exist"
    if isinstance(err, PermissionError):
        return f"access denied ({err})"
    return f"{type(err).__name__}: {err}"


def _age(fs, path: str) -> float:
    try:
        info = fs.info(path)
    except Exception:
        return float("inf")
    stamp = info.get("LastModified") or info.get("created") or info.get("mtime")
    try:
        seconds = stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp)
    except (TypeError, ValueError):
        return float("inf")
    return time.time() - seconds


def _break_stale(fs, path: str, seen: bytes) -> bool:
    """Remove the lock object if it still holds ``seen``, under this machine's flock for it."""
    folder = os.path.join(tempfile.gettempdir(), "padim_ooc-url-locks")
    os.makedirs(folder, exist_ok=True)
    name = hashlib.blake2b(f"{_protocols(fs)}:{path}".encode(), digest_size=16).hexdigest()
    with open(os.path.join(folder, name), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            if _read(fs, path)[1] != seen:
                return False
            fs.rm_file(path)
            return True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _try_remove(fs, path: str, data: bytes) -> None:
    try:
        if _read(fs, path)[1] == data:
            fs.rm_file(path)
    except Exception:
        pass


def release(store: str) -> None:
    """Give back one hold; the last removes the lock object (if it is still this process's)."""
    url = lock_url(store)
    with _guard:
        if url not in _held:
            return
        _held[url] -= 1
        if _held[url] > 0:
            return
        del _held[url]
        try:
            fs, path = _fs(url)
            info, _ = _read(fs, path)
            if info is not None and info.get("pid") == os.getpid():
                fs.rm_file(path)
        except Exception as err:  # left behind: the next writer finds it stale
            log.warning("could not remove the lock %s: %s", url, err)


def held(store: str) -> bool:
    return lock_url(store) in _held


def release_all() -> None:
    with _guard:
        for url in list(_held):
            _held[url] = 1
            release(url[: -len(LOCK_NAME) - 1])


__all__ = ["acquire", "release", "held", "release_all", "lock_url", "ENV", "ATOMIC"]
