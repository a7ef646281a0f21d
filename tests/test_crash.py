"""Crash safety: `padim-ooc fit` killed with SIGKILL at many moments, and failed writes.

The fit runs as a real subprocess on 200 small images and is killed (SIGKILL)
at chosen moments inside a checkpoint (the store's ``PADIM_OOC_PAUSE_AT`` test
hook stops it there, then the test kills it) and at random moments; after
every kill the store must open, hold a whole checkpoint and a ledger that
matches it, and the next run resumes. At the end the statistics must equal an
uninterrupted run's.

Why bit-equality can be asked for: CPU convolution results depend slightly
(~1e-6) on the batch composition. Every run here uses ``--batch-size 5`` and
``--checkpoint-every 10``, so checkpoints fall on batch boundaries and a
resumed run forms exactly the batches (and the fold groups) that the
uninterrupted run formed after that checkpoint: the same features, folded in
the same order.

A failed write (a full disk, an I/O error) is simulated in two ways: a real
file-size limit (``RLIMIT_FSIZE``: the kernel refuses the write with EFBIG)
on a real CLI run, and ``ENOSPC`` raised by Zarr's local store at every
single write of a checkpoint in turn.
"""
from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

import padim_ooc as po
from padim_ooc.cli import app
from padim_ooc.lock import LOCK_NAME
from padim_ooc.store import ModelStore

from conftest import CLI, write_images
from test_store import CONFIG, moments

N_IMAGES = 200
FIT_ARGS = ["--weights", "none", "--resize", "32", "--crop", "32", "--batch-size", "5",
            "--checkpoint-every", "10", "--loader-workers", "0", "-q"]


@pytest.fixture(scope="module")
def crash_images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("crash") / "images"
    write_images(folder, N_IMAGES, seed=11, size=(36, 36))
    return folder


@pytest.fixture(scope="module")
def reference(crash_images, tmp_path_factory):
    """An uninterrupted run: (model path, seconds it worked once it held the store's lock)."""
    model = tmp_path_factory.mktemp("ref") / "ref.zarr"
    proc = start_fit(crash_images, model)
    wait_for_lock(model, proc)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return model, time.monotonic() - t0


def file_digests(folder: Path) -> set[bytes]:
    """The ledger's identity of every image, computed here with hashlib."""
    return {hashlib.blake2b(p.read_bytes(), digest_size=16).digest() for p in folder.iterdir()}


def check_after_kill(model: Path) -> int:
    """The store opens and is consistent; returns its image count."""
    st = ModelStore.open(model)
    n = st.n_images
    digests = st.ledger_digests()
    assert len(digests) == n and len({bytes(d) for d in digests}) == n  # no image twice
    assert n % 10 == 0  # always a whole checkpoint
    if n:
        mean, m2 = st.mean_array()[...], st.m2_array()[...]
        assert np.isfinite(mean).all() and np.isfinite(m2).all()
        # a covariance: symmetric, non-negative diagonal
        assert np.abs(m2 - np.swapaxes(m2, 1, 2)).max() <= 1e-12 * np.abs(m2).max()
        assert (np.diagonal(m2, axis1=1, axis2=2) >= 0).all()
    return n


def lock_holder(model: Path) -> int | None:
    """The pid in the store's lock file (SIGKILL leaves it behind), or None."""
    try:
        return json.loads((model / LOCK_NAME).read_text())["pid"]
    except (FileNotFoundError, ValueError, KeyError):
        return None


