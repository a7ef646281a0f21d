"""The writer's lock: one writer per store, holders named, stale locks recovered, races safe.

Holders are real processes (forked from the test process, so they use the
same code without paying for another ``import torch``).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time

import psutil
import pytest

import padim_ooc as po
from padim_ooc.store import lock
from padim_ooc.store import ModelStore

from conftest import CONFIG, moments


FORK = mp.get_context("fork")


def _hold(store, ready, done, command="padim-ooc fit"):
    lock.acquire(store, command)
    ready.set()
    done.wait(60)
    lock.release(store)
    os._exit(0)


def _die_holding(store):
    lock.acquire(store, "padim-ooc fit")
    os._exit(0)  # no atexit, no release: like SIGKILL, the lock file stays


def start_holder(store):
    """A live process holding the lock of ``store``; returns (process, event that lets it go)."""
    ready, done = FORK.Event(), FORK.Event()
    proc = FORK.Process(target=_hold, args=(str(store), ready, done))
    proc.start()
    assert ready.wait(30)
    return proc, done


@pytest.fixture
def holder(tmp_path):
    store = tmp_path / "m.zarr"
    proc, done = start_holder(store)
    yield store, proc
    done.set()
    proc.join(30)


def test_acquire_writes_holder_and_release_removes_it(tmp_path):
    store = tmp_path / "m.zarr"
    with lock.store_lock(store, "padim-ooc fit"):
        info = json.loads((store / lock.LOCK_NAME).read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        assert info["command"] == "padim-ooc fit"
        assert abs(info["process_start"] - psutil.Process().create_time()) < 1e-3
        with lock.store_lock(store):  # re-entrant within a process
            assert lock.held(store)
        assert (store / lock.LOCK_NAME).exists()
    assert not store.exists()  # the lock made the folder, nothing was written: nothing left


def test_live_holder_refuses_with_its_name(holder):
    store, proc = holder
    t0 = time.monotonic()
    with pytest.raises(po.PadimError) as err:
        lock.acquire(store, "padim-ooc fit")
    text = str(err.value)
    assert f"pid {proc.pid} on host {socket.gethostname()}" in text
    assert "`padim-ooc fit`" in text and "since 20" in text and lock.LOCK_NAME in text
    assert "\n" not in text and time.monotonic() - t0 < 5
    assert (store / lock.LOCK_NAME).exists()  # a live lock is never broken


def test_store_open_for_writing_is_refused_while_reading_works(tmp_path, image_dir):
    store = tmp_path / "m.zarr"
    with ModelStore.create(store, CONFIG) as st:
        st.checkpoint(moments(6), [bytes([i]) * 16 for i in range(6)])
    proc, done = start_holder(store)
    try:
        assert ModelStore.open(store).n_images == 6
        with pytest.raises(po.PadimError, match=f"being written by .*pid {proc.pid}"):
            ModelStore.open(store, writable=True)
        with pytest.raises(po.PadimError, match=f"pid {proc.pid}"):
            po.fit([image_dir / "a"], store, batch_size=4)
        assert ModelStore.open(store).n_images == 6
    finally:
        done.set()
        proc.join(30)
    with ModelStore.open(store, writable=True) as st:  # free again once the holder is done
        assert st.n_images == 6


def test_stale_lock_of_a_dead_process_is_recovered(tmp_path, caplog):
    store = tmp_path / "m.zarr"
    proc = FORK.Process(target=_die_holding, args=(str(store),))
    proc.start()
    proc.join(30)
    dead = json.loads((store / lock.LOCK_NAME).read_text())
    assert dead["pid"] == proc.pid and not psutil.pid_exists(proc.pid)
    with lock.store_lock(store):
        mine = json.loads((store / lock.LOCK_NAME).read_text())
        assert mine["pid"] == os.getpid()
    assert f"removed a stale lock on {store} left by `padim-ooc fit` (pid {proc.pid}" in caplog.text


def test_reused_pid_is_stale_other_host_is_not(tmp_path):
    store = tmp_path / "m.zarr"
    store.mkdir()
    path = store / lock.LOCK_NAME
    # a live pid (our parent) but another start time: the pid was reused, the holder is gone
    path.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(),
                                "process_start": 1.0, "since": "then", "command": "padim-ooc fit"}))
    with lock.store_lock(store):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    # a holder on another host cannot be checked from here: refused, with the file to delete
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "process_start": 1.0,
                                "since": "2026-01-01T00:00:00+00:00", "command": "padim-ooc merge"}))
    with pytest.raises(po.PadimError, match=r"`padim-ooc merge` \(pid 1 on host elsewhere.example, since "
                                            r"2026-01-01T00:00:00\+00:00\), which runs on another host and cannot "
                                            r"be checked from here; wait .*delete .*\.padim_ooc\.lock\)$"):
        lock.acquire(store)
    assert path.exists()


def dead_pid() -> int:
    """The pid of a process of this host that has ended and been reaped."""
    proc = FORK.Process(target=os._exit, args=(0,))
    proc.start()
    proc.join(30)
    assert not psutil.pid_exists(proc.pid)
    return proc.pid


def this_boot_and_namespace() -> dict:
    """This process's boot id and PID namespace, read here from /proc."""
    return {"boot_id": open("/proc/sys/kernel/random/boot_id").read().strip(),
            "pid_ns": os.readlink("/proc/self/ns/pid")}


