"""Images and models in object storage, against a real S3 endpoint: moto's server mode on the
loopback interface (a free port), which s3fs talks to over HTTP as it would to AWS.

Fit from ``s3://`` images into an ``s3://`` model, incremental fits that do not read the past
again, SIGKILL mid-fit and resume, merge of two S3 stores, sharded fit and ``score --workers 2``
from S3 into S3, tar shards (a broken member is a counted skip), a missing bucket or denied access
(one line, exit 2), two writers on one S3 model (the second refused).
"""
from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

import padim_ooc as po  # noqa: E402
from padim_ooc import sources  # noqa: E402
from padim_ooc.store import ModelStore, lock  # noqa: E402

from conftest import CLI, CROP, RESIZE, cli_error, exact_stats, fit_summary, NOISE_COV, NOISE_MEAN, NOISE_SCORES, rel, run_cli, write_images  # noqa: E402

# the CLI's model for these tests: random resnet18 weights, small crops (the `extractor` fixture's)
CLI_MODEL = ["--weights", "none", "--resize", "72", "--crop", "64", "--batch-size", "4", "--dims", "100",
             "--seed", "0", "--loader-workers", "0", "-q"]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 (a free port), with this process's and its children's
    environment pointing boto at it (fake credentials); an s3fs filesystem on it."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    try:
        yield fs
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def bucket_images(s3, tmp_path_factory):
    """16 images on disk, and the same files in s3://images/train/ (12 in a/, 4 in b/)."""
    local = tmp_path_factory.mktemp("s3imgs")
    paths = write_images(local / "a", 12, seed=31) + write_images(local / "b", 4, seed=32, start=12)
    s3.mkdir("images")
    for p in paths:
        s3.put_file(str(p), f"images/train/{p.parent.name}/{p.name}")
    return paths


def upload(s3, paths, prefix):
    for p in paths:
        s3.put_file(str(p), f"{prefix}/{p.name}")


def stats(url):
    st = ModelStore.open(url)
    return st.n_images, st.mean_array()[...], st.m2_array()[...] / (st.n_images - 1)


def counting_reads(monkeypatch):
    """Every object read through padim_ooc.sources, in a list."""
    read = []
    real = sources._cat_all

    def cat_all(fs, paths):
        read.extend(paths)
        return real(fs, paths)

    monkeypatch.setattr(sources, "_cat_all", cat_all)
    return read


def test_fit_from_s3_into_s3_then_incremental_without_reading_the_past(s3, bucket_images, extractor, monkeypatch):
    s3.mkdir("models-a")
    url = "s3://models-a/m.zarr"
    read = counting_reads(monkeypatch)
    first = fit_summary(["s3://images/train/a/"], url, extractor, batch_size=4, loader_workers=0, checkpoint_every=4)
    assert (first.added, first.checkpoints, len(read)) == (12, 3, 12)
    n, mean, cov = stats(url)
    ref_mean, ref_cov = exact_stats(extractor, bucket_images[:12], 4)
    assert n == 12 and rel(mean, ref_mean) <= 1e-10 and rel(cov, ref_cov) <= 1e-10
    assert not s3.exists("models-a/m.zarr/" + lock.LOCK_NAME)  # the writer's lock was given back

    read.clear()  # the whole bucket: 12 held, recognised by ETag and size, only the 4 new ones read
    second = fit_summary(["s3://images/train/"], url, extractor, batch_size=4, loader_workers=0)
    assert (second.added, second.already_seen, len(read)) == (4, 12, 4)
    assert all("/b/" in key for key in read)
    n, mean, cov = stats(url)
    ref_mean, ref_cov = exact_stats(extractor, bucket_images, 4)
    assert n == 16 and rel(mean, ref_mean) <= 1e-10 and rel(cov, ref_cov) <= 1e-10

    read.clear()  # an object replaced (another ETag) is read and hashed again: new content, added
    changed = write_images(bucket_images[0].parent.parent / "changed", 1, seed=99)[0]
    s3.put_file(str(changed), "images/train/a/img0000.png")
    try:
        third = fit_summary(["s3://images/train/"], url, extractor, batch_size=4, loader_workers=0)
    finally:
        s3.put_file(str(bucket_images[0]), "images/train/a/img0000.png")  # as the other tests expect it
    assert (third.added, third.already_seen, read) == (1, 15, ["images/train/a/img0000.png"])


