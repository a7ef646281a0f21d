"""The command line end to end, as a user runs it (real subprocesses, real files)."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import zarr

from padim_ooc.data import list_images

from conftest import run_cli as run

SMALL = ["--weights", "none", "--resize", "72", "--crop", "64", "--loader-workers", "0", "-q"]


def assert_one_line_error(proc, text):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and text in lines[0]


def test_fit_info_score(tmp_path, image_dir):
    model = tmp_path / "m.zarr"
    out = json.loads(run("fit", image_dir / "a", "--model", model, *SMALL, "--batch-size", "8",
                         "--checkpoint-every", "5").stdout)
    assert out["added"] == 20 and out["n_images"] == 20 and out["finalized"]
    info = json.loads(run("info", model).stdout)
    assert info["backbone"] == "resnet18" and info["dims"] == 100 and info["grid"] == [16, 16]
    assert info["n_images"] == 20 and info["finalized"] is True and len(info["channels"]) == 100
    # incremental: only the 20 new images are added
    out = json.loads(run("fit", image_dir, "--model", model, "--loader-workers", "0", "-q").stdout)
    assert out["added"] == 20 and out["already_seen"] == 20 and out["n_images"] == 40
    res = json.loads(run("score", model, image_dir / "b", "--out", tmp_path / "out", "--maps",
                         "--loader-workers", "0", "-q").stdout)
    assert res["scored"] == 20
    with open(tmp_path / "out" / "scores.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "score"]
    assert [r[0] for r in rows[1:]] == [str(p) for p in list_images([image_dir / "b"])]
    scores = np.array([float(r[1]) for r in rows[1:]])
    assert np.isfinite(scores).all() and (scores > 0).all()
    maps = zarr.open_array(str(tmp_path / "out" / "maps.zarr"), mode="r")
    assert maps.shape == (20, 64, 64) and maps.dtype == np.float16
    np.testing.assert_allclose(maps[...].reshape(20, -1).max(axis=1), scores, rtol=2e-3)


def test_missing_and_empty_inputs(tmp_path):
    assert_one_line_error(run("fit", tmp_path / "nope", "--model", tmp_path / "m.zarr", *SMALL, ok=False),
                          "input not found")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run("fit", tmp_path / "empty", "--model", tmp_path / "m.zarr", *SMALL, ok=False),
                          "no images found")
    assert not (tmp_path / "m.zarr").exists()
    assert_one_line_error(run("info", tmp_path / "nope.zarr", ok=False), "model not found")


def test_different_configuration_refused(tmp_path, image_dir):
    model = tmp_path / "m.zarr"
    run("fit", image_dir / "a", "--model", model, *SMALL, "--no-finalize")
    assert_one_line_error(run("fit", image_dir / "b", "--model", model, *SMALL, "--seed", "3", ok=False),
                          "seed")
    proc = run("score", model, image_dir / "b", "--out", tmp_path / "o", ok=False)
    assert_one_line_error(proc, "not finalized")


@pytest.mark.parametrize("args", [["--help"], ["fit", "--help"], ["score", "--help"]])
def test_help(args):
    out = run(*args).stdout
    assert "Usage" in out