def start_fit(images: Path, model: Path, marker: Path | None = None, pause: str | None = None):
    env = dict(os.environ)
    env.pop("PADIM_OOC_PAUSE_AT", None)
    if pause:
        env.update(PADIM_OOC_PAUSE_AT=pause, PADIM_OOC_PAUSE_FILE=str(marker))
    return subprocess.Popen([*CLI, "fit", str(images), "--model", str(model), *FIT_ARGS],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for(marker: Path, proc, timeout=300.0) -> str:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the fit ended (rc {proc.returncode}) before the pause: {proc.stderr.read()}")
        assert time.monotonic() < deadline, "the fit never reached the pause point"
        time.sleep(0.02)
    time.sleep(0.05)
    return marker.read_text()


def wait_for_lock(model: Path, proc, timeout=300.0) -> None:
    """Until ``proc`` holds the store's lock: it has started working on the store."""
    deadline = time.monotonic() + timeout
    while lock_holder(model) != proc.pid and proc.poll() is None:
        assert time.monotonic() < deadline, "the fit never took the lock"
        time.sleep(0.02)


def kill(proc, sig=signal.SIGKILL) -> tuple[bool, str]:
    """Send ``sig``; (whether it was still running, its stderr)."""
    running = proc.poll() is None
    if running:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return running, err


def crash_and_resume(tmp_path, crash_images, reference, moments, seed):
    """Kill a fit at each moment in turn, resume each time; compare with the uninterrupted run.

    ``moments``: pause points (``point:n``, SIGKILL there; ``ctrl-c@point:n``, SIGINT there)
    or ``random`` (SIGKILL after a random delay once the fit holds the store's lock).
    """
    ref_model, work_seconds = reference
    model = tmp_path / "m.zarr"
    rng = random.Random(seed)
    plan = [("random", None) if m == "random" else ("pause", m) for m in moments]
    killed, counts, refused = [], [], False
    for i, (kind, pause) in enumerate(plan):
        marker = tmp_path / f"paused-{i}"
        stale = lock_holder(model)
        sig = signal.SIGKILL
        if pause and pause.startswith("ctrl-c@"):
            sig, pause = signal.SIGINT, pause.split("@", 1)[1]
        proc = start_fit(crash_images, model, marker, pause)
        if kind == "pause":
            where = wait_for(marker, proc)
            assert where.startswith(pause.split(":")[0])
            if not refused:  # while it is stopped mid-checkpoint: a second writer is refused, naming it
                res = CliRunner().invoke(app, ["fit", str(crash_images), "--model", str(model), *FIT_ARGS])
                assert res.exit_code == 2, res.output
                lines = res.stderr.strip().splitlines()
                assert len(lines) == 1 and lines[0].startswith("error: the model "), res.stderr
                assert f"pid {proc.pid} on host {socket.gethostname()}, since " in lines[0]
                refused = True
        else:  # a random moment of its work (the lock is taken once torch is loaded)
            wait_for_lock(model, proc)
            left = 1 - (counts[-1] if counts else 0) / N_IMAGES
            time.sleep(rng.uniform(0.0, 0.5) * work_seconds * left)
        running, stderr = kill(proc, sig)
        assert "Traceback" not in stderr
        if stale is not None and lock_holder(model) != stale:  # it got as far as the lock
            assert f"removed a stale lock on {model} left by `padim-ooc fit` (pid {stale}" in stderr
        if not running:  # a random delay can outlast the run: then it finished
            assert proc.returncode == 0, stderr
            break
        if sig == signal.SIGINT:  # Ctrl-C: one line, exit 130, the lock given back
            assert proc.returncode == 130 and stderr.strip().splitlines()[-1] == "error: interrupted", stderr
            assert lock_holder(model) is None
        else:
            assert proc.returncode == -signal.SIGKILL
        killed.append(("ctrl-c@" if sig == signal.SIGINT else "") + (pause or "random"))
        if (model / "zarr.json").exists():
            counts.append(check_after_kill(model))
    stale = lock_holder(model)
    final = subprocess.run([*CLI, "fit", str(crash_images), "--model", str(model), *FIT_ARGS],
                           capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr
    assert "Traceback" not in final.stderr
    if stale is not None:
        assert f"removed a stale lock on {model} left by `padim-ooc fit` (pid {stale}" in final.stderr
    out = json.loads(final.stdout)
    assert out["n_images"] == N_IMAGES and out["finalized"]

    got, ref = ModelStore.open(model), ModelStore.open(ref_model)
    assert got.n_images == ref.n_images == N_IMAGES
    digests = got.ledger_digests()
    assert len(digests) == N_IMAGES and {bytes(d) for d in digests} == file_digests(crash_images)
    for name in ("mean_array", "m2_array"):
        a, b = getattr(got, name)()[...], getattr(ref, name)()[...]
        assert np.abs(a - b).max() <= 1e-12 * np.abs(b).max(), name
    (pa_mean, pa_prec), (pb_mean, pb_prec) = got.final_arrays(), ref.final_arrays()
    assert np.array_equal(pa_prec[...], pb_prec[...]) and np.array_equal(pa_mean[...], pb_mean[...])
    # nothing left behind: one state, one final, the ledger, the attributes
    left = sorted(os.listdir(model))
    assert len(left) == 4 and "ledger" in left and "zarr.json" in left, left
    return killed, counts


def test_killed_fit_resumes_to_the_uninterrupted_statistics(tmp_path, crash_images, reference):
    t0 = time.monotonic()
    pauses = ["checkpoint-written:3", "ctrl-c@chunk:2"]
    killed, counts = crash_and_resume(tmp_path, crash_images, reference, pauses + ["random"], seed=5)
    assert killed[:2] == pauses and counts[:2] == [20, 20]
    assert counts == sorted(counts)  # progress is never lost across kills
    print(f"\ncrash test: {len(killed)} kill points {killed}, counts after kills {counts}, "
          f"{time.monotonic() - t0:.1f} s (reference worked {reference[1]:.1f} s)")


@pytest.mark.slow
def test_killed_fit_many_times(tmp_path, crash_images, reference):
    t0 = time.monotonic()
    pauses = ["checkpoint-written:1", "checkpoint-written:2", "checkpoint-switched:1",
              "ctrl-c@checkpoint-written:2", "checkpoint-switched:3", "chunk:1", "chunk:2", "chunk:3",
              "ctrl-c@checkpoint-switched:1", "chunk:5"]
    # every pause point is reached (each run has work left), then random kills, then one in finalize
    moments = pauses + ["random"] * 8 + ["final-written:1"]
    killed, counts = crash_and_resume(tmp_path, crash_images, reference, moments, seed=17)
    assert killed[:len(pauses)] == pauses
    print(f"\ncrash test (slow): {len(killed)} kill points, counts {counts}, {time.monotonic() - t0:.1f} s")


# ---- failed writes --------------------------------------------------------------------------

def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, image_dir, extractor):
    model = tmp_path / "m.zarr"
    po.fit([image_dir / "a"], model, extractor=extractor, batch_size=8, loader_workers=0)
    before = {p.relative_to(model): p.read_bytes() for p in model.rglob("*") if p.is_file()}
    # the next checkpoint's m2 (16 x 16 positions x 100 x 100 float64 = 20 MB) exceeds the limit
    proc = subprocess.run([*CLI, "fit", str(image_dir), "--model", str(model), "--weights", "none",
                           "--resize", "72", "--crop", "64", "--loader-workers", "0", "-q"],
                          capture_output=True, text=True, timeout=600, preexec_fn=_limit_file_size(2**20))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"error: cannot write the model store {model}: File too large; "
                     "the previous checkpoint (20 images) is intact"], proc.stderr
    after = {p.relative_to(model): p.read_bytes() for p in model.rglob("*") if p.is_file()}
    assert after == before  # byte for byte: the failed checkpoint was cleaned up
    m = po.open_model(model)
    assert m.n_images == 20 and m.finalized
    scores, _ = m.score([p for p in sorted((image_dir / "b").iterdir())][:2])
    assert np.isfinite(scores).all()


