"""``padim-ooc compact``: a scoring-only model (kind scorer) scores, evaluates and calibrates like
its source; fit, merge and finalize refuse it; the schema checks the kind; the write is crash-safe."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

import padim_ooc as po
from padim_ooc.compact import folder_bytes
from padim_ooc.errors import PadimError
from padim_ooc.store import ModelStore

from conftest import cli_error, cli_json, make_mvtec_class, rel

RUN = ["--device", "cpu", "--batch-size", 10, "--loader-workers", 0, "-q"]
# float16 precision against the float32 source, measured on the `fitted` fixture (resnet18 random
# weights, Rd100, 20 images) scoring image_dir/b: image scores 3.0e-5, maps 8.8e-5 relative
# (rel: max |a - b| / max |b|); the bounds are 3-5x that
FLOAT16_SCORES = 1e-4
FLOAT16_MAPS = 4e-4


@pytest.fixture(scope="module")
def scorers(fitted, tmp_path_factory):
    """The float32 and float16 scorers of ``fitted`` (written with the API), and their results."""
    root = tmp_path_factory.mktemp("scorers")
    s32 = po.compact(fitted, root / "s32.zarr")
    s16 = po.compact(fitted, root / "s16.zarr", float16=True)
    return root / "s32.zarr", root / "s16.zarr", s32, s16


def _score(capsys, model, data, out):
    cli_json(capsys, "score", model, data, "--out", out, "--maps", *RUN)
    return (out / "scores.csv").read_text(), zarr.open_array(str(out / "maps.zarr"), mode="r")[...]


def test_float32_scorer_scores_exactly_like_its_source(fitted, scorers, image_dir, tmp_path, capsys):
    s32 = scorers[0]
    csv_src, maps_src = _score(capsys, fitted, image_dir / "b", tmp_path / "src")
    csv_s32, maps_s32 = _score(capsys, s32, image_dir / "b", tmp_path / "s32")
    assert csv_s32 == csv_src and np.array_equal(maps_s32, maps_src)
    assert sorted(os.listdir(tmp_path / "s32")) == sorted(os.listdir(tmp_path / "src"))
    store = ModelStore.open(s32)
    assert store.is_scorer and store.attrs["precision_dtype"] == "float32"
    assert store.attrs["final"] == ModelStore.open(fitted).attrs["final"]
    assert sorted(os.listdir(s32)) == [store.attrs["final"], "zarr.json"]  # no state, ledger or cache


def test_float16_scorer_error_and_sizes(fitted, fitted_model, scorers, image_dir):
    s32, s16, r32, r16 = scorers
    paths = sorted((image_dir / "b").glob("*.png"))
    ref_scores, ref_maps = fitted_model.score(paths, batch_size=10)
    scores, maps = po.open_model(s16, device="cpu", extractor=fitted_model.extractor).score(paths, batch_size=10)
    err_scores, err_maps = rel(scores, ref_scores), rel(maps, ref_maps)
    print(f"float16 scorer: score error {err_scores:.2e}, map error {err_maps:.2e}")
    assert 0 < err_scores < FLOAT16_SCORES and err_maps < FLOAT16_MAPS
    prec = ModelStore.open(s16).final_arrays()[1]
    assert str(prec.dtype) == "float16"
    # sizes: the source holds m2 (float64) and the final float32 precision; the scorer the latter only
    src, b32, b16 = folder_bytes(str(fitted)), folder_bytes(str(s32)), folder_bytes(str(s16))
    print(f"bytes: source {src}, scorer {b32}, float16 scorer {b16}")
    assert (r32["model_bytes"], r32["out_bytes"], r16["out_bytes"]) == (src, b32, b16)
    assert b32 < src / 2.5 and b16 < b32 * 0.55


def test_fit_merge_finalize_refuse_a_scorer(scorers, fitted, image_dir, tmp_path, capsys):
    s32 = scorers[0]
    before = (Path(s32) / "zarr.json").read_bytes()
    cli_error(capsys, "fit", image_dir / "b", "--model", s32, *RUN, text="scoring-only model (padim-ooc compact): "
              "it holds no statistics to extend")
    cli_error(capsys, "finalize", s32, text="no statistics to finalize")
    cli_error(capsys, "merge", s32, "--model", tmp_path / "out.zarr", text="no statistics to merge")
    assert not (tmp_path / "out.zarr").exists()
    part = tmp_path / "part.zarr"
    shutil.copytree(fitted, part)
    cli_error(capsys, "merge", part, "--model", s32, text="no statistics to merge")
    assert (Path(s32) / "zarr.json").read_bytes() == before
    with pytest.raises(PadimError, match="no statistics to read"):
        po.open_model(s32).covariance()


def test_compact_refuses_unfinalized_existing_out_and_scorer(scorers, image_dir, extractor, tmp_path, capsys):
    s32 = scorers[0]
    raw = tmp_path / "raw.zarr"
    po.fit([image_dir / "b"], raw, extractor=extractor, finalize=False, batch_size=10, loader_workers=0)
    cli_error(capsys, "compact", raw, "--out", tmp_path / "x.zarr", text="not finalized")
    (tmp_path / "taken").mkdir()
    cli_error(capsys, "compact", s32, "--out", tmp_path / "taken", text="exists")
    cli_error(capsys, "compact", s32, "--out", tmp_path / "y.zarr", text="scoring-only model already")
    assert sorted(os.listdir(tmp_path)) == ["raw.zarr", "taken"]


def test_failed_compact_leaves_nothing(fitted, tmp_path, monkeypatch):
    mod = sys.modules["padim_ooc.compact"]  # the module: `padim_ooc.compact` is the function

    def broken(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mod, "_copy_final", broken)
    with pytest.raises(PadimError, match="cannot write the scorer .*No space left"):
        po.compact(fitted, tmp_path / "s.zarr")
    assert os.listdir(tmp_path) == []


def test_info_and_schema_of_a_scorer(scorers, fitted, tmp_path, capsys):
    s16 = scorers[1]
    info = cli_json(capsys, "info", s16)
    assert info["kind"] == "scorer" and "scoring-only" in info["scorer"] and info["precision_dtype"] == "float16"
    assert cli_json(capsys, "info", fitted)["kind"] == "model"

    def tampered(src, name, **changes):
        path = tmp_path / name
        shutil.copytree(src, path)
        meta = json.loads((path / "zarr.json").read_text())
        meta["attributes"]["padim_ooc"].update(changes)
        (path / "zarr.json").write_text(json.dumps(meta))
        return path

    state = ModelStore.open(fitted).attrs["state"]
    for name, src, changes, text in [
        ("a", s16, {"state": state}, "attribute 'state'"),
        ("b", s16, {"ledger": ["000001"]}, "attribute 'ledger'"),
        ("c", s16, {"precision_dtype": "int8"}, "attribute 'precision_dtype'"),
        ("d", s16, {"kind": "toy"}, "attribute 'kind'"),
        ("e", s16, {"final": None, "finalized": False}, "attribute 'final'"),
        ("f", fitted, {"precision_dtype": "float16"}, "float16: scoring-only models"),
    ]:
        cli_error(capsys, "info", tampered(src, name, **changes), text=text)
    # the attributes say float16, the array is float32 (or the other way round): damaged
    with pytest.raises(PadimError, match="has dtype float16, expected float32"):
        ModelStore.open(tampered(s16, "g", precision_dtype="float32")).final_arrays()


def test_calibrate_and_evaluate_a_scorer(extractor, tmp_path, capsys):
    """The scorer is calibrated and evaluated as its source is: the same thresholds and metrics."""
    root = make_mvtec_class(tmp_path / "cls", n_train=12, n_good=4, n_defect=3)
    model = tmp_path / "m.zarr"
    po.fit([root / "train" / "good"], model, extractor=extractor, batch_size=10, loader_workers=0)
    scorer = tmp_path / "s.zarr"
    cli_json(capsys, "compact", model, "--out", scorer)
    results = []
    for m in (model, scorer):
        cal = cli_json(capsys, "calibrate", m, root, "--labelled", "--rule", "f1", *RUN)
        ev = cli_json(capsys, "evaluate", m, root, "--out", tmp_path / f"ev-{m.name}", *RUN)
        results.append((cal, ev))
    (cal_m, ev_m), (cal_s, ev_s) = results
    assert cal_s.pop("model") != cal_m.pop("model") and cal_s == cal_m and ev_s["image_auroc"] == ev_m["image_auroc"] and ev_s["pro"] == ev_m["pro"]
    assert ev_s["decision"] == ev_m["decision"]
    assert ModelStore.open(scorer).is_scorer  # calibrating kept its kind
    # a conformal calibration on normal files: the scorer keeps no ledger, so nothing is left out
    cli_json(capsys, "calibrate", scorer, root / "test" / "good", "--fpr", 0.25, *RUN)
    assert ModelStore.open(scorer).calibration().rule != "f1"


def test_export_a_float16_scorer(scorers, fitted_model, image_dir, tmp_path):
    """``export`` takes a scorer: its graph scores as the scorer does (float16 precision widened)."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from padim_ooc.export.exporter import export_model
    from padim_ooc.export.runtime import Scorer

    export_model(scorers[1], tmp_path / "exp")
    paths = sorted((image_dir / "b").glob("*.png"))[:6]
    ref, _ = po.open_model(scorers[1], device="cpu", extractor=fitted_model.extractor).score(paths)
    assert rel(Scorer(str(tmp_path / "exp")).score(paths)["scores"], ref) < 1e-5  # the export's own noise


