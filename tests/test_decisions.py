"""Decisions on the command line and through the pipelines: fit --holdout, calibrate, score on a
calibrated model (p-values, labels, PNG masks and overlays), staleness, one-line errors.

Checked against independent computations: the hold-out set from the file bytes (BLAKE2b, numpy-free
integer arithmetic), p-values and thresholds by sorting and counting, masks against the float32 maps
of ``Model.score`` and the float16 maps of ``--maps``.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

import padim_ooc as po
from padim_ooc.store import ModelStore

from conftest import CROP, RESIZE, cli_error, cli_json, fit_summary, make_mvtec_class, write_images

FIT = ["--weights", "none", "--resize", RESIZE, "--crop", CROP, "--batch-size", 10, "--loader-workers", 0, "-q"]
RUN = ["--batch-size", 10, "--loader-workers", 0, "-q"]


def selected(path, fraction) -> bool:
    """The hold-out rule, written out: the first 8 bytes of the 16-byte BLAKE2b of the file, as a
    big-endian integer, below fraction * 2**64."""
    key = hashlib.blake2b(path.read_bytes(), digest_size=16).digest()
    return int.from_bytes(key[:8], "big") < fraction * 2 ** 64


def digest(path) -> bytes:
    return hashlib.blake2b(path.read_bytes(), digest_size=16).digest()


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, image_dir):
    """A model fitted by the CLI on image_dir (40 images) holding out half of them, calibrated at
    alpha = 0.2 after the fit; (path, the fit's JSON)."""
    from padim_ooc import cli

    path = tmp_path_factory.mktemp("cal") / "m.zarr"
    with pytest.raises(SystemExit) as exc:
        cli.main([str(a) for a in ["fit", image_dir, "--model", path, "--holdout", 0.5, "--fpr", 0.2, *FIT]])
    assert exc.value.code == 0
    return path


def test_holdout_is_chosen_by_content_in_every_fit(tmp_path, image_dir, extractor):
    """The same images are held out by a fit, by an incremental fit over two calls (a resumed one
    sees the same), by a repeated fit, and by a sharded fit on a cluster (3 shards on one in-process worker: FX tracing of two
    backbones at once in one process is not thread-safe); none of them is in the
    statistics, and every other image is."""
    from distributed import Client, LocalCluster

    files = sorted(image_dir.rglob("*.png"))
    want = {digest(p) for p in files if selected(p, 0.3)}
    assert 0 < len(want) < len(files)

    one = fit_summary([image_dir], tmp_path / "one.zarr", extractor, batch_size=10, loader_workers=0, holdout=0.3)
    assert {k for _, k in one.held_out} == want
    assert ModelStore.open(tmp_path / "one.zarr").ledger() == {digest(p) for p in files} - want

    half = fit_summary(files[:17], tmp_path / "inc.zarr", extractor, batch_size=10, loader_workers=0, holdout=0.3)
    rest = fit_summary(files, tmp_path / "inc.zarr", extractor, batch_size=10, loader_workers=0, holdout=0.3)
    assert {k for _, k in half.held_out} | {k for _, k in rest.held_out} == want
    assert rest.already_seen == len(files[:17]) - len(half.held_out)
    store = ModelStore.open(tmp_path / "inc.zarr")
    assert store.ledger() == {digest(p) for p in files} - want
    assert {bytes.fromhex(k) for _, k in store.attrs["holdout"]["images"]} == want  # the record keeps all

    again = fit_summary(files, tmp_path / "inc.zarr", extractor, batch_size=10, loader_workers=0, holdout=0.3)
    assert again.added == 0 and {k for _, k in again.held_out} == want

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as lc, \
            Client(lc) as client:
        sharded = fit_summary([image_dir], tmp_path / "sh.zarr", extractor, client=client, shards=3, batch_size=5,
                              holdout=0.3)
    assert sorted(k for _, k in sharded.held_out) == sorted(want)
    assert ModelStore.open(tmp_path / "sh.zarr").ledger() == {digest(p) for p in files} - want


def test_fit_calibrates_on_its_holdout(calibrated, image_dir):
    """The threshold is the ceil((n + 1)(1 - alpha))-th smallest score of the held-out images, scored
    with the finalized model (an independent sort of scores from ``Model.score``)."""
    files = sorted(image_dir.rglob("*.png"))
    held = [p for p in files if selected(p, 0.5)]
    store = ModelStore.open(calibrated)
    cal = store.calibration()
    assert cal.rule == "conformal" and cal.alpha == 0.2 and cal.n == len(held) and not cal.stale
    assert store.n_images == len(files) - len(held)
    model = po.open_model(calibrated, device="cpu")
    scores, _ = model.score(held, batch_size=10)
    k = math.ceil((len(held) + 1) * (1 - 0.2))
    assert cal.threshold == pytest.approx(float(np.sort(scores)[k - 1]), rel=1e-6)
    assert np.allclose(cal.scores, np.sort(scores), rtol=1e-6)


def test_score_writes_p_values_labels_masks_overlays(tmp_path, calibrated, image_dir, capsys):
    """scores.csv: p = (1 + #{calibration >= s}) / (n + 1), label = s > threshold; a mask PNG per
    anomalous image equal to map > threshold (the float32 maps of Model.score, and the float16
    maps of --maps away from the threshold); an overlay per image with the contour drawn."""
    write_images(tmp_path / "new", 12, seed=7)
    bright = write_images(tmp_path / "new", 3, seed=8, start=50)
    for p in bright:  # defects: bright squares
        img = np.asarray(Image.open(p)).copy()
        img[20:45, 20:45] = 255
        Image.fromarray(img).save(p)
    out = tmp_path / "out"
    result = cli_json(capsys, "score", calibrated, tmp_path / "new", "--out", out, "--maps", "--masks",
                      "--overlays", "all", *RUN)
    cal = ModelStore.open(calibrated).calibration()
    rows = read_csv(out / "scores.csv")
    assert list(rows[0]) == ["path", "score", "p_value", "label", "mask", "overlay"]
    s = np.array([float(r["score"]) for r in rows])
    ref = np.array(cal.scores)
    p = np.array([(1 + np.count_nonzero(ref >= v)) / (ref.size + 1) for v in s])
    assert np.array_equal(np.array([float(r["p_value"]) for r in rows]), p)
    assert [r["label"] for r in rows] == ["anomalous" if v > cal.threshold else "normal" for v in s]
    assert result["anomalous"] == int((s > cal.threshold).sum()) >= 3 and result["threshold"] == cal.threshold

    model = po.open_model(calibrated, device="cpu")
    paths = sorted(tmp_path.joinpath("new").iterdir())
    scores, maps = model.score(paths, batch_size=10)
    assert np.allclose(scores, s, rtol=1e-6)
    stored = zarr.open_array(str(out / "maps.zarr"), mode="r")[:]
    for i, (r, path) in enumerate(zip(rows, paths)):
        assert r["overlay"] == f"overlays/{i:06d}_{path.stem}.png"
        view = np.asarray(Image.open(out / r["overlay"]))
        assert view.shape == (CROP, CROP, 3)
        if r["label"] == "normal":
            assert r["mask"] == "" and not (maps[i] > cal.threshold).any()
            continue
        assert r["mask"] == f"masks/{i:06d}_{path.stem}.png"
        mask = np.asarray(Image.open(out / r["mask"])) > 0
        assert mask.any() and np.array_equal(mask, maps[i] > cal.threshold)
        near = np.abs(stored[i].astype(np.float32) - cal.threshold) <= 0.01 * cal.threshold  # float16 rounding
        assert np.array_equal(mask[~near], (stored[i] > cal.threshold)[~near])
        assert (view == (0, 255, 255)).all(axis=2).any()  # the mask's contour
    assert sorted(x.name for x in (out / "masks").iterdir()) == sorted(
        r["mask"].split("/")[1] for r in rows if r["mask"])


def test_score_on_a_cluster_decides_the_same(tmp_path, calibrated, image_dir):
    """Sharded scoring (a distributed cluster, shards of 5) writes the same labels and masks."""
    from distributed import Client, LocalCluster

    from padim_ooc.api import run_score
    from padim_ooc.data import list_images
    from padim_ooc.options import Cluster, ScoreOptions
    from padim_ooc.outputs import ScoreWriter

    store = ModelStore.open(calibrated)
    paths = list_images([image_dir / "b"])
    outs = {}
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as lc, \
            Client(lc) as client:
        for name, cluster in (("here", Cluster()), ("cluster", Cluster(client=client))):
            options = ScoreOptions(batch_size=5, loader_workers=0, masks=True, overlays="anomalous", cluster=cluster)
            with ScoreWriter(tmp_path / name, paths, crop=CROP, resize=RESIZE, calibration=store.calibration(),
                             masks=True, overlays="anomalous") as writer:
                run_score(store, paths, options, writer)
            outs[name] = read_csv(tmp_path / name / "scores.csv")
    here, there = outs["here"], outs["cluster"]
    assert [r["label"] for r in here] == [r["label"] for r in there] and any(r["mask"] for r in here)
    for a, b in zip(here, there):
        assert a["mask"] == b["mask"] and a["overlay"] == b["overlay"]
        if a["mask"]:
            ma = np.asarray(Image.open(tmp_path / "here" / a["mask"]))
            mb = np.asarray(Image.open(tmp_path / "cluster" / b["mask"]))
            assert np.array_equal(ma, mb)


def test_uncalibrated_model_keeps_path_score(tmp_path, fitted, image_dir, capsys):
    out = tmp_path / "out"
    result = cli_json(capsys, "score", fitted, image_dir / "b", "--out", out, *RUN)
    assert "anomalous" not in result
    assert list(read_csv(out / "scores.csv")[0]) == ["path", "score"]
    cli_error(capsys, "score", fitted, image_dir / "b", "--out", tmp_path / "o2", "--masks", *RUN,
              text="--masks needs a calibrated model")
    assert not (tmp_path / "o2").exists()


@pytest.mark.parametrize("value, text", [("0", "between 0 and 1"), ("1", "between 0 and 1"),
                                         ("nan", "between 0 and 1"), ("abc", "valid number")])
def test_bad_fpr_is_one_line(tmp_path, fitted, image_dir, capsys, value, text):
    cli_error(capsys, "calibrate", fitted, image_dir / "b", "--fpr", value, *RUN, text=text)
    cli_error(capsys, "fit", image_dir / "b", "--model", tmp_path / "x.zarr", "--holdout", "0.2", "--fpr", value,
              *FIT, text=text)
    assert not (tmp_path / "x.zarr").exists()


def test_other_bad_options_are_one_line(tmp_path, fitted, image_dir, capsys):
    cli_error(capsys, "fit", image_dir / "b", "--model", tmp_path / "x.zarr", "--holdout", "1", *FIT,
              text="--holdout must be")
    cli_error(capsys, "score", fitted, image_dir / "b", "--out", tmp_path / "o", "--overlays", "some", *RUN,
              text="--overlays must be all or anomalous")
    cli_error(capsys, "calibrate", fitted, *RUN, text="has no held-out images")
    cli_error(capsys, "calibrate", fitted, image_dir / "b", "--labelled", "--rule", "best", *RUN,
              text="unknown calibration rule")
    # 20 images allow alpha >= 1/21: alpha = 0.01 needs 99, and the message says both
    err = cli_error(capsys, "calibrate", fitted, image_dir / "b", "--fpr", "0.01", *RUN, text="needs at least 99")
    assert "0.04762" in err


def test_calibrate_on_files_counts_skips_and_leaves_out_fitted_images(tmp_path, fitted, image_dir, capsys):
    """Normal images: an unreadable one is a counted skip, those the model was fitted on are left out,
    and the threshold is the conformal rank of the others' scores."""
    model = tmp_path / "m.zarr"
    shutil.copytree(fitted, model)
    data = tmp_path / "cal"
    shutil.copytree(image_dir / "b", data)
    (data / "broken.png").write_bytes(b"not a png")
    shutil.copy(image_dir / "a" / "img0000.png", data / "seen.png")  # in the statistics
    result = cli_json(capsys, "calibrate", model, data, "--fpr", 0.1, *RUN)
    assert result["skipped"] == 1 and result["in_model"] == 1 and result["n"] == 20
    cal = ModelStore.open(model).calibration()
    scores, _ = po.open_model(model, device="cpu").score(sorted((image_dir / "b").iterdir()), batch_size=10)
    assert cal.threshold == pytest.approx(float(np.sort(scores)[math.ceil(21 * 0.9) - 1]), rel=1e-6)
    from padim_ooc import cli

    with pytest.raises(SystemExit):
        cli.main(["info", str(model)])
    shown = json.loads(capsys.readouterr().out)["calibration"]
    assert shown["status"] == "current" and shown["n"] == 20 and shown["scores"]["count"] == 20


def test_changed_statistics_make_the_calibration_stale_or_recalibrate(tmp_path, calibrated, image_dir, capsys):
    """finalize with another eps or a fit on a model calibrated on its hold-out calibrates it again on
    those images; a calibration made on files is marked stale instead (info and score say so)."""
    model = tmp_path / "m.zarr"
    shutil.copytree(calibrated, model)
    before = ModelStore.open(model).calibration()
    assert cli_json(capsys, "finalize", model, "--eps", "0.05")["calibration_stale"] is False
    after = ModelStore.open(model).calibration()
    held = [Path(p) for p, _ in ModelStore.open(model).attrs["holdout"]["images"]]
    scores, _ = po.open_model(model, device="cpu").score(held)  # the held-out images, scored by the new precision
    np.testing.assert_allclose(sorted(after.scores), np.sort(scores), rtol=1e-6)
    assert after.n == before.n == len(held) and after.threshold != before.threshold
    result = cli_json(capsys, "calibrate", model, *RUN)  # again on the stored hold-out, same alpha
    assert result["status"] == "calibrated" and result["alpha"] == 0.2 and not result["stale"]

    extra = write_images(tmp_path / "extra", 6, seed=11)
    fit = cli_json(capsys, "fit", tmp_path / "extra", "--model", model, *FIT)  # the record re-calibrates
    assert fit["calibration"]["status"] == "calibrated" and not ModelStore.open(model).calibration().stale
    assert fit["added"] == len(extra) and fit["calibration"]["n"] == result["n"]  # no --holdout: all folded in

    cli_json(capsys, "calibrate", model, image_dir / "b", "--fpr", 0.2, *RUN)  # calibrated on files: not the record
    write_images(tmp_path / "more", 4, seed=12)
    cli_json(capsys, "fit", tmp_path / "more", "--model", model, *FIT)
    assert ModelStore.open(model).calibration().stale
    from padim_ooc import cli

    with pytest.raises(SystemExit):
        cli.main(["info", str(model)])
    assert json.loads(capsys.readouterr().out)["calibration"]["status"].startswith("stale")
    code_out = cli_json(capsys, "score", model, image_dir / "b", "--out", tmp_path / "o", *RUN)
    assert code_out["calibration_stale"] is True


def test_a_finalize_whose_held_out_files_are_gone_leaves_the_calibration_stale(tmp_path, capsys):
    write_images(tmp_path / "imgs", 24, seed=13)
    model = tmp_path / "m.zarr"
    cli_json(capsys, "fit", tmp_path / "imgs", "--model", model, "--holdout", 0.5, "--fpr", 0.2, *FIT)
    for path, _ in ModelStore.open(model).attrs["holdout"]["images"]:
        os.unlink(path)
    assert cli_json(capsys, "finalize", model, "--eps", "0.05")["calibration_stale"] is True
    assert ModelStore.open(model).calibration().stale


def test_labelled_calibration_on_a_class_folder(tmp_path, extractor, capsys):
    """--labelled --rule recall:1.0: the highest threshold that flags every defective test image;
    with masks a pixel threshold too; evaluate reports the decision at it."""
    root = make_mvtec_class(tmp_path / "cls")
    model = tmp_path / "m.zarr"
    po.fit([root / "train" / "good"], model, extractor=extractor, batch_size=10, loader_workers=0)
    result = cli_json(capsys, "calibrate", model, root, "--labelled", "--rule", "recall:1.0", *RUN)
    assert result["rule"] == "recall:1.0" and result["pixel_threshold"] is not None
    ev = cli_json(capsys, "evaluate", model, root, "--out", tmp_path / "ev", *RUN[:4])
    rows = read_csv(tmp_path / "ev" / "scores.csv")
    s = np.array([float(r["score"]) for r in rows])
    bad = np.array([r["label"] == "1" for r in rows])
    thr = result["threshold"]
    assert (s[bad] > thr).all() and thr == pytest.approx(s[s < s[bad].min()].max(), rel=1e-6)
    d = ev["decision"]
    assert d["recall"] == 1.0 and d["fp"] == int((s[~bad] > thr).sum())
    assert d["false_alarm_rate"] == d["fp"] / (~bad).sum()
    assert "calibrated" in (tmp_path / "ev" / "report.html").read_text()


def test_masks_and_overlays_into_an_fsspec_url(calibrated, image_dir, capsys):
    """--masks and --overlays write through fsspec like scores.csv (a memory:// URL here)."""
    import fsspec

    out = "memory://decisions-out"
    result = cli_json(capsys, "score", calibrated, image_dir / "b", "--out", out, "--masks", "--overlays",
                      "anomalous", *RUN)
    fs = fsspec.filesystem("memory")
    with fs.open("/decisions-out/scores.csv", "r") as f:
        rows = list(csv.DictReader(f))
    flagged = [r for r in rows if r["label"] == "anomalous"]
    assert flagged and len(flagged) == result["anomalous"] and all(r["mask"] and r["overlay"] for r in flagged)
    for r in flagged:
        with fs.open(f"/decisions-out/{r['mask']}", "rb") as f:
            assert (np.asarray(Image.open(f)) > 0).any()
    assert all(not r["mask"] and not r["overlay"] for r in rows if r["label"] == "normal")


@pytest.mark.slow  # two interpreter starts (about 20 s on 2 busy cores); the content rule is checked above too
def test_holdout_is_the_same_after_a_killed_fit_is_resumed(tmp_path, image_dir):
    """A fit killed after its first checkpoint (the PADIM_OOC_PAUSE_AT hook stops it there), then
    run again: the hold-out record and the statistics' ledger are those of the content rule."""
    import os
    import subprocess
    import sys
    import time

    model, marker = tmp_path / "m.zarr", tmp_path / "paused"
    args = [sys.executable, "-m", "padim_ooc", "fit", str(image_dir / "a"), "--model", str(model), "--holdout", "0.3",
            "--fpr", "0.5", "--checkpoint-every", "5", "--batch-size", "5", "--weights", "none", "--resize",
            str(RESIZE), "--crop", str(CROP), "--loader-workers", "0", "-q"]
    env = dict(os.environ, PADIM_OOC_PAUSE_AT="checkpoint-switched:1", PADIM_OOC_PAUSE_FILE=str(marker))
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (marker.exists() and marker.read_text().endswith("\n")):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    killed = ModelStore.open(model)
    assert 0 < killed.n_images < 20 and killed.attrs.get("holdout") is None  # stopped mid-fit
    env.pop("PADIM_OOC_PAUSE_AT")
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    files = sorted((image_dir / "a").glob("*.png"))
    want = {digest(p) for p in files if selected(p, 0.3)}
    assert want
    store = ModelStore.open(model)
    assert {bytes.fromhex(k) for _, k in store.attrs["holdout"]["images"]} == want
    assert store.ledger() == {digest(p) for p in files} - want
    assert store.calibration().n == len(want) and json.loads(done.stdout)["held_out"] == len(want)


def test_python_api_calibrates_and_decides(tmp_path, calibrated, image_dir):
    """calibrate_model on the stored hold-out at another alpha; Model.calibration labels scores."""
    model = tmp_path / "m.zarr"
    shutil.copytree(calibrated, model)
    result = po.calibrate_model(model, fpr=0.5, loader_workers=0, batch_size=10)
    cal = po.open_model(model, device="cpu").calibration
    assert result["alpha"] == cal.alpha == 0.5 and cal.n == result["n"]
    k = math.ceil((cal.n + 1) * 0.5)
    assert cal.threshold == cal.scores[k - 1]
    scores, _ = po.score_files(model, [image_dir / "b"], batch_size=10, loader_workers=0)
    assert list(cal.labels(scores)) == ["anomalous" if s > cal.threshold else "normal" for s in scores]
    with pytest.raises(po.PadimError, match="between 0 and 1"):
        po.calibrate_model(model, fpr=1.0)


def test_too_few_held_out_images_keep_the_fit_and_say_what_to_do(tmp_path, image_dir, capsys):
    """alpha = 0.01 (the default) needs 99 held-out images: the fit is saved, the error is one line
    naming the smallest alpha they allow, and `calibrate M --fpr A` then uses the stored hold-out."""
    model = tmp_path / "m.zarr"
    files = sorted((image_dir / "a").glob("*.png"))
    n = sum(selected(p, 0.5) for p in files)
    err = cli_error(capsys, "fit", image_dir / "a", "--model", model, "--holdout", 0.5, *FIT,
                    text="is fitted but not calibrated: alpha=0.01 needs at least 99")
    assert f"1/(n+1) = {1 / (n + 1):.4g}" in err
    store = ModelStore.open(model)
    assert store.attrs["finalized"] and store.calibration() is None and len(store.attrs["holdout"]["images"]) == n
    result = cli_json(capsys, "calibrate", model, "--fpr", 0.5, *RUN)
    assert result["status"] == "calibrated" and result["n"] == n