def test_an_orthogonal_model_in_s3_keeps_its_projection(s3, bucket_images):
    """The projection of a semi-orthogonal embedding is written into the S3 store with it, and the
    reopened model (extended, then scored) uses it."""
    s3.mkdir("models-o")
    url = "s3://models-o/m.zarr"
    ex = po.Extractor("resnet18", weights=None, seed=0, resize=RESIZE, crop=CROP, device="cpu",
                      embedding="orthogonal")
    fit_summary(["s3://images/train/a/"], url, ex, batch_size=4, loader_workers=0)
    assert s3.exists("models-o/m.zarr/embedding/projection/zarr.json")
    assert np.array_equal(ModelStore.open(url).projection(), ex.projection)
    fit_summary(["s3://images/train/"], url, batch_size=4, loader_workers=0, device="cpu")  # rebuilt from S3
    n, mean, cov = stats(url)
    ref_mean, ref_cov = exact_stats(ex, bucket_images, 4)
    assert n == 16 and rel(mean, ref_mean) <= 1e-10 and rel(cov, ref_cov) <= 1e-10


def test_local_files_are_recognised_by_path_size_and_mtime(tmp_path, extractor, monkeypatch):
    paths = write_images(tmp_path / "imgs", 6, seed=3)
    model = tmp_path / "m.zarr"
    fit_summary([tmp_path / "imgs"], model, extractor, batch_size=3, loader_workers=0)
    import importlib

    data = importlib.import_module("padim_ooc.data")
    opened = []
    real = data.read_bytes  # every local image file is read through it

    def read_bytes(path, *args, **kwargs):
        if Path(path).suffix == ".png":
            opened.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(data, "read_bytes", read_bytes)
    again = fit_summary([tmp_path / "imgs"], model, extractor, batch_size=3, loader_workers=0)
    assert (again.added, again.already_seen, opened) == (0, 6, [])
    os.utime(paths[2], ns=(time.time_ns(), time.time_ns() + 10**9))  # touched: read again, same content
    again = fit_summary([tmp_path / "imgs"], model, extractor, batch_size=3, loader_workers=0)
    assert (again.added, again.already_seen, opened) == (0, 6, [paths[2].name])
    st = ModelStore.open(model)
    assert st.attrs["seq"] == 1 and len(st.identity_records()) == 7  # its new identity, without a new state
    again = fit_summary([tmp_path / "imgs"], model, extractor, batch_size=3, loader_workers=0)
    assert (again.added, again.already_seen, opened) == (0, 6, [paths[2].name])  # recognised now


def test_tar_shards_local_and_in_s3_with_a_broken_member(s3, tmp_path, extractor):
    paths = write_images(tmp_path / "imgs", 6, seed=5)
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for p in paths:
            tar.add(p, arcname=f"sample{p.stem}.png")
            meta = json.dumps({"label": 0}).encode()  # WebDataset side files: not images, ignored
            info = tarfile.TarInfo(f"sample{p.stem}.json")
            info.size = len(meta)
            tar.addfile(info, io.BytesIO(meta))
        info = tarfile.TarInfo("broken.png")
        info.size = 9
        tar.addfile(info, io.BytesIO(b"not a png"))
    s3.mkdir("shards")
    s3.put_file(str(shard), "shards/train/shard-000.tar")
    for source, model in ((shard, tmp_path / "local.zarr"), ("s3://shards/train/", tmp_path / "s3.zarr")):
        summary = fit_summary([source], model, extractor, batch_size=3, loader_workers=0)
        assert (summary.added, len(summary.skipped)) == (6, 1), source
        assert summary.skipped[0][0].endswith("broken.png::" + (str(shard) if source == shard else
                                                                 "s3://shards/train/shard-000.tar"))
        assert "not an image" in summary.skipped[0][1]
        n, mean, cov = stats(model)
        ref_mean, ref_cov = exact_stats(extractor, paths, 3)
        assert n == 6 and rel(mean, ref_mean) <= 1e-10 and rel(cov, ref_cov) <= 1e-10
    again = fit_summary([shard], tmp_path / "local.zarr", extractor, batch_size=3, loader_workers=0)
    assert (again.added, again.already_seen) == (0, 6)  # members recognised without reading them
    cut = tmp_path / "cut.tar"  # a shard cut short in its last image: that member is a counted skip
    cut.write_bytes(shard.read_bytes()[: tarfile.open(shard).getmember("sampleimg0005.png").offset_data + 100])
    summary = fit_summary([cut], tmp_path / "cut.zarr", extractor, batch_size=3, loader_workers=0)
    assert summary.added == 5 and len(summary.skipped) == 1 and "truncated" in summary.skipped[0][1]


