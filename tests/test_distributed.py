"""A real dask.distributed LocalCluster (2 worker processes on loopback): finalize, sharded
scoring (with a worker killed mid-run), sharded fit, and the CLI pointed at the cluster."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import padim_ooc as po
from padim_ooc.data import list_images
from padim_ooc.parallel.client import open_client
from padim_ooc.finalize import finalize
from padim_ooc.score import score_images
from padim_ooc.store import ModelStore as _Store
from padim_ooc.parallel.score_shards import score_shard_size, score_sharded
from padim_ooc.parallel.tasks import shard_ranges
from padim_ooc.store import ModelStore
from padim_ooc.welford import Moments

from conftest import (NOISE_COV, NOISE_MEAN, NOISE_PRECISION, NOISE_SCORES, exact_stats, exact_stats_on, fit_summary,
                      rel, run_cli, score_options)


@pytest.fixture(scope="module")
def cluster():
    """One local cluster for the module; yields (client, lines it printed)."""
    lines: list[str] = []
    with open_client(workers=2, echo=lines.append) as client:
        yield client, lines


def test_shard_ranges_align_to_batches():
    assert shard_ranges(40, 5, 3) == [(0, 15), (15, 30), (30, 40)]
    assert shard_ranges(7, 8, 4) == [(0, 7)]
    assert shard_ranges(0, 8, 4) == []
    ranges = shard_ranges(1001, 32, 7)
    assert ranges[0][0] == 0 and ranges[-1][1] == 1001 and all((b - a) % 32 == 0 for a, b in ranges[:-1])


def test_score_shards_have_a_bounded_size():
    """The number of scoring shards grows with N; no shard holds more than its cap."""
    for count in (100, 10_000, 1_000_000):
        ranges = shard_ranges(count, 32, 4, max_size=256)
        assert max(b - a for a, b in ranges) <= 256 and len(ranges) >= max(4, count / 256)
        assert ranges[0][0] == 0 and ranges[-1][1] == count and all(x[1] == y[0] for x, y in zip(ranges, ranges[1:]))
        assert all(a % 32 == 0 for a, _ in ranges)  # batch boundaries
    assert shard_ranges(100, 64, 1, max_size=10) == [(0, 64), (64, 100)]  # at least one batch a shard
    assert score_shard_size(224, maps=False) == 256
    assert score_shard_size(1024, maps=True) * 1024 * 1024 * 2 <= 64 * 2**20  # maps of one shard: <= 64 MiB


def test_cluster_set_up(cluster):
    client, lines = cluster
    assert len(client.scheduler_info()["workers"]) == 2
    assert any("dashboard at http://127.0.0.1:" in line for line in lines), lines
    assert set(client.run(torch.get_num_threads).values()) == {1}  # no oversubscription
    pids = client.run(os.getpid)
    assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()


def test_workers_take_their_own_gpu_round_robin(cluster):
    """Each worker of a host is numbered when the client registers its plugin: with 2 GPUs the two
    workers take cuda:0 and cuda:1 alone; with 1 they share it and each budgets half of it
    (asked of the real worker processes; the GPU count is a parameter, no GPU needed)."""
    from padim_ooc.parallel import devices

    client, _ = cluster
    two = sorted(client.run(devices.worker_gpu, 2).values())
    one = sorted(client.run(devices.worker_gpu, 1).values())
    assert two == [(0, 1), (1, 1)] and one == [(0, 2), (0, 2)], (two, one)
    assert devices.worker_gpu(2) is None  # the client's own process is no worker


def test_gpu_shares_add_up():
    from padim_ooc.parallel.devices import assign_slots, gpu_share

    slots = assign_slots({"tcp://a:2": "a", "tcp://a:1": "a", "tcp://b:9": "b", "tcp://a:3": "a"})
    assert slots == {"tcp://a:1": (0, 3), "tcp://a:2": (1, 3), "tcp://a:3": (2, 3), "tcp://b:9": (0, 1)}
    for n in range(1, 9):
        for gpus in range(1, 5):
            shares = [gpu_share(rank, n, gpus) for rank in range(n)]
            used = {index for index, _ in shares}
            assert used == set(range(min(n, gpus)))  # every GPU used before any is shared
            # each worker budgets 1/sharers of its GPU: at most one whole GPU per device in all
            for index in used:
                assert sum(1 / s for i, s in shares if i == index) == pytest.approx(1.0)


def test_finalize_on_the_cluster(cluster, tmp_path):
    client, _ = cluster
    rng = np.random.default_rng(0)
    positions, dims, n = 15, 160, 200  # d > 150: the batched-LU trap
    config = {"backbone": "resnet18", "layers": ["layer1"], "layer_channels": [dims],
              "channels": list(range(dims)), "dims": dims, "seed": 0, "weights": "random:seed=0",
              "weights_digest": "x", "resize": 64, "crop": 64, "normalize_mean": [0.5] * 3,
              "normalize_std": [0.5] * 3, "grid": [3, 5]}
    store = ModelStore.create(tmp_path / "m.zarr", config)
    store._write_attrs(chunk_positions=4)  # 4 chunks, so several tasks
    x = rng.normal(size=(positions, n, dims))
    store.checkpoint(Moments.from_batch(torch.from_numpy(x)), [])
    finalize(store, eps=0.01, client=client)
    mean32, prec = ModelStore.open(tmp_path / "m.zarr").final_arrays()
    prec = prec[...]
    for p in (0, 5, 14):
        ref = np.linalg.inv(np.cov(x[p], rowvar=False) + 0.01 * np.eye(dims))
        np.testing.assert_allclose(prec[p], ref, rtol=1e-3, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(mean32[...], x.mean(axis=1), rtol=1e-6)


def reference_scores(model_path, paths, batch_size):
    model = po.open_model(model_path, device="cpu")
    out = np.full(len(paths), np.nan)

    def on_batch(indices, scores, maps):
        out[indices] = scores

    score_images(model, paths, score_options(batch_size=batch_size, loader_workers=0), on_batch)
    return out


def test_sharded_scores_equal_one_process(cluster, fitted, image_dir):
    client, _ = cluster
    paths = list_images([image_dir / "b", image_dir / "a"])
    ref = reference_scores(fitted, paths, 4)
    seen, maps = [], {}

    def on_result(indices, scores, shard_maps):
        seen.extend(indices.tolist())
        for i, s, m in zip(indices, scores, shard_maps):
            maps[int(i)] = (s, m)

    bad = score_sharded(_Store.open(fitted), paths, client, score_options(batch_size=4, maps=True, device="cpu"),
                        shards=5, on_result=on_result)
    assert bad == []
    assert sorted(seen) == list(range(len(paths)))
    got = np.array([maps[i][0] for i in range(len(paths))])
    np.testing.assert_allclose(got, ref, rtol=NOISE_SCORES)  # workers' features: float32 rounding
    # the map's maximum is the score (maps come back as float16)
    np.testing.assert_allclose([maps[i][1].max() for i in range(len(paths))], ref, rtol=2e-3)


def test_many_small_shards_equal_one_process(cluster, fitted, image_dir):
    """Shards capped at 8 images: 40 images give 5+ shard results, in any order, the one-process scores."""
    client, _ = cluster
    paths = list_images([image_dir / "b", image_dir / "a"])
    ref = reference_scores(fitted, paths, 4)
    sizes, got = [], np.full(len(paths), np.nan)

    def on_result(indices, scores, _maps):
        sizes.append(len(indices))
        assert np.isnan(got[indices]).all()  # never twice
        got[indices] = scores

    score_sharded(_Store.open(fitted), paths, client, score_options(batch_size=4, device="cpu"),
                  max_shard_images=8, on_result=on_result)
    assert len(sizes) == 5 and max(sizes) == 8
    np.testing.assert_allclose(got, ref, rtol=NOISE_SCORES)
    # each worker kept its copy of the model only for the run
    from padim_ooc.parallel import score_shards

    assert set(client.run(lambda: len(score_shards._models)).values()) == {0}


def test_api_with_a_client(cluster, fitted, image_dir):
    from padim_ooc.api import score_files

    client, _ = cluster
    paths = list_images([image_dir / "b"])
    scores, maps = score_files(fitted, [image_dir / "b"], batch_size=4, maps=True, device="cpu", client=client)
    np.testing.assert_allclose(scores, reference_scores(fitted, paths, 4), rtol=NOISE_SCORES)
    assert maps.shape == (20, 64, 64) and maps.dtype == np.float16


def test_killed_worker_every_image_scored_once(cluster, fitted, image_dir):
    client, _ = cluster
    paths = list_images([image_dir / "b", image_dir / "a"])
    ref = reference_scores(fitted, paths, 2)
    pids = client.run(os.getpid)
    killed = {}
    seen = []

    def on_result(indices, scores, _maps):
        if not killed:  # first shard back: kill a worker that is working on another shard now
            busy = {addr: keys for addr, keys in client.processing().items() if keys}
            addr = next(iter(busy))
            os.kill(pids[addr], signal.SIGKILL)
            killed[addr] = list(busy[addr])
        seen.extend(zip(indices.tolist(), scores.tolist()))

    score_sharded(_Store.open(fitted), paths, client, score_options(batch_size=2, device="cpu"), shards=10,
                  on_result=on_result)
    assert killed and all(keys for keys in killed.values())
    indices = [i for i, _ in seen]
    assert sorted(indices) == list(range(len(paths)))  # every image exactly once
    np.testing.assert_allclose(np.array([s for _, s in sorted(seen)]), ref, rtol=NOISE_SCORES)
    client.wait_for_workers(2, timeout=60)  # the nanny restarted the killed worker
    assert pids[next(iter(killed))] not in client.run(os.getpid).values()


def test_sharded_fit_equals_one_process(cluster, tmp_path, image_dir, extractor, capfd):
    import re

    import psutil

    client, _ = cluster
    one = fit_summary([image_dir], tmp_path / "one.zarr", extractor, batch_size=5,
                    loader_workers=0, progress=False)
    rss = client.run(lambda: psutil.Process().memory_info().rss)
    limits = {a: w["memory_limit"] for a, w in client.scheduler_info(n_workers=-1)["workers"].items()}
    capfd.readouterr()
    summary = fit_summary([image_dir], tmp_path / "sharded.zarr", extractor, client=client, batch_size=5,
                          checkpoint_every=6, shards=3, device="cpu", progress=True)
    # the plans printed are the workers' own: budget = 0.8 x min(available, limit - the worker's RSS)
    plans = re.findall(r"memory plan: one pass .* budget ([\d.]+) GiB\) \[worker (\S+)\]", capfd.readouterr().err)
    assert plans and len({w for _, w in plans}) == len(plans)
    for budget, worker in plans:
        assert worker in limits
        assert float(budget) <= 0.8 * (limits[worker] - rss[worker]) / 2**30 + 0.005
    assert summary.added == 40 and summary.n_images == 40 and one.n_images == 40
    assert not (tmp_path / "sharded.zarr.parts").exists()
    a, b = po.open_model(tmp_path / "one.zarr"), po.open_model(tmp_path / "sharded.zarr")
    # shards of 15, 15, 10 images start at batch boundaries: the same batches, computed on the
    # workers (other process, one thread): the one-process statistics to float32 rounding ...
    assert rel(b.mean, a.mean) <= NOISE_MEAN
    assert rel(b.covariance(), a.covariance()) <= NOISE_COV
    mean, cov = exact_stats(extractor, list_images([image_dir]), 5)  # independent numpy two-pass, here
    assert rel(b.covariance(), cov) <= NOISE_COV
    # ... and exactly the two-pass statistics of the features the workers compute (numpy float64)
    mean, cov = exact_stats_on(client, b.store.config, list_images([image_dir]), 5)
    assert rel(b.mean, mean) <= 1e-10 and rel(b.covariance(), cov) <= 1e-10
    assert b.store.ledger() == a.store.ledger()


def test_sharded_fit_with_the_float32_fold(cluster, tmp_path, image_dir, extractor):
    """``fold="float32"`` reaches the shards: within 1e-6 (not 1e-10: it rounds) of the two-pass
    float64 statistics of the features the workers compute."""
    client, _ = cluster
    summary = fit_summary([image_dir], tmp_path / "sharded.zarr", extractor, client=client, batch_size=5,
                          shards=2, device="cpu", fold="float32")
    assert summary.n_images == 40
    b = po.open_model(tmp_path / "sharded.zarr")
    mean, cov = exact_stats_on(client, b.store.config, list_images([image_dir]), 5)
    err = rel(b.covariance(), cov)
    assert rel(b.mean, mean) <= 1e-6 and 1e-12 < err <= 1e-6


def test_api_fit_on_a_client_equals_one_process(cluster, tmp_path, image_dir, extractor):
    """``padim_ooc.fit(..., client=)``: sharded fit, merge and finalize on the cluster."""
    client, _ = cluster
    one = po.fit([image_dir / "a"], tmp_path / "one.zarr", extractor=extractor, batch_size=4, loader_workers=0)
    two = po.fit([image_dir / "a"], tmp_path / "two.zarr", extractor=extractor, batch_size=4, client=client)
    assert two.finalized and two.n_images == one.n_images == 20
    assert rel(two.covariance(), one.covariance()) <= NOISE_COV and rel(two.mean, one.mean) <= NOISE_MEAN
    (_, p1), (_, p2) = one.store.final_arrays(), two.store.final_arrays()
    assert rel(p2[...], p1[...]) <= NOISE_PRECISION
    mean, cov = exact_stats_on(client, two.store.config, list_images([image_dir / "a"]), 4)
    assert rel(two.mean, mean) <= 1e-10 and rel(two.covariance(), cov) <= 1e-10


def test_sharded_fit_extends_a_model_and_drops_repeats(cluster, tmp_path, image_dir, extractor):
    client, _ = cluster
    copies = tmp_path / "copies"
    copies.mkdir()
    src = list_images([image_dir / "b"])
    (copies / "copy0.png").write_bytes(src[0].read_bytes())
    (copies / "copy1.png").write_bytes(src[7].read_bytes())
    (copies / "junk.png").write_bytes(b"not an image")
    path = tmp_path / "m.zarr"
    fit_summary([image_dir / "a"], path, extractor, batch_size=8, loader_workers=0, progress=False)
    summary = fit_summary([image_dir / "a", image_dir / "b", copies], path, client=client, batch_size=8,
                          device="cpu", progress=False)
    assert (summary.added, summary.already_seen, summary.duplicates) == (20, 20, 2)
    assert [name for name, _ in summary.skipped] == [str(copies / "junk.png")]
    assert summary.n_images == 40
    model = po.open_model(path)
    mean, cov = exact_stats(extractor, list_images([image_dir]), 8)
    assert rel(model.mean, mean) <= 1e-6 and rel(model.covariance(), cov) <= 1e-5
    assert len(model.store.ledger()) == 40
    # on_error="fail": the shard's error reaches the caller, the model and its folder are as they were
    with pytest.raises(po.PadimError, match="junk.png"):
        fit_summary([copies], path, client=client, batch_size=8, device="cpu", progress=False, on_error="fail")
    assert ModelStore.open(path).n_images == 40 and not (tmp_path / "m.zarr.parts").exists()


def test_cli_on_an_existing_cluster(cluster, fitted, tmp_path, image_dir):
    client, _ = cluster
    address = client.scheduler.address
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "padim_ooc", "score", fitted, image_dir / "b", "--out", out,
                           "--scheduler", address, "--device", "cpu", "--batch-size", "4", "-q"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["scored"] == 20
    with open(out / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    paths = list_images([image_dir / "b"])
    assert [r["path"] for r in rows] == [str(p) for p in paths]  # input order
    ref = reference_scores(fitted, paths, 4)
    np.testing.assert_allclose([float(r["score"]) for r in rows], ref, rtol=NOISE_SCORES)



def test_cli_finalize_and_merge_on_a_cluster(cluster, tmp_path, image_dir, extractor):
    """`merge --scheduler` then `finalize --scheduler`: the numpy two-pass statistics of the
    features and numpy inv(cov + eps I) (float32 precision, to its rounding)."""
    from typer.testing import CliRunner

    from padim_ooc.cli import app
    from padim_ooc.data import digest

    client, _ = cluster
    parts = []
    for name, folder in (("pa", "a"), ("pb", "b")):
        parts.append(tmp_path / f"{name}.zarr")
        po.fit([image_dir / folder], parts[-1], extractor=extractor, batch_size=5, loader_workers=0, finalize=False)
    address, runner, model = client.scheduler.address, CliRunner(), tmp_path / "cli.zarr"
    result = runner.invoke(app, ["merge", *map(str, parts), "--model", str(model), "--no-finalize",
                                 "--scheduler", address])
    assert result.exit_code == 0 and json.loads(result.stdout)["finalized"] is False, result.output
    result = runner.invoke(app, ["finalize", str(model), "--eps", "0.05", "--scheduler", address])
    assert result.exit_code == 0 and json.loads(result.stdout)["finalized"] is True, result.output
    paths = list_images([image_dir])  # a's 20 then b's 20: batches of 5 as in the fits of the parts
    mean, cov = exact_stats(extractor, paths, 5)  # independent numpy two-pass
    cli = po.open_model(model)
    assert cli.n_images == 40 and rel(cli.mean, mean) <= 1e-9 and rel(cli.covariance(), cov) <= 1e-9
    assert cli.store.ledger() == {digest(p.read_bytes()) for p in paths}
    mean32, prec = cli.store.final_arrays()
    want = np.linalg.inv(cov + 0.05 * np.eye(cov.shape[-1]))
    np.testing.assert_allclose(mean32[...], mean, rtol=1e-5, atol=1e-6 * float(np.abs(mean).max()))
    np.testing.assert_allclose(prec[...], want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))


def test_cli_score_with_local_workers(fitted, tmp_path, image_dir):
    """`score --workers 2 --maps --out file://...`: the one-process scores and maps, in input order,
    and on stderr only the dashboard line (no Dask INFO log)."""
    import zarr

    paths = list_images([image_dir / "b"])
    out = tmp_path / "out"
    proc = run_cli("score", fitted, image_dir / "b", "--out", f"file://{out}", "--workers", "2", "--device", "cpu",
                   "--batch-size", "4", "--maps", "-q")
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dask: local cluster of 2 worker processes, dashboard at http"), lines
    import importlib.util

    assert ("pip install 'padim-ooc[dashboard]'" in lines[0]) == (importlib.util.find_spec("bokeh") is None)
    assert json.loads(proc.stdout)["scored"] == 20
    with open(out / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    ref = reference_scores(fitted, paths, 4)
    np.testing.assert_allclose([float(r["score"]) for r in rows], ref, rtol=NOISE_SCORES)
    _, ref_maps = po.open_model(fitted, device="cpu").score(paths, batch_size=4)
    np.testing.assert_allclose(zarr.open_array(str(out / "maps.zarr"))[...], ref_maps, rtol=2e-3, atol=1e-3)


def test_scheduler_without_workers_is_an_error():
    """A scheduler with no worker: a clear error after the worker timeout, not a silent hang."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=0, processes=False, protocol="tcp://", dashboard_address=":0") as empty:
        address = empty.scheduler_address
        start = time.monotonic()
        with pytest.raises(po.PadimError, match=f"the Dask scheduler at {address} has no workers"):
            with open_client(scheduler=address, worker_timeout=1):
                pass
        assert time.monotonic() - start < 10
        env = dict(os.environ, PADIM_OOC_WORKER_TIMEOUT="1")
        proc = subprocess.run([sys.executable, "-m", "padim_ooc", "merge", "a.zarr", "--model", "b.zarr",
                               "--scheduler", address],
                              capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: the Dask scheduler at {address} has no workers (waited 1 s): "
                                                f"start some with `dask worker {address}`, or set "
                                                "PADIM_OOC_WORKER_TIMEOUT to wait longer"]