def test_lock_records_boot_and_namespace_and_a_dead_holder_of_this_boot_is_stale(tmp_path):
    store = tmp_path / "m.zarr"
    with lock.store_lock(store):
        info = json.loads((store / lock.LOCK_NAME).read_text())
        assert {k: info[k] for k in ("boot_id", "pid_ns")} == this_boot_and_namespace()
    # a dead holder of this host, boot and namespace: stale; a lock file of an older version
    # (without boot id and namespace) whose holder is dead: stale as before
    for extra in (this_boot_and_namespace(), {}):
        store.mkdir(exist_ok=True)
        pid = dead_pid()
        (store / lock.LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(),
                                                        "process_start": 1.0, "command": "padim-ooc fit",
                                                        **extra}))
        assert lock.is_stale(json.loads((store / lock.LOCK_NAME).read_text()), age=60.0)
        with lock.store_lock(store):
            assert json.loads((store / lock.LOCK_NAME).read_text())["pid"] == os.getpid()


@pytest.mark.parametrize("field, value, why", [
    ("boot_id", "00000000-0000-0000-0000-000000000000", "runs on another boot of host"),
    ("pid_ns", "pid:[1]", "runs in another PID namespace"),
])
def test_holder_of_another_boot_or_pid_namespace_is_refused_never_broken(tmp_path, field, value, why):
    """Same host name, but another boot (another machine of that name) or another PID namespace
    (a container sharing the host name): its pid means nothing here, even a dead one."""
    store = tmp_path / "m.zarr"
    store.mkdir()
    path = store / lock.LOCK_NAME
    pid = dead_pid()
    info = {"pid": pid, "host": socket.gethostname(), "process_start": 1.0,
            "since": "2026-01-01T00:00:00+00:00", "command": "padim-ooc fit",
            **this_boot_and_namespace(), field: value}
    path.write_text(json.dumps(info))
    before = path.read_bytes()
    with pytest.raises(po.PadimError) as err:
        lock.acquire(store, wait=0.2)
    text = str(err.value)
    assert f"`padim-ooc fit` (pid {pid} on host {socket.gethostname()}, since 2026-01-01T00:00:00+00:00), " in text
    assert why in text and "cannot be checked from here" in text
    assert text.endswith(f"if that process is gone, delete {path})") and "\n" not in text
    assert path.read_bytes() == before and not lock.held(store)


def _load_lock_module():
    """Source for a child python that loads padim_ooc/lock.py without the package (no torch)."""
    store_dir = os.path.dirname(lock.__file__)
    return ("import sys, types; pkg = types.ModuleType('padim_ooc'); "
            f"pkg.__path__ = [{os.path.dirname(store_dir)!r}]; sys.modules['padim_ooc'] = pkg; "
            "sub = types.ModuleType('padim_ooc.store'); "
            f"sub.__path__ = [{store_dir!r}]; sys.modules['padim_ooc.store'] = sub; "
            "from padim_ooc.store import lock; ")


def test_live_holder_in_another_pid_namespace_is_refused(tmp_path):
    """A real writer in another PID namespace with its own /proc (a container sharing the host
    name): its pid (1 there) names another, live, process here. Host, pid and start time alone
    called the lock stale and broke it."""
    store = tmp_path / "m.zarr"
    code = _load_lock_module() + (f"lock.acquire({str(store)!r}, 'padim-ooc fit'); print('held', flush=True); "
                                  "sys.stdin.read(); lock.release(" + repr(str(store)) + ")")
    try:
        proc = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", code],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except FileNotFoundError:
        pytest.skip("no unshare command here")
    try:
        line = proc.stdout.readline()
        if line != "held\n":
            proc.kill()
            pytest.skip(f"cannot make a PID namespace here: {proc.communicate()[1].strip()[:200]}")
        info = json.loads((store / lock.LOCK_NAME).read_text())
        assert info["pid"] == 1 and psutil.Process(1).create_time() != info["process_start"]
        with pytest.raises(po.PadimError, match="pid 1 on host .*runs in another PID namespace"):
            lock.acquire(store, wait=0.2)
        assert json.loads((store / lock.LOCK_NAME).read_text()) == info  # not broken
        assert info["pid_ns"] != os.readlink("/proc/self/ns/pid")
    finally:
        proc.stdin.close()
        proc.wait(30)
    assert proc.returncode == 0 and not (store / lock.LOCK_NAME).exists()