def test_a_list_file_of_urls(s3, bucket_images, tmp_path, extractor):
    listing = tmp_path / "train.txt"
    listing.write_text("".join(f"s3://images/train/a/{p.name}\n" for p in bucket_images[:5]))
    # one loader worker process (forked): it reads the objects with its own s3fs instance
    summary = fit_summary([listing], tmp_path / "m.zarr", extractor, batch_size=5, loader_workers=1)
    assert summary.added == 5


def test_missing_bucket_or_denied_access_is_one_line_and_exit_2(s3, capsys, monkeypatch):
    cli_error(capsys, "fit", "s3://no-such-bucket/train/", "--model", "s3://no-such-bucket/m.zarr",
              *CLI_MODEL, text="input not found: s3://no-such-bucket/train/")
    cli_error(capsys, "fit", "s3://images/nothing-here/", "--model", "/tmp/never.zarr", *CLI_MODEL,
              text="input not found: s3://images/nothing-here/")

    def denied(*args, **kwargs):  # what s3fs raises for a 403 (moto does not check policies)
        raise PermissionError("Access Denied")

    monkeypatch.setattr(type(s3), "find", denied)
    cli_error(capsys, "fit", "s3://images/train/", "--model", "/tmp/never.zarr", *CLI_MODEL,
              text="access denied to s3://images/train/")


def test_two_writers_on_one_s3_model_the_second_is_refused(s3, bucket_images, capsys):
    s3.mkdir("models-w")
    url = "s3://models-w/m.zarr"
    assert lock.acquire(url, "padim-ooc fit (the first writer)")  # this process writes it
    try:
        proc = run_cli("fit", "s3://images/train/a/", "--model", url, *CLI_MODEL, ok=False)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert f"the model {url} is being written by `padim-ooc fit (the first writer)` (pid {os.getpid()}" in lines[0]
    finally:
        lock.release(url)
    assert not s3.exists("models-w/m.zarr/" + lock.LOCK_NAME)


def test_a_service_that_ignores_the_condition_is_refused(s3, monkeypatch):
    from padim_ooc.store import url_lock

    s3.mkdir("models-i")
    real = s3.pipe_file  # (url_to_fs gives this cached instance)
    monkeypatch.setattr(s3, "pipe_file", lambda path, data, mode="overwrite", **kw:
                        real(path, data, **kw))  # an S3 look-alike that ignores If-None-Match
    monkeypatch.setattr(url_lock, "_checked", set())
    with pytest.raises(po.PadimError, match="the service ignored a conditional put"):
        lock.acquire("s3://models-i/m.zarr")
    assert not s3.exists("models-i/m.zarr/" + lock.LOCK_NAME)