def test_client_arguments_are_checked():
    with pytest.raises(po.PadimError, match="tcp://HOST:8786"):
        with open_client(scheduler="localhost:1"):
            pass
    with pytest.raises(po.PadimError, match="not both"):
        with open_client(workers=2, scheduler="tcp://127.0.0.1:1"):
            pass
    with pytest.raises(po.PadimError, match="cannot reach the Dask scheduler"):
        with open_client(scheduler="tcp://127.0.0.1:1", timeout=2):
            pass
    with open_client(workers=1) as client:
        assert client is None  # one worker: in this process


@pytest.mark.slow
def test_cli_fit_with_local_workers(tmp_path, image_dir):
    """`fit --workers 2` starts its own cluster, says where its dashboard is, equals the one-process fit."""
    small = ["--weights", "none", "--resize", "72", "--crop", "64", "--batch-size", "10", "--device", "cpu"]
    for name, extra in (("one", ["--loader-workers", "0", "-q"]), ("two", ["--workers", "2"])):
        proc = subprocess.run([sys.executable, "-m", "padim_ooc", "fit", image_dir, "--model",
                               tmp_path / f"{name}.zarr", *small, *extra], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
    assert "dashboard at http://" in proc.stderr and "memory plan" in proc.stderr
    a, b = po.open_model(tmp_path / "one.zarr"), po.open_model(tmp_path / "two.zarr")
    assert b.finalized and rel(b.covariance(), a.covariance()) <= NOISE_COV  # workers: one thread each


@pytest.mark.slow
def test_sharded_fit_survives_a_killed_worker(cluster, tmp_path, image_dir, extractor):
    """A worker killed after its partial fit checkpointed: the task reruns elsewhere, resumes the
    partial store (its stale lock is recovered) and the result equals the one-process fit."""
    import threading

    client, _ = cluster
    client.wait_for_workers(2, timeout=60)
    one = fit_summary([image_dir], tmp_path / "one.zarr", extractor, batch_size=2,
                    loader_workers=0, progress=False)
    model, result = tmp_path / "m.zarr", {}

    def run():
        try:
            result["summary"] = fit_summary([image_dir], model, extractor, client=client, batch_size=2,
                                            checkpoint_every=4, shards=2, device="cpu", progress=False)
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            result["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    pids, killed, deadline = client.run(os.getpid), None, time.monotonic() + 120
    while killed is None and thread.is_alive() and time.monotonic() < deadline:
        for addr, keys in client.processing().items():
            for key in keys:
                if not str(key).startswith("padim-ooc-fit-"):
                    continue
                part = model.parent / "m.zarr.parts" / f"part-{int(str(key).rsplit('-', 1)[1]):05d}.zarr"
                if (part / "zarr.json").exists() and ModelStore.open(part).n_images >= 4:
                    os.kill(pids[addr], signal.SIGKILL)
                    killed = (addr, ModelStore.open(part).n_images)
                    break
            if killed:
                break
        time.sleep(0.05)
    thread.join(timeout=300)
    assert killed is not None, "no partial fit was caught in the middle"
    assert "error" not in result, result.get("error")
    summary = result["summary"]
    assert summary.added == 40 and summary.n_images == 40
    fitted, one = po.open_model(model), po.open_model(tmp_path / "one.zarr")
    assert rel(fitted.covariance(), one.covariance()) <= NOISE_COV and rel(fitted.mean, one.mean) <= NOISE_MEAN
    mean, cov = exact_stats_on(client, fitted.store.config, list_images([image_dir]), 2)
    assert rel(fitted.mean, mean) <= 1e-10 and rel(fitted.covariance(), cov) <= 1e-10
    assert fitted.store.ledger() == one.store.ledger()
    client.wait_for_workers(2, timeout=60)


def _bad_folder(root, image_dir, good=6):
    """``good`` images of ``a/`` plus a zero-byte .png and a text file named .png."""
    root.mkdir()
    for p in list_images([image_dir / "a"])[:good]:
        (root / p.name).write_bytes(p.read_bytes())
    (root / "empty.png").write_bytes(b"")
    (root / "text.png").write_text("not an image\n")
    return root


def _install_log_catcher():
    import logging

    class Catch(logging.Handler):
        records: list = []

        def emit(self, record):
            Catch.records.append(record.getMessage())

    logging.getLogger("padim_ooc").addHandler(Catch())
    logging.getLogger("padim_ooc").setLevel(logging.INFO)
    import padim_ooc

    padim_ooc._caught_logs = Catch.records


def test_cli_fit_on_an_existing_cluster(cluster, tmp_path, image_dir):
    """`fit --scheduler` with two bad files: one `warning: skipped` line each on the client (none
    logged on the workers), and the numpy two-pass statistics of the good images."""
    from padim_ooc.extractor import Extractor

    client, _ = cluster
    folder = _bad_folder(tmp_path / "bad", image_dir)
    client.run(_install_log_catcher)
    model = tmp_path / "cli.zarr"
    proc = run_cli("fit", folder, "--model", model, "--weights", "none", "--resize", "72", "--crop", "64",
                   "--dims", "20", "--batch-size", "2", "--device", "cpu", "--scheduler", client.scheduler.address,
                   "-q")
    warnings = [line for line in proc.stderr.splitlines() if "skipped" in line]
    assert len(warnings) == 2, proc.stderr
    for name in ("empty.png", "text.png"):
        assert sum(line.startswith(f"warning: skipped {folder / name}: ") for line in warnings) == 1, proc.stderr
    worker_logs = client.run(lambda: [m for m in __import__("padim_ooc")._caught_logs if "skipped" in m])
    assert worker_logs and all(not logs for logs in worker_logs.values()), worker_logs
    assert json.loads(proc.stdout)["skipped"] == 2 and not (tmp_path / "cli.zarr.parts").exists()
    fitted = po.open_model(model)
    good = [p for p in list_images([folder]) if p.name not in ("empty.png", "text.png")]
    ref = Extractor.from_config(fitted.store.attrs, device="cpu")
    fit_summary([folder], tmp_path / "one.zarr", ref, batch_size=2, loader_workers=0, progress=False)
    one = po.open_model(tmp_path / "one.zarr")  # the same batches (bad files included), computed here
    assert fitted.n_images == one.n_images == 6
    assert rel(fitted.mean, one.mean) <= NOISE_MEAN and rel(fitted.covariance(), one.covariance()) <= NOISE_COV
    mean, cov = exact_stats(ref, good, 2)  # independent numpy two-pass (batches of 2 good images: float32 rounding)
    assert rel(fitted.mean, mean) <= 1e-6 and rel(fitted.covariance(), cov) <= 1e-5


def test_task_errors_come_back_without_a_traceback(cluster, fitted, tmp_path, image_dir, extractor):
    """A bad image with on_error="fail" in a fit or score shard: the shard's one-line PadimError,
    no "Compute Failed" traceback in the workers' logs, and no partial stores left."""
    client, _ = cluster
    folder = _bad_folder(tmp_path / "bad", image_dir)
    before = sum(len(v) for v in client.get_worker_logs().values())
    with pytest.raises(po.PadimError, match=r"^bad image .*(empty|text)\.png: "):
        score_sharded(_Store.open(fitted), list_images([folder]), client, score_options(batch_size=2, device="cpu", on_error="fail"))
    model = tmp_path / "m.zarr"
    with pytest.raises(po.PadimError, match=r"^bad image .*(empty|text)\.png: "):
        fit_summary([folder], model, extractor, client=client, batch_size=2, shards=4, device="cpu",
                    progress=False, on_error="fail")
    assert not (tmp_path / "m.zarr.parts").exists() and not model.exists()
    logs = [msg for v in client.get_worker_logs().values() for _, msg in v]
    assert not [m for m in logs if "Compute Failed" in m or "Traceback" in m], logs[-5:]
    assert sum(len(v) for v in client.get_worker_logs().values()) >= before  # the logs are kept


def test_cli_fit_failure_on_local_workers_is_one_line(tmp_path, image_dir):
    """`fit --workers 2 --on-error fail` on a bad file: stderr is the dashboard line and one `error:`
    line (no Dask "Compute Failed" block, no traceback), and no model or partial stores are left."""
    folder = _bad_folder(tmp_path / "bad", image_dir, good=4)
    model = tmp_path / "bwf.zarr"
    proc = run_cli("fit", folder, "--model", model, "--weights", "none", "--resize", "72", "--crop", "64",
                   "--dims", "20", "--workers", "2", "--batch-size", "2", "--device", "cpu", "--on-error", "fail",
                   "-q", ok=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("dask: local cluster of 2 worker processes"), lines
    assert lines[1].startswith("error: bad image ") and lines[1].split(":")[1].strip().endswith(".png"), lines
    assert not model.exists() and not (tmp_path / "bwf.zarr.parts").exists()


def test_sharded_fit_and_score_of_an_orthogonal_model(cluster, tmp_path, image_dir):
    """The semi-orthogonal embedding on the cluster: the workers build the extractor with the
    model's stored projection; their statistics are the exact two-pass ones of their features,
    and their scores the one-process scores to float32 rounding."""
    client, _ = cluster
    ex = po.Extractor("resnet18", weights=None, seed=0, resize=72, crop=64, device="cpu", embedding="orthogonal")
    one = po.fit([image_dir], tmp_path / "one.zarr", extractor=ex, batch_size=5, loader_workers=0)
    two = po.fit([image_dir], tmp_path / "two.zarr", extractor=ex, batch_size=5, client=client)
    assert two.n_images == 40 and np.array_equal(two.store.projection(), ex.projection)
    assert rel(two.mean, one.mean) <= NOISE_MEAN and rel(two.covariance(), one.covariance()) <= NOISE_COV
    mean, cov = exact_stats_on(client, two.store.config, list_images([image_dir]), 5)
    assert rel(two.mean, mean) <= 1e-10 and rel(two.covariance(), cov) <= 1e-10
    paths = list_images([image_dir / "b"])
    ref = reference_scores(tmp_path / "one.zarr", paths, 4)
    got = {}
    bad = score_sharded(_Store.open(tmp_path / "one.zarr"), paths, client,
                        score_options(batch_size=4, device="cpu"), shards=3,
                        on_result=lambda idx, scores, _maps: got.update(zip(idx.tolist(), scores)))
    assert bad == [] and sorted(got) == list(range(len(paths)))
    np.testing.assert_allclose([got[i] for i in range(len(paths))], ref, rtol=NOISE_SCORES)
