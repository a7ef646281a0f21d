"""OAS shrinkage at finalize, against sklearn.covariance.oas on each position's samples."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.covariance import oas

import padim_ooc as po
from padim_ooc.finalize import covariance_block, finalize, precision_block
from padim_ooc.store import ModelStore

from conftest import cli_error, cli_json, rel, synthetic


def samples(p=6, n=9, d=4, seed=0, offset=30.0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(p, d, d))  # correlated dimensions, another scale per position
    return offset + np.einsum("pnd,pde->pne", rng.normal(size=(p, n, d)), mix)


def m2_of(x):
    c = x - x.mean(axis=1, keepdims=True)
    return np.einsum("pni,pnj->pij", c, c)


@pytest.mark.parametrize("p, n, d", [(6, 9, 4), (3, 4, 7), (2, 40, 5), (4, 2, 3), (3, 6, 1)])
def test_oas_equals_sklearn_on_each_positions_samples(p, n, d):
    x = samples(p, n, d, seed=p + n + d)
    cov, rho = covariance_block(m2_of(x), n, "oas")
    for i in range(p):
        want, shrink = oas(x[i])
        assert rel(cov[i].numpy(), want) <= 1e-12
        assert abs(float(rho[i]) - shrink) <= 1e-12 or d == 1  # sklearn reports 0 for one feature (same cov)
    none, rho0 = covariance_block(m2_of(x), n, "none")
    assert rel(none.numpy(), m2_of(x) / (n - 1)) <= 1e-15 and not rho0.any()
    eps = 0.01
    prec = precision_block(m2_of(x), n, eps, "oas")
    want = np.linalg.inv(np.stack([oas(x[i])[0] for i in range(p)]) + eps * np.eye(d))
    assert prec.dtype == np.float32 and rel(prec, want) <= 1e-6


def test_finalize_with_oas_then_without_reads_no_image(tmp_path):
    x = samples(15, 8, 4, seed=3)
    path = tmp_path / "m.zarr"
    synthetic(path, x, [bytes([i]) * 16 for i in range(8)]).close()
    with ModelStore.open(path, writable=True) as st:
        finalize(st, eps=0.1, shrinkage="oas")
    got = ModelStore.open(path)
    assert got.attrs["shrinkage"] == "oas" and got.attrs["eps"] == 0.1
    want = np.linalg.inv(np.stack([oas(x[i])[0] for i in range(15)]) + 0.1 * np.eye(4))
    assert rel(got.final_arrays()[1][...], want) <= 1e-6
    # again without shrinkage: the model's eps is kept, the statistics are not touched
    m = po.finalize_model(path, shrinkage="none")
    assert m.attrs["shrinkage"] == "none" and m.attrs["eps"] == 0.1
    want = np.linalg.inv(m2_of(x) / 7 + 0.1 * np.eye(4))
    assert rel(m.store.final_arrays()[1][...], want) <= 1e-6
    assert rel(m.covariance(), m2_of(x) / 7) <= 1e-13  # the exact statistics, unshrunk


def test_cli_shrinkage(tmp_path, capsys, image_dir):
    x = samples(15, 6, 4, seed=5)
    path = tmp_path / "m.zarr"
    synthetic(path, x, [bytes([i]) * 16 for i in range(6)]).close()
    out = cli_json(capsys, "finalize", path, "--shrinkage", "oas")
    assert out["shrinkage"] == "oas" and out["eps"] == 0.01
    assert cli_json(capsys, "finalize", path)["shrinkage"] == "oas"  # the model's shrinkage is kept
    assert cli_json(capsys, "info", path)["shrinkage"] == "oas"
    cli_error(capsys, "finalize", path, "--shrinkage", "ledoit", text="--shrinkage must be none or oas, not 'ledoit'")
    # fit --shrinkage: a fitted model finalized again with another shrinkage, no image added
    model = tmp_path / "f.zarr"
    small = ["--weights", "none", "--resize", "72", "--crop", "64", "--loader-workers", "0", "-q"]
    cli_json(capsys, "fit", image_dir / "a", "--model", model, *small)
    assert ModelStore.open(model).attrs["shrinkage"] == "none"
    res = cli_json(capsys, "fit", image_dir / "a", "--model", model, *small, "--shrinkage", "oas")
    assert res["added"] == 0 and res["finalized"]
    st = ModelStore.open(model)
    m2 = st.load_moments().m2.numpy()
    cov, _ = covariance_block(m2, st.n_images, "oas")
    want = torch.linalg.inv(cov + 0.01 * torch.eye(cov.shape[-1], dtype=torch.float64)).numpy()
    assert st.attrs["shrinkage"] == "oas" and rel(st.final_arrays()[1][...], want) <= 1e-5


def test_a_model_finalized_before_shrinkage_existed_is_none(tmp_path):
    from padim_ooc.options import shrinkage_for
    from padim_ooc.store import ATTR_KEY

    x = samples(15, 5, 4, seed=7)
    path = tmp_path / "m.zarr"
    with synthetic(path, x, [bytes([i]) * 16 for i in range(5)]) as st:
        finalize(st, eps=0.01)
        attrs = {k: v for k, v in st.attrs.items() if k != "shrinkage"}  # as an older version wrote it
        st.group.attrs[ATTR_KEY] = attrs
    old = ModelStore.open(path)
    assert "shrinkage" not in old.attrs and shrinkage_for(old.attrs, None) == "none"
    assert po.finalize_model(path).attrs["shrinkage"] == "none"