class FullDisk:
    """Zarr's local store raising ENOSPC from the ``fail_at``-th write on (0-based); counts writes."""

    def __init__(self, monkeypatch, fail_at=None):
        self.calls = 0
        self.fail_at = fail_at
        original = zarr.storage.LocalStore.set

        async def set(store, key, value):
            self.calls += 1
            if self.fail_at is not None and self.calls > self.fail_at:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return await original(store, key, value)

        monkeypatch.setattr(zarr.storage.LocalStore, "set", set)


def test_enospc_at_every_write_of_a_checkpoint(tmp_path, monkeypatch):
    base = tmp_path / "base.zarr"
    with ModelStore.create(base, CONFIG) as st:
        st._write_attrs(chunk_positions=4)  # 15 positions in 4 chunks: failures between chunks too
        first = moments(5, seed=1)
        st.checkpoint(first, [bytes([i]) * 16 for i in range(5)])
    second = moments(9, seed=2)
    new = [bytes([100 + i]) * 16 for i in range(4)]
    probe = tmp_path / "probe.zarr"
    shutil.copytree(base, probe)
    with monkeypatch.context() as mp:
        counter = FullDisk(mp)
        with ModelStore.open(probe, writable=True) as st:
            counter.calls = 0
            st.checkpoint(second, new)
        writes = counter.calls
    assert writes >= 12  # group, 2 arrays x (metadata + 4 chunks), ledger segment, attributes
    for k in range(writes):
        path = tmp_path / f"fail{k}.zarr"
        shutil.copytree(base, path)
        with monkeypatch.context() as mp:
            disk = FullDisk(mp)
            with ModelStore.open(path, writable=True) as st:
                disk.calls, disk.fail_at = 0, k
                with pytest.raises(po.PadimError) as err:
                    st.checkpoint(second, new)
        assert str(err.value) == (f"cannot write the model store {path}: No space left on device; "
                                  "the previous checkpoint (5 images) is intact")
        back = ModelStore.open(path)
        m = back.load_moments()
        assert m.n == 5 and torch.equal(m.mean, first.mean) and torch.equal(m.m2, first.m2)
        assert back.ledger() == {bytes([i]) * 16 for i in range(5)}
        assert sorted(os.listdir(path)) == ["ledger", "state-000001", "zarr.json"], k
        with ModelStore.open(path, writable=True) as st:  # and the next try succeeds
            st.checkpoint(second, new)
        again = ModelStore.open(path).load_moments()
        assert again.n == 9 and torch.equal(again.m2, second.m2)


