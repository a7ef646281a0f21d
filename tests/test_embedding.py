"""The semi-orthogonal embedding (Kim et al. 2021): the projection against numpy, its draw, the
exact statistics of the projected features, the stored projection, and what is refused."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr

import padim_ooc as po
from padim_ooc.data import decode_rgb, list_images
from padim_ooc.errors import PadimError
from padim_ooc.extractor import draw_projection, projection_digest
from padim_ooc.store import ModelStore

from conftest import CROP, RESIZE, cli_error, cli_json, exact_stats, rel


@pytest.fixture(scope="module")
def orthogonal():
    return po.Extractor("resnet18", weights=None, seed=0, resize=RESIZE, crop=CROP, device="cpu",
                        embedding="orthogonal")


@pytest.fixture(scope="module")
def fitted_orthogonal(tmp_path_factory, image_dir, orthogonal):
    """A finalized orthogonal model of image_dir/a (20 images, batches of 10)."""
    path = tmp_path_factory.mktemp("orthogonal") / "m.zarr"
    po.fit([image_dir / "a"], path, extractor=orthogonal, batch_size=10, loader_workers=0)
    return path


def _batch(extractor, paths):
    return torch.stack([extractor.preprocess(decode_rgb(p.read_bytes())) for p in paths])


def test_the_draw_is_seeded_and_orthonormal():
    w = draw_projection(448, 100, 0)
    assert w.shape == (448, 100) and w.dtype == np.float64
    assert np.abs(w.T @ w - np.eye(100)).max() <= 1e-12
    assert np.array_equal(w, draw_projection(448, 100, 0))
    assert not np.allclose(w, draw_projection(448, 100, 1))
    # the signs are fixed: the diagonal of R (W.T @ G for the same Gaussian G) is positive
    g = np.random.default_rng(0).standard_normal((448, 100))
    assert (np.diag(w.T @ g) > 0).all()
    assert projection_digest(w) == projection_digest(w.copy()) != projection_digest(draw_projection(448, 100, 1))
    with pytest.raises(PadimError, match="dims 449 is out of range"):
        draw_projection(448, 449, 0)


@pytest.mark.parametrize("crop", [CROP, 100])  # 100: layers 2 and 3 upsampled by a non-integer factor
def test_projection_equals_numpy_on_the_raw_concatenation(image_dir, crop):
    """The orthogonal features are W.T applied to the (F, h, w) concatenation of all channels
    (an extractor that keeps all 448 channels), to float32 rounding."""
    kw = dict(weights=None, seed=0, resize=max(RESIZE, crop), crop=crop, device="cpu")
    ortho = po.Extractor("resnet18", embedding="orthogonal", **kw)
    raw = po.Extractor("resnet18", dims=448, **kw)
    assert raw.channels == list(range(448)) and ortho.channels is None and ortho.dims == 100
    x = _batch(ortho, list_images([image_dir / "a"])[:5])
    got = ortho.embed(x).double().numpy()
    ref = np.einsum("fk,bfhw->bkhw", ortho.projection, raw.embed(x).double().numpy())
    assert got.shape == (5, 100, *ortho.grid)
    assert rel(got, ref) <= 1e-5, rel(got, ref)
    # the fold's layout, written into a strided buffer, holds the same values
    buf = torch.zeros(ortho.positions, 7, 100)[:, 1:6]
    ortho.embed_patches(x, out=buf)
    assert torch.equal(buf, ortho.embed_patches(x))
    assert rel(buf.permute(1, 2, 0).reshape(got.shape).double().numpy(), ref) <= 1e-5


def test_config_and_digest(orthogonal):
    cfg = orthogonal.config()
    assert cfg.embedding == "orthogonal" and cfg.channels is None and cfg.dims == 100
    assert cfg.projection_digest == projection_digest(draw_projection(448, 100, 0))
    assert po.Extractor("resnet18", weights=None, resize=RESIZE, crop=CROP, device="cpu").config().embedding == "random"
    with pytest.raises(PadimError, match="unknown embedding 'pca': use random or orthogonal"):
        po.Extractor("resnet18", weights=None, resize=RESIZE, crop=CROP, device="cpu", embedding="pca")
    with pytest.raises(PadimError, match="channel indices were given for an orthogonal embedding"):
        po.Extractor("resnet18", weights=None, resize=RESIZE, crop=CROP, device="cpu", embedding="orthogonal",
                     channels=[0, 1])
    with pytest.raises(PadimError, match="a projection was given for a random embedding"):
        po.Extractor("resnet18", weights=None, resize=RESIZE, crop=CROP, device="cpu",
                     projection=draw_projection(448, 100, 0))
    with pytest.raises(PadimError, match="differs from the one the model was fitted with"):
        po.Extractor.from_config(cfg, device="cpu", projection=draw_projection(448, 100, 1))


@pytest.mark.parametrize("batch_size", [1, 7])
def test_fit_equals_two_pass_of_the_projected_features(tmp_path, image_dir, orthogonal, batch_size):
    model = po.fit([image_dir], tmp_path / "m.zarr", extractor=orthogonal, batch_size=batch_size,
                   checkpoint_every=9, loader_workers=0)
    mean, cov = exact_stats(orthogonal, list_images([image_dir]), batch_size)
    assert model.n_images == 40 and model.mean.shape == (orthogonal.positions, 100)
    assert rel(model.mean, mean) <= 1e-9
    assert rel(model.covariance(), cov) <= 1e-9


def test_the_store_keeps_the_projection_and_reopens_and_scores(fitted_orthogonal, orthogonal, image_dir):
    store = ModelStore.open(fitted_orthogonal)
    assert store.attrs["embedding"] == "orthogonal" and store.attrs["channels"] is None
    assert store.attrs["projection_digest"] == orthogonal.config().projection_digest
    assert np.array_equal(store.projection(), orthogonal.projection)
    arr = zarr.open_group(str(fitted_orthogonal), mode="r")["embedding/projection"]
    assert arr.shape == (448, 100) and str(arr.dtype) == "float64"
    model = po.open_model(fitted_orthogonal, device="cpu")  # rebuilt from the store alone
    assert np.array_equal(model.extractor.projection, orthogonal.projection)
    x = _batch(orthogonal, list_images([image_dir / "b"])[:4])
    scores, maps = model.score_batch(x)
    ref = po.open_model(fitted_orthogonal, device="cpu", extractor=orthogonal).score_batch(x)[0]
    assert scores.shape == (4,) and torch.isfinite(scores).all() and torch.equal(scores, ref)


def test_the_stored_projection_is_the_one_used(tmp_path, fitted_orthogonal, image_dir):
    """A model scores with its stored projection, not a fresh draw: a store whose array and
    digest were replaced by another projection rebuilds the extractor with that one."""
    import shutil

    path = tmp_path / "m.zarr"
    shutil.copytree(fitted_orthogonal, path)
    other = draw_projection(448, 100, 5)
    zarr.open_group(str(path), mode="r+")["embedding/projection"][...] = other
    model = po.open_model(path, device="cpu")
    with pytest.raises(PadimError, match="embedding/projection does not match its digest"):
        model.extractor
    group = zarr.open_group(str(path), mode="r+")
    group.attrs["padim_ooc"] = {**group.attrs["padim_ooc"], "projection_digest": projection_digest(other)}
    assert np.array_equal(po.open_model(path, device="cpu").extractor.projection, other)


def test_extending_across_embeddings_is_refused(capsys, tmp_path, fitted_orthogonal, image_dir, extractor):
    with pytest.raises(PadimError, match=r"fitted with embedding='orthogonal', not 'random'"):
        po.fit([image_dir / "b"], fitted_orthogonal, extractor=extractor, loader_workers=0)
    cli_error(capsys, "fit", str(image_dir / "b"), "--model", str(fitted_orthogonal), "--embedding", "random",
              "--weights", "none", text="fitted with embedding='orthogonal', not 'random'")
    random_model = tmp_path / "r.zarr"
    po.fit([image_dir / "b"], random_model, extractor=extractor, batch_size=10, loader_workers=0)
    with pytest.raises(PadimError, match="their embedding differs"):
        po.merge([fitted_orthogonal, random_model], tmp_path / "out.zarr")
    # another projection (seed) is refused by its digest, even if the rest agrees
    other = po.Extractor("resnet18", weights=None, seed=0, resize=RESIZE, crop=CROP, device="cpu",
                         embedding="orthogonal", projection=draw_projection(448, 100, 3))
    with pytest.raises(PadimError, match="projection_digest"):
        po.fit([image_dir / "b"], fitted_orthogonal, extractor=other, loader_workers=0)
    assert po.open_model(fitted_orthogonal).n_images == 20  # unchanged


def test_extend_and_merge_orthogonal_models(tmp_path, image_dir, orthogonal):
    one = po.fit([image_dir], tmp_path / "one.zarr", extractor=orthogonal, batch_size=10, loader_workers=0)
    a = tmp_path / "a.zarr"
    po.fit([image_dir / "a"], a, extractor=orthogonal, batch_size=10, loader_workers=0, finalize=False)
    resumed = po.fit([image_dir], a, batch_size=10, loader_workers=0, device="cpu")  # extractor from the store
    assert resumed.n_images == 40 and rel(resumed.mean, one.mean) <= 1e-12
    b1, b2 = tmp_path / "b1.zarr", tmp_path / "b2.zarr"
    po.fit([image_dir / "a"], b1, extractor=orthogonal, batch_size=10, loader_workers=0, finalize=False)
    po.fit([image_dir / "b"], b2, extractor=orthogonal, batch_size=10, loader_workers=0, finalize=False)
    po.merge([b1, b2], tmp_path / "merged.zarr")
    merged = po.open_model(tmp_path / "merged.zarr", device="cpu")
    assert merged.store.attrs["projection_digest"] == orthogonal.config().projection_digest
    assert np.array_equal(merged.store.projection(), orthogonal.projection)
    assert rel(merged.mean, one.mean) <= 1e-12 and rel(merged.covariance(), one.covariance()) <= 1e-12


def test_an_old_store_without_the_attribute_opens_as_random(tmp_path, fitted, image_dir, capsys):
    import shutil

    path = tmp_path / "old.zarr"
    shutil.copytree(fitted, path)
    group = zarr.open_group(str(path), mode="r+")
    attrs = dict(group.attrs["padim_ooc"])
    attrs.pop("embedding"), attrs.pop("projection_digest")
    group.attrs["padim_ooc"] = attrs
    model = po.open_model(path, device="cpu")
    assert model.store.config.embedding == "random" and model.store.projection() is None
    assert model.extractor.embedding == "random" and model.extractor.channels == list(attrs["channels"])
    x = _batch(model.extractor, list_images([image_dir / "b"])[:3])
    assert torch.equal(model.score_batch(x)[0], po.open_model(fitted, device="cpu").score_batch(x)[0])
    assert cli_json(capsys, "info", str(path))["embedding"] == "random"
    # and it is extended by a random extractor of the same configuration
    assert po.fit([image_dir / "b"], path, batch_size=10, loader_workers=0, device="cpu").n_images == 40


def test_the_schema_checks_the_embedding(tmp_path, fitted_orthogonal):
    import shutil

    for change, text in [({"embedding": "pca"}, "attribute 'embedding' is 'pca'"),
                         ({"projection_digest": "abc"}, "attribute 'projection_digest'"),
                         ({"channels": [1, 2]}, "attribute 'channels'")]:
        path = tmp_path / f"bad{len(list(tmp_path.iterdir()))}.zarr"
        shutil.copytree(fitted_orthogonal, path)
        group = zarr.open_group(str(path), mode="r+")
        group.attrs["padim_ooc"] = {**group.attrs["padim_ooc"], **change}
        with pytest.raises(PadimError, match=text):
            ModelStore.open(path)
    path = tmp_path / "noarray.zarr"
    shutil.copytree(fitted_orthogonal, path)
    shutil.rmtree(path / "embedding" / "projection")
    with pytest.raises(PadimError, match="embedding/projection is missing"):
        ModelStore.open(path).projection()


def test_cli_fit_orthogonal_and_info(capsys, tmp_path, image_dir):
    model = tmp_path / "m.zarr"
    out = cli_json(capsys, "fit", str(image_dir / "a"), "--model", str(model), "--embedding", "orthogonal",
                   "--weights", "none", "--resize", str(RESIZE), "--crop", str(CROP), "--dims", "20",
                   "--device", "cpu", "--batch-size", "10", "--quiet")
    assert out["n_images"] == 20
    info = cli_json(capsys, "info", str(model))
    assert info["embedding"] == "orthogonal" and info["dims"] == 20 and info["projection_digest"].startswith("sha256:")
    assert np.array_equal(ModelStore.open(model).projection(), draw_projection(448, 20, 0))
    cli_error(capsys, "fit", str(image_dir / "a"), "--model", str(tmp_path / "n.zarr"), "--embedding", "pca",
              "--weights", "none", text="unknown embedding 'pca': use random or orthogonal")
    assert not (tmp_path / "n.zarr").exists()


def test_api_fit_embedding(tmp_path, image_dir, extractor):
    model = po.fit([image_dir / "a"], tmp_path / "m.zarr", embedding="orthogonal", weights="none",
                   batch_size=10, loader_workers=0, device="cpu", finalize=False)
    assert model.store.config.embedding == "orthogonal"
    with pytest.raises(PadimError, match="give one of them"):
        po.fit([image_dir / "a"], tmp_path / "n.zarr", extractor=extractor, embedding="orthogonal")


def test_a_creation_killed_after_the_projection_is_created_again(tmp_path, image_dir, orthogonal):
    """The projection is written before the root attributes: a creation killed in between leaves
    only ``embedding/`` (no model), which the next fit removes and writes again."""
    path = tmp_path / "m.zarr"
    (path / "embedding" / "projection").mkdir(parents=True)
    (path / "embedding" / "projection" / "zarr.json").write_text("{}")
    model = po.fit([image_dir / "a"], path, extractor=orthogonal, batch_size=10, loader_workers=0,
                   finalize=False)
    assert model.n_images == 20 and np.array_equal(model.store.projection(), orthogonal.projection)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "embedding").mkdir()
    (tmp_path / "other" / "zarr.json").write_text("{}")  # a foreign Zarr group: not taken for a leftover
    with pytest.raises(PadimError):
        ModelStore.create(tmp_path / "other", orthogonal.config(), orthogonal.projection)
