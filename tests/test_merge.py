"""Merging stores: tree of Chan merges chunk by chunk, checks of configuration and ledgers, URLs."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import uuid

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

import padim_ooc as po
from padim_ooc.cli import app
from padim_ooc.data import decode_rgb, list_images
from padim_ooc.finalize import finalize
from padim_ooc.merge import merge_stores, tree_merge
from padim_ooc.store import ModelStore
from padim_ooc.welford import Moments

from conftest import CONFIG, exact_stats, rel, synthetic, two_pass


@pytest.mark.parametrize("sizes", [[7], [3, 4], [5, 1, 9], [2, 2, 2, 2, 2], [1, 6, 3, 8, 2, 5, 4]])
def test_tree_merge_equals_two_pass(sizes):
    rng = np.random.default_rng(len(sizes))
    x = 1e4 + rng.normal(size=(6, sum(sizes), 5))  # large offset: cancellation would show
    bounds = np.cumsum([0] + sizes)
    states = [Moments.from_batch(torch.from_numpy(x[:, a:b])) for a, b in zip(bounds, bounds[1:])]
    merged = tree_merge(lambda s=s: Moments(s.n, s.mean.clone(), s.m2.clone()) for s in states)
    mean, m2 = two_pass(x)
    assert merged.n == sum(sizes)
    assert rel(merged.mean.numpy(), mean) <= 1e-14
    assert rel(merged.m2.numpy(), m2) <= 1e-10


def test_merge_of_synthetic_parts_chunk_by_chunk(tmp_path):
    rng = np.random.default_rng(0)
    x = 50 + rng.normal(size=(15, 23, 4))
    cuts = [0, 5, 6, 14, 23]
    parts = []
    for k, (a, b) in enumerate(zip(cuts, cuts[1:])):
        synthetic(tmp_path / f"p{k}.zarr", x[:, a:b], [bytes([i]) * 16 for i in range(a, b)])
        parts.append(tmp_path / f"p{k}.zarr")
    config = dict(CONFIG, dims=4)
    out = ModelStore.create(tmp_path / "out.zarr", config)
    out._write_attrs(chunk_positions=4)  # several chunks, the last one short
    del out
    result = merge_stores(parts, tmp_path / "out.zarr")
    assert result == {"model": str(tmp_path / "out.zarr"), "parts": 4, "added": 23, "n_images": 23}
    store = ModelStore.open(tmp_path / "out.zarr")
    assert store.m2_array().chunks[0] == 4
    back = store.load_moments()
    mean, m2 = two_pass(x)
    assert back.n == 23 and rel(back.mean.numpy(), mean) <= 1e-14 and rel(back.m2.numpy(), m2) <= 1e-12
    assert store.ledger() == {bytes([i]) * 16 for i in range(23)}


def test_mismatched_configuration_names_the_field(tmp_path):
    x = np.random.default_rng(0).normal(size=(15, 4, 4))
    synthetic(tmp_path / "a.zarr", x, [b"a" * 16])
    synthetic(tmp_path / "b.zarr", x, [b"b" * 16], dict(CONFIG, crop=60))
    with pytest.raises(po.PadimError, match=r"crop differs \(60 vs 64\)"):
        merge_stores([tmp_path / "a.zarr", tmp_path / "b.zarr"], tmp_path / "out.zarr")
    synthetic(tmp_path / "c.zarr", x, [b"c" * 16], dict(CONFIG, channels=[0, 1, 2, 5]))
    with pytest.raises(po.PadimError, match="channels differs"):
        merge_stores([tmp_path / "a.zarr", tmp_path / "c.zarr"], tmp_path / "out.zarr")
    assert not (tmp_path / "out.zarr").exists()


def test_overlapping_ledgers_are_refused(tmp_path):
    x = np.random.default_rng(0).normal(size=(15, 4, 4))
    synthetic(tmp_path / "a.zarr", x, [bytes([i]) * 16 for i in range(4)])
    synthetic(tmp_path / "b.zarr", x, [bytes([i]) * 16 for i in range(2, 6)])
    synthetic(tmp_path / "c.zarr", x, [bytes([i]) * 16 for i in range(10, 14)])
    with pytest.raises(po.PadimError, match=r"a\.zarr and .*b\.zarr both hold 2 of the same images"):
        merge_stores([tmp_path / "c.zarr", tmp_path / "a.zarr", tmp_path / "b.zarr"], tmp_path / "out.zarr")
    # the output's own images take part too
    merge_stores([tmp_path / "a.zarr"], tmp_path / "out.zarr")
    with pytest.raises(po.PadimError, match="count them twice"):
        merge_stores([tmp_path / "b.zarr"], tmp_path / "out.zarr")
    assert ModelStore.open(tmp_path / "out.zarr").n_images == 4  # untouched


@pytest.fixture(scope="module")
def halves(tmp_path_factory, image_dir, extractor):
    """a.zarr and b.zarr (20 images each, unfinalized) and one.zarr (all 40, finalized).

    Batches of 10: a part's batches are the one-shot fit's, so the features are identical.
    """
    root = tmp_path_factory.mktemp("halves")
    po.fit([image_dir], root / "one.zarr", extractor=extractor, batch_size=10, loader_workers=0)
    for half in "ab":
        po.fit([image_dir / half], root / f"{half}.zarr", extractor=extractor, batch_size=10,
               loader_workers=0, finalize=False)
    return root


def test_merged_halves_equal_one_fit(tmp_path, halves, image_dir, extractor):
    one = po.open_model(halves / "one.zarr")
    merge_stores([halves / "b.zarr", halves / "a.zarr"], tmp_path / "m.zarr")
    merged = po.open_model(tmp_path / "m.zarr", device="cpu")
    assert merged.n_images == 40 and not merged.finalized
    assert rel(merged.mean, one.mean) <= 1e-10
    assert rel(merged.covariance(), one.covariance()) <= 1e-10
    mean, cov = exact_stats(extractor, list_images([image_dir]), 10)
    assert rel(merged.covariance(), cov) <= 1e-9
    assert merged.store.ledger() == one.store.ledger()
    # into an existing model: a + b == one
    shutil.copytree(halves / "a.zarr", tmp_path / "a.zarr")
    merge_stores([halves / "b.zarr"], tmp_path / "a.zarr")
    inplace = po.open_model(tmp_path / "a.zarr")
    assert inplace.n_images == 40 and rel(inplace.covariance(), one.covariance()) <= 1e-10
    assert sorted(g for g in inplace.store.group.group_keys() if g.startswith("state-")) == ["state-000002"]


def test_fsspec_urls(tmp_path, halves, image_dir, extractor):
    """memory:// and file:// model paths: fit, merge, finalize, score."""
    mem = f"memory://padim-{uuid.uuid4().hex[:8]}"
    po.fit([image_dir / "a"], f"{mem}/a.zarr", extractor=extractor, batch_size=10, loader_workers=0,
           finalize=False)
    shutil.copytree(halves / "b.zarr", tmp_path / "b.zarr")
    merge_stores([f"{mem}/a.zarr", f"file://{tmp_path}/b.zarr"], f"{mem}/m.zarr")
    finalize(ModelStore.open(f"{mem}/m.zarr", writable=True), eps=0.01)
    one = po.open_model(halves / "one.zarr", device="cpu")
    merged = po.open_model(f"{mem}/m.zarr", device="cpu")
    assert merged.finalized and merged.n_images == 40
    assert rel(merged.covariance(), one.covariance()) <= 1e-10
    x = torch.stack([extractor.preprocess(decode_rgb(p.read_bytes())) for p in list_images([image_dir / "b"])[:4]])
    s_url, _ = merged.score(x)
    s_one, _ = one.score(x)
    np.testing.assert_allclose(s_url, s_one, rtol=1e-5)
    # a new store at a file:// URL
    po.fit([image_dir / "b"], f"file://{tmp_path}/c.zarr", extractor=extractor, batch_size=10,
           loader_workers=0, finalize=False)
    assert ModelStore.open(tmp_path / "c.zarr").n_images == 20


