"""One configuration record, options checked once, one fit pipeline: what a fit does, counted;
and a store written by an earlier version (main at 25c2dcc) opened, extended, finalized, scored."""
from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import padim_ooc as po
from padim_ooc import cli
from padim_ooc.config import DEFAULT_CROP, DEFAULT_RESIZE, ModelConfig
from padim_ooc.data import decode_rgb, list_images
from padim_ooc.options import Cluster, FitOptions, ScoreOptions
from padim_ooc.store import ModelStore, lock

from conftest import rel, write_images

OLD_STORE = Path(__file__).parent / "data" / "schema1-main-25c2dcc.zarr"
OLD_IMAGES = Path(__file__).parent / "data" / "schema1-images"


class Counts:
    """Counts calls of named functions (the real ones run)."""

    def __init__(self, monkeypatch):
        self.n: dict[str, int] = {}
        self.mp = monkeypatch

    def wrap(self, owner, name, key=None, static=False):
        original = getattr(owner, name)
        key = key or name

        def counted(*args, **kwargs):
            self.n[key] = self.n.get(key, 0) + 1
            return original(*args, **kwargs)

        self.mp.setattr(owner, name, staticmethod(counted) if static else counted)


def _count_fit(monkeypatch, capsys, *args) -> dict[str, int]:
    fit_module = importlib.import_module("padim_ooc.fit")  # `padim_ooc.fit` itself is the API function
    extractor_module = importlib.import_module("padim_ooc.extractor")

    counts = Counts(monkeypatch)
    for name in ("open", "create"):  # classmethods: wrap the bound method
        original = getattr(ModelStore, name)
        monkeypatch.setattr(ModelStore, name, classmethod(
            lambda cls, *a, _o=original, _k=name, **kw: (counts.n.__setitem__(_k, counts.n.get(_k, 0) + 1),
                                                         _o.__func__(cls, *a, **kw))[1]))
    counts.wrap(lock, "_try_create", "lock files created")
    counts.wrap(fit_module, "list_images")
    counts.wrap(fit_module, "store_exists")
    counts.wrap(extractor_module.backbones, "build", "backbones built")
    with pytest.raises(SystemExit) as exit_:
        cli.main(list(map(str, args)))
    assert exit_.value.code == 0, capsys.readouterr().err
    json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return counts.n


def test_one_cli_fit_opens_the_store_once_and_takes_the_lock_once(tmp_path, image_dir, monkeypatch, capsys):
    model = tmp_path / "m.zarr"
    small = ("--weights", "none", "--resize", "72", "--crop", "64", "--loader-workers", "0", "--device", "cpu", "-q")
    new = _count_fit(monkeypatch, capsys, "fit", image_dir / "a", "--model", model, *small)
    assert new == {"create": 1, "lock files created": 1, "list_images": 1, "store_exists": 1,
                   "backbones built": 1}, new
    monkeypatch.undo()
    again = _count_fit(monkeypatch, capsys, "fit", image_dir, "--model", model, *small)
    assert again == {"open": 1, "lock files created": 1, "list_images": 1, "store_exists": 1,
                     "backbones built": 1}, again
    assert ModelStore.open(model).n_images == 40 and not lock.held(model)


def test_the_configuration_record():
    cfg = ModelConfig(backbone="resnet18", layers=["layer1", "layer2"], dims=10, seed=3, weights="None",
                      resize=100)
    full = cfg.with_defaults()
    assert full.layers == ("layer1", "layer2") and full.weights == "none" and full.crop == min(DEFAULT_CROP, 100)
    assert full.normalize_mean == (0.485, 0.456, 0.406) and full.dims == 10
    assert ModelConfig().with_defaults().resize == DEFAULT_RESIZE and ModelConfig().with_defaults().crop == DEFAULT_CROP
    back = ModelConfig.from_attrs(json.loads(json.dumps(full.to_attrs() | {"n_images": 7})))
    assert back == full and isinstance(back.layers, tuple)
    # diff: fields both give that differ; None is "not given"
    assert full.diff(ModelConfig(crop=100, resize=120), keys=("crop", "resize")) == ["resize"]
    assert full.diff(ModelConfig(), keys=("crop", "resize", "dims")) == []
    with pytest.raises(po.PadimError, match=r"was fitted with seed=3, not 4; use a new model path"):
        full.check_extends(ModelConfig(seed=4), "m.zarr", keys=("seed",))