def test_a_holder_this_user_may_not_inspect_is_alive(holder, monkeypatch):
    """``/proc`` mounted with ``hidepid=1`` makes psutil raise ``AccessDenied`` for other users'
    processes, ``hidepid=2`` hides them (``NoSuchProcess``; ``os.kill(pid, 0)`` then raises
    ``PermissionError``). Neither can be set up here (no remount, and the tests run as one
    user), so psutil and ``os.kill`` are patched to answer that way for the holder, a real live
    process. Both used to count as "no such process": a live writer's lock was broken."""
    store, proc = holder
    path = store / lock.LOCK_NAME
    before = path.read_bytes()
    real_process, real_kill = psutil.Process, os.kill

    def denied(pid=None):
        if pid == proc.pid:
            raise psutil.AccessDenied(pid)
        return real_process(pid)

    def hidden(pid=None):
        if pid == proc.pid:
            raise psutil.NoSuchProcess(pid)
        return real_process(pid)

    def other_user(pid, sig):
        if pid == proc.pid:
            raise PermissionError(1, "Operation not permitted")
        return real_kill(pid, sig)

    for fake_process, fake_kill in ((denied, real_kill), (hidden, real_kill), (hidden, other_user)):
        with monkeypatch.context() as mp:
            mp.setattr(psutil, "Process", fake_process)
            mp.setattr(os, "kill", fake_kill)
            assert not lock.is_stale(json.loads(before), age=60.0)
            with pytest.raises(po.PadimError, match=f"being written by `padim-ooc fit` \\(pid {proc.pid} "):
                lock.acquire(store, wait=0.2)
        assert path.read_bytes() == before  # never broken


def test_a_zombie_holder_is_stale(tmp_path):
    """A writer that has ended but is not yet reaped by its parent (a zombie) writes nothing more."""
    store = tmp_path / "m.zarr"
    proc = FORK.Process(target=_die_holding, args=(str(store),))
    proc.start()
    deadline = time.monotonic() + 30
    while psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE:  # not joined: stays a zombie
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with lock.store_lock(store):
        assert json.loads((store / lock.LOCK_NAME).read_text())["pid"] == os.getpid()
    proc.join(30)


def test_empty_lock_file_young_is_respected_old_is_stale(tmp_path):
    store = tmp_path / "m.zarr"
    store.mkdir()
    path = store / lock.LOCK_NAME
    path.write_bytes(b"")  # a writer between creating and filling it, or one that died there
    with pytest.raises(po.PadimError, match="unknown process"):
        lock.acquire(store, wait=0.2)
    old = time.time() - 60
    os.utime(path, (old, old))
    with lock.store_lock(store):
        assert json.loads(path.read_text())["pid"] == os.getpid()


def _contend(store, log_path, start):
    start.wait(30)
    deadline = time.monotonic() + 60
    while True:
        try:
            lock.acquire(store, "contender", wait=0.05)
            break
        except po.PadimError:
            if time.monotonic() > deadline:
                os._exit(3)
            time.sleep(0.01)
    t0 = time.monotonic()
    info = json.loads(open(os.path.join(store, lock.LOCK_NAME)).read())
    time.sleep(0.05)
    t1 = time.monotonic()
    with open(log_path, "a") as f:
        f.write(f"{os.getpid()} {info['pid']} {t0} {t1}\n")
    lock.release(store)
    os._exit(0)


def test_racing_writers_on_a_stale_lock_hold_it_one_at_a_time(tmp_path):
    store = tmp_path / "m.zarr"
    dead = FORK.Process(target=_die_holding, args=(str(store),))
    dead.start()
    dead.join(30)
    assert (store / lock.LOCK_NAME).exists()
    log_path = tmp_path / "holds.txt"
    start = FORK.Event()
    procs = [FORK.Process(target=_contend, args=(str(store), str(log_path), start)) for _ in range(6)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(90)
    assert [p.exitcode for p in procs] == [0] * 6
    holds = sorted((float(t0), float(t1), int(pid), int(owner))
                   for pid, owner, t0, t1 in (line.split() for line in log_path.read_text().splitlines()))
    assert len(holds) == 6 and {h[2] for h in holds} == {p.pid for p in procs}
    assert all(h[2] == h[3] for h in holds)  # each saw its own name in the lock file
    assert all(a[1] <= b[0] for a, b in zip(holds, holds[1:]))  # never two holders at once
    assert not (store / lock.LOCK_NAME).exists()


def test_url_stores_are_locked_by_a_lock_object_and_a_file_is_no_store(tmp_path, monkeypatch):
    import fsspec

    assert lock.acquire("memory://somewhere") is True and lock.held("memory://somewhere")
    assert fsspec.filesystem("memory").exists("/somewhere/" + lock.LOCK_NAME)
    lock.release("memory://somewhere")
    assert not fsspec.filesystem("memory").exists("/somewhere/" + lock.LOCK_NAME)
    with pytest.raises(po.PadimError, match="has no conditional create that padim_ooc trusts"):
        lock.acquire("http://127.0.0.1:9/x.zarr")  # no conditional create padim_ooc knows to be atomic
    monkeypatch.setenv("PADIM_OOC_URL_LOCK", "off")  # the user's explicit choice: unlocked
    assert lock.acquire("memory://elsewhere") is False
    (tmp_path / "f.zarr").write_text("x")
    with pytest.raises(po.PadimError, match="is a file, not a model store folder"):
        lock.acquire(tmp_path / "f.zarr")
