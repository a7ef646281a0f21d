"""One writer at a time: a lock file inside the model store.

A process that writes a store (``fit``, ``finalize``, ``merge``) first creates
``<store>/.padim_ooc.lock`` with ``os.open(O_CREAT | O_EXCL)``, an atomic
create: of two processes racing, exactly one succeeds. The file holds who
holds it (pid, host, process start time, when, the command line) as JSON, so a
refused writer can say who it waits for. The file is removed when the writer
is done (including on errors and Ctrl-C); a process killed with SIGKILL (or a
machine that loses power) leaves it behind.

A lock left behind is *stale* when its holder ran here (same host name, same
boot, same PID namespace) and that process no longer exists (no process with
that pid, or one with that pid but another start time: the pid was reused). A
stale lock is removed with a warning and the new writer goes on. Breaking a
stale lock happens under an ``flock`` on the store folder and re-reads the
lock file first, so two processes that find the same stale lock cannot both
break it and both write.

A holder is taken for alive whenever its death cannot be proven: a pid that
``psutil`` may not inspect (``AccessDenied``), or that it cannot see but
``os.kill(pid, 0)`` finds (``/proc`` mounted with ``hidepid``: other users'
processes are hidden). A lock whose holder cannot be checked from here is
never broken automatically: one from another host, from another boot (a
machine of the same name, or one rebooted since), or from another PID
namespace (another container sharing the host name, e.g. with host
networking): the message names the holder and says which file to delete once
that process is known to be gone. Lock files written before the boot id and
namespace were recorded are checked by host, pid and start time as before.

Within one process the lock is re-entrant (counted): ``fit`` holds it and
opens the store for writing, which holds it again.

Stores at fsspec URLs are locked by a lock object written with a conditional
put (S3's ``If-None-Match: *``): :mod:`padim_ooc.store.url_lock`; a protocol
without one is refused unless ``PADIM_OOC_URL_LOCK=off``.
"""
from __future__ import annotations

import atexit
import datetime as _dt
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import psutil

from ..errors import PadimError
from . import url_lock

LOCK_NAME = ".padim_ooc.lock"
# an empty or unreadable lock file younger than this may be one being written right now
_YOUNG_SECONDS = 10.0

log = logging.getLogger("padim_ooc")

_guard = threading.RLock()
_held: dict[str, list] = {}  # lock path -> [count, created_folder]


def _is_url(path: str) -> bool:
    """A store at a URL other than ``file://`` (those are locked by a lock object, :mod:`.url_lock`)."""
    return "://" in path and not path.startswith("file://")


def _local(path: str) -> str:
    """A ``file://`` URL as its local path (locked like any local store)."""
    return path[len("file://"):] if path.startswith("file://") else path


def lock_path(store: str | os.PathLike) -> str:
    """The lock file of the store at ``store`` (a local path)."""
    return os.path.join(os.path.abspath(os.fspath(store)), LOCK_NAME)


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), or None if that cannot be read."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, ValueError):
        return None


def _holder_alive(pid: int) -> tuple[bool, float | None]:
    """Whether process ``pid`` of this host exists, and its start time where readable.

    Dead only when that is certain: a zombie (ended, not yet reaped), or a
    pid that neither ``psutil`` nor ``os.kill(pid, 0)`` finds. ``AccessDenied``
    and a pid hidden from ``psutil`` that ``os.kill`` still finds
    (``PermissionError``: another user's process under ``hidepid``) are alive,
    with an unknown start time.
    """
    if pid <= 0:  # not a process (and os.kill(0, ...) would mean our process group)
        return False, None
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:  # it has ended: it writes nothing more
            return False, None
        return True, proc.create_time()
    except psutil.ZombieProcess:
        return False, None
    except psutil.AccessDenied:
        return True, None
    except psutil.NoSuchProcess:
        pass
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process; a pid out of range
        return False, None
    except PermissionError:
        return True, None
    except OSError:  # pragma: no cover - cannot tell: alive, to be safe
        return True, None
    return True, None


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _boot_id() -> str | None:
    """This machine's boot id (Linux; changes at every boot), or None where there is none."""
    return _read_text("/proc/sys/kernel/random/boot_id")


