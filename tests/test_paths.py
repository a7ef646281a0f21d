"""Relative model paths with Dask workers whose working directory is elsewhere.

The arrays a store hands to workers (pickled zarr arrays) must name the store
by an absolute path: a worker started in another folder would otherwise read
missing chunks as zeros and write its chunks into its own folder, and the
command would report success. A real ``LocalCluster`` (2 worker processes on
loopback) whose workers ``chdir`` elsewhere; the test process works in
``tmp_path`` and passes relative paths.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from distributed import Client, LocalCluster

import padim_ooc as po
from padim_ooc.finalize import finalize
from padim_ooc.merge import merge_stores
from padim_ooc.store import ModelStore
from padim_ooc.welford import Moments

from conftest import CONFIG, NOISE_COV, NOISE_PRECISION, rel, two_pass


EPS = 0.01


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory):
    """A client whose 2 worker processes run in an empty folder of their own; yields (client, folder)."""
    folder = tmp_path_factory.mktemp("workers_cwd")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.run(os.chdir, str(folder))
        assert set(client.run(os.getcwd).values()) == {str(folder)}
        yield client, folder


def inverse(m2: np.ndarray, n: int) -> np.ndarray:
    """numpy float64: inv(m2 / (n - 1) + eps I), per position."""
    cov = m2 / (n - 1) + EPS * np.eye(m2.shape[-1])
    return np.linalg.inv(cov)


def test_finalize_and_merge_with_relative_paths(tmp_path, monkeypatch, elsewhere):
    client, folder = elsewhere
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(3)
    x = 5 + rng.normal(size=(15, 11, 4))  # (P, n, d)
    for k, (a, b) in enumerate([(0, 4), (4, 11)]):
        with ModelStore.create(f"p{k}.zarr", CONFIG) as st:
            st._write_attrs(chunk_positions=4)  # 4 chunks: several tasks, one short
            st.checkpoint(Moments.from_batch(torch.from_numpy(x[:, a:b])), [bytes([i]) * 16 for i in range(a, b)])
    result = merge_stores(["p0.zarr", "p1.zarr"], "out.zarr", client=client)
    mean, m2 = two_pass(x)
    with ModelStore.open("out.zarr", writable=True) as st:
        back = st.load_moments()
        assert back.n == 11
        np.testing.assert_allclose(back.mean.numpy(), mean, rtol=1e-13)
        np.testing.assert_allclose(back.m2.numpy(), m2, rtol=1e-11, atol=1e-11)
        finalize(st, eps=EPS, client=client)
    mean32, prec = ModelStore.open(tmp_path / "out.zarr").final_arrays()
    assert result["n_images"] == 11 and result["model"] == str(tmp_path / "out.zarr")
    np.testing.assert_allclose(prec[...], inverse(m2, 11), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(mean32[...], mean, rtol=1e-6)
    assert os.listdir(folder) == []  # the workers wrote nothing where they run


def test_fit_on_a_cluster_with_a_relative_model_path(tmp_path, monkeypatch, image_dir, extractor, elsewhere):
    client, folder = elsewhere
    single = po.fit([image_dir / "a"], tmp_path / "single.zarr", extractor=extractor, batch_size=10,
                    loader_workers=0)
    monkeypatch.chdir(tmp_path)
    model = po.fit([image_dir / "a"], "m.zarr", extractor=extractor, batch_size=10, client=client)
    assert model.n_images == 20
    # the workers' features (another process and thread count): the same to float32 rounding
    assert rel(model.covariance(), single.covariance()) <= NOISE_COV
    got = ModelStore.open("m.zarr").final_arrays()[1][...]
    want = single.store.final_arrays()[1][...]
    assert rel(got, want) <= NOISE_PRECISION
    assert os.listdir(folder) == []