def test_the_cli_help_shows_the_records_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["fit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"Square resize in pixels [{DEFAULT_RESIZE}]" in text and f"Centre crop in pixels [{DEFAULT_CROP}]" in text


@pytest.mark.parametrize("record, fields, text", [
    (FitOptions, {"batch_size": 0}, "batch size must be at least 1, got 0"),
    (FitOptions, {"checkpoint_every": 0}, "checkpoint interval must be at least 1 image"),
    (FitOptions, {"on_error": "ignore"}, "--on-error must be skip or fail, not 'ignore'"),
    (FitOptions, {"eps": float("nan")}, "eps must be a finite number >= 0"),
    (FitOptions, {"max_memory": 0}, "the memory budget must be positive"),
    (FitOptions, {"device": "tpu"}, "unknown device 'tpu'"),
    (FitOptions, {"fold": "half"}, "--fold must be float64 or float32, not 'half'"),
    (ScoreOptions, {"sigma": -1.0}, "sigma must be a finite number >= 0"),
    (ScoreOptions, {"loader_workers": -1}, "loader workers must be 0 or more"),
    (Cluster, {"workers": 0}, "--workers must be at least 1"),
    (Cluster, {"workers": 2, "scheduler": "tcp://h:1"}, "not both"),
    (Cluster, {"scheduler": "h:1"}, "expects an address like tcp://HOST:8786"),
])
def test_options_are_checked_where_they_enter(record, fields, text):
    with pytest.raises(po.PadimError) as err:
        record(**fields)
    assert text in str(err.value) and "\n" not in str(err.value)


# ---- a store written by main at 25c2dcc (tests/data): opened, extended, finalized, scored as it is ----

def _features(extractor, paths, batch_size) -> np.ndarray:
    """(P, N, d) float64 features of ``paths``, in batches of ``batch_size`` (as the fit makes them)."""
    x = torch.stack([extractor.preprocess(decode_rgb(p.read_bytes())) for p in paths])
    feats = torch.cat([extractor.embed(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    return feats.flatten(2).permute(2, 0, 1).double().numpy()


def test_a_store_written_by_an_earlier_version(tmp_path):
    path = tmp_path / "old.zarr"
    shutil.copytree(OLD_STORE, path)
    raw = zarr.open_group(str(path), mode="r")  # read with zarr alone, not with our store code
    attrs = dict(raw.attrs["padim_ooc"])
    n0, mean0, m20 = attrs["n_images"], raw[attrs["state"]]["mean"][...], raw[attrs["state"]]["m2"][...]
    prec0 = raw[attrs["final"]]["precision"][...]
    assert attrs["schema_version"] == 1 and n0 == 6 and attrs["grid"] == [8, 8]

    model = po.open_model(path, device="cpu")
    assert model.attrs["channels"] == attrs["channels"] and model.n_images == 6
    # scored as it is: Mahalanobis of its features against its stored precision (numpy float64),
    # upsampled bilinearly (torch's interpolate), no blur: the image score is the maximum
    paths = list_images([OLD_IMAGES])
    f = _features(model.extractor, paths, 4)
    diff = f - raw[attrs["final"]]["mean"][...].astype(np.float64)[:, None, :]
    dist = np.sqrt(np.einsum("pnd,pde,pne->pn", diff, prec0.astype(np.float64), diff)).T.reshape(-1, 1, 8, 8)
    up = torch.nn.functional.interpolate(torch.from_numpy(dist), size=(32, 32), mode="bilinear",
                                         align_corners=False).numpy()
    scores, _ = model.score(paths, sigma=0.0)
    np.testing.assert_allclose(scores, up.reshape(len(paths), -1).max(axis=1), rtol=1e-4)

    # extended: its statistics and 5 new images, merged with Chan's formula in numpy
    new = write_images(tmp_path / "new", 5, seed=21, size=(40, 40))
    run_fit = importlib.import_module("padim_ooc.fit").run_fit
    summary, finalized = run_fit([tmp_path / "new", OLD_IMAGES], path,
                                 FitOptions(batch_size=4, loader_workers=0, device="cpu", eps=0.1))
    assert (summary.added, summary.already_seen, summary.n_images, finalized) == (5, 6, 11, True)
    fn = _features(model.extractor, new, 4)
    nb, mean_b = fn.shape[1], fn.mean(axis=1)
    m2_b = np.einsum("pni,pnj->pij", fn - mean_b[:, None], fn - mean_b[:, None])
    n = n0 + nb
    delta = mean_b - mean0
    mean = mean0 + delta * nb / n
    m2 = m20 + m2_b + np.einsum("pi,pj->pij", delta, delta) * n0 * nb / n
    back = po.open_model(path, device="cpu")
    assert rel(back.mean, mean) <= 1e-10 and rel(back.covariance(), m2 / (n - 1)) <= 1e-10
    # finalized with the new eps: inv(cov + eps I) in numpy
    expected = np.linalg.inv(m2 / (n - 1) + 0.1 * np.eye(8))
    np.testing.assert_allclose(back.store.final_arrays()[1][...], expected, rtol=1e-4,
                               atol=1e-5 * np.abs(expected).max())
    assert back.attrs["eps"] == 0.1 and back.attrs["schema_version"] == 1
    s2, _ = back.score(paths[:2], sigma=4.0)
    assert np.isfinite(s2).all()