def _pid_namespace() -> str | None:
    """This process's PID namespace (Linux: ``pid:[4026531836]``), or None where there is none."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def default_command() -> str:
    """What this process is, for a lock's holder: ``padim-ooc fit`` or the script's name."""
    first = (sys.argv[0] if sys.argv else "") or "python"
    prog = os.path.basename(first)
    if prog == "__main__.py":  # python -m PACKAGE
        prog = os.path.basename(os.path.dirname(os.path.abspath(first))).replace("_", "-")
    if prog == "padim-ooc" and len(sys.argv) > 1:
        return f"padim-ooc {sys.argv[1]}"
    return prog


def _holder_info(command: str) -> dict:
    pid = os.getpid()
    argv = " ".join([os.path.basename(sys.argv[0] or "python")] + sys.argv[1:])
    return {"pid": pid, "host": socket.gethostname(), "boot_id": _boot_id(), "pid_ns": _pid_namespace(),
            "process_start": _process_start(pid),
            "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": command, "argv": argv[:200]}


def _read(path: str) -> dict | None:
    try:
        with open(path, "rb") as f:
            info = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("pid"), int) else None


def describe(info: dict | None) -> str:
    """The holder of a lock in words: command, pid, host, since when."""
    if info is None:
        return "an unknown process (the lock file is empty or unreadable)"
    return (f"`{info.get('command', '?')}` (pid {info['pid']} on host {info.get('host', '?')}, "
            f"since {info.get('since', '?')})")


def elsewhere(info: dict) -> str | None:
    """Why the holder of ``info`` cannot be checked from here, or None if it can.

    It can be checked when it ran on this host name, in this boot and in this
    PID namespace. A field missing from the lock file (written by an older
    version) is not compared; a field this process cannot read (not Linux)
    while the lock has it counts as a mismatch.
    """
    if info.get("host") != socket.gethostname():
        return "runs on another host"
    if "boot_id" in info and info["boot_id"] != _boot_id():
        return (f"runs on another boot of host {info.get('host')} (another machine of that name, "
                "or before a reboot)")
    if "pid_ns" in info and info["pid_ns"] != _pid_namespace():
        return "runs in another PID namespace (another container on this host)"
    return None


def is_stale(info: dict | None, age: float) -> bool:
    """Whether a lock whose file says ``info`` (and is ``age`` seconds old) has a dead holder.

    Only holders that ran here can be checked (see :func:`elsewhere`): stale
    when their pid names no process, or one that started at another time than
    the lock says (the pid was reused). A holder whose start time cannot be
    read (``AccessDenied``, ``hidepid``) is alive. An unreadable lock is stale
    once it is older than a few seconds (its writer died between creating and
    filling it).
    """
    if info is None:
        return age > _YOUNG_SECONDS
    if elsewhere(info) is not None:
        return False
    alive, started = _holder_alive(info["pid"])
    if not alive:
        return True
    recorded = info.get("process_start")
    return (started is not None and isinstance(recorded, (int, float))
            and abs(started - recorded) > 1.0)


def _try_create(path: str, info: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, json.dumps(info).encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def _break_stale(folder: str, path: str, seen: dict | None) -> bool:
    """Remove the stale lock at ``path`` if it still says ``seen``; True if removed.

    Serialised by an ``flock`` on the store folder, so that of several
    processes that found the same stale lock only the first removes it (the
    others re-read and find the new holder's lock).
    """
    dfd = os.open(folder, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(dfd, fcntl.LOCK_EX)
        except OSError:  # pragma: no cover - file systems without flock
            pass
        try:
            now = _read(path)
            age = time.time() - os.stat(path).st_mtime
        except FileNotFoundError:
            return True  # someone else removed it: try to create ours
        if now != seen or not is_stale(now, age):
            return False
        os.unlink(path)
        return True
    finally:
        os.close(dfd)


def acquire(store: str | os.PathLike, command: str = "write", *, wait: float = 1.0) -> bool:
    """Take the writer's lock of the store at ``store``; returns False for a URL store written
    without a lock (``PADIM_OOC_URL_LOCK=off``, see :mod:`padim_ooc.store.url_lock`).

    Creates the store folder if needed. Re-entrant within a process.

    Raises
    ------
    PadimError
        If another live process holds the lock (naming it), or the folder
        cannot hold a lock file.
    """
    store = _local(os.fspath(store))
    if _is_url(store):
        return url_lock.acquire(store, command, wait=wait)
    folder = os.path.abspath(store)
    path = os.path.join(folder, LOCK_NAME)
    with _guard:
        if path in _held:
            _held[path][0] += 1
            return True
        created = not os.path.exists(folder)
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise PadimError(f"{store} is a file, not a model store folder; choose another --model path")
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as err:
            raise PadimError(f"cannot create the model folder {store}: {err.strerror}") from None
        info = _holder_info(command)
        deadline = time.monotonic() + wait
        while True:
            try:
                if _try_create(path, info):
                    _held[path] = [1, created]
                    return True
            except OSError as err:
                raise PadimError(f"cannot create the lock file {path}: {err.strerror}") from None
            try:
                other = _read(path)
                age = time.time() - os.stat(path).st_mtime
            except FileNotFoundError:
                continue  # released meanwhile: try again
            if is_stale(other, age):
                if _break_stale(folder, path, other):
                    log.warning("removed a stale lock on %s left by %s, which is no longer running",
                                store, describe(other))
                continue
            if time.monotonic() >= deadline:
                raise refused(store, other, path)
            time.sleep(0.1)


def refused(store: str, other: dict | None, lock_file: str) -> PadimError:
    """The one-line error for a writer refused by a live holder ``other`` of ``lock_file``
    (a lock file here, or a lock object at a URL: :mod:`.url_lock`)."""
    where = other and elsewhere(other)
    unchecked = f", which {where} and cannot be checked from here" if where else ""
    return PadimError(f"the model {store} is being written by {describe(other)}{unchecked}; "
                      f"wait for it to finish (if that process is gone, delete {lock_file})")


def release(store: str | os.PathLike) -> None:
    """Give back one hold of the lock; the last one removes the lock file."""
    store = _local(os.fspath(store))
    if _is_url(store):
        url_lock.release(store)
        return
    folder = os.path.abspath(store)
    path = os.path.join(folder, LOCK_NAME)
    with _guard:
        entry = _held.get(path)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] > 0:
            return
        del _held[path]
        try:
            info = _read(path)
            if info is not None and info.get("pid") == os.getpid():
                os.unlink(path)
        except FileNotFoundError:
            pass
        if entry[1]:  # we created the folder: leave nothing behind if nothing was written
            try:
                os.rmdir(folder)
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                    raise


def held(store: str | os.PathLike) -> bool:
    """Whether this process holds the lock of ``store``."""
    store = _local(os.fspath(store))
    if _is_url(store):
        return url_lock.held(store)
    return lock_path(store) in _held


@contextmanager
def store_lock(store: str | os.PathLike, command: str = "write") -> Iterator[None]:
    """``with store_lock(path, "fit"):`` hold the writer's lock for the block."""
    acquire(store, command)
    try:
        yield
    finally:
        release(store)


@atexit.register
def _release_all() -> None:  # a normal exit never leaves a lock behind
    url_lock.release_all()
    with _guard:
        paths = list(_held)
    for path in paths:
        with _guard:
            if path in _held:
                _held[path][0] = 1
        release(os.path.dirname(path))


__all__ = ["LOCK_NAME", "default_command", "acquire", "release", "held", "store_lock", "describe", "elsewhere", "is_stale", "lock_path"]
