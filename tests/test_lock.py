"""The writer's lock: one writer per store, holders named, stale locks recovered, races safe.

Holders are real processes (forked from the test process, so they use the
same code without paying for another ``import torch``).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import time

import psutil
import pytest

import padim_ooc as po
from padim_ooc import lock
from padim_ooc.store import ModelStore

from test_store import CONFIG, moments

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
                                            r"2026-01-01T00:00:00\+00:00\); wait .*delete .*\.padim_ooc\.lock"):
        lock.acquire(store)
    assert path.exists()


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


def test_url_stores_are_not_locked_and_a_file_is_no_store(tmp_path):
    assert lock.acquire("memory://somewhere") is False
    lock.release("memory://somewhere")
    (tmp_path / "f.zarr").write_text("x")
    with pytest.raises(po.PadimError, match="is a file, not a model store folder"):
        lock.acquire(tmp_path / "f.zarr")