def test_cli_merge(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(15, 9, 4))
    synthetic(tmp_path / "a.zarr", x[:, :4], [bytes([i]) * 16 for i in range(4)])
    synthetic(tmp_path / "b.zarr", x[:, 4:], [bytes([i]) * 16 for i in range(4, 9)])
    cli = [sys.executable, "-m", "padim_ooc", "merge"]
    proc = subprocess.run([*cli, tmp_path / "a.zarr", tmp_path / "b.zarr", "--model", tmp_path / "m.zarr",
                           "--no-finalize"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["n_images"] == 9 and out["parts"] == 2 and out["finalized"] is False
    mean, m2 = two_pass(x)
    back = ModelStore.open(tmp_path / "m.zarr").load_moments()
    assert rel(back.m2.numpy(), m2) <= 1e-12


def test_api_merge_finalizes(tmp_path):
    from padim_ooc.api import merge

    rng = np.random.default_rng(2)
    x = rng.normal(size=(15, 12, 4))
    synthetic(tmp_path / "a.zarr", x[:, :5], [bytes([i]) * 16 for i in range(5)])
    synthetic(tmp_path / "b.zarr", x[:, 5:], [bytes([i]) * 16 for i in range(5, 12)])
    assert merge([tmp_path / "a.zarr", tmp_path / "b.zarr"], tmp_path / "m.zarr", eps=0.1)["n_images"] == 12
    _, prec = ModelStore.open(tmp_path / "m.zarr").final_arrays()
    ref = np.linalg.inv(np.cov(x[7], rowvar=False) + 0.1 * np.eye(4))
    np.testing.assert_allclose(prec[7], ref, rtol=1e-5)



def full_disk_at(monkeypatch, prefix: str):
    """Zarr's local store raising ENOSPC for every key under ``prefix`` (like tests/test_crash.py)."""
    original = zarr.storage.LocalStore.set

    async def set(store, key, value):
        if key.startswith(prefix):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return await original(store, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", set)


def test_a_failed_merge_keeps_the_output_as_it_was(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(15, 9, 4))
    synthetic(tmp_path / "a.zarr", x[:, :4], [bytes([i]) * 16 for i in range(4)])
    synthetic(tmp_path / "b.zarr", x[:, 4:], [bytes([i]) * 16 for i in range(4, 9)])
    out = tmp_path / "out.zarr"
    merge_stores([tmp_path / "a.zarr"], out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with monkeypatch.context() as mp:
        full_disk_at(mp, "state-000002/m2/c/")  # the merged chunks
        with pytest.raises(po.PadimError) as err:
            merge_stores([tmp_path / "b.zarr"], out)
    assert str(err.value) == (f"cannot write the model store {out}: No space left on device; "
                              "the previous checkpoint (4 images) is intact")
    # while the error (and its traceback) is alive, the lock is already given back
    assert not po.store.lock.held(out) and not (out / ".padim_ooc.lock").exists()
    with ModelStore.open(out, writable=True):  # a next writer gets in
        pass
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    mean, _ = two_pass(x[:, :4])
    back = ModelStore.open(out).load_moments()
    assert back.n == 4 and rel(back.mean.numpy(), mean) <= 1e-14


def test_a_failed_merge_into_a_new_path_leaves_nothing(tmp_path, monkeypatch):
    x = np.random.default_rng(5).normal(size=(15, 6, 4))
    synthetic(tmp_path / "a.zarr", x, [bytes([i]) * 16 for i in range(6)])
    out = tmp_path / "new.zarr"
    with monkeypatch.context() as mp:
        full_disk_at(mp, "state-000001/mean/c/")
        with pytest.raises(po.PadimError, match=f"cannot write the model store {out}: No space left"):
            merge_stores([tmp_path / "a.zarr"], out)
    assert not out.exists()
    ModelStore.create(tmp_path / "empty.zarr", CONFIG)  # no statistics
    res = CliRunner().invoke(app, ["merge", str(tmp_path / "empty.zarr"), "--model", str(tmp_path / "me.zarr")])
    assert res.exit_code == 2 and "nothing to merge: the parts hold no statistics" in res.stderr
    assert not (tmp_path / "me.zarr").exists()