def test_sigkill_mid_fit_and_resume_to_the_uninterrupted_statistics(s3, bucket_images, tmp_path, extractor):
    s3.mkdir("models-k")
    url = "s3://models-k/m.zarr"
    marker = tmp_path / "paused"
    env = {**os.environ, "PADIM_OOC_PAUSE_AT": "checkpoint-written:2", "PADIM_OOC_PAUSE_FILE": str(marker)}
    args = [*CLI, "fit", "s3://images/train/", "--model", url, *CLI_MODEL, "--checkpoint-every", "4",
            "--no-finalize"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        while not (marker.exists() and marker.read_text().endswith("\n")):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # the second checkpoint is written but not switched to; the lock object is held
        assert json.loads(s3.cat_file("models-k/m.zarr/" + lock.LOCK_NAME))["pid"] == proc.pid
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert ModelStore.open(url).n_images == 4  # the first checkpoint
    resumed = run_cli("fit", "s3://images/train/", "--model", url, *CLI_MODEL, "--checkpoint-every", "4",
                      "--no-finalize")
    assert "removed a stale lock" in resumed.stderr
    out = json.loads(resumed.stdout)
    assert (out["added"], out["already_seen"], out["n_images"]) == (12, 4, 16)
    n, mean, cov = stats(url)
    ref_mean, ref_cov = exact_stats(extractor, bucket_images, 4)  # two-pass float64, numpy
    assert n == 16 and rel(mean, ref_mean) <= NOISE_MEAN and rel(cov, ref_cov) <= NOISE_COV
    st = ModelStore.open(url)
    assert len({bytes(d) for d in st.ledger_digests()}) == 16
    assert sorted(k.rsplit("/", 1)[-1] for k in s3.ls("models-k/m.zarr")) == [
        "ledger", "seen", st.attrs["state"], "zarr.json"]  # leftovers of the killed run removed


def test_merge_finalize_and_sharded_score_from_s3_into_s3(s3, bucket_images, extractor):
    s3.mkdir("models-m")
    a, b, merged = "s3://models-m/a.zarr", "s3://models-m/b.zarr", "s3://models-m/merged.zarr"
    fit_summary(["s3://images/train/a/"], a, extractor, batch_size=4, loader_workers=0)
    fit_summary(["s3://images/train/b/"], b, extractor, batch_size=4, loader_workers=0)
    run_cli("merge", a, b, "--model", merged)
    n, mean, cov = stats(merged)
    ref_mean, ref_cov = exact_stats(extractor, bucket_images, 4)
    assert n == 16 and rel(mean, ref_mean) <= 1e-10 and rel(cov, ref_cov) <= 1e-10
    assert ModelStore.open(merged).attrs["finalized"]
    assert len(ModelStore.open(merged).identity_records()) == 16  # the parts' caches of identities

    out = "s3://models-m/scores"
    proc = run_cli("score", merged, "s3://images/train/", "--out", out, "--workers", "2", "--batch-size", "4",
                   "--loader-workers", "0", "-q", timeout=600)
    assert json.loads(proc.stdout)["scored"] == 16
    rows = s3.cat_file("models-m/scores/scores.csv").decode().splitlines()
    assert len(rows) == 17 and rows[1].startswith("s3://images/train/a/img0000.png,")
    one = po.open_model(merged, device="cpu")
    scores, _ = one.score([bucket_images[0]])
    assert abs(float(rows[1].split(",")[1]) - float(scores[0])) <= NOISE_SCORES * abs(float(scores[0]))


def test_sharded_fit_on_a_cluster_reading_from_s3_into_s3(s3, bucket_images, extractor):
    s3.mkdir("models-d")
    url = "s3://models-d/m.zarr"
    proc = run_cli("fit", "s3://images/train/", "--model", url, *CLI_MODEL, "--workers", "2", "--no-finalize",
                   timeout=600)
    assert json.loads(proc.stdout)["added"] == 16
    n, mean, cov = stats(url)
    ref_mean, ref_cov = exact_stats(extractor, bucket_images, 4)
    assert n == 16 and rel(mean, ref_mean) <= NOISE_MEAN and rel(cov, ref_cov) <= NOISE_COV
    assert not s3.exists("models-d/m.zarr.parts")  # the partial stores are removed
    assert len(ModelStore.open(url).identity_records()) == 16  # the shards' caches, merged in


def test_a_refit_after_a_sharded_fit_reads_nothing(s3, monkeypatch):
    read = counting_reads(monkeypatch)  # (the model of the test above)
    again = fit_summary(["s3://images/train/"], "s3://models-d/m.zarr", batch_size=4, loader_workers=0)
    assert (again.added, again.already_seen, read) == (0, 16, [])


def test_the_readme_bucket_example_runs_against_the_test_server(s3, bucket_images):
    """The README's three lines, as written, on s3://my-bucket (the fit with this module's small
    random-weight model appended: the README's default downloads pretrained weights)."""
    text = (Path(__file__).parents[1] / "README.md").read_text()
    block = text.split("<!-- bucket-example:", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line.split("#")[0].split() for line in block.splitlines()]
    assert lines[0][:3] == ["pip", "install", "-e"] and len(lines) == 3
    s3.mkdir("my-bucket")
    upload(s3, bucket_images[:10], "my-bucket/train/good")
    upload(s3, bucket_images[10:], "my-bucket/test")
    fit, score = lines[1], lines[2]
    assert fit[0] == score[0] == "padim-ooc"
    out = json.loads(run_cli(*fit[1:], *CLI_MODEL).stdout)
    assert out["n_images"] == 10 and out["finalized"]
    assert json.loads(run_cli(*score[1:]).stdout)["scored"] == 6
    assert len(s3.cat_file("my-bucket/scores/scores.csv").decode().splitlines()) == 7


def test_images_at_any_fsspec_protocol(tmp_path, extractor):
    import fsspec

    paths = write_images(tmp_path / "imgs", 4, seed=8)
    mem = fsspec.filesystem("memory")
    for p in paths:
        mem.pipe_file(f"/mem-images/train/{p.name}", p.read_bytes())
    summary = fit_summary(["memory://mem-images/train/"], tmp_path / "m.zarr", extractor, batch_size=2,
                          loader_workers=0)
    assert summary.added == 4
    n, mean, cov = stats(tmp_path / "m.zarr")
    ref_mean, ref_cov = exact_stats(extractor, paths, 2)
    assert rel(mean, ref_mean) <= 1e-10 and rel(cov, ref_cov) <= 1e-10