def test_orthogonal_scorer_keeps_its_projection(image_dir, tmp_path):
    """An orthogonal model's scorer carries ``embedding/projection`` (scoring projects with it)."""
    ex = po.Extractor("resnet18", weights=None, seed=0, resize=72, crop=64, device="cpu", embedding="orthogonal")
    model = po.fit([image_dir / "a"], tmp_path / "o.zarr", extractor=ex, batch_size=10, loader_workers=0)
    po.compact(tmp_path / "o.zarr", tmp_path / "s.zarr")
    assert sorted(os.listdir(tmp_path / "s.zarr")) == ["embedding", model.attrs["final"], "zarr.json"]
    paths = sorted((image_dir / "b").glob("*.png"))[:5]
    scores, maps = po.open_model(tmp_path / "s.zarr", device="cpu").score(paths)
    ref_scores, ref_maps = model.score(paths)
    assert np.array_equal(scores, ref_scores) and np.array_equal(maps, ref_maps)


def test_float16_overflow_is_refused(tmp_path, capsys):
    """A precision entry above float16's 65504 (tiny variances, eps 0) is one line, nothing written."""
    from conftest import synthetic
    from padim_ooc.finalize import finalize

    x = np.random.default_rng(0).normal(scale=1e-4, size=(15, 6, 4))
    with synthetic(tmp_path / "m.zarr", x, [bytes([i]) * 16 for i in range(6)]) as store:
        finalize(store, eps=0.0, scheduler="synchronous")
    cli_error(capsys, "compact", tmp_path / "m.zarr", "--out", tmp_path / "s.zarr", "--float16",
              text="overflows float16")
    assert sorted(os.listdir(tmp_path)) == ["m.zarr"]
    cli_json(capsys, "compact", tmp_path / "m.zarr", "--out", tmp_path / "s.zarr")  # float32 holds it
