"""Crash safety: `padim-ooc fit` killed with SIGKILL at many moments, and failed writes.

The fit runs as a real subprocess on 200 small images and is killed (SIGKILL;
also SIGTERM and Ctrl-C) at chosen moments inside a checkpoint (the store's
``PADIM_OOC_PAUSE_AT`` test hook stops it there, then the test kills it) and
at random moments (seeded; see :func:`crash_and_resume`); after every kill
the store must open, hold a whole checkpoint and a ledger that matches it, and
the next run resumes. At the end the statistics must equal an uninterrupted
run's. A failure's message lists every kill: the moment, the random draws,
the image counts before and after.

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
from padim_ooc.store.lock import LOCK_NAME
from padim_ooc.store import ModelStore

from conftest import CLI, CONFIG, moments, write_images

N_IMAGES = 200
EVERY = 10  # checkpoint interval (images): 20 checkpoints in a whole run
FIT_ARGS = ["--weights", "none", "--resize", "32", "--crop", "32", "--batch-size", "5",
            "--checkpoint-every", str(EVERY), "--loader-workers", "0", "-q"]
# chunk writes per checkpoint: mean, m2 (one chunk each at this size), the ledger segment and
# the identities segment (seen/)
CHUNKS_PER_CHECKPOINT = 4
SIGNALS = {"": signal.SIGKILL, "sigterm@": signal.SIGTERM, "ctrl-c@": signal.SIGINT}


@pytest.fixture(scope="module")
def crash_images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("crash") / "images"
    write_images(folder, N_IMAGES, seed=11, size=(36, 36))
    return folder


@pytest.fixture(scope="module")
def reference(crash_images, tmp_path_factory):
    """An uninterrupted run: (model path, its timeline).

    The timeline: seconds from taking the store's lock to the first checkpoint
    (``startup``), and between two checkpoints (``interval``); random kill
    moments are drawn in these windows.
    """
    model = tmp_path_factory.mktemp("ref") / "ref.zarr"
    proc = start_fit(crash_images, model)
    try:
        wait_for_lock(model, proc)
        t_lock, seen = time.monotonic(), {}
        while proc.poll() is None:
            n = store_count(model)
            if n and n not in seen:
                seen[n] = time.monotonic()
            time.sleep(0.002)
        _, err = proc.communicate(timeout=600)
    finally:
        stop(proc)
    assert proc.returncode == 0, err
    first, last = min(seen), max(seen)
    assert last == N_IMAGES
    timeline = {"startup": seen[first] - t_lock,
                "interval": (seen[last] - seen[first]) / max(1, (last - first) // EVERY)}
    return model, timeline


def file_digests(folder: Path) -> set[bytes]:
    """The ledger's identity of every image, computed here with hashlib."""
    return {hashlib.blake2b(p.read_bytes(), digest_size=16).digest() for p in folder.iterdir()}


def check_after_kill(model: Path) -> int:
    """The store opens and is consistent; returns its image count."""
    st = ModelStore.open(model)
    n = st.n_images
    digests = st.ledger_digests()
    assert len(digests) == n and len({bytes(d) for d in digests}) == n  # no image twice
    assert n % EVERY == 0  # always a whole checkpoint
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


def store_count(model: Path) -> int | None:
    """``n_images`` of the live checkpoint, read from the root ``zarr.json`` (replaced atomically)."""
    try:
        return json.loads((model / "zarr.json").read_text())["attributes"]["padim_ooc"]["n_images"]
    except (FileNotFoundError, ValueError, KeyError):
        return None