def test_a_failed_write_leaves_no_folder_behind_even_when_other_writes_land_later(tmp_path, monkeypatch):
    """Zarr writes an array's metadata and its parent group's metadata concurrently: when the
    array's fails, the group's still lands after the error; the new folder must still go."""
    path = tmp_path / "m.zarr"
    with ModelStore.create(path, CONFIG) as st:
        st.checkpoint(moments(5, seed=1), [bytes([i]) * 16 for i in range(5)])
    original_set = zarr.storage.LocalStore.set
    original_set_new = zarr.storage.LocalStore.set_if_not_exists

    async def set(store, key, value):
        if key == "state-000002/mean/zarr.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return await original_set(store, key, value)

    async def set_if_not_exists(store, key, value):
        if key == "state-000002/zarr.json":
            await asyncio.sleep(0.5)  # lands after the failure reached the caller
        return await original_set_new(store, key, value)

    with monkeypatch.context() as mp:
        mp.setattr(zarr.storage.LocalStore, "set", set)
        mp.setattr(zarr.storage.LocalStore, "set_if_not_exists", set_if_not_exists)
        with ModelStore.open(path, writable=True) as st:
            with pytest.raises(po.PadimError, match="No space left on device"):
                st.checkpoint(moments(9, seed=2), [bytes([100]) * 16])
        time.sleep(0.6)
    assert sorted(os.listdir(path)) == ["ledger", "state-000001", "zarr.json"]
    assert ModelStore.open(path).load_moments().n == 5


def test_interrupted_writes_leave_nothing_that_breaks_the_store(tmp_path):
    """What a kill leaves (temporary files, half-deleted groups) is cleaned when next written."""
    path = tmp_path / "m.zarr"
    with ModelStore.create(path, CONFIG) as st:
        st.checkpoint(moments(5), [b"a" * 16])
    (path / "zarr.0123abcd.partial").write_bytes(b"{")  # a kill while the attributes were written
    half = path / "state-000007" / "m2" / "c"
    half.mkdir(parents=True)  # a kill while an old state was deleted: its zarr.json already gone
    (half / "0").write_bytes(b"x" * 8)
    (path / "ledger" / "000009.partial").write_bytes(b"")
    assert ModelStore.open(path).load_moments().n == 5
    with ModelStore.open(path, writable=True):
        pass
    assert sorted(os.listdir(path)) == ["ledger", "state-000001", "zarr.json"]
    assert sorted(os.listdir(path / "ledger")) == ["000001", "zarr.json"]
    # a creation killed while it wrote the attributes: the folder holds only a temporary file
    fresh = tmp_path / "new.zarr"
    fresh.mkdir()
    (fresh / "zarr.4567cdef.partial").write_bytes(b'{"zarr_fo')
    with ModelStore.create(fresh, CONFIG):
        pass
    assert sorted(os.listdir(fresh)) == ["zarr.json"]


def test_enospc_during_finalize_keeps_the_model_as_it_was(tmp_path, image_dir, extractor, monkeypatch):
    path = tmp_path / "m.zarr"
    po.fit([image_dir / "a"], path, extractor=extractor, batch_size=10, loader_workers=0, finalize=False)
    before = {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    for fail_at in (0, 2, 5):  # the first array's metadata, a chunk, the switch of the attributes
        with monkeypatch.context() as mp:
            FullDisk(mp, fail_at=fail_at)
            res = CliRunner().invoke(app, ["finalize", str(path)])
        assert res.exit_code == 2 and "Traceback" not in res.output
        [line] = res.stderr.strip().splitlines()
        assert line.startswith("error: ") and "No space left on device" in line, line
        st = ModelStore.open(path)
        assert not st.attrs["finalized"] and st.n_images == 20
    with ModelStore.open(path, writable=True):  # leftovers of the failed attempts are removed
        pass
    after = {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    assert after == before
    assert CliRunner().invoke(app, ["finalize", str(path)]).exit_code == 0
    assert ModelStore.open(path).attrs["finalized"]