def start_fit(images: Path, model: Path, marker: Path | None = None, pause: str | None = None):
    env = dict(os.environ)
    env.pop("PADIM_OOC_PAUSE_AT", None)
    if pause:
        env.update(PADIM_OOC_PAUSE_AT=pause, PADIM_OOC_PAUSE_FILE=str(marker))
    return subprocess.Popen([*CLI, "fit", str(images), "--model", str(model), *FIT_ARGS],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def stop(proc) -> None:
    """Leave nothing running (after a failed assertion the fit may sit at a pause point)."""
    if proc.poll() is None:
        proc.kill()
        proc.communicate(timeout=60)


def wait_for(marker: Path, proc, timeout=300.0) -> str:
    """Until the fit stops at its pause point; what it wrote there (``point:n pid=P``)."""
    deadline = time.monotonic() + timeout
    while True:  # the marker's line is complete once it ends with a newline
        try:
            text = marker.read_text()
            if text.endswith("\n"):
                return text
        except FileNotFoundError:
            pass
        if proc.poll() is not None:
            raise AssertionError(f"the fit ended (rc {proc.returncode}) before the pause: {proc.stderr.read()}")
        assert time.monotonic() < deadline, "the fit never reached the pause point"
        time.sleep(0.01)


def wait_for_lock(model: Path, proc, timeout=300.0) -> None:
    """Until ``proc`` holds the store's lock: it has started working on the store."""
    deadline = time.monotonic() + timeout
    while lock_holder(model) != proc.pid:
        assert proc.poll() is None, f"the fit ended (rc {proc.returncode}) before it took the lock"
        assert time.monotonic() < deadline, "the fit never took the lock"
        time.sleep(0.005)


def wait_for_count(model: Path, proc, count: int, timeout=300.0) -> None:
    """Until the store's live checkpoint holds ``count`` images."""
    deadline = time.monotonic() + timeout
    while (store_count(model) or 0) < count:
        assert proc.poll() is None, f"the fit ended (rc {proc.returncode}) before {count} images"
        assert time.monotonic() < deadline, f"the fit never reached {count} images"
        time.sleep(0.002)


def checkpoints_used(moment: str) -> int:
    """How many checkpoints a pause moment lets the killed run complete (its progress)."""
    point, _, nth = moment.split("@")[-1].partition(":")
    n = int(nth or 1)
    return {"checkpoint-written": n - 1, "checkpoint-switched": n,
            "chunk": (n - 1) // CHUNKS_PER_CHECKPOINT}.get(point, 0)


def crash_and_resume(tmp_path, crash_images, reference, moments, seed):
    """Kill a fit at each moment in turn, resume each time; compare with the uninterrupted run.

    ``moments``: pause points (``point:n``: SIGKILL there; ``sigterm@point:n``:
    SIGTERM; ``ctrl-c@point:n``: SIGINT) or ``random``: SIGKILL at a random
    moment, drawn from ``random.Random(seed)``: once the fit holds the lock, it
    waits for ``k`` more checkpoints (``k`` uniform in what the later moments
    leave of the run, so the random kills spread over the whole run), then a
    uniform fraction of the next window (the startup after the lock when
    ``k == 0``, else one checkpoint interval, as timed in the uninterrupted run).
    Progress, not a clock, places the window, so a loaded machine moves no kill
    past the end of the run. Returns the trail: one dict per kill.
    """
    ref_model, timeline = reference
    model = tmp_path / "m.zarr"
    rng = random.Random(seed)
    trail, count, refused = [], 0, False
    try:
        for i, moment in enumerate(moments):
            prefix = moment.split("@")[0] + "@" if "@" in moment else ""
            sig, pause = SIGNALS[prefix], None if moment == "random" else moment[len(prefix):]
            step = {"moment": moment, "before": count}
            trail.append(step)
            marker = tmp_path / f"paused-{i}"
            stale = lock_holder(model)
            proc = start_fit(crash_images, model, marker, pause)
            try:
                if pause:
                    step["at"] = wait_for(marker, proc).split()[0]
                    assert step["at"] == pause, step
                    if not refused:  # while it is stopped mid-checkpoint: a second writer is refused, naming it
                        res = CliRunner().invoke(app, ["fit", str(crash_images), "--model", str(model), *FIT_ARGS])
                        assert res.exit_code == 2, res.output
                        lines = res.stderr.strip().splitlines()
                        assert len(lines) == 1 and lines[0].startswith("error: the model "), res.stderr
                        assert f"pid {proc.pid} on host {socket.gethostname()}, since " in lines[0]
                        refused = True
                else:
                    later = moments[i + 1:]
                    reserve = sum(checkpoints_used(m) for m in later) + 3  # and a margin for the last kill
                    left = (N_IMAGES - count) // EVERY - reserve
                    k = rng.randrange(0, max(0, left // (1 + later.count("random"))) + 1)
                    frac = rng.random()
                    delay = frac * (timeline["startup"] if k == 0 else timeline["interval"])
                    step.update(k=k, frac=round(frac, 3), delay=round(delay, 4))
                    wait_for_lock(model, proc)
                    if k:
                        wait_for_count(model, proc, count + k * EVERY)
                    time.sleep(delay)
                    assert proc.poll() is None, f"the fit ended before the random kill: {step}"
                proc.send_signal(sig)
                _, stderr = proc.communicate(timeout=60)
            finally:
                stop(proc)
            step["rc"] = proc.returncode
            assert "Traceback" not in stderr, stderr
            if stale is not None:  # it held the lock: so it had removed the one the last kill left
                assert f"removed a stale lock on {model} left by `padim-ooc fit` (pid {stale}" in stderr, stderr
            if sig == signal.SIGINT:  # Ctrl-C: one line, exit 130, the lock given back
                assert proc.returncode == 130, stderr
                assert stderr.strip().splitlines()[-1] == "error: interrupted", stderr
                assert lock_holder(model) is None
            else:  # SIGKILL, and SIGTERM alike: no handler runs, the lock stays for the next run to recover
                assert proc.returncode == -sig, stderr
                assert lock_holder(model) == proc.pid
            if (model / "zarr.json").exists():
                step["after"] = count = check_after_kill(model)  # the store opens after every kill
            else:  # killed after taking the lock, before the store was created: nothing else there
                assert count == 0 and all(n == LOCK_NAME or n.endswith(".partial") for n in os.listdir(model))
                step["after"] = "not created"
            assert count >= step["before"], "progress lost across a kill"  # never less than before

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
        assert len(left) == 5 and {"ledger", "seen", "zarr.json"} <= set(left), left  # seen: identities
    except AssertionError as err:  # the trail makes a failure reproducible: seed, draws, where each kill landed
        raise AssertionError(f"{err}\nkill trail (seed {seed}, timeline {timeline}): {trail}") from None
    return trail


def test_killed_fit_resumes_to_the_uninterrupted_statistics(tmp_path, crash_images, reference):
    """SIGKILL at 3 random moments, during a checkpoint write (written, not switched), between two
    chunk writes; SIGTERM after a switch; Ctrl-C between chunk writes; resumed after each."""
    t0 = time.monotonic()
    moments = ["random", "checkpoint-written:2", "chunk:5", "random", "sigterm@checkpoint-switched:1",
               "ctrl-c@chunk:2", "random"]
    trail = crash_and_resume(tmp_path, crash_images, reference, moments, seed=5)
    assert [s["moment"] for s in trail] == moments
    assert sum(s["moment"] == "random" and s["rc"] == -signal.SIGKILL for s in trail) == 3
    gained = {s["moment"]: s["after"] - s["before"] for s in trail if s["moment"] != "random"}
    assert gained == {"checkpoint-written:2": 10, "chunk:5": 10, "sigterm@checkpoint-switched:1": 10,
                      "ctrl-c@chunk:2": 0}, trail
    print(f"\ncrash test: {len(trail)} kill points, {time.monotonic() - t0:.1f} s "
          f"(reference timeline {reference[1]}): {trail}")


@pytest.mark.slow
def test_killed_fit_many_times(tmp_path, crash_images, reference):
    t0 = time.monotonic()
    pauses = ["checkpoint-written:1", "checkpoint-written:2", "checkpoint-switched:1",
              "ctrl-c@checkpoint-written:2", "checkpoint-switched:3", "chunk:1", "chunk:2", "chunk:3",
              "sigterm@checkpoint-written:1", "ctrl-c@checkpoint-switched:1", "chunk:5"]
    # every pause point is reached (each run has work left), random kills between them, one in finalize
    moments = [m for pair in zip(pauses, ["random"] * 8 + [None] * 3) for m in pair if m] + ["final-written:1"]
    trail = crash_and_resume(tmp_path, crash_images, reference, moments, seed=17)
    assert [s["moment"] for s in trail] == moments
    assert sum(s["moment"] == "random" for s in trail) == 8
    print(f"\ncrash test (slow): {len(trail)} kill points, {time.monotonic() - t0:.1f} s: {trail}")


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
    probe = tmp_path / "probe.zarr"  # how many writes a finalize makes: fail at each of them
    shutil.copytree(path, probe)
    with monkeypatch.context() as mp:
        counter = FullDisk(mp)
        assert CliRunner().invoke(app, ["finalize", str(probe)]).exit_code == 0
    assert counter.calls >= 5  # two arrays' metadata, their chunks, the switch of the attributes
    for fail_at in range(counter.calls):
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
